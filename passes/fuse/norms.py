"""Normalization idioms.

- layer_norm: ReduceMean / Sub / Pow (or Mul) / ReduceMean / Add(eps) / Sqrt / Div / Mul(gamma) /
  Add(beta) over the last axis, into LayerNormalization (opset 17).
- skip_layer_norm (`ort`): LayerNormalization(Add(a, b)) over the last axis of two 3-D tensors of
  the same shape, whose sum nothing else reads, into com.microsoft SkipLayerNormalization.
- skip_layer_norm_bias (`ort`): a constant bias added to either summand goes into the
  SkipLayerNormalization's bias input.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import is_constant, values
from onnxopt.pattern import C, Op, Rule, Var

MS = "com.microsoft"
X = Var("x")


def _layer_norm_patterns():
    d = Op("Sub", X, Op("ReduceMean", X, name="mean"), name="centered")
    for square in (Op("Pow", d, C("two", 2.0)), Op("Mul", d, d)):
        std = Op("Sqrt", Op("Add", Op("ReduceMean", square, name="var"), C("eps")))
        yield Op("Add", Op("Mul", Op("Div", d, std), C("gamma")), C("beta"))


def _last_axis_reduce(node: gs.Node, rank: int) -> bool:
    if node.attrs.get("keepdims", 1) != 1:
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and is_constant(node.inputs[1]):
        axes = values(node.inputs[1]).reshape(-1).tolist()
    return axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1)


def _layer_norm_check(m, env):
    x = m["x"]
    if x.shape is None or not x.shape:
        return "input rank unknown"
    rank, width = len(x.shape), x.shape[-1]
    if not all(_last_axis_reduce(m[n], rank) for n in ("mean", "var")):
        return "not a mean over the last axis"
    for name in ("gamma", "beta"):
        t = m[name]
        if t.shape is None or list(t.shape) != [width] or t.dtype != x.dtype:
            return f"{name} is not a vector over the last axis of the input's type"
    if m["eps"].shape is None or int(np.prod(m["eps"].shape)) != 1:
        return "epsilon is not a scalar"
    # onnxruntime runs it at earlier opsets too, but the model would fail onnx.checker
    return env.needs(17, "LayerNormalization")


def _layer_norm(m, env, outputs):
    eps = float(m.value("eps").reshape(-1)[0])
    return [gs.Node("LayerNormalization", env.names.new("LayerNorm"), attrs={"axis": -1, "epsilon": eps},
                    inputs=[m["x"], m["gamma"], m["beta"]], outputs=outputs)]


def _skip_check(m, env):
    ln, a, b = m["ln"], m["a"], m["b"]
    if len(ln.outputs) > 1 and any(t.outputs for t in ln.outputs[1:]):
        return "mean or inverse std output is used"
    if a.shape is None or len(a.shape) != 3 or a.shape != b.shape or any(d is None for d in a.shape):
        return "the two summands are not 3-D tensors of one proven shape"
    if ln.attrs.get("axis", -1) not in (-1, 2):
        return "not normalized over the last axis"
    if len(ln.inputs) > 2 and ln.inputs[2].name and not is_constant(ln.inputs[2]):
        return "beta is not a constant"
    return None


def _skip_layer_norm(m, env, outputs):
    ln = m["ln"]
    inputs = [m["a"], m["b"], m["gamma"]] + ([ln.inputs[2]] if len(ln.inputs) > 2 and ln.inputs[2].name else [])
    node = gs.Node("SkipLayerNormalization", env.names.new("SkipLayerNorm"), domain=MS,
                   attrs={"epsilon": float(ln.attrs.get("epsilon", 1e-5))}, inputs=inputs, outputs=outputs[:1])
    return [node]


def _skip_bias_check(m, env):
    sln, bias = m["sln"], m["bias"]
    if len(sln.inputs) != 4 or not sln.inputs[3].name:
        return "SkipLayerNormalization already has a bias, or no beta"
    if bias.shape is None or len(bias.shape) != 1 or bias.shape[0] != m["gamma"].shape[0]:
        return "bias is not a vector over the hidden axis"
    return None


def _skip_bias(m, env, outputs):
    sln = m["sln"]
    skip = sln.inputs[1] if sln.inputs[0] is m["add"].outputs[0] else sln.inputs[0]
    return [gs.Node("SkipLayerNormalization", env.names.new("SkipLayerNorm"), domain=MS, attrs=dict(sln.attrs),
                    inputs=[m["y"], skip, m["gamma"], sln.inputs[3], m["bias"]], outputs=outputs)]


RULES = [Rule("layer_norm", p, _layer_norm, _layer_norm_check) for p in _layer_norm_patterns()] + [
    Rule("skip_layer_norm", Op("LayerNormalization", Op("Add", Var("a"), Var("b"), name="add"), C("gamma"), name="ln"),
         _skip_layer_norm, _skip_check, targets=("ort",)),
    # the dense layer's bias add goes in too, as onnxruntime's own fusion does: without it the
    # separate Add costs more than the fusion saves (measured on MiniLM: +4% latency)
    Rule("skip_layer_norm_bias", Op("SkipLayerNormalization", Op("Add", Var("y"), C("bias"), name="add"), Var("skip"),
                                    C("gamma"), domains=(MS,), name="sln", commute=True),
         _skip_bias, _skip_bias_check, targets=("ort",)),
]
