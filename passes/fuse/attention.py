"""Self-attention into one fused op.

The pattern is BERT-style multi-head self-attention as torch's legacy and dynamo exporters write
it once `fold` has resolved the head reshapes to constants:

    q, k, v = (X @ W + b).reshape(0, 0, N, D)  transposed to [B, N, S, D] (k to [B, N, D, S])
    probs = Softmax(q @ k * scale (or / c) [+ mask])      over the last axis
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(0, 0, -1)

- attention (`ort`): com.microsoft Attention(X, [Wq|Wk|Wv], [bq|bk|bv], attention_bias=mask) with
  num_heads and scale: the additive mask is passed through unchanged, so the mask semantics are
  exactly the model's own (whatever value it uses for masked positions).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import values
from onnxopt.pattern import C, Op, Rule, Var

MS = "com.microsoft"
X = Var("x")


def _projection(tag: str) -> Op:
    return Op("Transpose", Op("Reshape", Op("Add", Op("MatMul", X, C("w" + tag)), C("b" + tag)), C("shape" + tag)),
              name="t" + tag)


def _patterns():
    scores = Op("MatMul", _projection("q"), _projection("k"))
    for scale_op in ("Mul", "Div"):
        scaled = Op(scale_op, scores, C("scale"), name="scaling", commute=scale_op == "Mul")
        for masked in (Op("Add", scaled, Var("mask")), scaled):
            probs = Op("Softmax", masked, name="softmax")
            context = Op("MatMul", probs, _projection("v"))
            yield Op("Reshape", Op("Transpose", context, name="tout"), C("shape_out"))


def _perm(node: gs.Node) -> list:
    return list(node.attrs.get("perm") or [])


def _check(m, env):
    x = m["x"]
    if x.shape is None or len(x.shape) != 3 or not isinstance(x.shape[2], int):
        return "input is not [batch, sequence, hidden] with a known hidden size"
    hidden = x.shape[2]
    weights = [m.value("w" + t) for t in "qkv"]
    biases = [m.value("b" + t) for t in "qkv"]
    if any(w.shape != (hidden, hidden) for w in weights) or any(b.shape != (hidden,) for b in biases):
        return "Q/K/V projections are not [hidden, hidden] with [hidden] biases"
    if len({w.dtype for w in weights + biases} | {np.dtype(x.dtype)}) != 1:
        return "mixed element types"
    shapes = [m.value("shape" + t).tolist() for t in "qkv"]
    if len({tuple(s) for s in shapes}) != 1 or len(shapes[0]) != 4 or shapes[0][:2] != [0, 0]:
        return "heads are not split as reshape [0, 0, heads, head_size]"
    head_size = shapes[0][3]
    if head_size <= 0 or hidden % head_size or shapes[0][2] not in (-1, hidden // head_size):
        return "head reshape does not divide the hidden size"
    if (_perm(m["tq"]), _perm(m["tk"]), _perm(m["tv"]), _perm(m["tout"])) != (
            [0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3], [0, 2, 1, 3]):
        return "head transposes are not the BERT layout"
    if m.value("shape_out").tolist() not in ([0, 0, -1], [0, 0, hidden]):
        return "context is not merged back to [batch, sequence, hidden]"
    if m["softmax"].attrs.get("axis", -1 if env.opset >= 13 else 1) not in (-1, 3):
        return "softmax is not over the last axis"
    scale = m.value("scale")
    if scale.size != 1:
        return "scale is not a scalar"
    if "mask" in m.tensors:
        mask = m["mask"]
        heads = hidden // head_size
        if (mask.shape is None or len(mask.shape) != 4 or mask.shape[1] not in (1, heads) or mask.dtype != x.dtype
                or 1 in mask.shape[2:]):  # onnxruntime's attention_bias does not broadcast over positions
            return "mask is not a 4-D [batch or 1, heads or 1, sequence, sequence] tensor of the input's type"
    if env.target != "ort":
        return "fused attention for --target onnx needs opset 23 (not implemented yet)"
    return None


def _attention(m, env, outputs):
    x = m["x"]
    hidden = x.shape[2]
    head_size = int(m.value("shapeq")[3])
    scale = float(m.value("scale").reshape(-1)[0])
    if m["scaling"].op == "Div":
        scale = 1.0 / scale
    weight = np.concatenate([values(m["w" + t]) for t in "qkv"], axis=1)
    bias = np.concatenate([values(m["b" + t]) for t in "qkv"])
    name = env.names.new("Attention")
    inputs = [x, gs.Constant(env.names.new(name + "_qkv_weight"), weight),
              gs.Constant(env.names.new(name + "_qkv_bias"), bias)]
    if "mask" in m.tensors:
        inputs += [gs.Variable.empty(), gs.Variable.empty(), m["mask"]]
    return [gs.Node("Attention", name, domain=MS, inputs=inputs, outputs=outputs,
                    attrs={"num_heads": hidden // head_size, "scale": scale})]


RULES = [Rule("attention", p, _attention, _check) for p in _patterns()]
