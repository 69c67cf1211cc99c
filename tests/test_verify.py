"""Verification: input specs and generated inputs, onnxruntime runs, the error metrics and the
tolerance classes, and what optimize does when a pass changes the outputs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxopt
from models.builders import from_text, run
from onnxopt import verify
from onnxopt.errors import UsageError, VerificationError
from onnxopt.graph import import_model, values
from onnxopt.passes.cleanup import CleanupPass
from onnxopt.passes.fold import FoldPass

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def graph(text: str) -> gs.Graph:
    return import_model(from_text(HEADER + text)).graph


# ----------------------------------------------------------------------------------- --input-shape


@pytest.mark.parametrize("items,expected", [
    (["x=1x3x224x224"], {"x": [1, 3, 224, 224]}),
    (["x=1,3,8"], {"x": [1, 3, 8]}),
    ([" x = 2 x 3 "], {"x": [2, 3]}),
    (["x="], {"x": []}),  # a scalar
    (["a=1", "b=4x5"], {"a": [1], "b": [4, 5]}),
    (["input:0=7"], {"input:0": [7]}),
    ([], {}),
    (None, {}),
])
def test_parse_input_shapes(items, expected):
    assert verify.parse_input_shapes(items) == expected


@pytest.mark.parametrize("item", ["x", "x=abc", "x=1x", "=1x2", "x=1xx2", "x=-1x3", "x=1.5"])
def test_parse_input_shapes_refuses(item):
    with pytest.raises(UsageError, match=r"bad --input-shape .*: expected NAME=DxDx\.\.\. such as x=1x3x224x224"):
        verify.parse_input_shapes([item])


# ----------------------------------------------------------------------------------- generated inputs


def test_dynamic_dims_defaults_and_shared_symbols():
    g = graph("g (float[N,C,H] x, float[N,H] z, float[7] w) => (float[N,C,H] y) { y = Relu(x) }")
    feeds = verify.make_inputs(g)
    # the first axis 1, the others 32, and the same symbol the same size everywhere
    assert {k: v.shape for k, v in feeds.items()} == {"x": (1, 32, 32), "z": (1, 32), "w": (7,)}
    assert all(v.dtype == np.float32 for v in feeds.values())
    feeds = verify.make_inputs(g, {"x": [2, 5, 9]})
    assert {k: v.shape for k, v in feeds.items()} == {"x": (2, 5, 9), "z": (2, 9), "w": (7,)}


def test_generated_inputs_are_deterministic_normal_floats():
    g = graph("g (float[64,64] x, double[4] d, bool[3] b) => (float[64,64] y) { y = Relu(x) }")
    a, b = verify.make_inputs(g), verify.make_inputs(g)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["x"].dtype == np.float32 and a["d"].dtype == np.float64
    assert abs(float(a["x"].mean())) < 0.05 and 0.95 < float(a["x"].std()) < 1.05
    np.testing.assert_array_equal(a["b"], np.ones(3, bool))
    assert not np.array_equal(verify.make_inputs(g, seed=1)["x"], a["x"])


def test_input_shape_errors():
    g = graph("g (float[N,3] x) => (float[N,3] y) { y = Relu(x) }")
    with pytest.raises(UsageError, match="--input-shape x: rank 3 but the input has rank 2"):
        verify.make_inputs(g, {"x": [1, 3, 4]})
    with pytest.raises(UsageError, match="--input-shape x: dimension 4 but the model fixes it to 3"):
        verify.make_inputs(g, {"x": [2, 4]})
    with pytest.raises(UsageError, match="model has no input named 'q'; its inputs are: x"):
        verify.make_inputs(g, {"q": [2, 3]})
    assert verify.make_inputs(g, {"x": [5, 3]})["x"].shape == (5, 3)


def test_unknown_rank_needs_an_input_shape():
    m = from_text(HEADER + "g (float[2] x) => (float[2] y) { y = Relu(x) }")
    m.graph.input[0].type.tensor_type.ClearField("shape")
    m.graph.output[0].type.tensor_type.ClearField("shape")
    g = import_model(m).graph
    with pytest.raises(UsageError, match=r"input 'x' has unknown rank; give --input-shape x=DxD\.\.\."):
        verify.make_inputs(g)
    assert verify.make_inputs(g, {"x": [4, 2]})["x"].shape == (4, 2)


def test_gather_index_input_gets_values_over_the_table_rows():
    table = ", ".join(str(float(i)) for i in range(20))
    g = graph("g (int64[64] idx) => (float[64,4] y) <float[5,4] t = {%s}> { y = Gather(t, idx) }" % table)
    idx = verify.make_inputs(g)["idx"]
    assert idx.dtype == np.int64 and idx.shape == (64,)
    assert set(idx.tolist()) == {0, 1, 2, 3, 4}  # in range, and spread: not all ones


def test_gather_index_through_cast_and_unsqueeze_with_axis():
    table = ", ".join(str(float(i)) for i in range(12))
    g = graph("""g (int32[16] i) => (float[2,16,1] y) <int64[1] ax = {1}, float[2,6] t = {%s}> {
      c = Cast<to = 7>(i)
      u = Unsqueeze(c, ax)
      y = Gather<axis = 1>(t, u)
    }""" % table)
    i = verify.make_inputs(g)["i"]
    assert i.dtype == np.int32 and set(i.tolist()) <= set(range(6)) and len(set(i.tolist())) > 1


def test_index_into_two_tables_takes_the_smaller():
    g = graph("""g (int64[32] i) => (float[32] a, float[32] b)
                 <float[9] t = {1,2,3,4,5,6,7,8,9}, float[3] s = {1,2,3}> {
      a = Gather(t, i)
      b = Gather(s, i)
    }""")
    assert set(verify.make_inputs(g)["i"].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("body,op", [
    ("y = Reshape(x, s)", "Reshape"),
    ("y = Expand(x, s)", "Expand"),
    ("c = Cast<to = 7>(s)\n y = Tile(x, c)", "Tile"),
])
def test_int_input_that_drives_a_shape_is_refused(body, op):
    g = graph("g (float[2,6] x, int64[2] s) => (float[a,b] y) { %s }" % body)
    with pytest.raises(UsageError, match=rf"input 's' drives a shape or an index \({op}\); "
                                         r"give real values with --inputs FILE\.npz"):
        verify.make_inputs(g)
    feeds = verify.make_inputs(g, given={"s": np.array([3, 4], np.int64)})
    assert feeds["s"].tolist() == [3, 4] and feeds["x"].shape == (2, 6)


def test_index_into_a_non_constant_is_refused():
    g = graph("g (float[5,4] t, int64[3] i) => (float[3,4] y) { y = Gather(t, i) }")
    with pytest.raises(UsageError, match="input 'i' holds indices into a non-constant tensor"):
        verify.make_inputs(g)


def test_plain_int_input_gets_ones():
    g = graph("g (int64[4] n) => (int64[4] y) { y = Add(n, n) }")
    np.testing.assert_array_equal(verify.make_inputs(g)["n"], np.ones(4, np.int64))


@pytest.mark.parametrize("value,message", [
    (np.ones((2, 3)), "--inputs x: type float64 but the model expects float32"),
    (np.ones((2, 4), np.float32), r"--inputs x: shape \[2, 4\] but the model fixes axis 1 to 3"),
    (np.ones(3, np.float32), r"--inputs x: shape \[3\] but the input has rank 2"),
])
def test_given_inputs_must_match_the_input_spec(value, message):
    g = graph("g (float[N,3] x) => (float[N,3] y) { y = Relu(x) }")
    with pytest.raises(UsageError, match=message):
        verify.make_inputs(g, given={"x": value})
    ok = np.arange(15, dtype=np.float32).reshape(5, 3)  # N is free
    np.testing.assert_array_equal(verify.make_inputs(g, given={"x": ok})["x"], ok)


def test_load_inputs(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.arange(3, dtype=np.float32), n=np.array([1, 2]))
    got = verify.load_inputs(str(tmp_path / "a.npz"))
    assert sorted(got) == ["n", "x"] and got["x"].tolist() == [0, 1, 2]
    with pytest.raises(UsageError, match="--inputs file not found"):
        verify.load_inputs(str(tmp_path / "nope.npz"))
    with pytest.raises(UsageError, match="--inputs file not found"):
        verify.load_inputs(str(tmp_path))  # a folder
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    os.rename(tmp_path / "obj.npy", tmp_path / "obj.npz")
    with pytest.raises(UsageError, match="is not a readable .npz file"):
        verify.load_inputs(str(tmp_path / "obj.npz"))  # pickled objects are never loaded


# ----------------------------------------------------------------------------------- running


def _save(tmp_path, text, name="m.onnx", check=True):
    path = tmp_path / name
    onnx.save(from_text(text, check=check), path)
    return str(path)


def test_run_model_matches_numpy(tmp_path):
    path = _save(tmp_path, HEADER + "g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }")
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    out = verify.run_model(path, {"x": x, "unused": np.zeros(1)})
    assert list(out) == ["y"]
    np.testing.assert_array_equal(out["y"], np.maximum(x, 0))


def test_run_model_failures(tmp_path):
    custom = _save(tmp_path, '<ir_version: 8, opset_import: ["" : 17, "my.domain" : 1]>\n'
                   "g (float[2] x) => (float[2] y) { y = my.domain.Foo(x) }", "c.onnx")
    with pytest.raises(verify.RuntimeUnavailable, match="onnxruntime cannot load the model: .*my.domain:Foo"):
        verify.run_model(custom, {"x": np.zeros(2, np.float32)})
    path = _save(tmp_path, HEADER + "g (float[2,6] x, int64[2] s) => (float[a,b] y) { y = Reshape(x, s) }")
    with pytest.raises(verify.RunFailed, match="onnxruntime fails to run the model on these inputs: "):
        verify.run_model(path, {"x": np.zeros((2, 6), np.float32), "s": np.array([5, 5])})
    with pytest.raises(UsageError, match="no values for input"):
        verify.run_model(path, {"x": np.zeros((2, 6), np.float32)})


def test_runtime_messages_are_one_short_line(tmp_path):
    opset = onnx.defs.onnx_opset_version() + 1
    path = _save(tmp_path, f'<ir_version: {onnx.IR_VERSION}, opset_import: ["" : {opset}]>\n'
                 "g (float[2] x) => (float[2] y) { y = Relu(x) }", check=False)
    with pytest.raises(verify.RuntimeUnavailable) as e:
        verify.run_model(path, {"x": np.zeros(2, np.float32)})
    text = str(e.value)
    assert "\n" not in text and len(text) <= len("onnxruntime cannot load the model: ") + 303
    assert "[ONNXRuntimeError]" not in text and "onnxruntime_src" not in text and "std::" not in text
    assert f"Opset {opset} is under development" in text


# ----------------------------------------------------------------------------------- metrics


def _one(ref, got, tolerance="fp32"):
    (m,) = verify.compare({"y": np.asarray(ref)}, {"y": np.asarray(got)}, tolerance)
    return m


def test_compare_identical():
    m = _one(np.array([1.0, -2.0], np.float32), np.array([1.0, -2.0], np.float32))
    assert (m.name, m.max_abs, m.max_rel, m.ok, m.note) == ("y", 0.0, 0.0, True, "")
    assert m.cosine == pytest.approx(1.0)


def test_compare_fp32_tolerance_boundary():
    ref = np.array([1000.0, 0.0], np.float64)
    inside = ref + np.array([1000.0 * 1e-4, 1e-5]) * 0.99  # atol + rtol*|ref| per element
    outside = ref + np.array([0.0, 2e-5])
    assert _one(ref, inside).ok
    m = _one(ref, outside)
    assert not m.ok and m.max_abs == pytest.approx(2e-5) and m.note == ""


def test_compare_exact_tolerance():
    ref = np.array([1.0, 2.0], np.float32)
    assert _one(ref, ref.copy(), "exact").ok
    m = _one(ref, np.nextafter(ref, np.float32(3)), "exact")  # one ulp off: fine for fp32, not for exact
    assert not m.ok and _one(ref, np.nextafter(ref, np.float32(3))).ok


def test_compare_metrics_values():
    m = _one(np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.5, 3.0]))
    assert m.max_abs == pytest.approx(1.0) and m.max_rel == pytest.approx(0.25)
    assert m.cosine == pytest.approx(np.dot([1, 2, 4], [1, 2.5, 3]) / np.linalg.norm([1, 2, 4])
                                     / np.linalg.norm([1, 2.5, 3]))
    assert not m.ok


def test_compare_nan_and_inf_positions():
    ref = np.array([1.0, np.nan, np.inf], np.float32)
    assert _one(ref, ref.copy()).ok
    m = _one(ref, np.array([1.0, 0.0, np.inf], np.float32))
    assert not m.ok and m.note == "NaN/Inf positions differ"
    m = _one(ref, np.array([1.0, np.nan, -np.inf], np.float32))
    assert not m.ok and m.note == "NaN/Inf positions differ"


def test_compare_shape_type_and_missing_outputs():
    m = _one(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert not m.ok and m.note == "shape/type float32[3, 2] instead of float32[2, 3]"
    m = _one(np.zeros(2, np.float32), np.zeros(2, np.float64))
    assert not m.ok and m.note == "shape/type float64[2] instead of float32[2]"
    (m,) = verify.compare({"y": np.zeros(2)}, {})
    assert (m.ok, m.note) == (False, "output missing")


def test_compare_integer_outputs_are_exact():
    assert _one(np.array([1, 2], np.int64), np.array([1, 2], np.int64)).ok
    m = _one(np.array([1, 2], np.int64), np.array([1, 3], np.int64))
    assert not m.ok and m.max_abs == float("inf") and m.cosine == 0.0
    assert _one(np.array([True, False]), np.array([True, False])).ok


# ----------------------------------------------------------------------------------- failures in optimize


SUB_TEXT = HEADER + """
g (float[2,3] x, float[2,3] w) => (float[2,3] y, float[2,3] z) {
  i = Identity(x)
  d = Sub(i, w)
  y = Relu(d)
  z = Mul(x, w)
}"""


@pytest.fixture
def swap_sub(monkeypatch):
    """cleanup, broken: it also swaps the inputs of every Sub, which changes output y (not z)."""
    real = CleanupPass.run

    def broken(self, model, ctx):
        counts = real(self, model, ctx)
        for node in model.graph.nodes:
            if node.op == "Sub":
                node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]
        return counts

    monkeypatch.setattr(CleanupPass, "run", broken)


@pytest.mark.parametrize("mode", ["final", "each"])
@pytest.mark.parametrize("passes", [["cleanup"], ["fold", "cleanup"]])
def test_verification_error_names_the_pass_and_the_output(swap_sub, tmp_path, mode, passes):
    m = from_text(SUB_TEXT)
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    with pytest.raises(VerificationError) as e:
        onnxopt.optimize(src, tmp_path / "out.onnx", passes=passes, verify=mode)
    assert (e.value.pass_name, e.value.output) == ("cleanup", "y")
    assert str(e.value).startswith("pass 'cleanup' changed output 'y': max abs err ")
    assert str(e.value).endswith("(tolerance rtol 1e-4 / atol 1e-5); nothing was written")
    assert e.value.exit_code == 1
    assert os.listdir(tmp_path) == ["in.onnx"]
    with pytest.raises(VerificationError, match="pass 'cleanup' changed output 'y'"):
        onnxopt.optimize(m, passes=passes, verify=mode)  # a ModelProto in, no file: the same check


def test_verification_error_for_an_earlier_pass_is_localized(monkeypatch, tmp_path):
    real = FoldPass.run

    def broken(self, model, ctx):
        counts = real(self, model, ctx)
        for node in model.graph.nodes:
            for t in node.inputs:
                if node.op == "Mul" and isinstance(t, gs.Constant):
                    t.values = values(t) * np.float32(1.01)
        return counts

    monkeypatch.setattr(FoldPass, "run", broken)
    m = from_text(HEADER + """g (float[2,3] x) => (float[2,3] y) {
      c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
      i = Identity(x)
      y = Mul(i, c)
    }""")
    with pytest.raises(VerificationError) as e:
        onnxopt.optimize(m, passes=["fold", "cleanup"], verify="final")
    assert (e.value.pass_name, e.value.output) == ("fold", "y")
    assert "max rel err 0.01" in str(e.value)


def test_verify_none_does_not_catch_it(swap_sub):
    m = from_text(SUB_TEXT)
    result = onnxopt.optimize(m, passes=["cleanup"], verify="none")
    feeds = {"x": np.full((2, 3), 3, np.float32), "w": np.ones((2, 3), np.float32)}
    np.testing.assert_array_equal(run(result.model, feeds)["y"], np.zeros((2, 3), np.float32))  # relu(1 - 3)
    assert result.verification == {"mode": "none", "skipped": "--verify none", "outputs": [], "over_budget": []}


def test_verify_each_metrics_per_pass_and_final():
    m = from_text(SUB_TEXT)
    result = onnxopt.optimize(m, passes=["fold", "cleanup"], verify="each")
    for r in result.passes:
        assert [(x["name"], x["ok"], x["max_abs"]) for x in r.verification] == [("y", True, 0.0), ("z", True, 0.0)]
        assert r.verification_skipped is None
    assert [(x["name"], x["ok"]) for x in result.verification["outputs"]] == [("y", True), ("z", True)]
    final = onnxopt.optimize(m, passes=["fold", "cleanup"], verify="final")
    assert all(r.verification is None for r in final.passes)
    assert [(x["name"], x["ok"]) for x in final.verification["outputs"]] == [("y", True), ("z", True)]


def test_an_optimized_model_onnxruntime_cannot_load_is_a_verification_error(monkeypatch):
    """A pass that emits an op onnxruntime lacks, on a model it could run: not a skip."""
    real = CleanupPass.run

    def broken(self, model, ctx):
        counts = real(self, model, ctx)
        model.graph.nodes[-1].op = "NoSuchOp"
        return counts

    monkeypatch.setattr(CleanupPass, "run", broken)
    m = from_text(HEADER + "g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }")
    with pytest.raises(VerificationError, match="pass 'cleanup' produced a model onnxruntime cannot run: "):
        onnxopt.optimize(m, passes=["cleanup"], verify="each")
    with pytest.raises(onnxopt.OnnxoptError):
        onnxopt.optimize(m, passes=["cleanup"], verify="final")


def test_split_samples_holds_back_the_last_quarter_at_most_64():
    samples = [{"x": np.full(1, i)} for i in range(9)]
    calibration, evaluation = verify.split_samples(samples)
    assert [int(s["x"][0]) for s in calibration] == list(range(7))
    assert [int(s["x"][0]) for s in evaluation] == [7, 8]
    assert verify.split_samples(samples[:1]) == (samples[:1], samples[:1])  # one sample serves both
    many = [{"x": np.full(1, i)} for i in range(1000)]  # the checks measure on 64: the rest calibrates
    calibration, evaluation = verify.split_samples(many)
    assert len(calibration) == 936 and [int(s["x"][0]) for s in evaluation] == list(range(936, 1000))


def test_compare_samples_averages_cosines_and_keeps_the_worst():
    ref = [{"y": np.array([1.0, 0.0])}, {"y": np.array([0.0, 1.0])}]
    got = [{"y": np.array([1.0, 0.0])}, {"y": np.array([1.0, 1.0])}]
    (m,) = verify.compare_samples(ref, got, "lossy", 0.8)
    assert m.samples == 2 and m.worst_cosine == pytest.approx(2 ** -0.5)
    assert m.cosine == pytest.approx((1 + 2 ** -0.5) / 2) and m.ok  # the mean 0.854 is within 0.8
    assert not verify.compare_samples(ref, got, "lossy", 0.9)[0].ok
    assert not verify.compare_samples(ref, got, "fp32")[0].ok and m.max_abs == 1.0
    nan = [{"y": np.array([1.0, 0.0])}, {"y": np.array([np.nan, 1.0])}]
    (m,) = verify.compare_samples(ref, nan, "lossy", 0.1)
    assert not m.ok and m.note == "NaN/Inf positions differ"


# ----------------------------------------------------------------------------------- argmax


def _outputs_model(opset: int) -> onnx.ModelProto:
    return onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
                                   "g (float[2,3,4] x) => (float[2,3,4] y, float[2,3,4] z, float[2,3,4] r) {\n"
                                   "  p = Softmax(x)\n  y = Identity(p)\n  z = LogSoftmax<axis = 1>(x)\n"
                                   "  r = Relu(x)\n}")


def test_argmax_axes_are_the_softmax_outputs():
    assert verify.argmax_axes(_outputs_model(17)) == {"y": (-1, False, False), "z": (1, False, True)}
    # before opset 13 Softmax normalizes over every axis from `axis` (default 1) on, as one
    assert verify.argmax_axes(_outputs_model(12)) == {"y": (1, True, False), "z": (1, True, True)}


def test_argmax_agreement_counts_positions_and_joins_the_lossy_budget():
    ref = np.zeros((2, 3, 4), np.float32)
    ref[..., :2] = [0.6, 0.4]
    ref[1, 2, :2] = [0.52, 0.48]  # a close call of the original
    got = ref.copy()
    got[0, 0, :2] = [0.4, 0.6]  # one of the 6 positions changes class; the cosine stays high
    got[1, 2, :2] = [0.48, 0.52]  # and the close call flips: not counted (CLOSE_CALL 0.05)
    (m,) = verify.compare({"y": ref}, {"y": got}, "lossy", 0.8, {"y": (-1, False, False)})
    assert (m.agreement, m.positions, m.ok) == (5 / 6, 6, True) and m.cosine > 0.95
    (m,) = verify.compare({"y": ref}, {"y": got}, "lossy", 0.9, {"y": (-1, False, False)})
    assert not m.ok and m.note == ""
    (m,) = verify.compare({"y": ref}, {"y": got}, "lossy", 0.9)  # not a Softmax output: cosine alone
    assert m.ok and m.agreement is None and m.positions == 0
    # log-probabilities: the same decisions
    (m,) = verify.compare({"y": np.log(ref + 1e-9)}, {"y": np.log(got + 1e-9)}, "lossy", 0.9, {"y": (-1, False, True)})
    assert (m.agreement, m.positions) == (5 / 6, 6)
    # flat: one argmax per batch row over its 12 values; row 0's first 0.6 moved from 0 to 1
    (m,) = verify.compare({"y": ref}, {"y": got}, "lossy", 0.9, {"y": (1, True, False)})
    assert (m.agreement, m.positions) == (0.5, 2)
    # over samples, the agreement pools the positions (5 of 6, then 2 of 2: 7 of 8, not the mean 11/12)
    (m,) = verify.compare_samples([{"y": ref}, {"y": ref[:1, :2]}], [{"y": got}, {"y": ref[:1, :2]}], "lossy",
                                  0.9, {"y": (-1, False, False)})
    assert (m.agreement, m.positions, m.samples, m.ok) == (7 / 8, 8, 2, False)


def test_min_agreement_binds_the_plain_agreement_instead():
    ref = np.zeros((2, 3, 4), np.float32)
    ref[..., :2] = [0.6, 0.4]
    ref[1, 2, :2] = [0.52, 0.48]
    got = ref.copy()
    got[0, 0, :2] = [0.4, 0.6]
    got[1, 2, :2] = [0.48, 0.52]  # the close call: counted now
    axes = {"y": (-1, False, False)}
    (m,) = verify.compare({"y": ref}, {"y": got}, "lossy", 0.9, axes)
    assert (m.agreement, m.plain_agreement, m.ok) == (5 / 6, 4 / 6, False)
    assert m.miss() == f"cosine {m.cosine:.6f}, argmax agreement 0.6667 (0.8333 with the original's close calls aside)"
    # the floor replaces the close-call rule at the cosine budget: 4 of 6 against 0.6 holds, against 0.7 not
    (m,) = verify.compare({"y": ref}, {"y": got}, "lossy", 0.9, axes, min_agreement=0.6)
    assert m.ok and m.cosine > 0.95
    (m,) = verify.compare({"y": ref}, {"y": got}, "lossy", 0.8, axes, min_agreement=0.7)
    assert not m.ok
    # pooled over samples: 4 of 6, then 2 of 2
    (m,) = verify.compare_samples([{"y": ref}, {"y": ref[:1, :2]}], [{"y": got}, {"y": ref[:1, :2]}], "lossy",
                                  0.8, axes, min_agreement=0.75)
    assert (m.plain_agreement, m.agreement, m.ok) == (6 / 8, 7 / 8, True)
    # not a Softmax output: no agreement, and the floor binds nothing
    (m,) = verify.compare({"y": ref}, {"y": got}, "lossy", 0.9, None, min_agreement=0.99)
    assert m.ok and m.plain_agreement is None
