"""Activation idioms into single ops.

- gelu: x * 0.5 * (1 + erf(x / sqrt(2))) in the associations torch's exporters write, into Gelu
  (opset 20) for `onnx` or com.microsoft Gelu for `ort`.
- gelu_erf_form (`onnx` below opset 20, where Gelu cannot be written): the other associations, and
  x * (1 / sqrt(2)) for the division, into (x * (1 + erf(x / sqrt(2)))) * 0.5, the one form
  onnxruntime fuses into its Gelu itself (torch's dynamo export is another: its FFN runs 5%
  slower unfused). The same kernels; moving the 0.5 is exact.
- gelu_tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), x^3 as Pow(x, 3) or x * x * x,
  also as x * sqrt(2/pi) * (1 + 0.044715 * x * x) (HF FastGELU), into Gelu(approximate="tanh")
  (opset 20) for `onnx` or com.microsoft FastGelu for `ort`.
- bias_gelu, bias_fast_gelu (`ort`): com.microsoft Gelu / FastGelu of Add(a, bias) with a 1-D
  constant bias over the last axis, into BiasGelu(a, bias) / FastGelu(a, bias).
- mish: x * tanh(softplus(x)), softplus also as log(exp(x) + 1), into Mish (opset 18).
- hard_swish: x * HardSigmoid(x) (alpha 1/6, beta 1/2), x * clip(x + 3, 0, 6) / 6 in its
  associations, into HardSwish (opset 14); below opset 14, the clip forms into x * HardSigmoid(x)
  (two kernels instead of four: PP-OCR's opset 11/12 float exports run 13-30% faster in onnxruntime).
- hard_sigmoid: clip(x + 3, 0, 6) / 6 (or * 1/6) and clip(x * a + b, 0, 1) (or x / d + b), the
  clip as Clip or Min/Max of constants, into HardSigmoid(alpha, beta).
- silu: x * sigmoid(x) and x * sigmoid(alpha * x) into Swish (opset 24) for `onnx` or
  com.microsoft QuickGelu for `ort`.

Every scalar constant must leave the input's shape alone (no broadcast to a higher rank).
"""

from __future__ import annotations

import math
from functools import cache, partial

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import const_value, is_constant, values
from onnxopt.pattern import C, Op, Rule, Var, match_node


MS = "com.microsoft"
X = Var("x")
ERF_ARGS = [Op("Div", X, C("s", math.sqrt(2.0))), Op("Mul", X, C("s", 1 / math.sqrt(2.0)))]
FLOAT_TYPES = (np.float32, np.float16)  # what onnxruntime's contrib activations are registered for


def _scalar_refusal(m) -> str | None:
    """Why a captured constant (other than x) is not a scalar that leaves x's shape alone."""
    rank = None if m["x"].shape is None else len(m["x"].shape)
    for name, t in m.tensors.items():
        if name == "x" or not is_constant(t):
            continue
        v = values(t)
        if v.size != 1:
            return f"{name} is not a scalar"
        if v.ndim and (rank is None or v.ndim > rank):
            return f"{name} would broadcast the input to a higher rank"
    return None


def _contrib_type_refusal(m) -> str | None:
    dtype = m["x"].dtype
    if dtype is None or isinstance(dtype, int) or np.dtype(dtype) not in [np.dtype(t) for t in FLOAT_TYPES]:
        return "the contrib op runs float32 and float16 only"
    return None


def _gelu_patterns():
    for arg in ERF_ARGS:
        one_plus = Op("Add", Op("Erf", arg), C("one", 1.0))
        yield Op("Mul", Op("Mul", X, one_plus), C("half", 0.5))  # (x * (1 + erf)) * 0.5  torch legacy
        yield Op("Mul", X, Op("Mul", one_plus, C("half", 0.5)))  # x * (0.5 * (1 + erf))  torch dynamo
        yield Op("Mul", Op("Mul", X, C("half", 0.5)), one_plus)  # (x * 0.5) * (1 + erf)


def ends_gelu(node: gs.Node) -> bool:
    """Whether `node` is the last Mul of an erf or tanh GELU as the exporters write it: left as it
    is, onnxruntime (and TensorRT) fuse it themselves where fuse cannot write Gelu (below opset 20)."""
    if node.op != "Mul":
        return False
    return any(match_node(p, node) is not None for p in _gelu_ends())


@cache
def _gelu_ends() -> tuple:
    """The erf and tanh GELU patterns, built once (ends_gelu runs for every scale a MatMul reads)."""
    return (*_gelu_patterns(), *_gelu_tanh_patterns())


def _gelu_check(m, env):
    return env.needs(20, "Gelu") if env.target == "onnx" else None


def _gelu_form_check(m, env):
    if env.opset >= 20:
        return "Gelu can be written (the gelu rule)"
    return _scalar_refusal(m)


def _gelu_form(m, env, outputs):
    """(x * (1 + erf(x / sqrt(2)))) * 0.5 with the matched constants' type."""
    x, half = m["x"], m["half"]

    def const(name, value):  # in the matched constants' type and shape, shared with the graph's own
        return env.constant(name, np.full(half.shape, value, dtype=half.dtype))

    def var(name):
        return gs.Variable(env.names.new(name), dtype=x.dtype)

    q, e, p, r = var("gelu_scaled"), var("gelu_erf"), var("gelu_one_plus"), var("gelu_product")
    return [gs.Node("Div", env.names.new("Div"), inputs=[x, const("sqrt2", math.sqrt(2.0))], outputs=[q]),
            gs.Node("Erf", env.names.new("Erf"), inputs=[q], outputs=[e]),
            gs.Node("Add", env.names.new("Add"), inputs=[e, const("one", 1.0)], outputs=[p]),
            gs.Node("Mul", env.names.new("Mul"), inputs=[x, p], outputs=[r]),
            gs.Node("Mul", env.names.new("Mul"), inputs=[r, const("half", 0.5)], outputs=outputs)]


def _gelu(m, env, outputs):
    if env.target == "ort":
        return [gs.Node("Gelu", env.names.new("Gelu"), domain=MS, inputs=[m["x"]], outputs=outputs)]
    return [gs.Node("Gelu", env.names.new("Gelu"), inputs=[m["x"]], outputs=outputs)]


def _gelu_tanh_patterns():
    k, c = C("k", math.sqrt(2 / math.pi)), C("c", 0.044715)
    cubes = [Op("Pow", X, C("three", 3.0)), Op("Mul", X, Op("Mul", X, X))]  # x * (x * x), either order
    squares_c = [Op("Mul", Op("Mul", X, c), X), Op("Mul", c, Op("Mul", X, X)),
                 Op("Mul", c, Op("Pow", X, C("two", 2.0)))]
    inners = [Op("Mul", k, Op("Add", X, Op("Mul", c, cube))) for cube in cubes]  # k * (x + c * x^3)
    for sq in squares_c:  # x * k * (1 + c * x * x), or x * (k * (...)), or k * (x * (...))
        poly = Op("Add", sq, C("one2", 1.0))
        inners += [Op("Mul", Op("Mul", X, k), poly), Op("Mul", X, Op("Mul", k, poly)), Op("Mul", k, Op("Mul", X, poly))]
    for inner in inners:
        one_plus = Op("Add", Op("Tanh", inner), C("one", 1.0))
        yield Op("Mul", Op("Mul", X, one_plus), C("half", 0.5))  # 0.5 * (x * (1 + tanh))  torch legacy
        yield Op("Mul", X, Op("Mul", one_plus, C("half", 0.5)))  # x * (0.5 * (1 + tanh))  torch dynamo
        yield Op("Mul", Op("Mul", X, C("half", 0.5)), one_plus)  # (0.5 * x) * (1 + tanh)  HF, tf2onnx


def _gelu_tanh_check(m, env):
    return _scalar_refusal(m) or _op_refusal(m, env, 20, "Gelu")


def _op_refusal(m, env, version: int, op: str) -> str | None:
    """The standard op needs its opset for `onnx`; the contrib op for `ort` its float types."""
    return env.needs(version, op) if env.target == "onnx" else _contrib_type_refusal(m)


def _gelu_tanh(m, env, outputs):
    if env.target == "ort":
        return [gs.Node("FastGelu", env.names.new("FastGelu"), domain=MS, inputs=[m["x"]], outputs=outputs)]
    return [gs.Node("Gelu", env.names.new("Gelu"), attrs={"approximate": "tanh"}, inputs=[m["x"]], outputs=outputs)]


def _bias_gelu_check(m, env):
    bias, a = m["bias"], m["a"]
    if bias.shape is None or len(bias.shape) != 1:
        return "bias is not 1-D"
    if a.shape is None or not a.shape or a.shape[-1] != bias.shape[0]:
        return "bias does not run along the last axis"
    return None


def _bias_gelu(m, env, outputs):
    return [gs.Node("BiasGelu", env.names.new("BiasGelu"), domain=MS, inputs=[m["a"], m["bias"]], outputs=outputs)]


def _bias_fast_gelu_check(m, env):
    if len(m["gelu"].inputs) > 1 and m["gelu"].inputs[1].name:
        return "FastGelu already has a bias"
    return _bias_gelu_check(m, env)


def _bias_fast_gelu(m, env, outputs):
    return [gs.Node("FastGelu", env.names.new("FastGelu"), domain=MS, inputs=[m["a"], m["bias"]], outputs=outputs)]


def _mish_patterns():
    yield Op("Mul", X, Op("Tanh", Op("Softplus", X)))
    yield Op("Mul", X, Op("Tanh", Op("Log", Op("Add", Op("Exp", X), C("one", 1.0)))))


def _mish_check(m, env):
    return _scalar_refusal(m) or env.needs(18, "Mish")


def _mish(m, env, outputs):
    return [gs.Node("Mish", env.names.new("Mish"), inputs=[m["x"]], outputs=outputs)]


def _clips(inner, lo: float, hi: float):
    """clip(inner, lo, hi): a Clip (its bounds checked by _bounds_refusal) or Min/Max of constants."""
    yield Op("Clip", inner, name="clip")
    yield Op("Min", Op("Max", inner, C("lo", lo), name="clip2", commute=True), C("hi", hi), name="clip", commute=True)
    yield Op("Max", Op("Min", inner, C("hi", hi), name="clip2", commute=True), C("lo", lo), name="clip", commute=True)


def _bounds_refusal(m, env, lo: float, hi: float) -> str | None:
    clip = m["clip"]
    if clip.op != "Clip":  # Min/Max: the bounds were matched as constants
        return None if len(clip.inputs) == 2 and len(m["clip2"].inputs) == 2 else "Min/Max of more than two inputs"
    if env.opset < 11:
        bounds = [clip.attrs.get("min", -np.inf), clip.attrs.get("max", np.inf)]
    else:
        ts = list(clip.inputs[1:3]) + [None, None]
        bounds = [const_value(t) if t is not None and t.name else None for t in ts[:2]]
        if any(b is None for b in bounds):
            return "Clip bounds are not both constants"
        bounds = [b.reshape(-1) for b in bounds]
        if any(b.size != 1 for b in bounds):
            return "Clip bounds are not scalars"
        bounds = [float(b[0]) for b in bounds]
    if not np.allclose(bounds, [lo, hi], rtol=1e-6, atol=0):
        return f"Clip bounds are {bounds}, not [{lo}, {hi}]"
    return None


def _add3():
    return Op("Add", X, C("three", 3.0))


def _hard_sigmoid_patterns():
    for clip in _clips(_add3(), 0.0, 6.0):  # clip(x + 3, 0, 6) / 6: HardSigmoid(1/6, 1/2)
        yield Op("Div", clip, C("six", 6.0)), 6.0
        yield Op("Mul", clip, C("sixth", 1 / 6)), 6.0
    for scaled in (Op("Mul", X, C("a")), Op("Div", X, C("d"))):  # clip(x * a + b, 0, 1)
        for clip in _clips(Op("Add", scaled, C("b")), 0.0, 1.0):
            yield clip, 1.0


def _hard_sigmoid_check(m, env, hi):
    if "d" in m.tensors and not m.value("d").all():
        return "divides by zero"
    return _scalar_refusal(m) or _bounds_refusal(m, env, 0.0, hi)


def _hard_sigmoid(m, env, outputs):
    alpha, beta = 1 / 6, 0.5
    if "a" in m.tensors:
        alpha, beta = float(m.value("a").reshape(-1)[0]), float(m.value("b").reshape(-1)[0])
    elif "d" in m.tensors:
        alpha, beta = 1 / float(m.value("d").reshape(-1)[0]), float(m.value("b").reshape(-1)[0])
    return [gs.Node("HardSigmoid", env.names.new("HardSigmoid"), attrs={"alpha": alpha, "beta": beta},
                    inputs=[m["x"]], outputs=outputs)]


def _hard_swish_patterns():
    yield Op("Mul", X, Op("HardSigmoid", X, name="hsig"))
    for clip in _clips(_add3(), 0.0, 6.0):
        yield Op("Div", Op("Mul", X, clip), C("six", 6.0))  # (x * clip) / 6  torch
        yield Op("Mul", Op("Mul", X, clip), C("sixth", 1 / 6))  # (x * clip) * (1/6)  tf2onnx
        yield Op("Mul", X, Op("Div", clip, C("six", 6.0)))  # x * (clip / 6)
        yield Op("Mul", X, Op("Mul", clip, C("sixth", 1 / 6)))


def _hard_swish_check(m, env):
    if "hsig" in m.nodes:
        hsig = m["hsig"]
        alpha, beta = hsig.attrs.get("alpha", 0.2), hsig.attrs.get("beta", 0.5)
        if not np.allclose([alpha, beta], [1 / 6, 0.5], rtol=1e-6, atol=0):
            return f"HardSigmoid alpha, beta are {alpha}, {beta}, not 1/6, 1/2"
        return env.needs(14, "HardSwish")  # below 14 this is already the shortest form
    reason = _scalar_refusal(m) or _bounds_refusal(m, env, 0.0, 6.0)
    if reason:
        return reason
    env.needs(14, "HardSwish")  # --max-opset may raise the opset for HardSwish itself
    return None  # below 14: x * HardSigmoid(x)


def _hard_swish(m, env, outputs):
    if env.opset >= 14:
        return [gs.Node("HardSwish", env.names.new("HardSwish"), inputs=[m["x"]], outputs=outputs)]
    hsig = gs.Variable(env.names.new("hard_sigmoid"), dtype=m["x"].dtype, shape=m["x"].shape)
    return [gs.Node("HardSigmoid", env.names.new("HardSigmoid"), attrs={"alpha": 1 / 6, "beta": 0.5},
                    inputs=[m["x"]], outputs=[hsig]),
            gs.Node("Mul", env.names.new("Mul"), inputs=[m["x"], hsig], outputs=outputs)]


def _silu_patterns():
    yield Op("Mul", X, Op("Sigmoid", Op("Mul", X, C("alpha"))))
    yield Op("Mul", X, Op("Sigmoid", X))


def _silu_check(m, env):
    return _scalar_refusal(m) or _op_refusal(m, env, 24, "Swish")


def _silu(m, env, outputs):
    alpha = float(m.value("alpha").reshape(-1)[0]) if "alpha" in m.tensors else 1.0
    if env.target == "ort":
        return [gs.Node("QuickGelu", env.names.new("QuickGelu"), domain=MS, attrs={"alpha": alpha},
                        inputs=[m["x"]], outputs=outputs)]
    return [gs.Node("Swish", env.names.new("Swish"), attrs={"alpha": alpha}, inputs=[m["x"]], outputs=outputs)]


RULES = [
    Rule("bias_gelu", Op("Gelu", Op("Add", Var("a"), C("bias")), domains=(MS,)), _bias_gelu, _bias_gelu_check,
         targets=("ort",)),
    Rule("bias_fast_gelu", Op("FastGelu", Op("Add", Var("a"), C("bias")), domains=(MS,), name="gelu"),
         _bias_fast_gelu, _bias_fast_gelu_check, targets=("ort",)),
]
RULES += [Rule("gelu", p, _gelu, _gelu_check) for p in _gelu_patterns()]
RULES += [Rule("gelu_erf_form", p, _gelu_form, _gelu_form_check, targets=("onnx",))
          for i, p in enumerate(_gelu_patterns()) if i != 0]  # the first is the form it writes
RULES += [Rule("gelu_tanh", p, _gelu_tanh, _gelu_tanh_check) for p in _gelu_tanh_patterns()]
RULES += [Rule("mish", p, _mish, _mish_check) for p in _mish_patterns()]
RULES += [Rule("hard_swish", p, _hard_swish, _hard_swish_check) for p in _hard_swish_patterns()]
RULES += [Rule("hard_sigmoid", p, _hard_sigmoid, partial(_hard_sigmoid_check, hi=hi))
          for p, hi in _hard_sigmoid_patterns()]
RULES += [Rule("silu", p, _silu, _silu_check) for p in _silu_patterns()]
