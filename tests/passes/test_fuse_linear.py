"""fuse: Gemm / MatMul folds (gemm_bn, scale_into_matmul, transpose_into_gemm), gemm_activation,
pad_into_conv and the shape chains. Exact op lists and counts, numerics through onnxruntime,
negatives, idempotence, a weight shared with another node, and a rule inside an If branch."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt
from models.builders import from_text, ops, optimize_checked, random_feeds, runtime_ops


def header(opset: int = 17) -> str:
    return f'<ir_version: 8, opset_import: ["" : {opset}]>'


def vals(n: int, seed: int = 0) -> str:
    return ", ".join(f"{x:.4f}" for x in np.random.default_rng(seed).standard_normal(n))


def fuse(model, target="onnx", **kwargs):
    return optimize_checked(model, ["fuse"], target=target, **kwargs)


def unchanged(model, target="onnx", **kwargs):
    """Fuse, check the numerics, assert nothing changed; returns the explain lines."""
    out, result = fuse(model, target=target, explain=True, **kwargs)
    assert ops(out) == ops(model) and result.passes[0].counts == {}
    return result.explain


def attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def inits(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def idempotent(model, target="onnx"):
    once = onnxopt.optimize(model, passes=["fuse"], target=target, verify="none").model
    twice = onnxopt.optimize(once, passes=["fuse"], target=target, verify="none")
    assert twice.passes[0].counts == {} and ops(twice.model) == ops(once)


# ----------------------------------------------------------------------------------- gemm_bn

BN = ("float[3] s = {1.5, 0.5, 2.0}, float[3] t = {0.1, -0.2, 0.3}, float[3] mu = {0.2, 0.1, -0.3}, "
      "float[3] v = {1.0, 2.0, 0.5}")


def bn_model(product: str, x: str = "float[2,4] x", y: str = "float[2,3] y", bn_attrs: str = "",
             opset: int = 17) -> onnx.ModelProto:
    return from_text(f"""
        {header(opset)}
        g ({x}) => ({y})
        <float[4,3] W = {{{vals(12)}}}, float[3,4] WT = {{{vals(12, 1)}}}, float[3] c = {{0.3, -0.1, 0.7}},
         {BN}> {{
            {product}
            y = BatchNormalization{bn_attrs}(h, s, t, mu, v)
        }}""")


@pytest.mark.parametrize("product", [
    "h = Gemm(x, W)",
    "h = Gemm<alpha = 0.5, beta = 2.0>(x, W, c)",
    "h = Gemm<transB = 1, alpha = 1.5>(x, WT, c)",
    "h = MatMul(x, W)",
    "p = MatMul(x, W)\n h = Add(c, p)",
])
def test_gemm_bn(product):
    out, result = fuse(bn_model(product))
    assert ops(out) == ["Gemm"] and result.passes[0].counts == {"gemm_bn": 1}
    assert [o.name for o in out.graph.output] == ["y"]


def test_gemm_bn_with_transposed_input_and_epsilon():
    model = bn_model("h = Gemm<transA = 1>(x, W, c)", x="float[4,2] x", bn_attrs="<epsilon = 0.01>")
    out, result = fuse(model)
    assert ops(out) == ["Gemm"] and attrs(out.graph.node[0])["transA"] == 1


def test_gemm_bn_refuses_a_3d_matmul():
    # BatchNormalization normalizes axis 1, which is not the product's last axis here
    model = from_text(f"""
        {header()}
        g (float[2,3,4] x) => (float[2,3,3] y) <float[4,3] W = {{{vals(12)}}}, {BN}> {{
            h = MatMul(x, W)
            y = BatchNormalization(h, s, t, mu, v)
        }}""")
    assert any("not 2-D" in line for line in unchanged(model))


@pytest.mark.parametrize("gemm", ["Gemm(x, w)", "Gemm(x, W, c)"])
def test_gemm_bn_refuses_a_weight_or_bias_that_is_an_input(gemm):
    model = from_text(f"""
        {header()}
        g (float[2,4] x, float[4,3] w, float[3] c) => (float[2,3] y) <float[4,3] W = {{{vals(12)}}}, {BN}> {{
            h = {gemm}
            y = BatchNormalization(h, s, t, mu, v)
        }}""")
    unchanged(model)


def test_gemm_bn_refuses_a_product_used_elsewhere():
    model = bn_model("h = Gemm(x, W)", y="float[2,3] y, float[2,3] h")
    unchanged(model)


def test_gemm_bn_refuses_training_mode():
    model = from_text(f"""
        {header(15)}
        g (float[2,4] x) => (float[2,3] y) <float[4,3] W = {{{vals(12)}}}, {BN}> {{
            h = Gemm(x, W)
            y, rm, rv = BatchNormalization<training_mode = 1>(h, s, t, mu, v)
        }}""")
    result = onnxopt.optimize(model, passes=["fuse"], verify="none", explain=True)
    assert ops(result.model) == ops(model) and result.passes[0].counts == {}
    assert any("training mode" in line for line in result.explain)


def test_gemm_bn_with_a_shared_weight_leaves_it_for_the_other_node():
    model = from_text(f"""
        {header()}
        g (float[2,4] x) => (float[2,3] y, float[2,3] z) <float[4,3] W = {{{vals(12)}}}, {BN}> {{
            h = Gemm(x, W)
            y = BatchNormalization(h, s, t, mu, v)
            z = MatMul(x, W)
        }}""")
    out, result = fuse(model)
    assert sorted(ops(out)) == ["Gemm", "MatMul"] and result.passes[0].counts == {"gemm_bn": 1}
    np.testing.assert_array_equal(inits(out)["W"], inits(model)["W"])
    node = {n.op_type: n for n in out.graph.node}
    assert node["MatMul"].input[1] == "W" and node["Gemm"].input[1] != "W"


# ----------------------------------------------------------------------------------- pad_into_conv


def pad_model(consumer: str, pads: str = "0, 0, 1, 2, 0, 0, 1, 0", value: str = "", opset: int = 17,
              mode: str = "", x: str = "float[1,3,6,6] x", outputs: str = "") -> onnx.ModelProto:
    """x -> Pad (H by 1 and 1, W by 2 before) -> consumer -> y"""
    if opset < 11:
        pad = f"xp = Pad<pads = [{pads}]{mode}{', value = ' + value if value else ''}>(x)"
        inputs = ""
    else:
        pad = f"xp = Pad{'<' + mode.lstrip(', ') + '>' if mode else ''}(x, p{', pv' if value else ''})"
        inputs = f", int64[8] p = {{{pads}}}" + (f", float pv = {{{value}}}" if value else "")
    return from_text(f"""
        {header(opset)}
        g ({x}) => (float[n,c,h,w] y{outputs}) <float[4,3,3,3] W = {{{vals(108)}}}{inputs}> {{
            {pad}
            y = {consumer}
        }}""")


@pytest.mark.parametrize("opset", [10, 13, 17])
def test_pad_into_conv(opset):
    out, result = fuse(pad_model("Conv<pads = [1, 0, 0, 1]>(xp, W)", opset=opset))
    assert ops(out) == ["Conv"] and result.passes[0].counts == {"pad_into_conv": 1}
    assert attrs(out.graph.node[0])["pads"] == [2, 2, 1, 1]


def test_pad_into_conv_with_an_explicit_zero_value_and_strides():
    out, result = fuse(pad_model("Conv<strides = [2, 2]>(xp, W)", value="0.0"))
    assert ops(out) == ["Conv"] and attrs(out.graph.node[0])["pads"] == [1, 2, 1, 0]


def test_pad_into_conv_with_axes_at_opset18():
    model = from_text(f"""
        {header(18)}
        g (float[1,3,6,6] x) => (float[1,4,7,5] y) <float[4,3,3,3] W = {{{vals(108)}}}, int64[4] p = {{2, 0, 1, 1}},
         int64[2] ax = {{-2, 3}}> {{
            xp = Pad(x, p, , ax)
            y = Conv(xp, W)
        }}""")
    out, result = fuse(model)
    assert ops(out) == ["Conv"] and attrs(out.graph.node[0])["pads"] == [2, 0, 1, 1]


def test_pad_into_conv_then_fused_conv_ort():
    model = from_text(f"""
        {header()}
        g (float[1,3,6,6] x) => (float[1,4,6,6] y)
        <float[4,3,3,3] W = {{{vals(108)}}}, int64[8] p = {{0, 0, 1, 1, 0, 0, 1, 1}}> {{
            xp = Pad(x, p)
            c = Conv(xp, W)
            y = Relu(c)
        }}""")
    out, result = fuse(model, target="ort")
    assert ops(out) == ["FusedConv"] and result.passes[0].counts == {"pad_into_conv": 1, "conv_activation": 1}
    assert attrs(out.graph.node[0])["pads"] == [1, 1, 1, 1]


@pytest.mark.parametrize("pool, value, want", [
    ("AveragePool<kernel_shape = [3, 3], pads = [1, 0, 0, 1], count_include_pad = 1>(xp)", "", [2, 2, 1, 1]),
    ("AveragePool<kernel_shape = [3, 3]>(xp)", "", [1, 2, 1, 0]),  # count_include_pad=0 without pads: exact as 1
    ("AveragePool<kernel_shape = [3, 3], strides = [2, 2], count_include_pad = 1>(xp)", "0.0", [1, 2, 1, 0]),
    ("MaxPool<kernel_shape = [3, 3], strides = [2, 2]>(xp)", "-inf", [1, 2, 1, 0]),
])
def test_pad_into_pool(pool, value, want):
    out, result = fuse(pad_model(pool, value=value))
    assert ops(out) == [pool.split("<")[0]] and result.passes[0].counts == {"pad_into_conv": 1}
    assert attrs(out.graph.node[0])["pads"] == want
    if "Average" in pool:
        assert attrs(out.graph.node[0])["count_include_pad"] == 1


@pytest.mark.parametrize("kwargs, reason", [
    (dict(consumer="AveragePool<kernel_shape = [3, 3], pads = [1, 0, 0, 1]>(xp)"), "count_include_pad=0"),
    (dict(consumer="MaxPool<kernel_shape = [3, 3]>(xp)"), "not -inf"),
    (dict(consumer="MaxPool<kernel_shape = [3, 3]>(xp)", value="0.0"), "not -inf"),
    (dict(consumer="AveragePool<kernel_shape = [2, 2]>(xp)"), "smaller than the kernel"),
    (dict(consumer="AveragePool<kernel_shape = [3, 3], ceil_mode = 1, strides = [2, 2]>(xp)"), "ceil_mode"),
    (dict(consumer="MaxPool<kernel_shape = [3, 3], dilations = [2, 2]>(xp)", value="-inf"), "dilations"),
    (dict(consumer="Conv(xp, W)", value="0.5"), "not 0"),
    (dict(consumer="Conv(xp, W)", mode=', mode = "reflect"'), "mode"),
    (dict(consumer="Conv(xp, W)", mode=', mode = "reflect"', opset=10), "mode"),
    (dict(consumer="Conv(xp, W)", pads="0, 1, 1, 2, 0, 0, 1, 0", x="float[1,2,6,6] x"), "channel"),
    (dict(consumer="Conv(xp, W)", pads="0, 0, 1, 2, 0, 0, -1, 0"), "negative"),
    (dict(consumer='Conv<auto_pad = "SAME_UPPER">(xp, W)'), "auto_pad"),
    (dict(consumer="Conv(xp, W)", outputs=", float[1,3,8,8] xp"), "graph output"),
])
def test_pad_not_merged(kwargs, reason):
    explain = unchanged(pad_model(**kwargs))
    assert any(reason in line for line in explain), explain


def test_pad_with_pads_from_an_input_is_not_merged():
    model = from_text(f"""
        {header()}
        g (float[1,3,6,6] x, int64[8] p) => (float[n,c,h,w] y) <float[4,3,3,3] W = {{{vals(108)}}}> {{
            xp = Pad(x, p)
            y = Conv(xp, W)
        }}""")
    feeds = {"x": random_feeds(model)["x"], "p": np.array([0, 0, 1, 1, 0, 0, 0, 2], np.int64)}
    assert any("not constants" in line for line in unchanged(model, feeds=feeds))


# ----------------------------------------------------------------------------------- scale_into_matmul


def scale_model(body: str, x: str = "float[2,3,4] x", y: str = "float[2,3,5] y", extra: str = "",
                dtype: str = "float") -> onnx.ModelProto:
    return from_text(f"""
        {header()}
        g ({x}) => ({y})
        <{dtype}[4,5] W = {{{vals(20)}}}, {dtype}[5,4] WT = {{{vals(20, 1)}}},
         {dtype}[5] c = {{0.1, 0.2, -0.3, 0.4, 0.5}}, {dtype} k = {{0.5}},
         {dtype}[5] vec = {{2.0, -1.0, 0.5, 4.0, 1.5}}{extra}> {{
            {body}
        }}""")


@pytest.mark.parametrize("body", [
    "h = MatMul(x, W)\n y = Mul(k, h)",
    "h = MatMul(x, W)\n y = Div(h, k)",
    "h = MatMul(x, W)\n y = Mul(h, vec)",
    "h = MatMul(x, W)\n y = Div(h, vec)",
    "h = MatMul(x, W)\n y = Mul(h, row)",
    "h = Mul(x, k)\n y = MatMul(h, W)",
    "h = Div(x, k)\n y = MatMul(h, W)",
])
def test_scale_into_matmul(body):
    out, result = fuse(scale_model(body, extra=", float[1,1,5] row = {1.0, 2.0, 3.0, 4.0, 5.0}"))
    assert ops(out) == ["MatMul"] and result.passes[0].counts == {"scale_into_matmul": 1}
    assert out.graph.node[0].input[0] == "x"


def test_scale_into_matmul_float64():
    model = scale_model("h = MatMul(x, W)\n y = Div(h, vec)", x="double[2,3,4] x", y="double[2,3,5] y", dtype="double")
    out, result = fuse(model)
    assert ops(out) == ["MatMul"] and result.passes[0].counts == {"scale_into_matmul": 1}


@pytest.mark.parametrize("body, alpha, beta", [
    ("h = Gemm<alpha = 2.0, beta = 0.5>(x, W, c)\n y = Mul(h, k)", 1.0, 0.25),
    ("h = Gemm(x, W, c)\n y = Div(h, k)", 2.0, 2.0),
    ("h = Gemm<transB = 1>(x, WT, c)\n y = Mul(h, vec)", 1.0, 1.0),
    ("h = Gemm<beta = 3.0>(x, W, c)\n y = Div(h, vec)", 1.0, 3.0),
])
def test_scale_into_gemm(body, alpha, beta):
    out, result = fuse(scale_model(body, x="float[3,4] x", y="float[3,5] y"))
    assert ops(out) == ["Gemm"] and result.passes[0].counts == {"scale_into_matmul": 1}
    a = attrs(out.graph.node[0])
    assert a.get("alpha", 1.0) == pytest.approx(alpha) and a.get("beta", 1.0) == pytest.approx(beta)


def test_scalar_into_gemm_alpha_needs_no_constant_weight():
    model = from_text(f"""
        {header()}
        g (float[3,4] x, float[4,5] w) => (float[3,5] y) <float k = {{0.25}}> {{
            h = Gemm(x, w)
            y = Mul(h, k)
        }}""")
    out, result = fuse(model)
    assert ops(out) == ["Gemm"] and attrs(out.graph.node[0])["alpha"] == pytest.approx(0.25)


def test_scale_into_matmul_makes_a_new_weight_for_a_shared_one():
    model = scale_model("h = MatMul(x, W)\n y = Mul(h, vec)\n z = MatMul(x, W)", y="float[2,3,5] y, float[2,3,5] z")
    out, result = fuse(model)
    assert ops(out) == ["MatMul", "MatMul"] and result.passes[0].counts == {"scale_into_matmul": 1}
    np.testing.assert_array_equal(inits(out)["W"], inits(model)["W"])
    scaled, other = sorted(out.graph.node, key=lambda n: n.output[0])  # writing y, z
    assert other.input[1] == "W" and scaled.input[1] != "W"
    np.testing.assert_allclose(inits(out)[scaled.input[1]], inits(model)["W"] * inits(model)["vec"], rtol=1e-6)


@pytest.mark.parametrize("body, extra, reason", [
    ("h = Mul(x, v4)\n y = MatMul(h, W)", ", float[4] v4 = {1.0, 2.0, 3.0, 4.0}", "only a scalar"),
    ("h = MatMul(x, W)\n y = Div(h, z5)", ", float[5] z5 = {1.0, 0.0, 1.0, 1.0, 1.0}", "zeros"),
    ("h = MatMul(x, W)\n y = Mul(h, col)", ", float[3,1] col = {1.0, 2.0, 3.0}", "last axis"),
    ("h = MatMul(x, W)\n y = Sub(h, k)", "", None),
    ("h = MatMul(x, W)\n y = Div(k, h)", "", None),
])
def test_scale_not_folded(body, extra, reason):
    explain = unchanged(scale_model(body, extra=extra))
    assert reason is None or any(reason in line for line in explain), explain


def test_scale_not_folded_when_the_product_is_used_elsewhere():
    unchanged(scale_model("h = MatMul(x, W)\n y = Mul(h, k)", y="float[2,3,5] y, float[2,3,5] h"))


GELU_FFN = {
    "erf": "q = Div(h, s2)\n e = Erf(q)\n p = Add(e, one)\n r = Mul(h, p)",
    "tanh": "h3 = Pow(h, three)\n t0 = Mul(c, h3)\n t1 = Add(h, t0)\n t2 = Mul(k2, t1)\n e = Tanh(t2)\n"
            " p = Add(e, one)\n r = Mul(h, p)",
}


def gelu_ffn(form: str, opset: int = 17) -> onnx.ModelProto:
    """x @ W1 + b, a GELU as torch's legacy exporter writes it ((h * (1 + f(h))) * 0.5), then @ W2;
    or with `form` another body that computes r from h."""
    return from_text(f"""
        {header(opset)}
        g (float[2,3,4] x) => (float[2,3,4] y)
        <float[4,5] W = {{{vals(20)}}}, float[5,4] WT = {{{vals(20, 1)}}}, float[5] c5 = {{0.1, 0.2, -0.3, 0.4, 0.5}},
         float s2 = {{1.4142135}}, float one = {{1.0}}, float half = {{0.5}}, float three = {{3.0}},
         float c = {{0.044715}}, float k2 = {{0.7978846}}> {{
            h0 = MatMul(x, W)
            h = Add(h0, c5)
            {GELU_FFN.get(form, form)}
            g = Mul(r, half)
            y = MatMul(g, WT)
        }}""")


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_scale_not_folded_out_of_a_gelu_the_runtime_fuses(form):
    """Below opset 20 fuse cannot write Gelu; folding the GELU's 0.5 into the next MatMul would
    leave elementwise ops that onnxruntime no longer fuses into its Gelu / FastGelu."""
    model = gelu_ffn(form)
    explain = unchanged(model)
    assert any("the 0.5 of a GELU the runtime fuses itself" in line for line in explain), explain
    if form == "erf":  # onnxruntime's own fusion (it does not match this tanh form)
        assert "Gelu" in runtime_ops(model) and "Erf" not in runtime_ops(model)
    # the same chain without the GELU around it still folds
    out, result = fuse(gelu_ffn("r = Mul(h, h)"))
    assert result.passes[0].counts == {"scale_into_matmul": 1} and ops(out) == ["MatMul", "Add", "Mul", "MatMul"]


def test_scale_not_folded_for_integers():
    model = from_text(f"""
        {header()}
        g (int32[2,4] x) => (int32[2,3] y)
        <int32[4,3] W = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}}, int32 k = {{3}}> {{
            h = MatMul(x, W)
            y = Mul(h, k)
        }}""")
    for target in ("onnx", "ort"):
        unchanged(model, target=target)


def test_scale_with_a_weight_that_is_an_input():
    model = from_text(f"""
        {header()}
        g (float[2,3,4] x, float[4,5] w) => (float[2,3,5] y) <float k = {{0.5}}> {{
            h = MatMul(x, w)
            y = Mul(h, k)
        }}""")
    unchanged(model, target="onnx")
    # ort: into com.microsoft FusedMatMul's alpha instead
    out, result = fuse(model, target="ort")
    assert ops(out) == ["FusedMatMul"] and attrs(out.graph.node[0])["alpha"] == pytest.approx(0.5)
    assert result.passes[0].counts == {"scale_into_matmul": 1}


def alpha_model(scaling: str, tail: str = "y = Identity(z)") -> onnx.ModelProto:
    """a @ b, then `scaling` (by c) into z, then `tail` into y"""
    return from_text(f"""
        {header()}
        g (float[2,3,4] a, float[2,4,5] b) => (float[2,3,5] y) <float c = {{{scaling.split()[1]}}},
         float[2,3,5] m = {{{vals(30)}}}> {{
            h = MatMul(a, b)
            z = {scaling.split()[0]}
            {tail}
        }}""")


@pytest.mark.parametrize("scaling, alpha", [("Mul(c,h) 0.3", 0.3), ("Div(h,c) 8.0", 0.125), ("Div(h,c) 0.25", 4.0)])
def test_scale_into_fused_matmul_alpha_ort(scaling, alpha):
    out, result = fuse(alpha_model(scaling), target="ort")
    assert ops(out) == ["FusedMatMul", "Identity"] and result.passes[0].counts == {"scale_into_matmul": 1}
    assert attrs(out.graph.node[0])["alpha"] == pytest.approx(alpha)


@pytest.mark.parametrize("scaling, tail, reason", [
    ("Div(h,c) 3.0", "y = Identity(z)", "power of two"),
    ("Mul(c,h) 0.3", "y = Softmax(z)", "attention"),
    ("Div(h,c) 8.0", "s = Add(z, m)\n y = Softmax(s)", "attention"),
])
def test_fused_matmul_alpha_refused(scaling, tail, reason):
    explain = unchanged(alpha_model(scaling, tail), target="ort")
    assert any(reason in line for line in explain), explain


# ----------------------------------------------------------------------------------- transpose_into_gemm


@pytest.mark.parametrize("body, trans", [
    ("ta = Transpose<perm = [1, 0]>(a)\n y = Gemm(ta, B, c)", (1, 0)),
    ("tb = Transpose(BT)\n y = Gemm<transA = 1>(a, tb, c)", (1, 1)),
    ("ta = Transpose(a)\n tb = Transpose<perm = [1, 0]>(B)\n y = Gemm<transB = 1, alpha = 0.5>(ta, tb, c)", (1, 0)),
])
def test_transpose_into_gemm(body, trans):
    model = from_text(f"""
        {header()}
        g (float[4,3] a) => (float[3,5] y)
        <float[4,5] B = {{{vals(20)}}}, float[5,4] BT = {{{vals(20, 1)}}}, float[5] c = {{1.0, 2.0, 3.0, 4.0, 5.0}}> {{
            {body}
        }}""")
    for target in ("onnx", "ort"):
        out, result = fuse(model, target=target)
        assert ops(out) == ["Gemm"] and result.passes[0].counts == {"transpose_into_gemm": 1}
        a = attrs(out.graph.node[0])
        assert (a["transA"], a["transB"]) == trans


def matmul_model(body: str, a: str = "float[2,3,5,4] a", b: str = "float[2,3,5,6] b",
                 y: str = "float[2,3,4,6] y", opset: int = 17) -> onnx.ModelProto:
    return from_text(f"""
        {header(opset)}
        g ({a}, {b}) => ({y}) {{
            {body}
        }}""")


@pytest.mark.parametrize("body, b, trans", [
    ("ta = Transpose<perm = [0, 1, 3, 2]>(a)\n y = MatMul(ta, b)", "float[2,3,5,6] b", (1, 0)),
    ("tb = Transpose<perm = [0, 1, 3, 2]>(b)\n y = MatMul(a, tb)", "float[2,3,6,5] b", (0, 1)),
    ("ta = Transpose<perm = [0, 1, 3, 2]>(a)\n tb = Transpose<perm = [0, 1, 3, 2]>(b)\n y = MatMul(ta, tb)",
     "float[2,3,6,5] b", (1, 1)),
])
def test_transposed_matmul_into_fused_matmul_ort(body, b, trans):
    a = "float[2,3,5,4] a" if "ta" in body else "float[2,3,4,5] a"
    model = matmul_model(body, a=a, b=b)
    out, result = fuse(model, target="ort")
    assert ops(out) == ["FusedMatMul"] and result.passes[0].counts == {"transpose_into_gemm": 1}
    node = attrs(out.graph.node[0])
    assert (node["transA"], node["transB"]) == trans
    unchanged(model, target="onnx")  # not 2-D: stays for onnx


def test_transposed_matmul_and_scale_into_one_fused_matmul():
    model = from_text(f"""
        {header()}
        g (float[2,4,3] a, float[2,4,5] b) => (float[2,3,5] y) <float k = {{0.5}}> {{
            ta = Transpose<perm = [0, 2, 1]>(a)
            h = MatMul(ta, b)
            y = Mul(h, k)
        }}""")
    out, result = fuse(model, target="ort")
    assert ops(out) == ["FusedMatMul"]
    assert result.passes[0].counts == {"transpose_into_gemm": 1, "scale_into_matmul": 1}
    assert attrs(out.graph.node[0])["alpha"] == pytest.approx(0.5) and attrs(out.graph.node[0])["transA"] == 1


@pytest.mark.parametrize("opset, fused", [(13, True), (10, False)])
def test_2d_transposed_matmul_into_gemm_onnx(opset, fused):
    model = matmul_model("tb = Transpose(b)\n y = MatMul(a, tb)", a="float[4,5] a", b="float[6,5] b",
                         y="float[4,6] y", opset=opset)
    out, result = fuse(model, explain=True)
    if fused:
        assert ops(out) == ["Gemm"] and result.passes[0].counts == {"transpose_into_gemm": 1}
        assert attrs(out.graph.node[0]) == {"transA": 0, "transB": 1}
    else:
        assert ops(out) == ops(model) and any("needs opset 11" in line for line in result.explain)


@pytest.mark.parametrize("body, a, b, y, target", [
    # not the last two axes
    ("ta = Transpose<perm = [1, 0, 2, 3]>(a)\n y = MatMul(ta, b)", "float[3,2,5,4] a", "float[2,3,4,6] b",
     "float[2,3,5,6] y", "ort"),
    # not 2-D
    ("ta = Transpose<perm = [0, 1, 3, 2]>(a)\n y = MatMul(ta, b)", "float[2,3,5,4] a", "float[2,3,5,6] b",
     "float[2,3,4,6] y", "onnx"),
])
def test_transposed_matmul_not_fused(body, a, b, y, target):
    unchanged(matmul_model(body, a=a, b=b, y=y), target=target)


def test_transpose_used_elsewhere_is_not_fused():
    model = matmul_model("ta = Transpose<perm = [0, 1, 3, 2]>(a)\n y = MatMul(ta, b)",
                         y="float[2,3,4,6] y, float[2,3,4,5] ta")
    unchanged(model, target="ort")


def test_transposed_matmul_float64_is_not_fused_ort():
    model = matmul_model("ta = Transpose<perm = [0, 1, 3, 2]>(a)\n y = MatMul(ta, b)", a="double[2,3,5,4] a",
                         b="double[2,3,5,6] b", y="double[2,3,4,6] y")
    unchanged(model, target="ort")


def test_transposed_constant_weight_is_left_to_fold():
    model = from_text(f"""
        {header()}
        g (float[2,3,4] x) => (float[2,3,5] y) <float[5,4] W = {{{vals(20)}}}> {{
            wt = Transpose(W)
            y = MatMul(x, wt)
        }}""")
    out, result = optimize_checked(model, ["fold", "fuse"])
    assert ops(out) == ["MatMul"]


# ----------------------------------------------------------------------------------- gemm_activation


def gemm_act_model(act: str, dtype: str = "float", y: str = "float[3,5] y") -> onnx.ModelProto:
    return from_text(f"""
        {header()}
        g ({dtype}[3,4] x) => ({y}) <{dtype}[4,5] W = {{{vals(20)}}}, {dtype}[5] c = {{0.1, 0.2, -0.3, 0.4, 0.5}}> {{
            h = Gemm<alpha = 0.5>(x, W, c)
            y = {act}
        }}""")


@pytest.mark.parametrize("act, params", [
    ("Relu(h)", {}), ("Sigmoid(h)", {}), ("Tanh(h)", {}), ("Softplus(h)", {}), ("Softsign(h)", {}),
    ("LeakyRelu(h)", {"activation_alpha": 0.01}), ("LeakyRelu<alpha = 0.2>(h)", {"activation_alpha": 0.2}),
    ("HardSigmoid<alpha = 0.3>(h)", {"activation_alpha": 0.3, "activation_beta": 0.5}),
    ("Elu<alpha = 0.7>(h)", {"activation_alpha": 0.7}), ("Celu(h)", {"activation_alpha": 1.0}),
    ("ThresholdedRelu<alpha = 0.2>(h)", {"activation_alpha": 0.2}),
    ("Selu(h)", {"activation_alpha": 1.6732632, "activation_gamma": 1.050701}),
])
def test_gemm_activation_ort(act, params):
    out, result = fuse(gemm_act_model(act), target="ort")
    assert ops(out) == ["FusedGemm"] and result.passes[0].counts == {"gemm_activation": 1}
    got = attrs(out.graph.node[0])
    assert got["activation"].decode() == act.split("(")[0].split("<")[0] and got["alpha"] == pytest.approx(0.5)
    assert {k: v for k, v in got.items() if k.startswith("activation_")} == pytest.approx(params)


@pytest.mark.parametrize("act, dtype, target", [
    ("Relu(h)", "float", "onnx"), ("Clip(h)", "float", "ort"), ("Relu(h)", "double", "ort"),
])
def test_gemm_activation_not_fused(act, dtype, target):
    unchanged(gemm_act_model(act, dtype, y=f"{dtype}[3,5] y"), target=target)


def test_gemm_activation_refuses_a_product_used_elsewhere():
    unchanged(gemm_act_model("Relu(h)", y="float[3,5] y, float[3,5] h"), target="ort")


def test_gemm_bn_then_activation_ort():
    model = from_text(f"""
        {header()}
        g (float[2,4] x) => (float[2,3] y) <float[4,3] W = {{{vals(12)}}}, {BN}> {{
            h = MatMul(x, W)
            b = BatchNormalization(h, s, t, mu, v)
            y = Relu(b)
        }}""")
    out, result = fuse(model, target="ort")
    assert ops(out) == ["FusedGemm"] and result.passes[0].counts == {"gemm_bn": 1, "gemm_activation": 1}


# ----------------------------------------------------------------------------------- shape chains


def chain_model(body: str, x: str = "float[2,3,4] x", y: str = "float[4,3,2] y", opset: int = 17) -> onnx.ModelProto:
    return from_text(f"""
        {header(opset)}
        g ({x}) => ({y}) <int64[2] s1 = {{6, 4}}, int64[3] s2 = {{4, 3, 2}}, int64[3] s0 = {{0, 2, 2}},
         int64[1] a1 = {{1}}> {{
            {body}
        }}""")


def test_transpose_chain_composes():
    model = chain_model("t = Transpose<perm = [1, 0, 2]>(x)\n y = Transpose<perm = [2, 0, 1]>(t)", y="float[4,3,2] y")
    out, result = fuse(model)
    assert ops(out) == ["Transpose"] and result.passes[0].counts == {"transpose_chain": 1}
    assert attrs(out.graph.node[0])["perm"] == [2, 1, 0]


@pytest.mark.parametrize("perms", [("<perm = [1, 2, 0]>", "<perm = [2, 0, 1]>"), ("", "")])
def test_transpose_chain_identity_disappears(perms):
    model = chain_model(f"r = Relu(x)\n t = Transpose{perms[0]}(r)\n u = Transpose{perms[1]}(t)\n y = Neg(u)",
                        y="float[2,3,4] y")
    out, result = fuse(model)
    assert ops(out) == ["Relu", "Neg"] and result.passes[0].counts == {"transpose_chain": 1}
    assert list(out.graph.node[1].input) == ["r"]


def test_transpose_chain_identity_keeps_the_output_name():
    model = chain_model("r = Relu(x)\n t = Transpose<perm = [1, 0, 2]>(r)\n y = Transpose<perm = [1, 0, 2]>(t)",
                        y="float[2,3,4] y")
    out, result = fuse(model)
    assert ops(out) == ["Relu"] and [o.name for o in out.graph.output] == ["y"]
    assert list(out.graph.node[0].output) == ["y"]
    # from a graph input to a graph output, only an Identity keeps both names
    model = chain_model("t = Transpose<perm = [1, 0, 2]>(x)\n y = Transpose<perm = [1, 0, 2]>(t)", y="float[2,3,4] y")
    out, result = fuse(model)
    assert ops(out) == ["Identity"] and result.passes[0].counts == {"transpose_chain": 1}


def test_transpose_chain_with_the_intermediate_used_elsewhere():
    model = chain_model("t = Transpose<perm = [1, 0, 2]>(x)\n y = Transpose<perm = [1, 0, 2]>(t)",
                        y="float[2,3,4] y, float[3,2,4] t")
    unchanged(model)


@pytest.mark.parametrize("inner, x", [
    ("r = Reshape(x, s1)", "float[2,3,4] x"), ("r = Flatten<axis = 2>(x)", "float[2,3,4] x"),
    ("r = Unsqueeze(x, a1)", "float[2,3,4] x"), ("r = Squeeze(x, a1)", "float[2,1,3,4] x"),
    ("r = Squeeze(x)", "float[2,1,3,4] x"), ("r = Reshape(x, s1)\n q = Reshape(r, s1)", "float[2,3,4] x"),
])
def test_reshape_chain(inner, x):
    body = f"{inner}\n y = Reshape({'q' if 'q =' in inner else 'r'}, s2)"
    out, result = fuse(chain_model(body, x=x))
    assert ops(out) == ["Reshape"] and list(out.graph.node[0].input) == ["x", "s2"]
    assert result.passes[0].counts == {"reshape_chain": 2 if "q =" in inner else 1}


def test_reshape_chain_opset11_squeeze_attributes():
    model = chain_model("r = Unsqueeze<axes = [0]>(x)\n y = Reshape(r, s2)", opset=11)
    out, result = fuse(model)
    assert ops(out) == ["Reshape"] and list(out.graph.node[0].input) == ["x", "s2"]


def test_reshape_chain_refuses_a_zero_entry():
    # s0 = [0, 2, 2] copies r's first dimension (6), which is not x's (2): the chain must stay
    model = chain_model("r = Reshape(x, s1)\n y = Reshape(r, s0)", y="float[6,2,2] y")
    explain = unchanged(model)
    assert any("copies a dimension" in line for line in explain), explain


def test_reshape_chain_with_the_intermediate_used_elsewhere():
    unchanged(chain_model("r = Reshape(x, s1)\n y = Reshape(r, s2)", y="float[4,3,2] y, float[6,4] r"))


@pytest.mark.parametrize("body, opset", [
    ("u = Reshape(r, s4)\n s = Squeeze(u, a1)\n v = Unsqueeze(s, a1)", 17),
    ("u = Reshape(r, s4)\n s = Squeeze(u, a1)\n v = Unsqueeze(s, am3)", 17),  # -3: axis 1 of the rank-4 result
    ("u = Reshape(r, s4)\n s = Squeeze(u)\n v = Unsqueeze(s, a1)", 17),  # no axes: the size-1 axes of the shape
    ("u = Reshape(r, s4)\n s = Squeeze<axes = [1]>(u)\n v = Unsqueeze<axes = [1]>(s)", 11),
    ("u = Identity(r)\n s = Unsqueeze(u, an)\n v = Squeeze(s, a3)", 17),  # -1: axis 3 of the rank-4 Unsqueeze output
    ("u = Identity(r)\n s = Unsqueeze<axes = [0]>(u)\n v = Squeeze<axes = [-4]>(s)", 11),
])
def test_squeeze_chain(body, opset):
    y = "float[2,1,3,4] y" if "Reshape" in body else "float[2,3,4] y"
    model = from_text(f"""
        {header(opset)}
        g (float[2,3,4] x) => ({y}) <int64[1] a1 = {{1}}, int64[1] am3 = {{-3}}, int64[1] an = {{-1}},
         int64[1] a3 = {{3}}, int64[4] s4 = {{2, 1, 3, 4}}> {{
            r = Relu(x)
            {body}
            y = Neg(v)
        }}""")
    out, result = fuse(model)
    assert result.passes[0].counts == {"squeeze_chain": 1}
    assert ops(out) == ["Relu", body.split("= ")[1].split("(")[0], "Neg"]
    assert out.graph.node[2].input[0] == "u"


def test_squeeze_chain_refuses_different_axes():
    model = from_text(f"""
        {header()}
        g (float[2,1,3,1] x) => (float[2,3,1,1] y) <int64[1] a1 = {{1}}, int64[1] a2 = {{2}}> {{
            s = Squeeze(x, a1)
            y = Unsqueeze(s, a2)
        }}""")
    explain = unchanged(model)
    assert any("axes differ" in line for line in explain), explain


def test_squeeze_chain_with_the_intermediate_used_elsewhere():
    model = from_text(f"""
        {header()}
        g (float[2,3] x) => (float[2,3] y, float[1,2,3] s) <int64[1] a = {{0}}> {{
            s = Unsqueeze(x, a)
            y = Squeeze(s, a)
        }}""")
    unchanged(model)


def test_squeeze_chain_identity_from_input_to_output_keeps_an_identity():
    model = from_text(f"""
        {header()}
        g (float[2,3] x) => (float[2,3] y) <int64[1] a = {{0}}> {{
            s = Unsqueeze(x, a)
            y = Squeeze(s, a)
        }}""")
    out, result = fuse(model)
    assert ops(out) == ["Identity"] and result.passes[0].counts == {"squeeze_chain": 1}


# ----------------------------------------------------------------------------------- idempotence, If


@pytest.mark.parametrize("model, target", [
    (bn_model("h = Gemm<transB = 1, alpha = 1.5>(x, WT, c)"), "onnx"),
    (pad_model("Conv<pads = [1, 0, 0, 1]>(xp, W)"), "ort"),
    (scale_model("h = MatMul(x, W)\n y = Mul(h, vec)"), "onnx"),
    (alpha_model("Div(h,c) 8.0"), "ort"),
    (matmul_model("ta = Transpose<perm = [0, 1, 3, 2]>(a)\n y = MatMul(ta, b)"), "ort"),
    (gemm_act_model("LeakyRelu(h)"), "ort"),
    (chain_model("t = Transpose<perm = [1, 0, 2]>(x)\n y = Transpose<perm = [2, 0, 1]>(t)"), "onnx"),
    (chain_model("r = Reshape(x, s1)\n y = Reshape(r, s2)"), "onnx"),
])
def test_idempotent(model, target):
    idempotent(model, target)


def test_rules_inside_an_if_branch():
    model = from_text(f"""
        {header()}
        g (bool cond, float[2,4] x) => (float[2,3] y) <float[4,3] W = {{{vals(12)}}}, {BN}> {{
            y = If(cond) <then_branch = then () => (float[2,3] ty) {{
                h = MatMul(x, W)
                ty = BatchNormalization(h, s, t, mu, v)
            }}, else_branch = other () => (float[2,3] fy) {{
                a = Transpose<perm = [1, 0]>(x)
                b = Transpose<perm = [1, 0]>(a)
                fy = MatMul(b, W)
            }}>
        }}""")
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": random_feeds(model)["x"]}
        out, result = fuse(model, feeds=feeds)
        assert result.passes[0].counts == {"gemm_bn": 1, "transpose_chain": 1}
        branches = {a.name: [n.op_type for n in a.g.node] for a in out.graph.node[0].attribute}
        assert branches == {"then_branch": ["Gemm"], "else_branch": ["MatMul"]}


def test_disable_the_new_rules():
    model = bn_model("h = Gemm(x, W)")
    out, result = fuse(model, options=["fuse.disable=gemm_bn"])
    assert ops(out) == ops(model) and result.passes[0].counts == {}
