"""Activation idioms into single ops.

- gelu: x * 0.5 * (1 + erf(x / sqrt(2))) in the associations torch's exporters write, into Gelu
  (opset 20) for `onnx` or com.microsoft Gelu for `ort`.
- bias_gelu (`ort`): com.microsoft Gelu(Add(a, bias)) with a 1-D constant bias over the last
  axis, into com.microsoft BiasGelu(a, bias).
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from onnxopt.pattern import C, Op, Rule, Var

MS = "com.microsoft"
X = Var("x")
ERF_ARGS = [Op("Div", X, C("s", math.sqrt(2.0))), Op("Mul", X, C("s", 1 / math.sqrt(2.0)))]


def _gelu_patterns():
    for arg in ERF_ARGS:
        one_plus = Op("Add", Op("Erf", arg), C("one", 1.0))
        yield Op("Mul", Op("Mul", X, one_plus), C("half", 0.5))  # (x * (1 + erf)) * 0.5  torch legacy
        yield Op("Mul", X, Op("Mul", one_plus, C("half", 0.5)))  # x * (0.5 * (1 + erf))  torch dynamo
        yield Op("Mul", Op("Mul", X, C("half", 0.5)), one_plus)  # (x * 0.5) * (1 + erf)


def _gelu_check(m, env):
    return env.needs(20, "Gelu") if env.target == "onnx" else None


def _gelu(m, env, outputs):
    if env.target == "ort":
        return [gs.Node("Gelu", env.names.new("Gelu"), domain=MS, inputs=[m["x"]], outputs=outputs)]
    return [gs.Node("Gelu", env.names.new("Gelu"), inputs=[m["x"]], outputs=outputs)]


def _bias_gelu_check(m, env):
    bias, a = m["bias"], m["a"]
    if bias.shape is None or len(bias.shape) != 1:
        return "bias is not 1-D"
    if a.shape is None or not a.shape or a.shape[-1] != bias.shape[0]:
        return "bias does not run along the last axis"
    return None


def _bias_gelu(m, env, outputs):
    return [gs.Node("BiasGelu", env.names.new("BiasGelu"), domain=MS, inputs=[m["a"], m["bias"]], outputs=outputs)]


RULES = [
    Rule("bias_gelu", Op("Gelu", Op("Add", Var("a"), C("bias")), domains=(MS,)), _bias_gelu, _bias_gelu_check,
         targets=("ort",)),
] + [Rule("gelu", p, _gelu, _gelu_check) for p in _gelu_patterns()]
