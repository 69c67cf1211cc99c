"""quant: the pass as users run it (--quant, --min-cosine, --calibration-data), budget included.
The float16 conversion's own rules are tested in test_quant_fp16.py."""

import os

import numpy as np
import onnx
import pytest

import onnxopt
from models.builders import from_text, ops, run

MLP = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x) => (float[N,3] y)
    <float[4,8] w1 = {W1}, float[8] b1 = {B1}, float[8,3] w2 = {W2}> {
        h = MatMul(x, w1)
        a = Add(h, b1)
        r = Relu(a)
        y = MatMul(r, w2)
    }"""


def values(shape, seed) -> str:
    return ", ".join(f"{v:.4f}" for v in np.random.default_rng(seed).standard_normal(shape).ravel())


def mlp() -> onnx.ModelProto:
    return from_text(MLP.replace("{W1}", "{" + values((4, 8), 0) + "}").replace("{B1}", "{" + values(8, 1) + "}")
                     .replace("{W2}", "{" + values((8, 3), 2) + "}"))


def test_fp16_converts_and_keeps_the_io_types():
    result = onnxopt.optimize(mlp(), passes=["quant"], quant="fp16")
    assert result.passes[0].counts == {"nodes_to_fp16": 4, "constants_to_fp16": 3, "casts_inserted": 2}
    out = result.model
    assert ops(out) == ["Cast", "MatMul", "Add", "Relu", "MatMul", "Cast"]
    assert {t.data_type for t in out.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    (metrics,) = result.verification["outputs"]
    assert metrics["ok"] and metrics["cosine"] >= 0.999
    x = {"x": np.random.default_rng(5).standard_normal((7, 4)).astype(np.float32)}
    assert run(out, x)["y"].dtype == np.float32


def test_fp16_idempotent():
    once = onnxopt.optimize(mlp(), passes=["quant"], quant="fp16").model
    again = onnxopt.optimize(once, passes=["quant"], quant="fp16")
    assert again.passes[0].counts == {} and ops(again.model) == ops(once)


def test_a_result_outside_the_budget_is_not_written(tmp_path):
    """1e-9 underflows to 0 in float16: every output becomes 0, cosine 0."""
    model = from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) <float[3] s = {1e-9, 2e-9, 3e-9}> { y = Mul(x, s) }""")
    out = tmp_path / "out.onnx"
    with pytest.raises(onnxopt.VerificationError, match=r"missed the error budget \(cosine >= 0.999\): 'y' cosine 0"):
        onnxopt.optimize(model, out, passes=["quant"], quant="fp16")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_min_cosine_sets_the_budget():
    result = onnxopt.optimize(mlp(), passes=["quant"], quant="fp16", min_cosine=0.5)
    assert result.verification["outputs"][0]["ok"]
    with pytest.raises(onnxopt.UsageError, match="bad --min-cosine 1.5"):
        onnxopt.optimize(mlp(), passes=["quant"], quant="fp16", min_cosine=1.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"passes": ["quant"]}, "the quant pass needs --quant MODE"),
    ({"passes": ["fold"], "quant": "fp16"}, "--quant fp16 needs the quant pass in --passes"),
    ({"passes": ["quant"], "quant": "int2"},
     "bad --quant int2: expected one of fp16, mixed, dynamic, static, int8, int4"),
])
def test_usage_errors(kwargs, message):
    with pytest.raises(onnxopt.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        onnxopt.optimize(mlp(), verify="none", **kwargs)


def test_calibration_data_from_npz_and_folder(tmp_path):
    """An .npz with the samples along the first axis, or a folder with one sample per file; the
    held-back last quarter verifies the result."""
    data = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=data)  # the input is [N, 4]: each row is a [1, 4] sample
    result = onnxopt.optimize(mlp(), passes=["quant"], quant="fp16", calibration_data=tmp_path / "calib.npz")
    assert result.verification["outputs"][0]["ok"]
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", x=data[i:i + 2])
    assert onnxopt.optimize(mlp(), passes=["quant"], quant="fp16", calibration_data=folder).verification["outputs"]


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p / "c.npz", z=np.ones((2, 4), np.float32)),
     "calibration sample 0 feeds z; the model's inputs are x"),
    (lambda p: (p / "empty").mkdir(), "has no .npz files"),
])
def test_bad_calibration_data(tmp_path, make, message):
    make(tmp_path)
    target = tmp_path / ("c.npz" if (tmp_path / "c.npz").exists() else "empty")
    with pytest.raises(onnxopt.UsageError, match=message):
        onnxopt.optimize(mlp(), passes=["quant"], quant="fp16", calibration_data=target)


def test_cli_quant_flags(cli, tmp_path):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), src)
    ran = cli(src, "-o", out, "--passes", "fold,cleanup,quant", "--quant", "fp16", "--min-cosine", "0.9999")
    assert ran.code == 0, ran.err
    assert os.path.getsize(out) < os.path.getsize(src)
    ran = cli(src, "-o", tmp_path / "o2.onnx", "--passes", "quant", "--quant", "fp16", "--min-cosine", "2")
    assert ran.code == 2 and "bad --min-cosine 2.0" in ran.err
    ran = cli(src, "-o", tmp_path / "o3.onnx", "--passes", "quant", "--quant", "fp16", "--min-agreement", "2")
    assert ran.code == 2 and "bad --min-agreement 2.0" in ran.err and not (tmp_path / "o3.onnx").exists()
    # a model without a Softmax output: the floor binds nothing, and the run says so
    ran = cli(src, "-o", tmp_path / "o4.onnx", "--passes", "quant", "--quant", "fp16", "--min-agreement", "0.99", "-v")
    assert ran.code == 0 and "--min-agreement: no output is computed by a Softmax or LogSoftmax" in ran.out + ran.err


def test_mixed_is_fp16_where_the_budget_holds():
    result = onnxopt.optimize(mlp(), passes=["quant"], quant="mixed")
    assert result.passes[0].counts == {"nodes_to_fp16": 4}
    assert ops(result.model) == ["Cast", "MatMul", "Add", "Relu", "MatMul", "Cast"]


def test_mixed_keeps_float32_where_float16_breaks_the_budget():
    """x + 1000.3 - 1000: in float16 the constant is 1000.5, every output 0.2 off; the Mul after
    it is harmless. (onnxruntime's CPU computes these ops in float32, so the constants decide.)"""
    model = from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4,16] x) => (float[4,16] y) <float c1 = {1000.3}, float c2 = {1000.0}, float s = {3.0}> {
            a = Add(x, c1)
            b = Sub(a, c2)
            y = Mul(b, s)
        }""")
    data = [{"x": np.random.default_rng(i).standard_normal((4, 16)).astype(np.float32)} for i in range(8)]
    with pytest.raises(onnxopt.VerificationError, match="missed the error budget"):
        onnxopt.optimize(model, passes=["quant"], quant="fp16", calibration_data=data)
    result = onnxopt.optimize(model, passes=["quant"], quant="mixed", calibration_data=data)
    assert result.passes[0].counts == {"nodes_to_fp16": 2, "nodes_kept_fp32_for_budget": 1}
    assert result.verification["outputs"][0]["cosine"] >= 0.999
    assert any("kept in float for the budget (cosine >= 0.999): Add#0" in line for line in result.explain)
