"""Convolution + activation (`ort`), and padding into convolutions and pools.

- conv_activation: Conv followed by Relu, Clip (constant bounds), Sigmoid, Tanh, LeakyRelu or
  HardSigmoid that alone reads its output, into com.microsoft FusedConv (the activation runs in
  the convolution's output loop), float32 only as onnxruntime's CPU kernel is.
- pad_into_conv: a constant-mode Pad with constant, non-negative pads on the spatial axes only,
  into the pads of the Conv (value 0), AveragePool (value 0; count_include_pad=1, or 0 when the
  pool has no pads of its own, then set to 1) or MaxPool (value -inf, no Indices output) that reads
  it (auto_pad NOTSET; pools without ceil_mode or dilations, and with pads below the kernel size as
  onnxruntime requires). Opset 2-10 Pad attributes and opset 11+ inputs, axes (18) included.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import const_value, is_constant, values
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


def _pads(pad: gs.Node, env) -> tuple | str:
    """(pads over every axis, pad value) of a constant-mode Pad, or why they are not known."""
    mode = pad.attrs.get("mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return "Pad mode is not constant"
    if env.opset < 2:
        return "Pad before opset 2"
    if env.opset < 11:
        return list(pad.attrs.get("pads", [])), float(pad.attrs.get("value", 0.0))
    args = [t if t.name else None for t in pad.inputs[1:4]] + [None] * 3
    if any(t is not None and const_value(t) is None for t in args[:3]):
        return "Pad pads, value or axes are not constants"
    pads = [int(v) for v in const_value(args[0]).reshape(-1)] if args[0] is not None else []
    value = float(const_value(args[1]).reshape(-1)[0]) if args[1] is not None else 0.0
    if args[2] is not None:
        rank = len(pad.inputs[0].shape) if pad.inputs[0].shape is not None else None
        axes = [int(a) for a in const_value(args[2]).reshape(-1)]
        if rank is None or len(pads) != 2 * len(axes):
            return "Pad axes on an input of unknown rank"
        full = [0] * (2 * rank)
        for i, a in enumerate(axes):
            full[a % rank], full[a % rank + rank] = pads[i], pads[i + len(axes)]
        pads = full
    return pads, value


def _pad_check(m, env):
    pad, node = m["pad"], m["node"]
    found = _pads(pad, env)
    if isinstance(found, str):
        return found
    pads, value = found
    rank = len(pads) // 2
    spatial = rank - 2
    if rank < 3 or any(p < 0 for p in pads):
        return "negative pads (a crop), or no spatial axes"
    if any(pads[i] or pads[rank + i] for i in (0, 1)):
        return "pads the batch or channel axis"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return f"{node.op} auto_pad is not NOTSET"
    if len(node.attrs.get("pads", [0] * 2 * spatial)) != 2 * spatial:
        return f"{node.op} pads do not match the Pad's rank"
    if node.op == "Conv":
        return None if value == 0 else "pad value is not 0"
    if node.attrs.get("ceil_mode", 0) or any(d != 1 for d in node.attrs.get("dilations", [])):
        return f"{node.op} with ceil_mode or dilations"
    if node.op == "MaxPool" and (value != -np.inf or len(node.outputs) > 1):
        return "MaxPool pad value is not -inf, or its Indices output is asked for"
    if node.op == "AveragePool":
        if value != 0 or env.opset < 7:
            return "pad value is not 0, or AveragePool before opset 7 (no count_include_pad)"
        if not node.attrs.get("count_include_pad", 0) and any(node.attrs.get("pads", [])):
            return "count_include_pad=0 with pads of its own: the padded zeros would be counted differently"
    kernel = list(node.attrs.get("kernel_shape", []))
    merged = _merged_pads(node, pads)
    if len(kernel) != spatial or any(p >= kernel[i % spatial] for i, p in enumerate(merged)):
        return "merged pads would not be smaller than the kernel (onnxruntime requires it for pools)"
    return None


def _merged_pads(node: gs.Node, pads: list) -> list:
    rank = len(pads) // 2
    spatial = rank - 2
    own = list(node.attrs.get("pads", [0] * 2 * spatial))
    begins = [own[i] + pads[2 + i] for i in range(spatial)]
    return begins + [own[spatial + i] + pads[rank + 2 + i] for i in range(spatial)]


def _pad_into(m, env, outputs):
    node = m["node"]
    attrs = dict(node.attrs)
    attrs["pads"] = _merged_pads(node, _pads(m["pad"], env)[0])
    if node.op == "AveragePool":
        attrs["count_include_pad"] = 1  # the Pad's zeros were counted: the merged pads must be too
    return [gs.Node(node.op, env.names.new((node.name or node.op) + "_padded"), attrs=attrs,
                    inputs=[m["x"]] + list(node.inputs[1:]), outputs=outputs)]


RULES = [
    Rule("conv_activation", Op(ACTIVATIONS, Op("Conv", Var("x"), C("w"), name="conv"), name="act"),
         _fused_conv, _check, targets=("ort",)),
    Rule("pad_into_conv", Op(("Conv", "AveragePool", "MaxPool"), Op("Pad", Var("x"), name="pad"), name="node"),
         _pad_into, _pad_check),
]
