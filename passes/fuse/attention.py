"""Multi-head attention into one fused op.

The pattern is BERT-style multi-head attention as torch's legacy and dynamo exporters write it
once `fold` has resolved the head reshapes to constants:

    q, k, v = (Xq @ Wq [+ bq]), (Xk @ Wk [+ bk]), (Xv @ Wv [+ bv])   each .reshape(0, 0, N, D)
              transposed to [B, N, S, D] (k to [B, N, D, S])
    probs = Softmax(q @ k [* scale (or / c)] [+ bias] [+ mask])   over the last axis (unscaled: scale 1)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(0, 0, -1)

The reshapes may spell batch and sequence by their known sizes or with one -1 (the dynamo
exporter with fixed shapes: reshape(-1, 65, N, D), allowzero=1) as long as each keeps them; one
that regroups positions (reshape(-1, S / 2, N, D)) is another computation and is left alone.

- attention (`ort`): self-attention (Xq = Xk = Xv) into com.microsoft Attention(X, [Wq|Wk|Wv],
  [bq|bk|bv], attention_bias=mask) with num_heads and scale.
- multi_head_attention (`ort`): the other cases (cross-attention: queries and keys from different
  tensors) into com.microsoft MultiHeadAttention(Xq @ Wq, Xk @ Wk, Xv @ Wv, [bq|bk|bv],
  attention_bias=mask); the projections stay MatMuls.
- attention_onnx (`onnx`): standard Attention (opset 23) over the projected [B, S, hidden]
  tensors with q_num_heads = kv_num_heads = N.
- attention_packed: paddle2onnx's packed-QKV form (see below) into com.microsoft Attention
  (`ort`) or Split + Attention (opset 23, `onnx`).

The additive mask is passed through unchanged (with two additive terms, T5's position bias and
its padding mask, their sum), so the mask semantics are exactly the model's own
(whatever value it uses for masked positions). A key-padding mask of shape [B, 1, 1, L] is
expanded over the query positions first (one Expand shared by every layer that reads the same
mask): onnxruntime's kernels do not broadcast the mask over that axis.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import values
from onnxopt.pattern import C, Op, Rule, Var

MS = "com.microsoft"


def _projection(tag: str, bias: bool) -> Op:
    proj = Op("MatMul", Var("x" + tag), C("w" + tag), name="mm" + tag)
    if bias:
        proj = Op("Add", proj, C("b" + tag), name="add" + tag)
    return Op("Transpose", Op("Reshape", proj, C("shape" + tag), name="r" + tag), name="t" + tag)


def _patterns():
    for bias in (True, False):
        scores = Op("MatMul", _projection("q", bias), _projection("k", bias))
        for scale_op in ("Mul", "Div", None):  # None: unscaled (T5), or the scale already in Wq (Whisper)
            scaled = (Op(scale_op, scores, C("scale"), name="scaling", commute=scale_op == "Mul") if scale_op
                      else scores)
            # two additive terms: T5's relative position bias, then the padding mask
            for masked in (Op("Add", Op("Add", scaled, Var("bias")), Var("mask")), Op("Add", scaled, Var("mask")),
                           scaled):
                probs = Op("Softmax", masked, name="softmax")
                context = Op("MatMul", probs, _projection("v", bias))
                yield Op("Reshape", Op("Transpose", context, name="tout"), C("shape_out"), name="rout")


def _perm(node: gs.Node) -> list:
    return list(node.attrs.get("perm") or [])


def _self_attention(m) -> bool:
    return m["xq"] is m["xk"] is m["xv"]


def _common_check(m, env):
    """Why the matched attention cannot be fused at all (None: it can)."""
    xs = [m["x" + t] for t in "qkv"]
    if any(x.shape is None or len(x.shape) != 3 or not isinstance(x.shape[2], int) for x in xs):
        return "inputs are not [batch, sequence, hidden] with a known hidden size"
    weights = [m.value("w" + t) for t in "qkv"]
    if any(w.ndim != 2 or w.shape[0] != x.shape[2] for w, x in zip(weights, xs)):
        return "Q/K/V projection weights do not match their inputs"
    hidden = weights[0].shape[1]
    if any(w.shape[1] != hidden for w in weights):
        return "Q, K and V projections differ in width"
    biases = [m.value("b" + t) for t in "qkv"] if "bq" in m.tensors else []
    if any(b.shape != (hidden,) for b in biases):
        return "Q/K/V biases are not [hidden] vectors"
    if len({w.dtype for w in weights + biases} | {np.dtype(x.dtype) for x in xs}) != 1:
        return "mixed element types"
    shapes = [m.value("shape" + t).tolist() for t in "qkv"]
    if len({tuple(s[2:]) for s in shapes}) != 1 or any(
            len(s) != 4 or not keeps_leading(s, x.shape, m["r" + t]) for s, x, t in zip(shapes, xs, "qkv")):
        return "heads are not split as reshape [batch, sequence, heads, head_size]"
    head_size = shapes[0][3]
    if head_size <= 0 or hidden % head_size or shapes[0][2] not in (-1, hidden // head_size):
        return "head reshape does not divide the hidden size"
    if shapes[0][2] == -1 and -1 in shapes[0][:2]:
        return "head reshape has two inferred dimensions"
    if (_perm(m["tq"]), _perm(m["tk"]), _perm(m["tv"]), _perm(m["tout"])) != (
            [0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3], [0, 2, 1, 3]):
        return "head transposes are not the BERT layout"
    merged = m.value("shape_out").tolist()
    if (len(merged) != 3 or merged[2] not in (-1, hidden) or merged.count(-1) > 1
            or not keeps_leading(merged, m["xq"].shape, m["rout"])):
        return "context is not merged back to [batch, sequence, hidden]"
    if m["softmax"].attrs.get("axis", -1 if env.opset >= 13 else 1) not in (-1, 3):
        return "softmax is not over the last axis"
    if "scale" in m.tensors and m.value("scale").size != 1:
        return "scale is not a scalar"
    if "mask" in m.tensors:
        heads = hidden // head_size
        terms = [m["mask"]] + ([m["bias"]] if "bias" in m.tensors else [])
        shape = _sum_shape(terms)
        if (shape is None or len(shape) != 4 or shape[1] not in (1, heads)
                or any(t.dtype != xs[0].dtype for t in terms)):
            return "mask is not a 4-D [batch or 1, heads or 1, query or 1, key] tensor of the input's type"
        if shape[3] == 1 and not (isinstance(m["xk"].shape[1], int) and m["xk"].shape[1] == 1):
            return "mask broadcasts over the key positions"
    return None


def keeps_leading(shape: list, dims, reshape: gs.Node) -> bool:
    """Whether the Reshape to `shape` keeps its input's first two dimensions (`dims`: the
    [batch, sequence, ...] of the projection's input): each is copied (0, unless allowzero), the
    same known size, or the one -1 beside a kept one (it then resolves to the other: the trailing
    dimensions hold exactly the hidden size, checked by the caller). dynamo exports with fixed
    shapes write [-1, 65, 3, 64] where the legacy exporter writes [0, 0, 3, 64]."""
    copies = not reshape.attrs.get("allowzero", 0)

    def kept(target, dim) -> bool:
        return (target == 0 and copies) or (isinstance(dim, int) and target == dim > 0)

    a, b = shape[:2]
    return (kept(a, dims[0]) or a == -1) and (kept(b, dims[1]) or b == -1) and (a, b).count(-1) <= 1


def _check_ort_attention(m, env):
    return _common_check(m, env) or (None if _self_attention(m) else "queries and keys come from different tensors")


def _check_ort_mha(m, env):
    return _common_check(m, env) or ("self-attention: fused as Attention" if _self_attention(m) else None)


def _check_onnx(m, env):
    return _common_check(m, env) or env.needs(23, "Attention")


def _scale(m) -> float:
    if "scale" not in m.tensors:
        return 1.0
    scale = float(m.value("scale").reshape(-1)[0])
    return 1.0 / scale if m["scaling"].op == "Div" else scale


def _heads(m) -> int:
    return int(m.value("wq").shape[1] // m.value("shapeq")[3])


def _sum_shape(terms: list) -> list | None:
    """The broadcast shape of the 4-D additive terms (None where unknown or not 4-D)."""
    if any(t.shape is None or len(t.shape) != 4 for t in terms):
        return None
    shape = list(terms[0].shape)
    for t in terms[1:]:
        for i, d in enumerate(t.shape):
            if d == 1 or d == shape[i]:
                continue
            if shape[i] != 1:
                return None  # two different sizes, or unknown ones that may differ
            shape[i] = d
    return shape


def _full_mask(m, env) -> gs.Tensor:
    """The additive mask (bias + mask when there are two terms: one Add per pair of tensors) with
    the query axis spelled out: [B, 1, 1, L] is expanded to [B, 1, S, L] with S read from the
    queries' input at run time (one Expand per mask tensor and query input)."""
    mask = m["mask"]
    if "bias" in m.tensors:
        key = ("attention_bias", m["bias"].name, mask.name)
        if key not in env.cache:
            out = gs.Variable(env.names.new(mask.name + "_with_bias"), dtype=mask.dtype,
                              shape=_sum_shape([mask, m["bias"]]))
            env.graph.nodes.append(gs.Node("Add", env.names.new("Add"), inputs=[m["bias"], mask], outputs=[out]))
            env.cache[key] = out
        mask = env.cache[key]
    if mask.shape[2] != 1 or m["xq"].shape[1] == 1:
        return mask
    key = ("expanded_mask", mask.name, m["xq"].name)
    if key not in env.cache:
        new = env.names.new
        shape = gs.Variable(new(mask.name + "_query_shape"), dtype=np.int64, shape=[3])
        seq = gs.Variable(new(mask.name + "_query_len"), dtype=np.int64, shape=[1])
        target = gs.Variable(new(mask.name + "_expand_shape"), dtype=np.int64, shape=[4])
        out = gs.Variable(new(mask.name + "_expanded"), dtype=mask.dtype,
                          shape=[mask.shape[0], mask.shape[1], m["xq"].shape[1], mask.shape[3]])
        env.graph.nodes += [
            gs.Node("Shape", new("Shape"), inputs=[m["xq"]], outputs=[shape]),
            gs.Node("Gather", new("Gather"), inputs=[shape, env.constant("one", np.array([1], np.int64))],
                    outputs=[seq], attrs={"axis": 0}),
            gs.Node("Concat", new("Concat"), attrs={"axis": 0}, outputs=[target],
                    inputs=[env.constant("ones", np.array([1, 1], np.int64)), seq,
                            env.constant("one", np.array([1], np.int64))]),
            gs.Node("Expand", new("Expand"), inputs=[mask, target], outputs=[out]),
        ]
        env.cache[key] = out
    return env.cache[key]


def _packed_bias(m, env, name):
    if "bq" not in m.tensors:
        return None
    return gs.Constant(env.names.new(name + "_qkv_bias"), np.concatenate([values(m["b" + t]) for t in "qkv"]))


def _attention(m, env, outputs):
    x = m["xq"]
    name = env.names.new("Attention")
    weight = np.concatenate([values(m["w" + t]) for t in "qkv"], axis=1)
    bias = _packed_bias(m, env, name)
    if bias is None:  # onnxruntime's Attention wants one
        bias = env.constant(name + "_qkv_bias", np.zeros(weight.shape[1], weight.dtype))
    inputs = [x, gs.Constant(env.names.new(name + "_qkv_weight"), weight), bias]
    if "mask" in m.tensors:
        inputs += [gs.Variable.empty(), gs.Variable.empty(), _full_mask(m, env)]
    return [gs.Node("Attention", name, domain=MS, inputs=inputs, outputs=outputs,
                    attrs={"num_heads": _heads(m), "scale": _scale(m)})]


def _multi_head_attention(m, env, outputs):
    name = env.names.new("MultiHeadAttention")
    bias = _packed_bias(m, env, name)
    inputs = [m["mm" + t].outputs[0] for t in "qkv"] + [bias if bias is not None else gs.Variable.empty()]
    if "mask" in m.tensors:
        inputs += [gs.Variable.empty(), _full_mask(m, env)]
    return [gs.Node("MultiHeadAttention", name, domain=MS, inputs=inputs, outputs=outputs,
                    attrs={"num_heads": _heads(m), "scale": _scale(m)})]


def _attention_onnx(m, env, outputs):
    proj = [m[("add" if "bq" in m.tensors else "mm") + t].outputs[0] for t in "qkv"]
    inputs = proj + ([_full_mask(m, env)] if "mask" in m.tensors else [])
    heads = _heads(m)
    return [gs.Node("Attention", env.names.new("Attention"), inputs=inputs, outputs=outputs,
                    attrs={"q_num_heads": heads, "kv_num_heads": heads, "scale": _scale(m)})]


RULES = [Rule("attention", p, _attention, _check_ort_attention, targets=("ort",)) for p in _patterns()] + [
    Rule("multi_head_attention", p, _multi_head_attention, _check_ort_mha, targets=("ort",)) for p in _patterns()] + [
    Rule("attention_onnx", p, _attention_onnx, _check_onnx, targets=("onnx",)) for p in _patterns()]


# ----------------------------------------------------------------------------------- packed QKV (paddle2onnx)
#
#   qkv = X @ W + b                      [B, S, 3 * hidden]
#   heads = qkv.reshape(0, -1, 3, N, D).transpose(2, 0, 3, 1, 4)          [3, B, N, S, D]
#   q, k, v = heads[0], heads[1], heads[2]   (Slice + Squeeze)
#   out = softmax(q * scale @ k^T) @ v  -> transpose(0, 2, 1, 3) -> reshape(0, -1, hidden)
#
# (paddle's SVTR blocks in the PP-OCR recognizers). The weight's columns are already ordered
# (Q | K | V, each head-major), as com.microsoft Attention wants them.

def _packed_branch(i: int) -> Op:
    heads = Op("Transpose", Op("Reshape", Op("Add", Op("MatMul", Var("x"), C("w")), C("b"), name="qkv"), C("shape5")),
               name="split")
    return Op("Squeeze", Op("Slice", heads, C(f"start{i}"), C(f"end{i}"), name=f"slice{i}"), name=f"squeeze{i}")



def _packed_patterns():
    q, k, v = (_packed_branch(i) for i in range(3))
    scaled = Op("Mul", q, C("scale"), name="scaling")
    for scores in (Op("MatMul", scaled, Op("Transpose", k, name="tk")),
                   Op("FusedMatMul", scaled, k, name="fused", domains=(MS,))):
        context = Op("MatMul", Op("Softmax", scores, name="softmax"), v)
        yield Op("Reshape", Op("Transpose", context, name="tout"), C("shape_out"))


def _packed_check(m, env):
    x = m["x"]
    if x.shape is None or len(x.shape) != 3 or not isinstance(x.shape[2], int):
        return "input is not [batch, sequence, hidden] with a known hidden size"
    hidden = x.shape[2]
    w, b = m.value("w"), m.value("b")
    if w.shape != (hidden, 3 * hidden) or b.shape != (3 * hidden,) or len({w.dtype, b.dtype, np.dtype(x.dtype)}) != 1:
        return "packed QKV weight is not [hidden, 3 * hidden] with a [3 * hidden] bias of the input's type"
    shape = m.value("shape5").tolist()
    if len(shape) != 5 or shape[0] != 0 or shape[1] not in (0, -1) or shape[2] != 3 or shape[3] * shape[4] != hidden:
        return "heads are not split as reshape [0, -1, 3, heads, head_size]"
    if _perm(m["split"]) != [2, 0, 3, 1, 4] or _perm(m["tout"]) != [0, 2, 1, 3]:
        return "head transposes are not the packed layout"
    for i in range(3):
        sl, sq = m[f"slice{i}"], m[f"squeeze{i}"]
        extra = [values(t).reshape(-1).tolist() if t.name else None for t in sl.inputs[3:5]]
        if (m.value(f"start{i}").reshape(-1).tolist(), m.value(f"end{i}").reshape(-1).tolist()) != ([i], [i + 1]) \
                or extra[:1] not in ([], [None], [[0]]) or extra[1:] not in ([], [None], [[1]]):
            return "Q/K/V are not the three slices of the packed heads"
        axes = sq.attrs.get("axes") if env.opset < 13 else (values(sq.inputs[1]).reshape(-1).tolist()
                                                           if len(sq.inputs) > 1 else None)
        if list(axes or []) != [0]:
            return "Q/K/V slices are not squeezed on axis 0"
    if "tk" in m.nodes and _perm(m["tk"]) != [0, 1, 3, 2]:
        return "keys are not transposed over their last two axes"
    if "fused" in m.nodes:
        a = m["fused"].attrs
        if a.get("transA", 0) or not a.get("transB", 0) or a.get("alpha", 1.0) != 1.0 or \
                a.get("transBatchA", 0) or a.get("transBatchB", 0):
            return "the scores' FusedMatMul is not q @ k^T"
    if m["softmax"].attrs.get("axis", -1 if env.opset >= 13 else 1) not in (-1, 3):
        return "softmax is not over the last axis"
    if m.value("scale").size != 1:
        return "scale is not a scalar"
    if m.value("shape_out").tolist() not in ([0, -1, hidden], [0, 0, hidden], [0, 0, -1]):
        return "context is not merged back to [batch, sequence, hidden]"
    return env.needs(23, "Attention") if env.target == "onnx" else None


def _packed_attention(m, env, outputs):
    heads = int(m.value("shape5")[3])
    scale = float(m.value("scale").reshape(-1)[0])
    name = env.names.new("Attention")
    if env.target == "ort":
        return [gs.Node("Attention", name, domain=MS, inputs=[m["x"], m["w"], m["b"]], outputs=outputs,
                        attrs={"num_heads": heads, "scale": scale})]
    hidden = m["x"].shape[2]
    qkv = m["qkv"].outputs[0]
    parts = [gs.Variable(env.names.new(f"{name}_{t}"), dtype=qkv.dtype, shape=list(qkv.shape[:2]) + [hidden]
                         if qkv.shape is not None else None) for t in "qkv"]
    split = gs.Node("Split", env.names.new(f"{name}_split"), attrs={"axis": -1}, outputs=parts,
                    inputs=[qkv, env.constant("split_sizes", np.array([hidden] * 3, np.int64))])
    return [split, gs.Node("Attention", name, inputs=parts, outputs=outputs,
                           attrs={"q_num_heads": heads, "kv_num_heads": heads, "scale": scale})]


RULES += [Rule("attention_packed", p, _packed_attention, _packed_check) for p in _packed_patterns()]
