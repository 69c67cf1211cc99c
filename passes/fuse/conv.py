"""Convolution + activation (`ort`).

- conv_activation: Conv followed by Relu, Clip (constant bounds), Sigmoid, Tanh, LeakyRelu or
  HardSigmoid that alone reads its output, into com.microsoft FusedConv (the activation runs in
  the convolution's output loop), float32 only as onnxruntime's CPU kernel is.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import is_constant, values
from onnxopt.pattern import C, Op, Rule, Var

MS = "com.microsoft"
ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid")


def _activation_params(act: gs.Node, env) -> list | str:
    """FusedConv's activation_params, or the reason the activation cannot be fused."""
    if act.op == "LeakyRelu":
        return [float(act.attrs.get("alpha", 0.01))]
    if act.op == "HardSigmoid":
        return [float(act.attrs.get("alpha", 0.2)), float(act.attrs.get("beta", 0.5))]
    if act.op != "Clip":
        return []
    if env.opset < 11:
        low, high = act.attrs.get("min", -np.inf), act.attrs.get("max", np.inf)
    else:
        bounds = [t if t.name else None for t in act.inputs[1:3]] + [None, None]
        if any(t is not None and not is_constant(t) for t in bounds[:2]):
            return "Clip bounds are not constants"
        low = float(values(bounds[0]).reshape(-1)[0]) if bounds[0] is not None else -np.inf
        high = float(values(bounds[1]).reshape(-1)[0]) if bounds[1] is not None else np.inf
    finfo = np.finfo(np.float32)
    return [float(max(low, finfo.min)), float(min(high, finfo.max))]


def _check(m, env):
    conv, x = m["conv"], m["x"]
    if x.dtype is None or isinstance(x.dtype, int) or np.dtype(x.dtype) != np.float32:
        return "FusedConv runs float32 only"
    if len(conv.outputs) != 1:
        return "Conv has extra outputs"
    params = _activation_params(m["act"], env)
    return params if isinstance(params, str) else None


def _fused_conv(m, env, outputs):
    conv, act = m["conv"], m["act"]
    attrs = dict(conv.attrs)
    attrs["activation"] = act.op
    params = _activation_params(act, env)
    if params:
        attrs["activation_params"] = params
    return [gs.Node("FusedConv", env.names.new((conv.name or "Conv") + "_fused"), domain=MS, attrs=attrs,
                    inputs=list(conv.inputs), outputs=outputs)]


RULES = [Rule("conv_activation", Op(ACTIVATIONS, Op("Conv", Var("x"), C("w"), name="conv"), name="act"),
              _fused_conv, _check, targets=("ort",))]
