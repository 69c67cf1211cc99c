"""Gemm / MatMul folds, Gemm + activation, and shape chains.

- gemm_bn: an inference BatchNormalization over axis 1 of a Gemm (constant B, C), or of a 2-D
  MatMul with a constant weight (and an optional constant bias Add), into one Gemm with scaled
  weights and a new bias.
- scale_into_matmul: Mul or Div by a constant scalar, or by a vector over the last axis, of a
  MatMul with a constant weight or of a Gemm (a scalar goes into alpha and beta, a vector into B
  and C), and MatMul(x * c, W) or MatMul(x / c, W) with a scalar c, into the weight (not the final
  0.5 of an erf or tanh GELU: below opset 20, where fuse cannot write Gelu, onnxruntime fuses the
  exporter's pattern itself, and the folded form runs 5% slower in MiniLM's FFN). `ort` also: a
  float32 MatMul of two tensors times a scalar into com.microsoft FusedMatMul's alpha (a Div only
  by a power of two, whose reciprocal is exact), except for attention scores that reach a Softmax,
  which the attention rule takes.
- transpose_into_gemm: Gemm(Transpose(a), Transpose(b)) into Gemm's transA / transB. MatMul with an
  operand whose last two axes are swapped by a Transpose: com.microsoft FusedMatMul (transA /
  transB, float32) for `ort`; for `onnx` a Gemm (opset 11) when both operands are known 2-D floats.
  `fold` has already evaluated a Transpose of a constant weight, but for a large shared one.
- gemm_activation (`ort`): Gemm followed by an activation onnxruntime's FusedGemm runs (Relu,
  LeakyRelu, Sigmoid, Tanh, HardSigmoid, Elu, Selu, Celu, Softplus, Softsign, ThresholdedRelu)
  into com.microsoft FusedGemm, float32 only as its CPU kernel is.
- transpose_chain: Transpose(Transpose(x)) into one Transpose with the composed perm, or into x.
- reshape_chain: Reshape(Reshape | Squeeze | Unsqueeze | Flatten (x), shape) into Reshape(x, shape)
  when the constant shape has no 0 entry (a 0 copies a dimension of the Reshape's own input) or
  allowzero=1.
- squeeze_chain: Unsqueeze(Squeeze(x, axes), axes) and Squeeze(Unsqueeze(x, axes), axes) into x.

As for every rule, an intermediate that another node reads or that is a graph output refuses the
match, the chains' included: the outer node could read x directly, but that saves a node only when
the chain is the identity. A folded weight is always a new constant: a weight shared with other
nodes is never changed for them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import bypass, const_value, is_constant, output_tensors, static_shape, values
from onnxopt.pattern import C, Op, Rule, Var

from .activations import ends_gelu

MS = "com.microsoft"
X = Var("x")
FLOATS = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def _dtype(t: gs.Tensor) -> np.dtype | None:
    """The tensor's numpy element type, None when unknown or one numpy lacks."""
    if t.dtype is None or isinstance(t.dtype, int):
        return None
    try:
        return np.dtype(t.dtype)
    except TypeError:
        return None


def _float(t: gs.Tensor, allowed=FLOATS) -> bool:
    return _dtype(t) in allowed


def _rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def _used_outside(t: gs.Tensor, env) -> bool:
    return bool(t.outputs) or id(t) in output_tensors(env.graph)


def _const(env, base: str, array: np.ndarray) -> gs.Constant:
    return gs.Constant(env.names.new(base), np.ascontiguousarray(array))


def _gemm_c(gemm: gs.Node) -> gs.Tensor | None:
    return gemm.inputs[2] if len(gemm.inputs) > 2 and gemm.inputs[2].name else None


# ----------------------------------------------------------------------------------- gemm_bn


def _bn_patterns():
    params = (C("scale"), C("shift"), C("mean"), C("var"))
    matmul = Op("MatMul", X, C("w"), name="mm")
    for inner in (Op("Gemm", X, C("w"), name="gemm"), Op("Add", matmul, C("bias")), matmul):
        yield Op("BatchNormalization", inner, *params, name="bn")


def _out_features(m) -> int:
    w = m["w"]
    if "gemm" in m.nodes and m["gemm"].attrs.get("transB", 0):
        return int(w.shape[0])
    return int(w.shape[1])


def _gemm_bn_check(m, env):
    bn, w = m["bn"], m["w"]
    if env.opset < 7:
        return "Gemm and BatchNormalization before opset 7 are not handled"
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
        return "BatchNormalization in training mode or not spatial"
    if any(_used_outside(t, env) for t in bn.outputs[1:]):
        return "BatchNormalization's running statistics are used"
    if not _float(w) or w.shape is None or len(w.shape) != 2:
        return "weight is not a 2-D float constant"
    n = _out_features(m)
    for name in ("scale", "shift", "mean", "var"):
        if tuple(m[name].shape) != (n,) or not _float(m[name]):
            return f"BatchNormalization {name} is not a float vector over axis 1 of the product"
    if "gemm" in m.nodes:
        c = _gemm_c(m["gemm"])
        if len(m["gemm"].outputs) != 1 or (c is not None and not is_constant(c)):
            return "Gemm's C is not a constant"
        return None
    if _rank(m["x"]) != 2:
        return "MatMul input is not 2-D: the normalized axis 1 is not the product's last axis"
    if not _float(m["x"], (np.dtype(np.float32), np.dtype(np.float64))):
        return "MatMul is not float32 or float64 (Gemm)"
    if "bias" in m.tensors:
        bias = m["bias"]
        if tuple(bias.shape) not in ((), (1,), (n,), (1, n)) or bias.dtype != w.dtype:
            return "bias is not a vector over the last axis of the weight's type"
    return None


def _gemm_bn(m, env, outputs):
    bn, w = m["bn"], m["w"]
    scale, shift, mean, var = (m.value(n).astype(np.float64) for n in ("scale", "shift", "mean", "var"))
    factor = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    if "gemm" in m.nodes:
        gemm = m["gemm"]
        attrs = dict(gemm.attrs)
        c = _gemm_c(gemm)
        bias = values(c).astype(np.float64) * float(attrs.get("beta", 1.0)) if c is not None else np.zeros(())
        attrs["beta"] = 1.0
    else:
        attrs = {}
        bias = m.value("bias").astype(np.float64) if "bias" in m.tensors else np.zeros(())
    weight = values(w).astype(np.float64)
    weight = weight * (factor[:, None] if attrs.get("transB", 0) else factor[None, :])
    bias = bias * factor + (shift - mean * factor)
    inputs = [m["x"], _const(env, w.name + "_bn", weight.astype(w.dtype)),
              _const(env, w.name + "_bn_bias", bias.astype(w.dtype))]
    return [gs.Node("Gemm", env.names.new((bn.name or "Gemm") + "_gemm"), attrs=attrs, inputs=inputs,
                    outputs=outputs[:1])]


# ----------------------------------------------------------------------------------- scale_into_matmul


def _scale_patterns():
    for op in ("Mul", "Div"):
        yield Op(op, Op("MatMul", X, C("w"), name="mm"), C("s"), name="scale")
        yield Op(op, Op("Gemm", X, Var("w"), name="gemm"), C("s"), name="scale")
        yield Op("MatMul", Op(op, X, C("s"), name="scale"), C("w"), name="mm")


def _input_side(m) -> bool:
    return m.matched[-1] is not m["scale"]


def _scale_check(m, env):
    s, w, node = m.value("s"), m["w"], m["scale"]
    if s.dtype not in FLOATS:
        return "scale is not a float constant"
    if node.op == "Div" and not np.all(s):
        return "Div by a constant holding zeros"
    if _input_side(m):
        rank = _rank(m["x"])
        if s.size != 1 or (s.ndim > 1 and (rank is None or s.ndim > rank)):
            return "only a scalar that does not broadcast the input is folded from the input side"
        if ends_gelu(node):
            return "the 0.5 of a GELU the runtime fuses itself (fuse writes Gelu from opset 20)"
    else:
        rank = _rank((m["mm"] if "mm" in m.nodes else m["gemm"]).outputs[0])
        if s.ndim > 1 and (rank is None or s.ndim > rank or any(d != 1 for d in s.shape[:-1])):
            return "scale is not a scalar or a vector over the product's last axis"
    if "gemm" in m.nodes:
        gemm = m["gemm"]
        if env.opset < 7:
            return "Gemm before opset 7 (broadcast attribute) is not handled"
        if len(gemm.outputs) != 1 or not _float(m["x"]) or s.dtype != _dtype(m["x"]):
            return "Gemm is not float or of another type than the scale"
        if s.size == 1:
            return None  # into alpha and beta: the weights may be anything
        c = _gemm_c(gemm)
        if not is_constant(w) or (c is not None and not is_constant(c)):
            return "Gemm's B or C is not a constant"
    if not _float(w) or w.shape is None or len(w.shape) < 2 or s.dtype != np.dtype(w.dtype):
        return "weight is not a float matrix of the scale's type"
    n = _out_features(m) if "gemm" in m.nodes else int(w.shape[-1])
    if s.size != 1 and s.shape[-1] != n:
        return "scale is not a vector over the product's last axis"
    return None


def _scale(m, env, outputs):
    s, node, w = m.value("s").astype(np.float64), m["scale"], m["w"]
    div = node.op == "Div"
    if "gemm" in m.nodes:
        gemm = m["gemm"]
        attrs, inputs = dict(gemm.attrs), list(gemm.inputs)
        if s.size == 1:
            k = float(s.reshape(-1)[0])
            for key in ("alpha", "beta"):
                v = float(attrs.get(key, 1.0))
                attrs[key] = v / k if div else v * k
        else:
            vec = s.reshape(-1)
            column = vec[:, None] if attrs.get("transB", 0) else vec[None, :]
            weight = values(w).astype(np.float64)
            inputs[1] = _const(env, w.name + "_scaled", (weight / column if div else weight * column).astype(w.dtype))
            c = _gemm_c(gemm)
            if c is not None:
                bias = values(c).astype(np.float64)
                inputs[2] = _const(env, c.name + "_scaled", (bias / vec if div else bias * vec).astype(c.dtype))
        return [gs.Node("Gemm", env.names.new((gemm.name or "Gemm") + "_scaled"), attrs=attrs, inputs=inputs,
                        outputs=outputs)]
    vec = s.reshape(-1)  # a scalar, or a vector over the weight's last axis
    weight = values(w).astype(np.float64)
    weight = (weight / vec if div else weight * vec).astype(w.dtype)
    return [gs.Node("MatMul", env.names.new((m["mm"].name or "MatMul") + "_scaled"),
                    inputs=[m["x"], _const(env, w.name + "_scaled", weight)], outputs=outputs)]


def _alpha_patterns():
    for op in ("Mul", "Div"):
        yield Op(op, Op("MatMul", Var("a"), Var("b"), name="mm"), C("s"), name="scale")
        yield Op(op, Op("FusedMatMul", Var("a"), Var("b"), name="mm", domains=(MS,)), C("s"), name="scale")


def _reaches_softmax(t: gs.Tensor) -> bool:
    """Whether the tensor feeds a Softmax directly or through one Add (attention scores)."""
    for c in t.outputs:
        if c.op == "Softmax" or (c.op == "Add" and any(cc.op == "Softmax" for o in c.outputs for cc in o.outputs)):
            return True
    return False


def _alpha_check(m, env):
    s, node, mm = m.value("s"), m["scale"], m["mm"]
    f32 = (np.dtype(np.float32),)
    if s.size != 1 or s.dtype != np.float32 or not (_float(m["a"], f32) and _float(m["b"], f32)):
        return "FusedMatMul's alpha takes a float32 scalar on float32 operands"
    if node.op == "Div" and (s.reshape(-1)[0] == 0 or np.frexp(s.reshape(-1)[0])[0] != 0.5):
        return "Div by a scalar whose reciprocal is not exact (not a power of two)"
    ranks = (_rank(m["a"]), _rank(m["b"]), _rank(mm.outputs[0]))
    if any(r is None or r < 2 for r in ranks) or s.ndim > ranks[2] or len(mm.outputs) != 1:
        return "operands are not known to have rank 2 or more"
    if _reaches_softmax(node.outputs[0]):
        return "attention scores: left to the attention rule"
    return None


def _alpha(m, env, outputs):
    mm, k = m["mm"], float(m.value("s").reshape(-1)[0])
    attrs = dict(mm.attrs) if mm.op == "FusedMatMul" else {}
    alpha = float(attrs.get("alpha", 1.0))
    attrs["alpha"] = alpha / k if m["scale"].op == "Div" else alpha * k
    return [gs.Node("FusedMatMul", env.names.new((mm.name or "MatMul") + "_fused"), domain=MS, attrs=attrs,
                    inputs=[m["a"], m["b"]], outputs=outputs)]


# ----------------------------------------------------------------------------------- transpose_into_gemm


def _transposed_patterns(op: str):
    ta, tb = Op("Transpose", Var("a"), name="ta"), Op("Transpose", Var("b"), name="tb")
    for a, b in ((ta, tb), (ta, Var("b")), (Var("a"), tb)):
        yield Op(op, a, b, name="mm")


def _swaps_last_two(t: gs.Node) -> bool:
    perm = t.attrs.get("perm")
    if perm is None:
        return _rank(t.inputs[0]) == 2
    r = len(perm)
    return r >= 2 and list(perm) == list(range(r - 2)) + [r - 1, r - 2]


def _transposes(m) -> list:
    return [m[n] for n in ("ta", "tb") if n in m.nodes]


def _gemm_transpose_check(m, env):
    # Gemm's operands are 2-D, so a Transpose without perm (reversing the axes) swaps them too
    if not all(t.attrs.get("perm") is None or list(t.attrs["perm"]) == [1, 0] for t in _transposes(m)):
        return "Transpose is not [1, 0]"
    return None if len(m["mm"].outputs) == 1 else "Gemm has extra outputs"


def _operands(m) -> tuple:
    """The operands without the Transposes, and transA / transB to flip."""
    return m["a"], m["b"], int("ta" in m.nodes), int("tb" in m.nodes)


def _gemm_transpose(m, env, outputs):
    gemm = m["mm"]
    a, b, flip_a, flip_b = _operands(m)
    attrs = dict(gemm.attrs)
    attrs["transA"] = attrs.get("transA", 0) ^ flip_a
    attrs["transB"] = attrs.get("transB", 0) ^ flip_b
    return [gs.Node("Gemm", env.names.new((gemm.name or "Gemm") + "_t"), attrs=attrs,
                    inputs=[a, b] + list(gemm.inputs[2:]), outputs=outputs)]


def _fused_matmul_check(m, env):
    a, b, _, _ = _operands(m)
    if not all(_swaps_last_two(t) for t in _transposes(m)):
        return "Transpose does not swap the last two axes"
    if _reaches_softmax(m["mm"].outputs[0]):
        return "attention scores: left to the attention rules"
    if any(r is None or r < 2 for r in (_rank(a), _rank(b))):
        return "operands are not known to have rank 2 or more"
    f32 = (np.dtype(np.float32),)
    return None if _float(a, f32) and _float(b, f32) else "FusedMatMul is used for float32 only"


def _fused_matmul(m, env, outputs):
    a, b, flip_a, flip_b = _operands(m)
    return [gs.Node("FusedMatMul", env.names.new((m["mm"].name or "MatMul") + "_fused"), domain=MS,
                    attrs={"alpha": 1.0, "transA": flip_a, "transB": flip_b}, inputs=[a, b], outputs=outputs)]


def _matmul_gemm_check(m, env):
    a, b, _, _ = _operands(m)
    if _rank(a) != 2 or _rank(b) != 2 or not all(_swaps_last_two(t) for t in _transposes(m)):
        return "operands are not known to be 2-D"
    if not (_float(a, FLOATS[1:]) and _float(b, FLOATS[1:])):
        return "Gemm is used for float32 and float64 only"
    return env.needs(11, "Gemm without C")


def _matmul_gemm(m, env, outputs):
    a, b, flip_a, flip_b = _operands(m)
    return [gs.Node("Gemm", env.names.new((m["mm"].name or "MatMul") + "_gemm"),
                    attrs={"transA": flip_a, "transB": flip_b}, inputs=[a, b], outputs=outputs)]


# ----------------------------------------------------------------------------------- gemm_activation

# FusedGemm's activation attributes, as the activation's own with "activation_" before each name
_ACTIVATION_DEFAULTS = {
    "Relu": {}, "Sigmoid": {}, "Tanh": {}, "Softplus": {}, "Softsign": {},
    "LeakyRelu": {"alpha": 0.01}, "HardSigmoid": {"alpha": 0.2, "beta": 0.5}, "Elu": {"alpha": 1.0},
    "Celu": {"alpha": 1.0}, "ThresholdedRelu": {"alpha": 1.0},
    "Selu": {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875},
}


def _gemm_activation_check(m, env):
    if not _float(m["x"], (np.dtype(np.float32),)):
        return "FusedGemm runs float32 only"
    if env.opset < 7:
        return "Gemm before opset 7 (broadcast attribute) is not handled"
    return None if len(m["gemm"].outputs) == 1 else "Gemm has extra outputs"


def _gemm_activation(m, env, outputs):
    gemm, act = m["gemm"], m["act"]
    attrs = dict(gemm.attrs)
    attrs["activation"] = act.op
    for key, default in _ACTIVATION_DEFAULTS[act.op].items():
        attrs["activation_" + key] = float(act.attrs.get(key, default))
    return [gs.Node("FusedGemm", env.names.new((gemm.name or "Gemm") + "_fused"), domain=MS, attrs=attrs,
                    inputs=list(gemm.inputs), outputs=outputs)]


# ----------------------------------------------------------------------------------- shape chains


def _passthrough(x: gs.Tensor, env, outputs) -> list:
    """The root computes x itself: its readers read x, or, for a graph output, x's producer
    writes the output (as cleanup's bypass does); an Identity where neither is possible."""
    node = gs.Node("Identity", env.names.new("Identity"), inputs=[x], outputs=outputs)
    if bypass(env.graph, node, x, output_tensors(env.graph), {id(n) for n in env.graph.nodes}):
        return []
    return [node]


def _perm(node: gs.Node, rank: int | None) -> list | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return list(range(rank))[::-1] if rank is not None else None


def _composed_perm(m) -> list | None:
    """The perm of the two Transposes as one ([] when both reverse all axes), None if unknown."""
    inner, outer = m["inner"], m["outer"]
    if inner.attrs.get("perm") is None and outer.attrs.get("perm") is None:
        return []  # reversed twice: the identity, whatever the rank
    given = inner.attrs.get("perm") or outer.attrs.get("perm")
    p1, p2 = _perm(inner, len(given)), _perm(outer, len(given))
    return [p1[i] for i in p2] if len(p1) == len(p2) else None


def _transpose_chain_check(m, env):
    return None if _composed_perm(m) is not None else "perms of different lengths"


def _transpose_chain(m, env, outputs):
    perm = _composed_perm(m)
    if perm == list(range(len(perm))):
        return _passthrough(m["x"], env, outputs)
    return [gs.Node("Transpose", env.names.new((m["outer"].name or "Transpose") + "_composed"),
                    attrs={"perm": perm}, inputs=[m["x"]], outputs=outputs)]


def _reshape_chain_check(m, env):
    if env.opset < 5:
        return "Reshape before opset 5 takes its shape as an attribute"
    shape = m.value("shape").reshape(-1)
    if 0 in shape.tolist() and not m["outer"].attrs.get("allowzero", 0):
        return "a 0 in the target shape copies a dimension of the Reshape's own input"
    return None


def _reshape_chain(m, env, outputs):
    outer = m["outer"]
    return [gs.Node("Reshape", env.names.new((outer.name or "Reshape") + "_direct"), attrs=dict(outer.attrs),
                    inputs=[m["x"], m["shape"]], outputs=outputs)]


def _axes(node: gs.Node, env) -> list | str:
    """The node's axes as given, or the reason they are not known."""
    if env.opset < 13:
        axes = node.attrs.get("axes")
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = const_value(node.inputs[1])
        if axes is None:
            return f"{node.op} axes are not a constant"
    else:
        axes = None
    if axes is None:  # only Squeeze may omit them: every axis of size 1
        shape = static_shape(node.inputs[0])
        if node.op != "Squeeze" or shape is None:
            return f"{node.op} without axes on a tensor of unknown shape"
        return [i for i, d in enumerate(shape) if d == 1]
    return [int(a) for a in np.asarray(axes).reshape(-1)]


def _normalized(axes: list, rank: int | None) -> list | None:
    if any(a < 0 for a in axes) and rank is None:
        return None
    return sorted(a + rank if a < 0 else a for a in axes)


def _squeeze_chain_check(m, env):
    inner, outer, x = m["inner"], m["outer"], m["x"]
    first, second = _axes(inner, env), _axes(outer, env)
    for axes in (first, second):
        if isinstance(axes, str):
            return axes
    rank = _rank(x)
    if inner.op == "Squeeze":  # both normalize against x's rank (the Unsqueeze's output rank)
        ranks = (rank, rank - len(first) + len(second) if rank is not None else None)
    else:  # both against the Unsqueeze's output rank
        ranks = (rank + len(first) if rank is not None else None,) * 2
    first, second = _normalized(first, ranks[0]), _normalized(second, ranks[1])
    if first is None or second is None:
        return "negative axes on a tensor of unknown rank"
    return None if first == second else "the axes differ"


def _squeeze_chain(m, env, outputs):
    return _passthrough(m["x"], env, outputs)


RULES = (
    [Rule("gemm_bn", p, _gemm_bn, _gemm_bn_check) for p in _bn_patterns()]
    + [Rule("scale_into_matmul", p, _scale, _scale_check) for p in _scale_patterns()]
    + [Rule("scale_into_matmul", p, _alpha, _alpha_check, targets=("ort",)) for p in _alpha_patterns()]
    + [Rule("transpose_into_gemm", p, _gemm_transpose, _gemm_transpose_check) for p in _transposed_patterns("Gemm")]
    + [Rule("transpose_into_gemm", p, _fused_matmul, _fused_matmul_check, targets=("ort",))
       for p in _transposed_patterns("MatMul")]
    + [Rule("transpose_into_gemm", p, _matmul_gemm, _matmul_gemm_check, targets=("onnx",))
       for p in _transposed_patterns("MatMul")]
    + [Rule("gemm_activation", Op(tuple(_ACTIVATION_DEFAULTS), Op("Gemm", X, Var("w"), name="gemm"), name="act"),
            _gemm_activation, _gemm_activation_check, targets=("ort",))]
    + [Rule("transpose_chain", Op("Transpose", Op("Transpose", X, name="inner"), name="outer"), _transpose_chain,
            _transpose_chain_check)]
    + [Rule("reshape_chain", Op("Reshape", Op(("Reshape", "Squeeze", "Unsqueeze", "Flatten"), X, name="inner"),
                                C("shape"), name="outer"), _reshape_chain, _reshape_chain_check)]
    + [Rule("squeeze_chain", Op(outer, Op(inner, X, name="inner"), name="outer"), _squeeze_chain, _squeeze_chain_check)
       for outer, inner in (("Unsqueeze", "Squeeze"), ("Squeeze", "Unsqueeze"))]
)
