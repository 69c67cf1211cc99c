"""Normalization idioms.

- layer_norm: ReduceMean / Sub / Pow (or Mul) / ReduceMean / Add(eps) / Sqrt / Div / Mul(gamma) /
  Add(beta) over the last axis, into LayerNormalization (opset 17).
- skip_layer_norm (`ort`): LayerNormalization(Add(a, b)) over the last axis of two 3-D tensors of
  the same shape, whose sum nothing else reads, into com.microsoft SkipLayerNormalization.
- skip_layer_norm_bias (`ort`): a constant bias added to either summand goes into the
  SkipLayerNormalization's bias input.
- rms_norm: x / sqrt(ReduceMean(x^2) + eps) * gamma (x^2 as Pow or Mul; the division also as
  x * Reciprocal(...) or x * (1 / ...)) over the last axis, into RMSNormalization (opset 23);
  without gamma only when no constant scale follows (that one is matched with it).
- skip_rms_norm (`ort`): RMSNormalization, or the idiom, of Add(a, b) over the last axis of two
  3-D tensors of the same shape, whose sum nothing else reads, into
  com.microsoft SkipSimplifiedLayerNormalization (any opset).
- skip_add_as_sum (`residual_sums`, after the rules; both targets, on unless skip_layer_norm is
  for `ort`): the residual Add(a, b) that a LayerNormalization normalizes, of two computed 3-D
  tensors of one proven shape, is written as Sum(a, b), the same float32 sum. onnxruntime fuses
  that Add + LayerNormalization into its SkipLayerNormalization by itself wherever it can prove
  the shapes (the dynamo exports), and in 1.32 that CPU kernel runs 3.5-6.5x slower than the
  two it replaces (bench/skip_layer_norm.md: 312 us against 49 us at [1, 128, 384]); a Sum it
  leaves alone. On MiniLM dynamo: 12 nodes, and the fused model's latency from 0.96x to 0.88x
  the float model's. `--opt fuse.disable=skip_add_as_sum` keeps the Add (for a runtime whose
  fused kernel is the faster one: onnxruntime's CUDA SkipLayerNormalization is one kernel for
  two).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import STANDARD_DOMAINS, const_value, is_constant
from onnxopt.pattern import C, Op, Rule, Var

MS = "com.microsoft"
X = Var("x")


def _layer_norm_patterns():
    """With gamma and beta first, then gamma only, then neither (cleanup removes a Mul by ones
    and an Add of zeros)."""
    d = Op("Sub", X, Op("ReduceMean", X, name="mean"), name="centered")
    for square in (Op("Pow", d, C("two", 2.0)), Op("Mul", d, d)):
        std = Op("Sqrt", Op("Add", Op("ReduceMean", square, name="var"), C("eps")))
        normed = Op("Div", d, std)
        yield Op("Add", Op("Mul", normed, C("gamma")), C("beta"))
        yield Op("Mul", normed, C("gamma"))
        yield normed


def _followed_by_constant(m, op: str) -> bool:
    """The match's result is read only by an `op` with a constant other operand (a larger
    match then fuses it too: leave it to that one)."""
    root = m.matched[-1].outputs[0]
    users = root.outputs
    return len(users) == 1 and users[0].op == op and any(is_constant(t) for t in users[0].inputs if t is not root)


def _last_axis_reduce(node: gs.Node, rank: int) -> bool:
    if node.attrs.get("keepdims", 1) != 1:
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = const_value(node.inputs[1])
        axes = None if axes is None else axes.reshape(-1).tolist()
    return axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1)


def _layer_norm_check(m, env):
    x = m["x"]
    if x.shape is None or not x.shape:
        return "input rank unknown"
    rank, width = len(x.shape), x.shape[-1]
    if not all(_last_axis_reduce(m[n], rank) for n in ("mean", "var")):
        return "not a mean over the last axis"
    for name in ("gamma", "beta"):
        t = m.tensors.get(name)
        if t is not None and (t.shape is None or list(t.shape) != [width] or t.dtype != x.dtype):
            return f"{name} is not a vector over the last axis of the input's type"
    if "beta" not in m.tensors and _followed_by_constant(m, "Mul" if "gamma" not in m.tensors else "Add"):
        return "a constant scale or shift follows: matched with it"
    if "gamma" not in m.tensors and not isinstance(width, (int, np.integer)):
        return "width unknown (a scale of ones needs it)"
    if m["eps"].shape is None or int(np.prod(m["eps"].shape)) != 1:
        return "epsilon is not a scalar"
    # onnxruntime runs it at earlier opsets too, but the model would fail onnx.checker
    return env.needs(17, "LayerNormalization")


def _layer_norm(m, env, outputs):
    eps = float(m.value("eps").reshape(-1)[0])
    x = m["x"]
    gamma = m.tensors.get("gamma")
    if gamma is None:
        gamma = env.constant("ln_scale", np.ones([x.shape[-1]], np.dtype(x.dtype)))
    inputs = [x, gamma] + ([m["beta"]] if "beta" in m.tensors else [])
    return [gs.Node("LayerNormalization", env.names.new("LayerNorm"), attrs={"axis": -1, "epsilon": eps},
                    inputs=inputs, outputs=outputs)]


def _one_3d_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Whether a and b are 3-D tensors of one proven shape (the summands SkipLayerNormalization takes)."""
    return a.shape is not None and len(a.shape) == 3 and list(a.shape) == list(b.shape or []) \
        and all(d is not None for d in a.shape)


def _skip_check(m, env):
    ln, a, b = m["ln"], m["a"], m["b"]
    if len(ln.outputs) > 1 and any(t.outputs for t in ln.outputs[1:]):
        return "mean or inverse std output is used"
    if not _one_3d_shape(a, b):
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


def residual_sums(graph: gs.Graph) -> int:
    """skip_add_as_sum (see the module doc): the residual Adds a LayerNormalization normalizes,
    written as Sum; how many."""
    done = 0
    for node in graph.nodes:
        if node.op != "LayerNormalization" or node.domain not in STANDARD_DOMAINS or not node.inputs:
            continue
        add = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if add is None or add.op != "Add" or add.domain not in STANDARD_DOMAINS:
            continue
        a, b = add.inputs
        # what onnxruntime fuses: two computed 3-D summands of one proven shape (a constant one is a
        # bias); elsewhere it leaves the Add apart and the Add stays
        if not (is_constant(a) or is_constant(b)) and _one_3d_shape(a, b):
            add.op = "Sum"
            done += 1
    return done


def _rms_patterns(x):
    """The RMS idiom over `x` (a Var, or a named Op used as one), with gamma first."""
    for square in (Op("Pow", x, C("two", 2.0)), Op("Mul", x, x)):
        std = Op("Sqrt", Op("Add", Op("ReduceMean", square, name="mean"), C("eps")))
        norms = [Op("Div", x, std), Op("Mul", x, Op("Reciprocal", std)), Op("Mul", x, Op("Div", C("one", 1.0), std))]
        yield from (Op("Mul", norm, C("gamma")) for norm in norms)
        yield from norms


def _centered(x: gs.Tensor) -> bool:
    """x = Sub(y, ReduceMean(y))."""
    sub = x.inputs[0] if x.inputs else None
    if sub is None or sub.op != "Sub" or not sub.inputs[1].inputs:
        return False
    mean = sub.inputs[1].inputs[0]
    return mean.op == "ReduceMean" and mean.inputs[0] is sub.inputs[0]


def _rms_refusal(m, x: gs.Tensor) -> str | None:
    """Why the matched RMS idiom over `x` is not an RMSNormalization over its last axis."""
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], (int, np.integer)):
        return "input rank or width unknown"
    if _centered(x):
        return "the input is centered (y - mean(y)): a LayerNorm, fused as one"
    if not _last_axis_reduce(m["mean"], len(x.shape)):
        return "not a mean over the last axis"
    if m["eps"].shape is None or int(np.prod(m["eps"].shape)) != 1:
        return "epsilon is not a scalar"
    if "gamma" in m.tensors:
        gamma = m["gamma"]
        if gamma.shape is None or list(gamma.shape) != [x.shape[-1]] or gamma.dtype != x.dtype:
            return "gamma is not a vector over the last axis of the input's type"
    elif _followed_by_constant(m, "Mul"):
        return "a constant scale follows: matched with it"
    return None


def _rms_gamma(m, env, x: gs.Tensor) -> gs.Tensor:
    if "gamma" in m.tensors:
        return m["gamma"]
    return env.constant("rms_scale", np.ones([x.shape[-1]], dtype=x.dtype))


def _rms_check(m, env):
    return _rms_refusal(m, m["x"]) or env.needs(23, "RMSNormalization")


def _rms_norm(m, env, outputs):
    eps = float(m.value("eps").reshape(-1)[0])
    return [gs.Node("RMSNormalization", env.names.new("RMSNorm"), attrs={"axis": -1, "epsilon": eps},
                    inputs=[m["x"], _rms_gamma(m, env, m["x"])], outputs=outputs)]


def _skip_rms_refusal(m) -> str | None:
    a, b = m["a"], m["b"]
    if not _one_3d_shape(a, b):
        return "the two summands are not 3-D tensors of one proven shape"
    dtype = m["add"].outputs[0].dtype
    if dtype is None or isinstance(dtype, int) or np.dtype(dtype) not in (np.float32, np.float16):
        return "SkipSimplifiedLayerNormalization runs float32 and float16 only"
    return None


def _skip_rms_check(m, env):
    if "rms" in m.nodes:
        rms, gamma = m["rms"], m["gamma"]
        if rms.attrs.get("axis", -1) not in (-1, 2):
            return "not normalized over the last axis"
        if rms.attrs.get("stash_type", 1) != 1:
            return "stash_type is not float32"
        reason = _skip_rms_refusal(m)
        if reason is None and (gamma.shape is None or list(gamma.shape) != [m["a"].shape[-1]]):
            return "scale is not a vector over the last axis"
        return reason
    return _skip_rms_refusal(m) or _rms_refusal(m, m["add"].outputs[0])


def _skip_rms_norm(m, env, outputs):
    if "rms" in m.nodes:
        eps = float(m["rms"].attrs.get("epsilon", 1e-5))
    else:
        eps = float(m.value("eps").reshape(-1)[0])
    gamma = _rms_gamma(m, env, m["add"].outputs[0])
    return [gs.Node("SkipSimplifiedLayerNormalization", env.names.new("SkipSimplifiedLayerNorm"), domain=MS,
                    attrs={"epsilon": eps}, inputs=[m["a"], m["b"], gamma], outputs=outputs)]


SUM = Op("Add", Var("a"), Var("b"), name="add")
RULES = [Rule("layer_norm", p, _layer_norm, _layer_norm_check) for p in _layer_norm_patterns()]
RULES += [Rule("skip_rms_norm", p, _skip_rms_norm, _skip_rms_check, targets=("ort",)) for p in _rms_patterns(SUM)]
RULES += [Rule("rms_norm", p, _rms_norm, _rms_check) for p in _rms_patterns(X)]
RULES += [
    Rule("skip_rms_norm", Op("RMSNormalization", SUM, C("gamma"), name="rms"), _skip_rms_norm, _skip_rms_check,
         targets=("ort",)),
    Rule("skip_layer_norm", Op("LayerNormalization", Op("Add", Var("a"), Var("b"), name="add"), C("gamma"), name="ln"),
         _skip_layer_norm, _skip_check, targets=("ort",)),
    # the dense layer's bias add goes in too, as onnxruntime's own fusion does: without it the
    # separate Add costs more than the fusion saves (measured on MiniLM: +4% latency)
    Rule("skip_layer_norm_bias", Op("SkipLayerNormalization", Op("Add", Var("y"), C("bias"), name="add"), Var("skip"),
                                    C("gamma"), domains=(MS,), name="sln", commute=True),
         _skip_bias, _skip_bias_check, targets=("ort",)),
]
