"""fuse: the activation and RMS norm rules (silu, hard_sigmoid, hard_swish, mish, gelu_tanh,
bias_fast_gelu, rms_norm, skip_rms_norm) with exact counts and numerics, opset refusals, negatives
and idempotence. The forms are those torch's exporters (legacy and dynamo), HF and tf2onnx write."""

import math

import numpy as np
import onnx
import pytest

import onnxopt
from models.builders import from_text, ops, optimize_checked, random_feeds

MS = "com.microsoft"
K = math.sqrt(2 / math.pi)


def header(opset: int) -> str:
    ir = max(8, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]))
    return f'<ir_version: {ir}, opset_import: ["" : {opset}]>'


def model(opset: int, body: str, consts: str = "", inputs: str = "float[2,3,4] x",
          outputs: str = "float[2,3,4] y") -> onnx.ModelProto:
    consts = f"<{consts}>" if consts else ""
    return from_text(f"""
        {header(opset)}
        g ({inputs}) => ({outputs}) {consts} {{
            {body}
        }}""")


def fuse(m, target="onnx", scale=1.0, **kwargs):
    feeds = {k: np.asarray(v * scale, dtype=v.dtype) for k, v in random_feeds(m).items()}
    return optimize_checked(m, ["fuse"], target=target, feeds=feeds, **kwargs)


def attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def assert_unchanged(m, target="onnx", scale=1.0, **kwargs):
    out, result = fuse(m, target, scale, **kwargs)
    assert ops(out) == ops(m) and result.passes[0].counts == {}
    return result


def explain(m, target="onnx", **kwargs) -> list[str]:
    return onnxopt.optimize(m, passes=["fuse"], target=target, verify="none", explain=True, **kwargs).explain


def assert_idempotent(m, target):
    once = onnxopt.optimize(m, passes=["fuse"], target=target, verify="none").model
    twice = onnxopt.optimize(once, passes=["fuse"], target=target, verify="none")
    assert twice.passes[0].counts == {} and ops(twice.model) == ops(once)


# silu -------------------------------------------------------------------------------------------

SILU = {
    "torch": ("s = Sigmoid(x)\n y = Mul(x, s)", "", 1.0),
    "swapped": ("s = Sigmoid(x)\n y = Mul(s, x)", "", 1.0),
    "alpha": ("ax = Mul(x, alpha)\n s = Sigmoid(ax)\n y = Mul(x, s)", "float alpha = {1.702}", 1.702),
    "alpha_first": ("ax = Mul(alpha, x)\n s = Sigmoid(ax)\n y = Mul(s, x)", "float alpha = {0.5}", 0.5),
}


def silu_model(opset, form="torch"):
    body, consts, _ = SILU[form]
    return model(opset, body, consts)


@pytest.mark.parametrize("form", list(SILU))
def test_silu_onnx_opset24(form):
    out, result = fuse(silu_model(24, form))
    assert ops(out) == ["Swish"] and out.graph.node[0].domain == ""
    assert attrs(out.graph.node[0])["alpha"] == pytest.approx(SILU[form][2])
    assert result.passes[0].counts == {"silu": 1}


@pytest.mark.parametrize("form", list(SILU))
def test_silu_ort_quick_gelu(form):
    out, result = fuse(silu_model(17, form), target="ort")
    assert ops(out) == ["QuickGelu"] and out.graph.node[0].domain == MS
    assert attrs(out.graph.node[0])["alpha"] == pytest.approx(SILU[form][2])
    assert result.passes[0].counts == {"silu": 1}


def test_silu_onnx_needs_opset24_and_max_opset_raises_it():
    m = silu_model(17)
    assert_unchanged(m)
    assert ("fuse: silu at Mul: not fused: Swish needs opset 24, the model has 17 (--max-opset 24 allows it)"
            in explain(m))
    out, result = fuse(m, max_opset=24)
    assert ops(out) == ["Swish"] and result.passes[0].counts == {"silu": 1, "opset_raised_17_to_24": 1}
    assert next(o.version for o in out.opset_import if o.domain == "") == 24


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_silu_sigmoid_used_elsewhere_is_not_fused(target):
    as_output = model(24, "s = Sigmoid(x)\n y = Mul(x, s)", outputs="float[2,3,4] y, float[2,3,4] s")
    assert_unchanged(as_output, target)
    read_again = model(24, "s = Sigmoid(x)\n y = Mul(x, s)\n z = Add(s, x)", outputs="float[2,3,4] y, float[2,3,4] z")
    assert_unchanged(read_again, target)
    assert "fuse: silu at Mul: not fused: intermediate 's' is used elsewhere" in explain(read_again, target)


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_silu_negatives(target):
    other = model(24, "s = Sigmoid(z)\n y = Mul(x, s)", inputs="float[2,3,4] x, float[2,3,4] z")
    assert_unchanged(other, target)
    vector_alpha = model(24, "ax = Mul(x, alpha)\n s = Sigmoid(ax)\n y = Mul(x, s)",
                         "float[4] alpha = {1.0, 1.5, 2.0, 2.5}")
    assert_unchanged(vector_alpha, target)
    # a [1,1,1,1] alpha would broadcast x up to rank 4: the fused op would not
    broadcast = model(24, "ax = Mul(x, alpha)\n s = Sigmoid(ax)\n y = Mul(x, s)", "float[1,1,1,1] alpha = {1.5}",
                      outputs="float[1,2,3,4] y")
    assert_unchanged(broadcast, target)


def test_silu_ort_refuses_double():
    m = model(17, "s = Sigmoid(x)\n y = Mul(x, s)", inputs="double[2,3,4] x", outputs="double[2,3,4] y")
    assert_unchanged(m, "ort")


# hard_sigmoid ----------------------------------------------------------------------------------

CLIP_6 = "float three = {3.0}, float lo = {0.0}, float hi = {6.0}, float six = {6.0}, float sixth = {0.16666667}"
HARD_SIGMOID = {  # form: (opset, body, alpha, beta)
    "torch_div": (13, "p = Add(x, three)\n c = Clip(p, lo, hi)\n y = Div(c, six)", 1 / 6, 0.5),
    "mul_sixth": (13, "p = Add(three, x)\n c = Clip(p, lo, hi)\n y = Mul(sixth, c)", 1 / 6, 0.5),
    "clip_attrs": (10, "p = Add(x, three)\n c = Clip<min = 0.0, max = 6.0>(p)\n y = Div(c, six)", 1 / 6, 0.5),
    "min_max": (13, "p = Add(x, three)\n m = Max(p, lo)\n c = Min(m, hi)\n y = Div(c, six)", 1 / 6, 0.5),
    "max_min": (13, "p = Add(x, three)\n m = Min(hi, p)\n c = Max(m, lo)\n y = Mul(c, sixth)", 1 / 6, 0.5),
    "keras": (13, "ax = Mul(x, a)\n p = Add(ax, b)\n y = Clip(p, lo, one)", 0.2, 0.5),
    "keras_min_max": (13, "ax = Mul(x, a)\n p = Add(b, ax)\n m = Max(p, lo)\n y = Min(m, one)", 0.2, 0.5),
    "div": (13, "ax = Div(x, d)\n p = Add(ax, b)\n y = Clip(p, lo, one)", 0.25, 0.5),
}
GENERAL = "float a = {0.2}, float b = {0.5}, float d = {4.0}, float one = {1.0}"


def hard_sigmoid_model(form):
    opset, body, _, _ = HARD_SIGMOID[form]
    return model(opset, body, f"{CLIP_6}, {GENERAL}")


@pytest.mark.parametrize("form", list(HARD_SIGMOID))
@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_hard_sigmoid(form, target):
    _, _, alpha, beta = HARD_SIGMOID[form]
    out, result = fuse(hard_sigmoid_model(form), target, scale=5.0)  # both clip regions
    assert ops(out) == ["HardSigmoid"] and result.passes[0].counts == {"hard_sigmoid": 1}
    assert attrs(out.graph.node[0]) == {"alpha": pytest.approx(alpha), "beta": pytest.approx(beta)}


@pytest.mark.parametrize("body, consts", [
    ("p = Add(x, three)\n c = Clip(p, lo, hi)\n y = Div(c, six)", "float three = {2.5}"),  # wrong shift
    ("p = Add(x, three)\n c = Clip(p, lo, hi)\n y = Div(c, six)", "float hi = {5.0}"),  # wrong bound
    ("p = Add(x, three)\n c = Clip(p, lo, hi)\n y = Div(c, six)", "float six = {5.0}"),  # wrong scale
    ("p = Add(x, three)\n c = Clip(p, lo)\n y = Div(c, six)", ""),  # no upper bound
    ("ax = Mul(x, a)\n p = Add(ax, b)\n y = Clip(p, lo, hi)", ""),  # clip(.., 0, 6) of x * a + b
    ("p = Add(x, three)\n m = Max(p, lo, lo)\n c = Min(m, hi)\n y = Div(c, six)", ""),  # Max of three inputs
])
def test_hard_sigmoid_wrong_constants(body, consts):
    defaults = dict(c.split(" = ") for c in f"{CLIP_6}, {GENERAL}".split(", "))
    defaults.update(dict(c.split(" = ") for c in consts.split(", ") if c))
    m = model(13, body, ", ".join(f"{k} = {v}" for k, v in defaults.items()))
    assert_unchanged(m, scale=5.0)


def test_hard_sigmoid_clip_bound_from_input_or_used_elsewhere():
    m = model(13, "p = Add(x, three)\n c = Clip(p, lo, h)\n y = Div(c, six)", CLIP_6,
              inputs="float[2,3,4] x, float h")
    assert_unchanged(m, scale=5.0)
    m = model(13, "p = Add(x, three)\n c = Clip(p, lo, hi)\n y = Div(c, six)", CLIP_6,
              outputs="float[2,3,4] y, float[2,3,4] c")
    assert_unchanged(m, scale=5.0)


# hard_swish ------------------------------------------------------------------------------------

HARD_SWISH = {  # form: (body, counts at opset 14)
    "hard_sigmoid": ("h = HardSigmoid<alpha = 0.1666666716337204>(x)\n y = Mul(x, h)", {"hard_swish": 1}),
    "torch_relu6": ("p = Add(x, three)\n c = Clip(p, lo, hi)\n m = Mul(x, c)\n y = Div(m, six)", {"hard_swish": 1}),
    "tf_sixth": ("p = Add(x, three)\n c = Clip(p, lo, hi)\n m = Mul(c, x)\n y = Mul(m, sixth)", {"hard_swish": 1}),
    "min_max": ("p = Add(x, three)\n a = Max(p, lo)\n c = Min(a, hi)\n m = Mul(x, c)\n y = Div(m, six)",
                {"hard_swish": 1}),
    # the inner clip / 6 becomes HardSigmoid first, then x * HardSigmoid(x)
    "x_times_hsig": ("p = Add(x, three)\n c = Clip(p, lo, hi)\n d = Div(c, six)\n y = Mul(x, d)",
                     {"hard_sigmoid": 1, "hard_swish": 1}),
}


def hard_swish_model(opset, form):
    return model(opset, HARD_SWISH[form][0], CLIP_6)


@pytest.mark.parametrize("form", list(HARD_SWISH))
@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_hard_swish_opset14(form, target):
    out, result = fuse(hard_swish_model(14, form), target, scale=5.0)
    assert ops(out) == ["HardSwish"] and result.passes[0].counts == HARD_SWISH[form][1]


@pytest.mark.parametrize("form", ["torch_relu6", "tf_sixth", "min_max"])
def test_hard_swish_below_opset14_is_x_times_hard_sigmoid(form):
    m = hard_swish_model(13, form)
    out, result = fuse(m, scale=5.0)  # both clip regions; numerics checked against onnxruntime
    assert ops(out) == ["HardSigmoid", "Mul"] and result.passes[0].counts == {"hard_swish": 1}
    hsig, mul = out.graph.node
    assert attrs(hsig) == {"alpha": pytest.approx(1 / 6), "beta": pytest.approx(0.5)}
    assert list(hsig.input) == ["x"] and sorted(mul.input) == sorted(["x", hsig.output[0]])
    assert list(mul.output) == ["y"]
    assert_idempotent(m, "onnx")


def test_hard_swish_needs_opset14_and_max_opset_raises_it():
    m = hard_swish_model(13, "torch_relu6")
    assert ("fuse: hard_swish at Mul: not fused: HardSwish needs opset 14, the model has 13 "
            "(--max-opset 14 allows it)") in explain(m)
    out, result = fuse(m, scale=5.0, max_opset=14)
    assert ops(out) == ["HardSwish"] and result.passes[0].counts == {"hard_swish": 1, "opset_raised_13_to_14": 1}


def test_hard_swish_at_opset13_keeps_the_hard_sigmoid():
    out, result = fuse(hard_swish_model(13, "x_times_hsig"), scale=5.0)
    assert ops(out) == ["HardSigmoid", "Mul"] and result.passes[0].counts == {"hard_sigmoid": 1}
    out, result = fuse(hard_swish_model(13, "x_times_hsig"), scale=5.0, max_opset=17)
    assert ops(out) == ["HardSwish"]
    assert result.passes[0].counts == {"hard_sigmoid": 1, "hard_swish": 1, "opset_raised_13_to_14": 1}


def test_hard_swish_from_opset10_clip_attributes():
    m = model(10, "p = Add(x, three)\n c = Clip<min = 0.0, max = 6.0>(p)\n m = Mul(x, c)\n y = Div(m, six)", CLIP_6)
    out, result = fuse(m, scale=5.0)
    assert ops(out) == ["HardSigmoid", "Mul"] and result.passes[0].counts == {"hard_swish": 1}
    out, result = fuse(m, scale=5.0, max_opset=14)
    assert ops(out) == ["HardSwish"] and result.passes[0].counts == {"hard_swish": 1, "opset_raised_10_to_14": 1}


def test_hard_swish_negatives():
    keras = model(14, "h = HardSigmoid<alpha = 0.2>(x)\n y = Mul(x, h)")  # not HardSwish's 1/6
    assert_unchanged(keras, scale=5.0)
    other = model(14, "h = HardSigmoid<alpha = 0.1666666716337204>(z)\n y = Mul(x, h)",
                  inputs="float[2,3,4] x, float[2,3,4] z")
    assert_unchanged(other, scale=5.0)
    used = model(14, HARD_SWISH["torch_relu6"][0], CLIP_6, outputs="float[2,3,4] y, float[2,3,4] m")
    assert_unchanged(used, scale=5.0)
    wrong = model(14, HARD_SWISH["torch_relu6"][0], CLIP_6.replace("hi = {6.0}", "hi = {6.5}"))
    assert_unchanged(wrong, scale=5.0)


# mish ------------------------------------------------------------------------------------------

MISH = {
    "softplus": "s = Softplus(x)\n t = Tanh(s)\n y = Mul(x, t)",
    "log_exp": "e = Exp(x)\n p = Add(e, one)\n s = Log(p)\n t = Tanh(s)\n y = Mul(t, x)",
}


@pytest.mark.parametrize("form", list(MISH))
@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_mish(form, target):
    out, result = fuse(model(18, MISH[form], "float one = {1.0}"), target, scale=3.0)
    assert ops(out) == ["Mish"] and result.passes[0].counts == {"mish": 1}


def test_mish_needs_opset18_and_max_opset_raises_it():
    m = model(17, MISH["softplus"])
    assert_unchanged(m)
    assert ("fuse: mish at Mul: not fused: Mish needs opset 18, the model has 17 (--max-opset 18 allows it)"
            in explain(m))
    out, result = fuse(m, max_opset=18)
    assert ops(out) == ["Mish"] and result.passes[0].counts == {"mish": 1, "opset_raised_17_to_18": 1}


def test_mish_negatives():
    assert_unchanged(model(18, MISH["log_exp"], "float one = {2.0}"))
    other = model(18, "s = Softplus(z)\n t = Tanh(s)\n y = Mul(x, t)", inputs="float[2,3,4] x, float[2,3,4] z")
    assert_unchanged(other)
    assert_unchanged(model(18, MISH["softplus"], outputs="float[2,3,4] y, float[2,3,4] t"))


# gelu_tanh, bias_fast_gelu ---------------------------------------------------------------------

GELU_CONSTS = (f"float k = {{{K:.10f}}}, float c = {{0.044715}}, float one = {{1.0}}, float one2 = {{1.0}}, "
               "float half = {0.5}, float two = {2.0}, float three = {3.0}, float[4] bias = {0.1, -0.2, 0.3, 0.4}")
GELU_TANH = {
    # torch legacy: 0.5 * (x * (1 + tanh(k * (x + c * (x * (x * x))))))
    "torch_legacy": "x2 = Mul(x, x)\n x3 = Mul(x, x2)\n cx3 = Mul(c, x3)\n i = Add(x, cx3)\n ki = Mul(k, i)\n"
                    "t = Tanh(ki)\n p = Add(one, t)\n xp = Mul(x, p)\n y = Mul(half, xp)",
    # torch dynamo (opset 18): x * (0.5 * (tanh(k * (x + c * x^3)) + 1))
    "torch_dynamo": "x3 = Pow(x, three)\n cx3 = Mul(c, x3)\n i = Add(x, cx3)\n ki = Mul(k, i)\n"
                    "t = Tanh(ki)\n p = Add(t, one)\n hp = Mul(half, p)\n y = Mul(x, hp)",
    # HF NewGELU / tf2onnx: (x * 0.5) * (1 + tanh((x + x^3 * c) * k))
    "hf_new": "hx = Mul(x, half)\n x3 = Pow(x, three)\n cx3 = Mul(x3, c)\n i = Add(x, cx3)\n ki = Mul(i, k)\n"
              "t = Tanh(ki)\n p = Add(t, one)\n y = Mul(hx, p)",
    # HF FastGELU: 0.5 * x * (1 + tanh(x * k * (1 + c * x * x)))
    "hf_fast": "hx = Mul(x, half)\n kx = Mul(x, k)\n cx = Mul(x, c)\n cxx = Mul(cx, x)\n q = Add(cxx, one2)\n"
               "ki = Mul(kx, q)\n t = Tanh(ki)\n p = Add(t, one)\n y = Mul(hx, p)",
    # x * (1 + c * x^2) written with Pow, then k * (...)
    "poly_pow": "x2 = Pow(x, two)\n cx2 = Mul(c, x2)\n q = Add(one2, cx2)\n xq = Mul(x, q)\n"
                "ki = Mul(k, xq)\n t = Tanh(ki)\n p = Add(t, one)\n xp = Mul(x, p)\n y = Mul(xp, half)",
}


def gelu_tanh_model(opset, form="torch_legacy", bias=False, consts=GELU_CONSTS, **kwargs):
    pre = "x = Add(a, bias)" if bias else "x = Identity(a)"
    return model(opset, f"{pre}\n {GELU_TANH[form]}", consts, inputs="float[2,3,4] a", **kwargs)


@pytest.mark.parametrize("form", list(GELU_TANH))
def test_gelu_tanh_onnx_opset20(form):
    out, result = fuse(gelu_tanh_model(20, form), scale=2.0)
    assert ops(out) == ["Identity", "Gelu"] and out.graph.node[1].domain == ""
    assert attrs(out.graph.node[1]) == {"approximate": b"tanh"}
    assert result.passes[0].counts == {"gelu_tanh": 1}


@pytest.mark.parametrize("form", list(GELU_TANH))
def test_gelu_tanh_ort_fast_gelu(form):
    out, result = fuse(gelu_tanh_model(17, form), target="ort", scale=2.0)
    assert ops(out) == ["Identity", "FastGelu"] and out.graph.node[1].domain == MS
    assert result.passes[0].counts == {"gelu_tanh": 1}


def test_gelu_tanh_onnx_needs_opset20_and_max_opset_raises_it():
    m = gelu_tanh_model(17)
    assert_unchanged(m)
    assert ("fuse: gelu_tanh at Mul: not fused: Gelu needs opset 20, the model has 17 (--max-opset 20 allows it)"
            in explain(m))
    out, result = fuse(m, max_opset=20)
    assert ops(out) == ["Identity", "Gelu"]
    assert result.passes[0].counts == {"gelu_tanh": 1, "opset_raised_17_to_20": 1}


def test_bias_fast_gelu_ort():
    out, result = fuse(gelu_tanh_model(17, "hf_new", bias=True), target="ort", scale=2.0)
    assert ops(out) == ["FastGelu"] and len(out.graph.node[0].input) == 2
    assert result.passes[0].counts == {"gelu_tanh": 1, "bias_fast_gelu": 1}
    out, result = fuse(gelu_tanh_model(20, "hf_new", bias=True), target="onnx", scale=2.0)
    assert ops(out) == ["Add", "Gelu"] and result.passes[0].counts == {"gelu_tanh": 1}


def test_bias_fast_gelu_needs_a_vector_bias():
    consts = GELU_CONSTS.replace("float[4] bias = {0.1, -0.2, 0.3, 0.4}", "float[3,1] bias = {0.1, -0.2, 0.3}")
    out, result = fuse(gelu_tanh_model(17, "hf_new", bias=True, consts=consts), target="ort")
    assert ops(out) == ["Add", "FastGelu"] and result.passes[0].counts == {"gelu_tanh": 1}


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_gelu_tanh_negatives(target):
    assert_unchanged(gelu_tanh_model(20, consts=GELU_CONSTS.replace("0.044715", "0.05")), target)
    assert_unchanged(gelu_tanh_model(20, consts=GELU_CONSTS.replace(f"{K:.10f}", "0.8")), target)
    assert_unchanged(gelu_tanh_model(20, consts=GELU_CONSTS.replace("half = {0.5}", "half = {0.6}")), target)
    assert_unchanged(gelu_tanh_model(20, outputs="float[2,3,4] y, float[2,3,4] t"), target)


# rms_norm, skip_rms_norm -----------------------------------------------------------------------

RMS_CONSTS = ("float two = {2.0}, float eps = {1e-6}, float one = {1.0}, float[4] gamma = {1.0, 2.0, 0.5, 1.5}, "
              "int64[1] ax = {-1}")
RMS = {  # form: (square, normalize, scaled)
    "dynamo": ("Pow(x, two)", "r = Reciprocal(sd)\n n = Mul(x, r)", "y = Mul(gamma, n)"),
    "legacy": ("Pow(x, two)", "r = Div(one, sd)\n n = Mul(x, r)", "y = Mul(gamma, n)"),
    "div": ("Mul(x, x)", "n = Div(x, sd)", "y = Mul(n, gamma)"),
    "no_gamma": ("Mul(x, x)", "r = Reciprocal(sd)\n y = Mul(r, x)", ""),
}


def rms_model(opset, form="dynamo", axes="-1", consts=RMS_CONSTS, **kwargs):
    square, normalize, scaled = RMS[form]
    mean = "v = ReduceMean(sq, ax)" if opset >= 18 else f"v = ReduceMean<axes = [{axes}]>(sq)"
    body = f"sq = {square}\n {mean}\n ve = Add(v, eps)\n sd = Sqrt(ve)\n {normalize}\n {scaled}"
    return model(opset, body, consts.replace("{-1}", f"{{{axes}}}"), **kwargs)


@pytest.mark.parametrize("form", list(RMS))
@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_rms_norm_opset23(form, target):
    out, result = fuse(rms_model(23, form), target)
    assert ops(out) == ["RMSNormalization"] and result.passes[0].counts == {"rms_norm": 1}
    node = out.graph.node[0]
    assert attrs(node) == {"axis": -1, "epsilon": pytest.approx(1e-6)}
    scale = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == node.input[1]))
    assert scale.tolist() == ([1.0] * 4 if form == "no_gamma" else [1.0, 2.0, 0.5, 1.5])


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_rms_norm_needs_opset23_and_max_opset_raises_it(target):
    m = rms_model(17, "legacy")
    assert_unchanged(m, target)
    assert ("fuse: rms_norm at Mul: not fused: RMSNormalization needs opset 23, the model has 17 "
            "(--max-opset 23 allows it)") in explain(m, target)
    out, result = fuse(m, target, max_opset=23)
    assert ops(out) == ["RMSNormalization"]
    assert result.passes[0].counts == {"rms_norm": 1, "opset_raised_17_to_23": 1}


def test_rms_norm_hf_llama_legacy_casts_go_with_cleanup():
    # torch legacy export of LlamaRMSNorm: Cast to float, ..., Cast back, then weight * h
    m = model(23, "h = Cast<to = 1>(x)\n sq = Pow(h, two)\n v = ReduceMean(sq, ax)\n ve = Add(v, eps)\n"
                  "sd = Sqrt(ve)\n r = Div(one, sd)\n n = Mul(h, r)\n nc = Cast<to = 1>(n)\n y = Mul(gamma, nc)",
              RMS_CONSTS)
    out, result = optimize_checked(m, ["cleanup", "fuse"], target="onnx")
    assert ops(out) == ["RMSNormalization"] and result.passes[1].counts == {"rms_norm": 1}


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_rms_norm_negatives(target):
    assert_unchanged(rms_model(23, axes="1", inputs="float[2,4,4] x", outputs="float[2,4,4] y"), target)
    assert_unchanged(rms_model(17, axes="1", inputs="float[2,4,4] x", outputs="float[2,4,4] y"), target,
                     max_opset=23)
    wide = RMS_CONSTS.replace("float[4] gamma = {1.0, 2.0, 0.5, 1.5}", "float[1,1,4] gamma = {1.0, 2.0, 0.5, 1.5}")
    assert_unchanged(rms_model(23, consts=wide), target)  # nor without it: the scale follows
    assert_unchanged(rms_model(23, outputs="float[2,3,4] y, float[2,3,1] v"), target)  # the mean read again
    assert_unchanged(rms_model(23, consts=RMS_CONSTS.replace("two = {2.0}", "two = {3.0}")), target)
    assert_unchanged(rms_model(23, "legacy", consts=RMS_CONSTS.replace("one = {1.0}", "one = {2.0}")), target)
    other = model(23, "sq = Mul(x, x)\n v = ReduceMean(sq, ax)\n ve = Add(v, eps)\n sd = Sqrt(ve)\n n = Div(z, sd)\n"
                      "y = Mul(n, gamma)", RMS_CONSTS, inputs="float[2,3,4] x, float[2,3,4] z")
    assert_unchanged(other, target)


SKIP = ["fuse.skip_layer_norm=true"]  # skip_rms_norm is opt-in with skip_layer_norm


def skip_rms_model(opset, fused_op=False, shapes=("float[2,3,4]", "float[2,3,4]"), **kwargs):
    inputs = f"{shapes[0]} a, {shapes[1]} b"
    if fused_op:
        return model(opset, "x = Add(a, b)\n y = RMSNormalization<axis = -1, epsilon = 1e-6>(x, gamma)", RMS_CONSTS,
                     inputs=inputs, **kwargs)
    square, normalize, scaled = RMS["dynamo"]
    mean = "ReduceMean(sq, ax)" if opset >= 18 else "ReduceMean<axes = [-1]>(sq)"
    return model(opset, f"x = Add(a, b)\n sq = {square}\n v = {mean}\n ve = Add(v, eps)\n"
                        f"sd = Sqrt(ve)\n {normalize}\n {scaled}", RMS_CONSTS, inputs=inputs, **kwargs)


@pytest.mark.parametrize("opset, fused_op", [(23, True), (17, False)])
def test_skip_rms_norm_ort(opset, fused_op):
    """Opt-in with fuse.skip_layer_norm, like SkipLayerNormalization."""
    out, result = fuse(skip_rms_model(opset, fused_op), "ort")
    assert "SkipSimplifiedLayerNormalization" not in ops(out)
    out, result = fuse(skip_rms_model(opset, fused_op), "ort", options=SKIP)
    assert ops(out) == ["SkipSimplifiedLayerNormalization"] and out.graph.node[0].domain == MS
    assert result.passes[0].counts == {"skip_rms_norm": 1}
    assert attrs(out.graph.node[0]) == {"epsilon": pytest.approx(1e-6)} and len(out.graph.node[0].input) == 3


def test_skip_rms_norm_from_the_idiom_at_opset23_goes_straight_to_the_skip_op():
    out, result = fuse(skip_rms_model(23), "ort", options=SKIP)
    assert ops(out) == ["SkipSimplifiedLayerNormalization"] and result.passes[0].counts == {"skip_rms_norm": 1}


def test_skip_rms_norm_onnx_target_keeps_the_add():
    out, result = fuse(skip_rms_model(23), "onnx")
    assert ops(out) == ["Add", "RMSNormalization"] and result.passes[0].counts == {"rms_norm": 1}


def test_skip_rms_norm_refusals():
    # the sum is the residual stream read again (as in LLaMA): only the norm fuses
    used = skip_rms_model(23, outputs="float[2,3,4] y, float[2,3,4] x")
    out, result = fuse(used, "ort", options=SKIP)
    assert ops(out) == ["Add", "RMSNormalization"] and result.passes[0].counts == {"rms_norm": 1}
    assert_unchanged(skip_rms_model(17, outputs="float[2,3,4] y, float[2,3,4] x"), "ort", options=SKIP)
    assert_unchanged(skip_rms_model(23, True, outputs="float[2,3,4] y, float[2,3,4] x"), "ort", options=SKIP)
    # a scale that only broadcasts
    one_scale = model(23, "x = Add(a, b)\n y = RMSNormalization<axis = -1, epsilon = 1e-6>(x, gamma)",
                      "float[1] gamma = {2.0}", inputs="float[2,3,4] a, float[2,3,4] b")
    assert_unchanged(one_scale, "ort", options=SKIP)
    # broadcast summands, and 2-D ones
    assert_unchanged(skip_rms_model(23, True, shapes=("float[2,3,4]", "float[1,3,4]")), "ort", options=SKIP)
    out, result = fuse(skip_rms_model(17, shapes=("float[6,4]", "float[6,4]"), outputs="float[6,4] y"), "ort", options=SKIP)
    assert ops(out) == ops(skip_rms_model(17, shapes=("float[6,4]", "float[6,4]"), outputs="float[6,4] y"))


# idempotence -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, target", [
    (lambda: silu_model(24, "alpha"), "onnx"), (lambda: silu_model(17), "ort"),
    (lambda: hard_sigmoid_model("keras"), "onnx"), (lambda: hard_swish_model(14, "x_times_hsig"), "onnx"),
    (lambda: model(18, MISH["log_exp"], "float one = {1.0}"), "onnx"),
    (lambda: gelu_tanh_model(20, "hf_fast"), "onnx"), (lambda: gelu_tanh_model(17, "hf_new", bias=True), "ort"),
    (lambda: rms_model(23, "no_gamma"), "onnx"), (lambda: skip_rms_model(17), "ort"),
])
def test_idempotent(make, target):
    assert_idempotent(make(), target)


# onnxruntime kernel coverage ---------------------------------------------------------------------

def _ort_loads_single(op: str, opset: int, dtype=onnx.TensorProto.FLOAT) -> bool:
    import onnxruntime as ort
    g = onnx.helper.make_graph([onnx.helper.make_node(op, ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", dtype, [2, 4])],
                               [onnx.helper.make_tensor_value_info("y", dtype, [2, 4])])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("opset", [24, 25])
def test_a_fusion_onnxruntime_has_no_kernel_for_is_refused(opset):
    """Fused exactly when onnxruntime can run the fused op: its 1.32 CPU Swish kernel is
    registered for opset 24 only, so at 25 x * sigmoid(x) stays as it is (and loads)."""
    m = silu_model(opset)
    out, result = fuse(m, explain=True)
    if _ort_loads_single("Swish", opset):
        assert ops(out) == ["Swish"] and result.passes[0].counts == {"silu": 1}
    else:
        assert ops(out) == ops(m) and result.passes[0].counts == {}
        assert any("onnxruntime cannot run the fused node" in line for line in result.explain), result.explain


# two spellings of one computation ---------------------------------------------------------------


def test_two_gelu_spellings_of_one_input_fuse_into_one_node():
    """Found by fuzzing: two erf GELUs of x written differently fused into two identical Gelu
    nodes, which only a second run's cleanup merged. fuse now keeps one."""
    m = model(20, """
        d = Div(x, sqrt2)
        e = Erf(d)
        e1 = Add(e, one)
        h = Mul(e1, half)
        g1 = Mul(x, h)
        s = Mul(x, rsqrt2)
        f = Erf(s)
        f1 = Add(f, one)
        xh = Mul(x, half)
        g2 = Mul(xh, f1)
        y1 = Relu(g1)
        y2 = Neg(g2)
        y = Add(y1, y2)""", "float sqrt2 = {1.4142135}, float rsqrt2 = {0.70710677}, float one = {1.0}, "
                              "float half = {0.5}")
    out, result = fuse(m)
    assert result.passes[0].counts == {"gelu": 2, "fused_duplicates_merged": 1}
    assert ops(out) == ["Gelu", "Relu", "Neg", "Add"]
    assert_idempotent(m, "onnx")


def test_fuse_does_not_merge_duplicates_it_did_not_make():
    m = model(17, """
        a = Relu(x)
        b = Relu(x)
        y = Add(a, b)""")
    assert_unchanged(m)
