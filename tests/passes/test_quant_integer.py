"""quant --quant dynamic: int8 weights, activations quantized at run time (passes/quant/int8.py),
SmoothQuant and the budget's fallback to float (passes/quant/budget.py); --quant int4 (int4.py).

Numerics: onnxruntime's integer kernels are exact, so the quantized model's outputs equal a numpy
model of the same arithmetic (DynamicQuantizeLinear's uint8 activations, our int8 weights and
scales) to float rounding."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from models.builders import MASKED_KEYS_OPS, op_counts, ops, run
from onnxopt.passes.quant import int4 as int4_mod
from onnxopt.passes.quant.int8 import quantize_columns, simulate_dynamic

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((64, 96)).astype(np.float32) / 8
B1 = RNG.standard_normal(96).astype(np.float32)
W2 = RNG.standard_normal((96, 80)).astype(np.float32) / 8


def mlp(opset: int = 17) -> onnx.ModelProto:
    """y = relu(x @ W1 + b1) @ W2, with x [N, 64]."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], "mm1"), helper.make_node("Add", ["h", "b1"], ["a"], "add1"),
             helper.make_node("Relu", ["a"], ["r"], "relu"), helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 80])],
                              [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"),
                               numpy_helper.from_array(W2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def x_feed(seed=1, n=6):
    return {"x": np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)}


def deq(w, qmax=63):
    q, s = quantize_columns(w, qmax)
    return q.astype(np.float32) * s


def simulated_mlp(x, qmax=63):
    h = np.maximum(simulate_dynamic(x) @ deq(W1, qmax) + B1, 0)
    return simulate_dynamic(h) @ deq(W2, qmax)


def dynamic(model, **kw):
    kw.setdefault("options", ["quant.fallback=false"])
    kw.setdefault("min_cosine", 0.9)
    return onnxopt.optimize(model, passes=["quant"], quant="dynamic", inputs=x_feed(), **kw)


@pytest.mark.parametrize("target, expected", [
    ("ort", ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul"]),
    ("onnx", ["DynamicQuantizeLinear", "MatMulInteger", "Mul", "Cast", "Mul", "Add", "Relu",
              "DynamicQuantizeLinear", "MatMulInteger", "Mul", "Cast", "Mul"]),
])
def test_matmul_placement_and_exact_numerics(target, expected):
    result = dynamic(mlp(), target=target)
    assert result.passes[0].counts == {"matmul_int8": 2, "weights_int8": 64 * 96 + 96 * 80}
    out = result.model
    assert ops(out) == expected
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    int8 = [w for w in weights.values() if w.dtype == np.int8]
    assert [w.shape for w in int8] == [(64, 96), (96, 80)]
    assert all(np.abs(w).max() == 63 for w in int8)  # 7-bit by default (reduce_range)
    x = x_feed(2)
    np.testing.assert_allclose(run(out, x)["y"], simulated_mlp(x["x"]), rtol=1e-5, atol=1e-5)
    if target == "ort":  # the bias went into DynamicQuantizeMatMul's bias input
        first = out.graph.node[0]
        assert first.domain == "com.microsoft" and len(first.input) == 5 and first.input[3] == ""


def test_full_range_weights_with_reduce_range_off():
    result = dynamic(mlp(), target="ort", options=["quant.fallback=false", "quant.reduce_range=false"])
    int8 = [numpy_helper.to_array(t) for t in result.model.graph.initializer if t.data_type == TensorProto.INT8]
    assert all(np.abs(w).max() == 127 for w in int8)


def test_idempotent_and_deterministic(tmp_path):
    once = dynamic(mlp(), target="ort").model
    again = onnxopt.optimize(once, passes=["quant"], quant="dynamic", target="ort", inputs=x_feed())
    assert again.passes[0].counts == {} and ops(again.model) == ops(once)
    onnx.save(mlp(), tmp_path / "in.onnx")
    for name in ("a.onnx", "b.onnx"):
        onnxopt.optimize(tmp_path / "in.onnx", tmp_path / name, passes=["quant"], quant="dynamic", inputs=x_feed())
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_gemm_with_transposed_weight_alpha_and_beta():
    w = RNG.standard_normal((80, 64)).astype(np.float32)  # [N, K]: transB
    c = RNG.standard_normal(80).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], "gemm", transB=1, alpha=0.5, beta=2.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 80])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    for target, expected in (("ort", ["DynamicQuantizeMatMul"]),
                             ("onnx", ["DynamicQuantizeLinear", "MatMulInteger", "Mul", "Cast", "Mul", "Add"])):
        result = dynamic(model, target=target)
        assert result.passes[0].counts["gemm_int8"] == 1 and ops(result.model) == expected
        x = x_feed(3)
        want = simulate_dynamic(x["x"]) @ deq(0.5 * w.T) + 2.0 * c
        np.testing.assert_allclose(run(result.model, x)["y"], want, rtol=1e-5, atol=1e-5)


def embedding(rows=300, dim=32, dtype=np.float32):
    table = RNG.standard_normal((rows, dim)).astype(dtype) * np.linspace(0.1, 3, rows, dtype=np.float32)[:, None]
    node = helper.make_node("Gather", ["table", "ids"], ["y"], "embed", axis=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("y", onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                             [2, 5, dim])],
                              [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), table


def test_gather_table_rows_with_their_own_scales():
    model, table = embedding()
    ids = {"ids": np.array([[0, 5, 299, 7, 7], [1, 2, 3, 150, 0]], np.int64)}
    result = onnxopt.optimize(model, passes=["quant"], quant="dynamic", inputs=ids,
                              options=["quant.fallback=false"])
    assert result.passes[0].counts == {"gather_int8": 1, "weights_int8": 300 * 32}
    assert ops(result.model) == ["Gather", "Gather", "Cast", "Mul"]
    q, s = quantize_columns(table.T, 127)  # per row, full 8 bits (no matmul: no saturation to avoid)
    want = (q.T.astype(np.float32) * s[:, None])[ids["ids"]]
    np.testing.assert_array_equal(run(result.model, ids)["y"], want)


def attention_model(mask_index=False):
    """com.microsoft Attention (packed QKV [64, 192], 4 heads) with an additive attention bias."""
    w = RNG.standard_normal((64, 192)).astype(np.float32) / 8
    b = RNG.standard_normal(192).astype(np.float32) / 4
    inputs = ["x", "w", "b", "mask" if mask_index else "", "", "" if mask_index else "bias"]
    node = helper.make_node("Attention", inputs, ["y"], "attn", domain="com.microsoft", num_heads=4)
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, 64])]
    graph_inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [2, 7]) if mask_index else
                        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2, 1, 7, 7]))
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, 64])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    return model, w, b


def test_packed_attention_becomes_int8_projection_split_and_mha():
    model, w, b = attention_model()
    rng = np.random.default_rng(4)
    feeds = {"x": rng.standard_normal((2, 7, 64)).astype(np.float32),
             "bias": np.where(rng.random((2, 1, 7, 7)) < 0.2, -1e4, 0).astype(np.float32)}
    feeds["bias"][0, ..., -2:] = np.finfo(np.float32).min  # padding: keys no query sees
    result = onnxopt.optimize(model, passes=["quant"], quant="dynamic", target="ort", inputs=feeds,
                              options=["quant.fallback=false"], min_cosine=0.9)
    assert result.passes[0].counts == {"attention_int8": 1, "weights_int8": 64 * 192}
    assert op_counts(result.model) == {"DynamicQuantizeMatMul": 1, "Split": 1, "MultiHeadAttention": 1,
                                       **MASKED_KEYS_OPS}
    mha = next(n for n in result.model.graph.node if n.op_type == "MultiHeadAttention")
    assert helper.get_attribute_value(mha.attribute[0]) == 4
    # fuse's masked_keys: K through the row factor, the bias with hidden keys at -40
    made = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert list(mha.input)[3:5] == ["", ""] and made[mha.input[5]] == "Where" and made[mha.input[1]] == "Mul"
    # the same maths in float: Attention on the simulated int8 input with the dequantized weight
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.initializer[0].CopyFrom(numpy_helper.from_array(deq(w), "w"))
    want = run(reference, {"x": simulate_dynamic(feeds["x"]), "bias": feeds["bias"]})["y"]
    np.testing.assert_allclose(run(result.model, feeds)["y"], want, rtol=1e-4, atol=1e-5)


def test_attention_with_mask_index_and_target_onnx_stay_float():
    model, _, _ = attention_model(mask_index=True)
    feeds = {"x": np.ones((2, 7, 64), np.float32), "mask": np.ones((2, 7), np.int32)}
    result = onnxopt.optimize(model, passes=["quant"], quant="dynamic", target="ort", inputs=feeds)
    assert result.passes[0].counts == {} and ops(result.model) == ["Attention"]


@pytest.mark.parametrize("text, why", [
    ("y = MatMul(x, x2)", "two activations"),
    ("y = MatMul(x, small)", "a weight under 4096 values"),
    ("y = MatMul(x, w_int)", "an integer weight"),
])
def test_matmuls_left_alone(text, why):
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4,64] x, float[64,64] x2) => (float[4,?] y)
        <float[64,8] small = {{{", ".join(["0.5"] * 512)}}}, int32[64,64] w_int = {{{", ".join(["1"] * 4096)}}}> {{
            {text}
        }}""".replace("y = MatMul(x, w_int)", "wf = Cast<to = 1>(w_int)\n y = MatMul(x, wf)"))
    feeds = {"x": np.ones((4, 64), np.float32), "x2": np.ones((64, 64), np.float32)}
    result = onnxopt.optimize(model, passes=["quant"], quant="dynamic", inputs=feeds)
    assert result.passes[0].counts == {}, why


def test_overridable_weight_and_conv_stay_float():
    model = mlp()
    model.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [96, 80]))  # a default only
    result = dynamic(model, target="ort")
    assert result.passes[0].counts["matmul_int8"] == 1 and ops(result.model)[-1] == "MatMul"
    conv = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,8,6,6] x) => (float[1,64,6,6] y) { y = Conv<pads = [1, 1, 1, 1]>(x, w) }""")
    conv.graph.initializer.append(numpy_helper.from_array(RNG.standard_normal((64, 8, 3, 3)).astype(np.float32), "w"))
    result = onnxopt.optimize(conv, passes=["quant"], quant="dynamic")
    assert result.passes[0].counts == {} and ops(result.model) == ["Conv"]
    assert any("Conv stays float in dynamic mode" in line for line in result.explain)


# ----------------------------------------------------------------------------------- the budget


def outlier_mlp():
    """The MLP fed through a per-channel gain with one channel 300x the others: per-tensor
    activation quantization of that input crushes every other channel."""
    model = mlp()
    gain = np.ones(64, np.float32)
    gain[3] = 300.0
    model.graph.initializer.append(numpy_helper.from_array(gain, "gain"))
    model.graph.node.insert(0, helper.make_node("Mul", ["x", "gain"], ["xg"], "gain"))
    model.graph.node[1].input[0] = "xg"
    w1 = W1.copy()
    w1[3] /= 300.0  # the float model's output stays ordinary
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    return model


def calibration(n=16, seed=7):
    return [x_feed(seed + i, 8) for i in range(n)]


def test_sensitive_node_goes_back_to_float_until_the_budget_holds():
    result = onnxopt.optimize(outlier_mlp(), passes=["quant"], quant="dynamic", target="ort",
                              calibration_data=calibration(), options=["quant.smooth=false"], min_cosine=0.999)
    assert result.passes[0].counts == {"matmul_int8": 1, "kept_float_for_budget": 1, "weights_int8": 96 * 80}
    assert ops(result.model) == ["Mul", "MatMul", "Add", "Relu", "DynamicQuantizeMatMul"]
    assert any("kept in float for the budget (cosine >= 0.999): mm1" in line for line in result.explain)
    (metrics,) = result.verification["outputs"]
    assert metrics["ok"] and metrics["cosine"] >= 0.999 and metrics["samples"] == 4  # the held-back quarter


def flipping_classifier():
    """Two classes whose logits differ by about what int8 weights and activations err by:
    quantized, an eighth of the rows change class (by more than a close call), while the
    probabilities keep a cosine above 0.99."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((2048, 1)).astype(np.float32)
    w = np.concatenate([w0, w0 + 1e-2 * rng.standard_normal((2048, 1)).astype(np.float32)], 1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["l"], name="head"), helper.make_node("Softmax", ["l"], ["p"]),
         helper.make_node("Identity", ["p"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2048])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [numpy_helper.from_array(w, "w")])
    samples = [{"x": 0.25 * rng.standard_normal((16, 2048)).astype(np.float32)} for _ in range(16)]
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), samples


def test_argmax_agreement_of_a_softmax_output_is_part_of_the_budget():
    model, samples = flipping_classifier()
    kw = dict(passes=["quant"], quant="dynamic", target="ort", calibration_data=samples)
    kept = onnxopt.optimize(model, **kw, options=["quant.smooth=false"])
    assert kept.passes[0].counts == {"kept_float_for_budget": 1}
    assert ops(kept.model) == ["MatMul", "Softmax", "Identity"]
    (metrics,) = kept.verification["outputs"]
    assert (metrics["agreement"], metrics["positions"], metrics["samples"]) == (1.0, 64, 4)
    assert "quant: kept in float for the budget (cosine or argmax agreement (the lower) >= 0.99): head" in kept.explain
    with pytest.raises(onnxopt.VerificationError,
                       match=r"missed the error budget \(cosine and argmax agreement >= 0.99\): 'y' cosine "
                             r"0\.99\d+, argmax agreement 0\.\d+ \(0\.\d+ with the original's close calls aside\);"):
        onnxopt.optimize(model, **kw, options=["quant.smooth=false", "quant.fallback=false"])
    written = onnxopt.optimize(model, **kw, options=["quant.smooth=false", "quant.fallback=false"],
                               write_over_budget=True)
    assert ops(written.model) == ["DynamicQuantizeMatMul", "Softmax", "Identity"]
    (metrics,) = written.verification["outputs"]
    assert metrics["cosine"] > 0.99 and metrics["agreement"] < 0.95 and not metrics["ok"]


def test_min_agreement_counts_every_changed_argmax():
    """int8 changes the class of 26 of the 64 held-back rows of flipping_classifier, 8 of them by
    more than a close call: a budget of 0.85 takes it by default (56 of 64 with the close calls
    aside); --min-agreement 0.85 counts all 26 and keeps the head in float."""
    model, samples = flipping_classifier()
    kw = dict(passes=["quant"], quant="dynamic", target="ort", calibration_data=samples, min_cosine=0.85,
              options=["quant.smooth=false"])
    loose = onnxopt.optimize(model, **kw)
    assert ops(loose.model) == ["DynamicQuantizeMatMul", "Softmax", "Identity"]
    (metrics,) = loose.verification["outputs"]
    assert (metrics["agreement"], metrics["plain_agreement"], metrics["positions"]) == (56 / 64, 38 / 64, 64)
    assert metrics["ok"]
    strict = onnxopt.optimize(model, **kw, min_agreement=0.85)
    assert strict.passes[0].counts == {"kept_float_for_budget": 1}
    assert ops(strict.model) == ["MatMul", "Softmax", "Identity"]
    (metrics,) = strict.verification["outputs"]
    assert (metrics["agreement"], metrics["plain_agreement"], metrics["ok"]) == (1.0, 1.0, True)
    assert any(line.startswith("quant: kept in float for the budget (cosine or argmax agreement (the lower; the "
                               "agreement shifted by the budget less --min-agreement) >= 0.85): head")
               for line in strict.explain)
    with pytest.raises(onnxopt.VerificationError,
                       match=r"missed the error budget \(cosine >= 0.85, argmax agreement >= 0.85\): 'y' cosine "
                             r"0\.99\d+, argmax agreement 0\.5938 \(0\.8750 with the original's close calls aside\)"):
        onnxopt.optimize(model, **kw | {"options": ["quant.smooth=false", "quant.fallback=false"]}, min_agreement=0.85)
    with pytest.raises(onnxopt.UsageError, match=r"bad --min-agreement 0.0: expected a number in \(0, 1\]"):
        onnxopt.optimize(model, **kw, min_agreement=0.0)



def test_a_budget_miss_is_not_blamed_on_a_lossless_pass_that_drifted(monkeypatch):
    """A lossy run that misses its budget fails as a budget miss, even when a lossless pass before
    it moved the outputs a little past the fp32 tolerance (float drift through a deep network): the
    lossless passes are not rerun one by one to take the blame."""
    from onnxopt.passes.fold import FoldPass

    real = FoldPass.run

    def drifting(self, model, ctx):
        counts = real(self, model, ctx)
        for t in model.graph.tensors().values():
            if t.name == "w":
                t.values = (t.values * np.float32(1.003)).astype(np.float32)
        return counts

    monkeypatch.setattr(FoldPass, "run", drifting)
    model, samples = flipping_classifier()
    kw = dict(quant="dynamic", target="ort", calibration_data=samples,
              options=["quant.smooth=false", "quant.fallback=false"])
    with pytest.raises(onnxopt.VerificationError, match="pass 'fold' changed output 'y'"):
        onnxopt.optimize(model, passes=["fold", "cleanup"], **{k: v for k, v in kw.items() if k == "target"},
                         inputs=samples[0])  # alone, the drift is beyond fp32's tolerance
    with pytest.raises(onnxopt.VerificationError) as e:
        onnxopt.optimize(model, passes=["fold", "quant"], **kw)
    assert e.value.pass_name is None
    assert str(e.value).startswith("passes fold,quant missed the error budget (cosine and argmax agreement >= 0.99)")

def test_smoothquant_moves_the_outlier_into_the_weight():
    plain = onnxopt.optimize(outlier_mlp(), passes=["quant"], quant="dynamic", target="ort",
                             calibration_data=calibration(), options=["quant.smooth=false", "quant.fallback=false"],
                             min_cosine=0.5)
    smooth = onnxopt.optimize(outlier_mlp(), passes=["quant"], quant="dynamic", target="ort",
                              calibration_data=calibration(), options=["quant.fallback=false"], min_cosine=0.5)
    assert smooth.passes[0].counts["smoothed"] >= 1
    assert ops(smooth.model)[:3] == ["Mul", "Mul", "DynamicQuantizeMatMul"]  # x * gain, then x / s
    worse, better = plain.verification["outputs"][0]["cosine"], smooth.verification["outputs"][0]["cosine"]
    assert worse < 0.99 < 0.999 < better


def test_over_budget_is_an_error_unless_written_anyway(cli, tmp_path):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(outlier_mlp(), src)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([c["x"] for c in calibration()]).reshape(16, 8, 64))
    args = [src, "-o", out, "--passes", "quant", "--quant", "dynamic", "--calibration-data", tmp_path / "calib.npz",
            "--opt", "quant.smooth=false", "--opt", "quant.fallback=false", "--min-cosine", "0.999"]
    ran = cli(*args)
    assert ran.code == 1 and "missed the error budget (cosine >= 0.999): 'y' cosine 0." in ran.err
    assert "--write-over-budget writes it anyway" in ran.err and not out.exists()
    ran = cli(*args, "--write-over-budget", "-q")
    assert ran.code == 0 and out.exists()
    assert ran.err.startswith("onnxopt: warning: over the error budget, written anyway: 'y' cosine 0.")
    assert ran.err.rstrip().endswith("(budget 0.999)") and len(ran.err.strip().splitlines()) == 1


def test_int8_on_a_graph_without_convolutions_is_dynamic():
    auto = dynamic(mlp(), target="ort", options=["quant.fallback=false"])
    chosen = onnxopt.optimize(mlp(), passes=["quant"], quant="int8", target="ort", inputs=x_feed(),
                              options=["quant.fallback=false"], min_cosine=0.9)
    assert chosen.passes[0].counts == auto.passes[0].counts and ops(chosen.model) == ops(auto.model)


def three_readers():
    """q, k, v = x @ Wq, x @ Wk, x @ Wv: one input read by three weights (unfused attention's projections)."""
    ws = [RNG.standard_normal((64, 64)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], f"mm{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["N", 64]) for i in range(3)],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), ws


@pytest.mark.parametrize("target, expected", [
    ("ort", ["DynamicQuantizeLinear"] + ["MatMulIntegerToFloat"] * 3),
    ("onnx", ["DynamicQuantizeLinear"] + ["MatMulInteger", "Mul", "Cast", "Mul"] * 3),
])
def test_readers_of_one_input_share_its_quantization(target, expected):
    model, ws = three_readers()
    result = dynamic(model, target=target)
    found = ops(result.model)
    assert result.passes[0].counts["matmul_int8"] == 3 and found[0] == expected[0]
    assert sorted(found) == sorted(expected)  # one quantization, then the three readers (in toposort's order)
    x = x_feed(5)
    got = run(result.model, x)
    for i, w in enumerate(ws):
        np.testing.assert_allclose(got[f"y{i}"], simulate_dynamic(x["x"]) @ deq(w), rtol=1e-5, atol=1e-4)


def test_readers_of_one_input_share_one_smoothing():
    model, ws = three_readers()
    gain = np.ones(64, np.float32)
    gain[:4] = 200.0  # outlier channels, as in transformer activations
    model.graph.initializer.append(numpy_helper.from_array(gain, "gain"))
    model.graph.node.insert(0, helper.make_node("Mul", ["x", "gain"], ["xg"], "gain"))
    for node in model.graph.node[1:]:
        node.input[0] = "xg"
    result = onnxopt.optimize(model, passes=["quant"], quant="dynamic", target="ort", calibration_data=calibration(),
                              options=["quant.fallback=false"], min_cosine=0.5)
    assert result.passes[0].counts["smoothed"] == 3
    assert ops(result.model) == ["Mul", "Mul", "DynamicQuantizeLinear"] + ["MatMulIntegerToFloat"] * 3


# ----------------------------------------------------------------------------------- int4


def int4(model, **kw):
    kw.setdefault("options", ["quant.fallback=false"])
    kw.setdefault("min_cosine", 0.5)
    kw.setdefault("inputs", x_feed())
    return onnxopt.optimize(model, passes=["quant"], quant="int4", target="ort", **kw)


def test_int4_blocks_round_trip_and_padding():
    w = RNG.standard_normal((72, 5)).astype(np.float32)  # K = 72: the last block is padded
    q, scale, zero = int4_mod.quantize_blocks(w)
    assert q.shape == (5, 96) and scale.shape == zero.shape == (5, 3) and q.max() <= 15
    back = int4_mod.dequantize_blocks(q, scale, zero, 72)
    assert back.shape == (72, 5)
    assert np.abs(back - w).max() <= scale.max() / 2 + 1e-6  # within half a level of each block


def test_int4_placement_and_exact_numerics():
    result = int4(mlp())
    assert result.passes[0].counts == {"matmul_int4": 2, "weights_int4": 64 * 96 + 96 * 80}
    out = result.model
    assert ops(out) == ["MatMulNBits", "Add", "Relu", "MatMulNBits"]
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs == {"K": 64, "N": 96, "bits": 4, "block_size": 32, "accuracy_level": 0}
    x = x_feed(2)
    w1, w2 = (int4_mod.dequantize_blocks(*int4_mod.quantize_blocks(w), w.shape[0]) for w in (W1, W2))
    want = np.maximum(x["x"] @ w1 + B1, 0) @ w2
    np.testing.assert_allclose(run(out, x)["y"], want, rtol=1e-4, atol=1e-4)
    again = onnxopt.optimize(out, passes=["quant"], quant="int4", target="ort", inputs=x_feed())
    assert again.passes[0].counts == {}


def test_gptq_beats_round_to_nearest_on_the_calibration_inputs():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))  # correlated inputs, as in real layers
    w = rng.standard_normal((64, 48)).astype(np.float32)
    rtn = int4_mod.dequantize_blocks(*int4_mod.quantize_blocks(w), 64)
    gptq = int4_mod.dequantize_blocks(*int4_mod.gptq(w, x.T @ x), 64)
    err = {name: np.square(x @ w - x @ v).sum() for name, v in (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] < 0.7 * err["rtn"]


def test_int4_gptq_through_the_pass():
    result = int4(mlp(), calibration_data=calibration(), inputs=None)
    assert result.passes[0].counts["matmul_int4"] == 2
    assert any("int4 (gptq)" in line for line in result.explain)
    rtn = int4(mlp(), calibration_data=calibration(), inputs=None, options=["quant.fallback=false", "quant.method=rtn"])
    assert any("int4 (rtn)" in line for line in rtn.explain)


def test_int4_embedding_gather():
    model, table = embedding(rows=300, dim=64)
    ids = {"ids": np.array([[0, 5, 299, 7, 7], [1, 2, 3, 150, 0]], np.int64)}
    result = int4(model, inputs=ids)
    assert result.passes[0].counts == {"gather_int4": 1, "weights_int4": 300 * 64}
    assert ops(result.model) == ["GatherBlockQuantized"]
    want = int4_mod.dequantize_blocks(*int4_mod.quantize_blocks(table.T), 64).T[ids["ids"]]
    np.testing.assert_allclose(run(result.model, ids)["y"], want, rtol=1e-6, atol=1e-6)


def test_int4_attention():
    model, w, b = attention_model()
    feeds = {"x": np.ones((2, 7, 64), np.float32), "bias": np.zeros((2, 1, 7, 7), np.float32)}
    result = int4(model, inputs=feeds)
    assert op_counts(result.model) == {"MatMulNBits": 1, "Add": 1, "Split": 1, "MultiHeadAttention": 1,
                                       **MASKED_KEYS_OPS}


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "onnx"}, "--quant int4 needs --target ort"),
    ({"target": "ort", "options": ["quant.method=gptq"]}, "quant.method=gptq needs --calibration-data"),
    ({"target": "ort", "options": ["quant.method=awq"]}, "bad --opt quant.method=awq"),
])
def test_int4_usage_errors(kwargs, message):
    with pytest.raises(onnxopt.UsageError, match=message):
        onnxopt.optimize(mlp(), passes=["quant"], quant="int4", inputs=x_feed(), **kwargs)
