"""quant --quant static: calibrated QDQ placement (passes/quant/static.py).

What matters is that onnxruntime turns the layout into its integer kernels, so the tests check
the exact QuantizeLinear/DequantizeLinear placement, the fused graph onnxruntime builds from it,
the weight and bias encodings, and the outputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from models.builders import ops, run
from onnxopt.passes.quant import static as static_mod

RNG = np.random.default_rng(0)


def convnet(opset=17, classes=5):
    """conv(3->8)+bias -> relu -> maxpool -> conv(8->8)+bias -> add(residual) -> GAP -> flatten -> gemm."""
    inits = [numpy_helper.from_array(RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) / 3, "w1"),
             numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32) / 4, "b1"),
             numpy_helper.from_array(RNG.standard_normal((8, 8, 3, 3)).astype(np.float32) / 6, "w2"),
             numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32) / 4, "b2"),
             numpy_helper.from_array(RNG.standard_normal((classes, 8)).astype(np.float32), "wg"),
             numpy_helper.from_array(RNG.standard_normal(classes).astype(np.float32), "bg")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "p1"], ["s"], "add"),
             helper.make_node("GlobalAveragePool", ["s"], ["g"], "gap"),
             helper.make_node("Flatten", ["g"], ["f"], "flatten"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], "fc", transB=1)]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def samples(n=16, seed=1):
    return [{"x": np.random.default_rng(seed + i).standard_normal((1, 3, 16, 16)).astype(np.float32)} for i in range(n)]


def static(model, **kw):
    kw.setdefault("options", ["quant.fallback=false"])
    return onnxopt.optimize(model, passes=["quant"], quant="static", calibration_data=samples(), **kw)


def fused_ops(model):
    """The op types onnxruntime runs after its own (QDQ) fusions."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = f"{tmp}/m.onnx", f"{tmp}/o.onnx"
        onnx.save(model, src)
        o = ort.SessionOptions()
        o.optimized_model_filepath = dst
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(src, o, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(dst).graph.node]


def test_placement_fuses_into_integer_kernels():
    result = static(convnet())
    assert result.passes[0].counts == {"conv_int8": 2, "add_int8": 1, "globalaveragepool_int8": 1, "gemm_int8": 1,
                                       "activations_absorbed": 1, "weights_gptq": 3}
    out = result.model
    assert ops(out) == [
        "QuantizeLinear",  # the graph input x
        *["DequantizeLinear"] * 7,  # x, then the weights and int32 biases of conv1, conv2, fc (toposorted first)
        "Conv", "QuantizeLinear", "DequantizeLinear",  # relu absorbed: its range on the conv's output
        "MaxPool", "QuantizeLinear", "DequantizeLinear",  # carried: same scale and zero point
        "Conv", "QuantizeLinear", "DequantizeLinear",
        "Add", "QuantizeLinear", "DequantizeLinear",
        "GlobalAveragePool", "QuantizeLinear", "DequantizeLinear",
        "Flatten", "QuantizeLinear", "DequantizeLinear",  # carried
        "Gemm"]  # read by nothing quantized: a float output (QGemm's float form)
    fused = fused_ops(out)
    assert fused.count("QLinearConv") == 2 and "QLinearAdd" in fused and "QLinearGlobalAveragePool" in fused
    assert "QGemm" in fused and "Conv" not in fused and "Relu" not in fused
    assert result.verification["outputs"][0]["cosine"] > 0.999


def hard_swish_net():
    """conv1 -> x * HardSigmoid(x) (fuse's HardSwish below opset 14) -> conv2; conv2 * conv1."""
    inits = [numpy_helper.from_array(RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) / 3, "w1"),
             numpy_helper.from_array(RNG.standard_normal((8, 8, 3, 3)).astype(np.float32) / 6, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSigmoid", ["c1"], ["h"], "hsig", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["c1", "h"], ["a"], "hswish"),
             helper.make_node("Conv", ["a", "w2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c2", "c1"], ["y"], "gate")]  # a product of two tensors: quantized
    graph = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_x_times_hard_sigmoid_x_stays_one_float_activation():
    result = static(hard_swish_net())
    assert result.passes[0].counts == {"conv_int8": 2, "mul_int8": 1, "weights_gptq": 2}
    by_name = {n.name: n for n in result.model.graph.node}
    producer = {o: n for n in result.model.graph.node for o in n.output}
    hswish, gate = by_name["hswish"], by_name["gate"]
    assert [producer[t].op_type for t in hswish.input] == ["DequantizeLinear", "HardSigmoid"]
    assert producer[by_name["hsig"].input[0]].op_type == "DequantizeLinear"
    assert [n.op_type for n in result.model.graph.node if hswish.output[0] in n.input] == ["QuantizeLinear"]
    assert [producer[t].op_type for t in gate.input] == ["DequantizeLinear", "DequantizeLinear"]
    assert "QLinearMul" in fused_ops(result.model)
    assert result.verification["outputs"][0]["cosine"] > 0.999


def depthwise_net(share=False):
    """Two depthwise convs whose 8 input channels span very different ranges: conv0 (no activation)
    -> padded depthwise dw0; conv1 -> x * HardSigmoid(x) -> * a + b (PP-LCNet's affine block, scalar
    a and b) -> padded depthwise dw1, whose weights even the channels out again (as a BatchNorm
    after them would). share=True: the affine block's output is read twice."""
    rng = np.random.default_rng(5)
    spread = np.geomspace(0.02, 4.0, 8).astype(np.float32).reshape(8, 1, 1, 1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32) * spread, "w0"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * spread.ravel(), "b0"),
             numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32) / spread, "wd0"),
             numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32) * spread[::-1], "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32) / spread[::-1], "wd1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bd1"),
             numpy_helper.from_array(np.array([1.5], np.float32), "a"),
             numpy_helper.from_array(np.array(0.25, np.float32), "b")]
    dw = {"group": 8, "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], "conv0"),
             helper.make_node("Conv", ["c0", "wd0"], ["d0"], "dw0", **dw),
             helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1"),
             helper.make_node("HardSigmoid", ["c1"], ["h"], "hsig", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["c1", "h"], ["hs"], "hswish"),
             helper.make_node("Mul", ["a", "hs"], ["m"], "lab_mul"),
             helper.make_node("Add", ["m", "b"], ["l"], "lab_add"),
             helper.make_node("Conv", ["l", "wd1", "bd1"], ["d1"], "dw1", **dw),
             helper.make_node("Add", ["d0", "d1"], ["y"], "sum")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])]
    if share:
        nodes.append(helper.make_node("Relu", ["l"], ["l2"], "second_reader"))
        outputs.append(helper.make_tensor_value_info("l2", TensorProto.FLOAT, [1, 8, 16, 16]))
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_depthwise_inputs_share_the_uint8_range_and_err_less():
    model = depthwise_net()
    eq = static(model, write_over_budget=True)
    plain = static(model, options=["quant.fallback=false", "quant.equalize=false"], write_over_budget=True)
    assert eq.passes[0].counts["depthwise_inputs_equalized"] == 2
    assert "depthwise_inputs_equalized" not in plain.passes[0].counts
    init = {t.name: numpy_helper.to_array(t) for t in eq.model.graph.initializer}
    by_name = {n.name: n for n in eq.model.graph.node}
    producer = {o: n for n in eq.model.graph.node for o in n.output}
    a, b = (init[by_name[n].input[k]] for n, k in (("lab_mul", 0), ("lab_add", 1)))
    assert a.shape == b.shape == (8, 1, 1) and np.allclose(b / a, 0.25 / 1.5)  # (x * a + b) * s, per channel
    assert np.isclose(a.min(), 1.5) and a.max() > 1.5 * 10  # no channel shrinks; the small ones grow
    for conv in ("dw0", "dw1"):
        assert init[producer[by_name[conv].input[1]].input[1]].shape == (8,)  # weights per channel absorb s
    x = samples(8, seed=50)
    want = [run(model, f)["y"] for f in x]

    def error(m):
        return sum(float(np.sum((run(m, f)["y"] - w) ** 2)) for f, w in zip(x, want))

    assert error(eq.model) < 0.5 * error(plain.model)
    assert eq.verification["outputs"][0]["cosine"] > plain.verification["outputs"][0]["cosine"]
    again = static(eq.model)  # quantized already: nothing to do a second time
    assert "depthwise_inputs_equalized" not in again.passes[0].counts


@pytest.mark.filterwarnings("error")  # a numpy warning would be a line on the user's stderr
def test_channel_stretch_fills_the_range_and_weighs_the_cost():
    stretch = static_mod.channel_stretch
    # equal channels, and a channel that never varied: nothing to do
    assert stretch(np.array([-1.0, -1.0, 0.0]), np.array([2.0, 2.0, 0.0])).tolist() == [1.0, 1.0, 1.0]
    # non-negative channels: each reaches the top of the range, the widest keeps 1
    np.testing.assert_allclose(stretch(np.zeros(3), np.array([8.0, 2.0, 0.5])), [1.0, 4.0, 16.0], rtol=1e-6)
    # a channel in [-0.4, 0.4] beside [0, 22] (PP-OCRv4 rec's): stretching it past -0.4 pays though
    # the range widens. Errors weighed equally: bounds [-1/16, 1] x 22, the small channel x 55/16
    # (its step 3.2x finer, the other's 6% coarser: the least sum of squares among the ratios)
    lo, hi = np.array([0.0, -0.4]), np.array([22.0, 0.4])
    np.testing.assert_allclose(stretch(lo, hi), [1.0, 55 / 16], rtol=1e-6)
    # where the small channel's error costs 1000x more downstream: bounds [-1/2, 1], x 27.5
    np.testing.assert_allclose(stretch(lo, hi, energy=np.array([1e-3, 1.0])), [1.0, 27.5], rtol=1e-6)
    # where it costs nothing: the range stays as observed
    np.testing.assert_allclose(stretch(lo, hi, energy=np.array([1.0, 1e-9])), [1.0, 1.0], rtol=1e-6)
    # a channel that reached inf or NaN keeps 1, and does not set the others' factors
    got = stretch(np.array([0.0, 0.0, -np.inf, np.nan]), np.array([8.0, 2.0, 1.0, 1.0]))
    np.testing.assert_allclose(got, [1.0, 4.0, 1.0, 1.0], rtol=1e-6)


def test_depthwise_equalization_is_exact_in_float():
    import onnx_graphsurgeon as gs

    from onnxopt.graph import Names

    model = depthwise_net()
    graph = gs.import_onnx(model)
    found = static_mod.depthwise_inputs(graph)
    assert [(c.name, p.name, a.name if a else None) for c, p, a in found] == [
        ("dw0", "conv0", None), ("dw1", "lab_mul", "lab_add")]
    rng = np.random.default_rng(3)
    lo = {"c0": -rng.uniform(0.01, 3, 8), "l": -rng.uniform(0.01, 3, 8)}
    hi = {"c0": rng.uniform(0.01, 3, 8), "l": rng.uniform(0.01, 3, 8)}
    assert static_mod.equalize_depthwise(found, lo, hi, Names(graph)) == 2
    out = gs.export_onnx(graph.cleanup())
    for f in samples(4, seed=70):
        np.testing.assert_allclose(run(out, f)["y"], run(model, f)["y"], rtol=1e-5, atol=1e-5)


def test_depthwise_equalization_leaves_what_it_cannot_prove_free():
    import onnx_graphsurgeon as gs

    shared = static_mod.depthwise_inputs(gs.import_onnx(depthwise_net(share=True)))
    assert [c.name for c, _, _ in shared] == ["dw0"]  # the affine block's output has a second reader
    model = depthwise_net()
    for node in model.graph.node:
        if node.name == "hswish":
            node.input[1] = "c1"  # x * x: fine; the Mul by a non-constant below is not
        if node.name == "lab_mul":
            node.input[0] = "c1"
        if node.name == "dw0":
            node.attribute[0].i = 4  # group 4: not depthwise
            model.graph.initializer[2].CopyFrom(numpy_helper.from_array(
                np.ones((8, 2, 3, 3), np.float32), "wd0"))
    assert static_mod.depthwise_inputs(gs.import_onnx(model)) == []


def test_weights_bias_and_carried_parameters():
    out = static(convnet()).model
    init = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    by_output = {n.output[0]: n for n in out.graph.node}
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    wdq, bdq = by_output[conv.input[1]], by_output[conv.input[2]]
    w, w_scale, w_zero = (init[i] for i in wdq.input)
    assert w.dtype == np.int8 and w.shape == (8, 3, 3, 3) and np.abs(w).max() == 63 and not w_zero.any()
    assert helper.get_attribute_value(wdq.attribute[0]) == 0 and w_scale.shape == (8,)
    b, b_scale, _ = (init[i] for i in bdq.input)
    x_scale = init[by_output[conv.input[0]].input[1]]
    assert b.dtype == np.int32 and np.allclose(b_scale, x_scale * w_scale)
    pool = next(n for n in out.graph.node if n.op_type == "MaxPool")
    q_in = by_output[pool.input[0]]  # the DequantizeLinear before the pool
    q_out = next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    assert [init[i] for i in q_in.input[1:]] == [init[i] for i in q_out.input[1:]]


def test_outputs_close_to_float_and_idempotent():
    model = convnet()
    result = static(model)
    x = samples(1, seed=99)[0]
    want, got = run(model, x)["y"], run(result.model, x)["y"]
    assert np.abs(want - got).max() < 0.05 * np.abs(want).max()
    again = onnxopt.optimize(result.model, passes=["quant"], quant="static", calibration_data=samples())
    assert again.passes[0].counts == {} and ops(again.model) == ops(result.model)


def test_entropy_threshold_drops_a_far_outlier():
    rng = np.random.default_rng(0)
    for relu in (False, True):
        observer = static_mod.RangeObserver()
        xs = [rng.standard_normal(100000).astype(np.float32) for _ in range(3)]
        xs = [np.maximum(x, 0) for x in xs] if relu else xs
        xs[0][0] = 60.0
        for histograms in (False, True):
            for x in xs:
                observer.add({"t": x}, histograms)
        assert observer.range("t", "minmax")[1] == 60.0
        lo, hi = observer.range("t", "entropy")
        assert 3.0 < hi < 5.0 and (lo == 0.0 if relu else -5.0 < lo < -3.0)
    image = np.concatenate([rng.uniform(0.6, 1.0, 90000), rng.uniform(-1, 0.6, 10000)])
    hist, _ = np.histogram(image, 2048, (image.min(), image.max()))
    assert static_mod.entropy_threshold(hist, image.min(), image.max()) == pytest.approx(1.0, abs=1e-3)


def test_percentile_clips_outliers_minmax_keeps():
    calib = samples(40)  # 30 calibrate: 23040 input values
    calib[0]["x"][0, 0, 0, 0] = 500.0  # one extreme value: within the 0.01% tail
    ranges = {}
    for method in ("minmax", "percentile"):
        out = onnxopt.optimize(convnet(), passes=["quant"], quant="static", calibration_data=calib,
                               options=["quant.fallback=false", f"quant.calibration={method}"], min_cosine=0.5).model
        init = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
        ranges[method] = float(init[out.graph.node[0].input[1]])  # the input's scale
    assert ranges["percentile"] < 0.5 * ranges["minmax"]


def test_opset_11_is_raised_for_per_channel_qdq():
    result = static(convnet(opset=11))
    assert result.passes[0].counts["opset_raised_11_to_13"] == 1
    assert result.model.opset_import[0].version == 13


def test_a_sensitive_node_stays_float():
    model = convnet()
    w2 = numpy_helper.to_array(model.graph.initializer[2]).copy()
    w2[0] *= 300  # one output channel far larger: its scale crushes nothing, but the Add's range
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "w2"))
    result = onnxopt.optimize(model, passes=["quant"], quant="static", calibration_data=samples(), min_cosine=0.9999)
    counts = result.passes[0].counts
    assert counts["kept_float_for_budget"] >= 1 and result.verification["outputs"][0]["cosine"] >= 0.9999


@pytest.mark.parametrize("kwargs, message", [
    ({}, "--quant static needs --calibration-data"),
    ({"calibration_data": samples(2), "options": ["quant.calibration=kl"]}, "bad --opt quant.calibration=kl"),
])
def test_static_usage_errors(kwargs, message):
    with pytest.raises(onnxopt.UsageError, match=message):
        onnxopt.optimize(convnet(), passes=["quant"], quant="static", **kwargs)


@pytest.mark.filterwarnings("error")  # a numpy warning would be a line on the user's stderr
def test_a_bias_that_does_not_fit_int32_stays_float():
    """Inputs of 1e-37: input scale x weight scale underflows, the bias cannot be int32 there."""
    tiny = [{"x": s["x"] * np.float32(1e-37)} for s in samples()]
    out = onnxopt.optimize(convnet(), passes=["quant"], quant="static", calibration_data=tiny,
                           options=["quant.fallback=false"], min_cosine=0.1).model
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert conv.input[2] == "b1"  # the float bias, untouched
    assert all(t.data_type != TensorProto.INT32 or np.abs(numpy_helper.to_array(t)).max() < 2**31 - 1
               for t in out.graph.initializer)


# --------------------------------------------------------------------------- GPTQ weight rounding


def test_gptq_rows_beat_rounding_to_nearest_on_correlated_inputs():
    from onnxopt.passes.quant.int8 import quantize_columns

    rng = np.random.default_rng(3)
    mix = rng.standard_normal((48, 48)) * np.linspace(0.1, 3.0, 48)  # correlated inputs, uneven scales
    fit, held = rng.standard_normal((2000, 48)) @ mix, rng.standard_normal((500, 48)) @ mix
    w = rng.standard_normal((24, 48)).astype(np.float32)
    q, scale = static_mod.gptq_rows(w, fit.T @ fit, 63)
    q_rtn, scale_rtn = quantize_columns(w.T, 63)
    assert q.dtype == np.int8 and np.abs(q).max() <= 63 and np.array_equal(scale, scale_rtn)
    assert not np.array_equal(q, q_rtn.T)

    def error(levels):
        return np.linalg.norm(held @ (levels * scale[:, None] - w).T) / np.linalg.norm(held @ w.T)

    assert error(q) < 0.6 * error(q_rtn.T)


@pytest.mark.parametrize("attrs, shape", [
    ({"pads": [1, 0, 2, 1], "strides": [2, 1]}, (6, 4, 3, 3)),
    ({"dilations": [2, 2], "group": 2}, (6, 2, 3, 2)),
    ({"group": 4, "pads": [1, 1, 1, 1]}, (4, 1, 3, 3)),  # depthwise
])
def test_conv_patches_are_the_rows_the_weight_multiplies(attrs, shape):
    import onnx_graphsurgeon as gs

    from onnxopt.passes.quant.calib import conv_patches

    w = RNG.standard_normal(shape).astype(np.float32)
    x = RNG.standard_normal((2, 4, 9, 8)).astype(np.float32)
    node = gs.Node("Conv", attrs=dict(attrs, kernel_shape=list(shape[2:])),
                   inputs=[gs.Variable("x"), gs.Constant("w", w)], outputs=[gs.Variable("y")])
    proto = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    y = run(helper.make_model(proto, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), {"x": x})["y"]
    groups = conv_patches(x, node, limit=10**6)  # every output position
    group = attrs.get("group", 1)
    per = shape[0] // group
    for g, rows in enumerate(groups):
        got = rows @ w[g * per:(g + 1) * per].reshape(per, -1).T
        want = np.moveaxis(y[:, g * per:(g + 1) * per], 1, -1).reshape(-1, per)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_static_rounds_weights_by_gptq_unless_told_rtn():
    from onnxopt.passes.quant.int8 import quantize_columns

    def conv_levels(model):
        init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        by_output = {n.output[0]: n for n in model.graph.node}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        return [init[by_output[c.input[1]].input[0]] for c in convs]

    model = convnet()  # (each call draws new weights)
    gptq, rtn = static(model), static(model, options=["quant.fallback=false", "quant.method=rtn"])
    assert gptq.passes[0].counts["weights_gptq"] == 3 and "weights_gptq" not in rtn.passes[0].counts
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    assert np.array_equal(conv_levels(rtn.model)[0], quantize_columns(w1.reshape(8, -1).T, 63)[0].T.reshape(w1.shape))
    assert any(not np.array_equal(a, b) for a, b in zip(conv_levels(gptq.model), conv_levels(rtn.model)))
    assert gptq.verification["outputs"][0]["cosine"] > rtn.verification["outputs"][0]["cosine"]
    with pytest.raises(onnxopt.UsageError, match="bad --opt quant.method=adaround"):
        static(convnet(), options=["quant.method=adaround"])


def test_reductions_longer_than_the_gptq_cap_round_to_nearest(monkeypatch):
    monkeypatch.setattr(static_mod, "GPTQ_MAX_K", 30)  # conv1 reduces over 27 inputs, conv2 72, the gemm 8
    counts = static(convnet()).passes[0].counts
    assert counts["conv_int8"] == 2 and counts["weights_gptq"] == 2


def test_fit_budget_keeps_each_units_better_variant(monkeypatch):
    from onnxopt.passes.quant import budget
    from onnxopt.passes.quant.int8 import Site

    loss = {0: (0.001, 0.002), 1: (0.02, 0.001), 2: (0.003, 0.004), 3: (0.015, 0.016)}  # site: (variant 0, 1)

    class Scored:
        budget = 0.99

        def score(self, m):
            return 1.0 - sum(loss[i][v] for i, v in m["done"])

    def rewrite(m, chosen, variant):
        m["done"] = [(s.index, variant.get(s.index, 0)) for s in chosen]

    monkeypatch.setattr(budget, "copy_model", dict)
    sites = [Site(i, "conv", f"conv{i}", 1) for i in range(4)]
    fit = budget.fit_budget({}, sites, rewrite, Scored(), variants=2)
    assert [s.index for s in fit.chosen] == [0, 1, 2] and [s.index for s in fit.kept] == [3]
    assert fit.variant == {1: 1} and fit.score == pytest.approx(0.995)
    assert fit.sensitivity == pytest.approx({"conv3": 0.015, "conv2": 0.003, "conv0": 0.001, "conv1": 0.001})
    loss.update({1: (0.001, 0.001), 3: (0.001, 0.0)})  # variant 0 fits everywhere: tried first, kept
    fit = budget.fit_budget({}, sites, rewrite, Scored(), variants=2)
    assert len(fit.chosen) == 4 and fit.variant == {} and fit.trials == 1
    # 12 units: only the 4 most sensitive are measured in variant 1 (units 8-11 here)
    loss.clear()
    loss.update({i: (0.0005, 0.0) for i in range(8)})  # insensitive: variant 1 is better, never measured
    loss.update({8: (0.004, 0.001), 9: (0.003, 0.005), 10: (0.004, 0.001), 11: (0.005, 0.006)})
    sites = [Site(i, "conv", f"conv{i}", 1) for i in range(12)]
    fit = budget.fit_budget({}, sites, rewrite, Scored(), variants=2)
    assert fit.variant == {8: 1, 10: 1} and [s.index for s in fit.kept] == [11]
    assert fit.trials == 1 + 12 + 4 + 4  # full, each unit, the 4 in variant 1, the binary search over 12


def test_static_says_how_fast_the_int8_graph_runs_against_the_float_one(monkeypatch):
    import re

    from onnxopt.passes.quant import budget

    result = static(convnet())
    said = [line for line in result.explain if "runs the int8 graph in" in line]
    assert len(said) == 1 and re.search(r"in \d+\.\d\dx the float graph's time", said[0])
    ratio = result.details["quant"]["latency_vs_float"]
    assert ratio > 0 and (ratio > 1) == any("warning: the int8 graph is slower" in line for line in result.explain)
    monkeypatch.setattr(budget, "LATENCY_BYTES", 0)  # too large to time: nothing said
    result = static(convnet())
    assert not any("int8 graph" in line for line in result.explain) and "quant" not in result.details


def test_latency_ratio_of_a_model_against_itself_is_near_one():
    from onnxopt.graph import import_model
    from onnxopt.passes.quant.budget import latency_ratio

    m = import_model(convnet())
    assert 0.5 < latency_ratio(m, m, samples(1)[0], rounds=20) < 2.0


# ----------------------------------------------------------------------------------- --quant int8


def timed(monkeypatch, ratio):
    """--quant int8's timing of its static part, fixed (a tiny graph's real timing is noise)."""
    import onnxopt.passes.quant as quant_pass

    monkeypatch.setattr(quant_pass, "latency_ratio", lambda *args, **kwargs: ratio)


def test_int8_chooses_static_for_convolutions_and_dynamic_for_the_rest(monkeypatch):
    timed(monkeypatch, 0.8)
    result = onnxopt.optimize(convnet(classes=600), passes=["quant"], quant="int8", target="ort",
                              calibration_data=samples(), options=["quant.fallback=false"])
    counts = result.passes[0].counts
    assert counts["conv_int8"] == 2 and counts["add_int8"] == 1 and counts["gemm_int8"] == 1
    found = ops(result.model)
    assert found.count("Conv") == 2 and "Gemm" not in found and found.count("DynamicQuantizeMatMul") == 1
    assert any("int8 chose static QDQ for the 2 convolutions" in line for line in result.explain)
    assert any("int8 chose dynamic quantization" in line for line in result.explain)
    assert any("with static QDQ the graph runs 0.80x its float time" in line for line in result.explain)
    assert result.details["quant"] == {"static_latency_vs_float": 0.8}


def test_int8_keeps_convolutions_float_where_static_qdq_runs_slower(monkeypatch):
    timed(monkeypatch, 1.5)
    model = convnet(classes=600, opset=11)
    result = onnxopt.optimize(model, passes=["quant"], quant="int8", target="ort", calibration_data=samples(),
                              options=["quant.fallback=false"])
    assert result.passes[0].counts == {"gemm_int8": 1, "weights_int8": 600 * 8}  # the dynamic part alone
    found = ops(result.model)
    assert "QuantizeLinear" not in found and found.count("Conv") == 2 and "DynamicQuantizeMatMul" in found
    assert result.model.opset_import[0].version == 11  # static's raise to 13 undone with it
    assert any("int8 leaves the 2 convolutions in float after all (opset 11 kept): with static QDQ the graph "
               "ran 1.50x" in line for line in result.explain)


def test_int8_without_calibration_data_leaves_convolutions_float():
    x = samples(1)[0]
    result = onnxopt.optimize(convnet(classes=600), passes=["quant"], quant="int8", target="ort", inputs=x)
    assert result.passes[0].counts == {"gemm_int8": 1, "weights_int8": 600 * 8}
    assert "QuantizeLinear" not in ops(result.model) and ops(result.model).count("Conv") == 2
    assert any("int8 leaves the 2 convolutions in float" in line for line in result.explain)


def test_two_runs_write_identical_files(tmp_path):
    onnx.save(convnet(), tmp_path / "in.onnx")
    for name in ("a.onnx", "b.onnx"):
        onnxopt.optimize(tmp_path / "in.onnx", tmp_path / name, passes=["fold", "cleanup", "quant"], quant="static",
                         calibration_data=samples())
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def attention(s=6, d=8, heads=2):
    """Unfused self-attention with an additive [1, 1, 1, S] padding mask, as exporters write it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((d, d)) * 0.5).astype(np.float32), f"w{t}") for t in "qkvo"]
    inits += [numpy_helper.from_array(np.array([0, 0, heads, d // heads], np.int64), "split"),
              numpy_helper.from_array(np.array([0, 0, d], np.int64), "merge"),
              numpy_helper.from_array(np.array((d // heads) ** -0.5, np.float32), "scale")]
    nodes = []
    for t, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", f"w{t}"], [f"{t}0"]),
                  helper.make_node("Reshape", [f"{t}0", "split"], [f"{t}1"]),
                  helper.make_node("Transpose", [f"{t}1"], [f"{t}2"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["q2", "k2"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"]),
              helper.make_node("Add", ["s1", "mask"], ["s2"]), helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v2"], ["c0"]),
              helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["c1", "merge"], ["c2"]), helper.make_node("MatMul", ["c2", "wo"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s, d]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 1, s])]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("masked_keys", [False, True])
def test_attention_scores_and_masked_keys_factor_stay_float(masked_keys):
    """Calibrated on unpadded samples (a mask of zeros), the padded keys must stay hidden: a
    QuantizeLinear on scores + mask would clamp them to the calibrated minimum."""
    model = attention()
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((1, 6, 8)).astype(np.float32), "mask": np.zeros((1, 1, 1, 6), np.float32)}
             for _ in range(16)]
    out = onnxopt.optimize(model, passes=["fuse", "quant"] if masked_keys else ["quant"], quant="static",
                           target="onnx", calibration_data=calib, options=["quant.fallback=false"]).model
    made = {o: n.op_type for n in out.graph.node for o in n.output}
    for n in out.graph.node:
        if (n.op_type == "Add" and made.get(n.output[0]) == "Add" and any(
                r.op_type == "Softmax" and n.output[0] in r.input for r in out.graph.node)) or "hide_keys" in n.name:
            assert all(made.get(i) != "DequantizeLinear" for i in n.input), n.name
    assert sum("hide_keys" in n.name for n in out.graph.node) == masked_keys
    padded = np.zeros((1, 1, 1, 6), np.float32)
    padded[..., -2:] = np.finfo(np.float32).min
    for seed in range(3):  # the int8 error, 2-3% of the largest output either way (40-60% without the rule)
        x = np.random.default_rng(10 + seed).standard_normal((1, 6, 8)).astype(np.float32)
        for mask in (np.zeros_like(padded), padded):
            want, got = run(model, {"x": x, "mask": mask})["y"], run(out, {"x": x, "mask": mask})["y"]
            assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
