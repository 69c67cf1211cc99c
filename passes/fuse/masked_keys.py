"""masked_keys (after the rules; both targets): an attention whose additive mask hides some keys
from every query gets those keys' rows of K zeroed and their mask entries set to FLOOR, so each
hidden key's logit is exactly FLOOR instead of the original -3.4e38 (or -10000). The forms:
- a standard Attention (opset 23), or onnxruntime's MultiHeadAttention (the quant pass applies
  it to those it writes): K is its input;
- the unfused score path, Softmax(MatMul(Q, K^T) (times or over scalars) + mask), as the default
  target keeps it below opset 23: K is the [B, L, hidden] tensor before the Reshape that splits
  it into heads (then Transpose (0, 2, 3, 1)); the new mask goes into the Add. Every tensor from
  that Reshape to the Softmax must be read by the next node alone (no present-key output).

Why: onnxruntime's softmax takes a slow path for exp of a large negative number (the result
underflows through denormals): in 1.32 on CPU, a padding mask of float32's lowest value makes
the Attention kernel 1.8x slower than the same mask at 0 (12 heads, 128 tokens, the last quarter
padding: 619 us against 337 us, bench/masked_keys.md), and logits 87-104 below the row's largest
cost several times more still. A logit of FLOOR stays in the fast range for any row whose
largest logit is under 47.

Exactness: a hidden key's weight was exactly 0 (exp underflows); now it is exp(FLOOR - m), m the
row's largest visible logit, which float32 rounds away beside the visible keys' sum (at least 1)
while m > FLOOR + 24 = -16. The keys still seen by some query keep the original mask entries, so
a causal mask is unchanged (every key but the last is seen); a sample none of whose keys is seen
(a mask all padding) is left as it was.

Hidden: every entry of the key's column of the mask is at most HIDDEN (-10000: exp of it
underflows to 0 against any logit within 9900 of the row's largest). The mask must broadcast
over the heads ([B or 1, 1, S, L], or [S, L]) and K must be a 3-D [B, L, hidden] tensor; the
Attention must have no past state, softcap or is_causal, the MultiHeadAttention no bias input
(it would add to the zeroed rows), key_padding_mask or past state; nothing but scalar factors
may stand between the scores and the mask's Add (a position bias added first would shift the
floor).

Rewritten so, the kernel takes 327-335 us. MiniLM at 128 tokens, the last quarter padding,
`--passes fold,cleanup,fuse` against the float model, without and with it (bench/masked_keys.md):
the unfused score path at the model's opset, legacy 0.985x to 0.938x, dynamo 0.873x to 0.840x;
`--max-opset 23`, legacy 0.965x to 0.911x, dynamo 0.848x to 0.809x; the outputs as close to the
float model's as without it. Structured + dynamic INT8 at --min-cosine 0.96 (bench/structured.md;
the same units removed): the default target, legacy 0.378x to 0.333x, dynamo 0.341x to 0.300x;
`--max-opset 23` 0.303x and 0.278x; `--target ort` (quant's MultiHeadAttention) 0.340x and
0.299x, from 0.373x and 0.334x.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import STANDARD_DOMAINS, is_constant, producer, values

from .attention import keeps_leading

HIDDEN = -10000.0  # a mask entry at or below this hides the key from that query
FLOOR = -40.0  # the logit of a hidden key after the rewrite


def hide_masked_keys(env, nodes: list | None = None) -> int:
    """The rewrite (see the module doc) on every attention of env.graph it applies to (or on
    `nodes` only: attention nodes, or the Softmax of an unfused one); how many. env: fuse's Env
    (its constants are reused, so a second run finds nothing to merge). New nodes go right before
    the node that reads K."""
    graph, names = env.graph, env.names
    fixed = {id(t) for t in graph.outputs}
    made: dict[str, tuple[gs.Tensor, gs.Tensor]] = {}  # mask name -> (new mask, K's row factor)
    ahead: dict[int, list[gs.Node]] = {}  # id(node) -> the nodes to put before it
    count, unfused = 0, False
    for node in list(graph.nodes) if nodes is None else nodes:
        site = _site(node, fixed)
        if site is None:
            continue
        (mask_reader, at), (k_reader, k_at) = site
        mask, k = mask_reader.inputs[at], k_reader.inputs[k_at]
        new = ahead.setdefault(id(k_reader), [])
        if mask.name not in made:
            made[mask.name], mask_nodes = _hidden_keys(env, mask)
            new += mask_nodes
        new_mask, keep = made[mask.name]
        kept = gs.Variable(names.new(f"{k.name}_seen"), np.float32, k.shape)
        new.append(gs.Node("Mul", names.new(f"{node.name or node.op}_hide_keys"), inputs=[k, keep], outputs=[kept]))
        k_reader.inputs[k_at], mask_reader.inputs[at] = kept, new_mask
        count += 1
        unfused |= k_reader is not node
    if ahead:
        graph.nodes = [n for node in graph.nodes for n in ahead.get(id(node), []) + [node]]
    if unfused:  # K's head Reshape now reads the factor, and the mask may be computed after it
        graph.toposort()
    return count


def _site(node: gs.Node, fixed: set) -> tuple[tuple[gs.Node, int], tuple[gs.Node, int]] | None:
    """Where the rewrite applies: ((the node reading the mask, its input index), (the node
    reading K, its input index)), else None. The attention ops read both; in the unfused form the
    Softmax's Add reads the mask and K's head Reshape reads K."""
    if node.op == "Softmax":
        site = _unfused(node, fixed)
    else:
        at = _mask_input(node)
        site = None if at is None else ((node, at), (node, 1))
    if site is None:
        return None
    (mask_reader, at), (k_reader, k_at) = site
    return site if _eligible(mask_reader.inputs[at], k_reader.inputs[k_at]) else None


def _mask_input(node: gs.Node) -> int | None:
    """The input index of the attention op's additive mask where the rewrite may apply, else
    None: the standard Attention's attn_mask, or onnxruntime's MultiHeadAttention's
    attention_bias (no bias, key_padding_mask or past state: K is the keys as the kernel uses
    them)."""
    ins = node.inputs
    if node.op == "Attention" and node.domain in STANDARD_DOMAINS and len(ins) > 3:
        at, rest = 3, ins[4:]
        if node.attrs.get("softcap", 0.0) or node.attrs.get("is_causal", 0):
            return None
    elif node.op == "MultiHeadAttention" and node.domain == "com.microsoft" and len(ins) > 5:
        at, rest = 5, ins[3:5] + ins[6:]
    else:
        return None
    if not ins[at].name or any(x.name for x in rest) or any(o.name and o.outputs for o in node.outputs[1:]):
        return None
    return at


def _unfused(softmax: gs.Node, fixed: set) -> tuple[tuple[gs.Node, int], tuple[gs.Node, int]] | None:
    """Softmax(last axis)(Add(scores, mask)), scores = MatMul(Q, K^T) times or over scalar
    constants, K^T = Transpose(0, 2, 3, 1) (times or over scalar constants) of Reshape(K,
    [B, L, H, D]) splitting K's last axis: ((the Add, the mask's input index), (the Reshape, 0)),
    else None. Every tensor from the Reshape's output to the Softmax's input is read by the next
    node alone, so only this softmax sees the change."""
    def only(t, reader):
        return id(t) not in fixed and len(t.outputs) == 1 and t.outputs[0] is reader

    if softmax.domain not in STANDARD_DOMAINS or softmax.attrs.get("axis", -1) not in (-1, 3):
        return None
    x = softmax.inputs[0]
    add = producer(x)
    if add is None or add.op != "Add" or add.domain not in STANDARD_DOMAINS or not only(x, softmax):
        return None
    for at in (1, 0):
        qk = _above_scalars(add.inputs[1 - at], add, only)
        if qk is not None and qk.op == "MatMul" and qk.domain in STANDARD_DOMAINS:
            break
    else:
        return None
    if x.shape is None or len(x.shape) != 4:
        return None
    node = _above_scalars(qk.inputs[1], qk, only)
    if node is None or node.op != "Transpose" or tuple(node.attrs.get("perm", ())) != (0, 2, 3, 1):
        return None  # (fuse's transpose_chain has made one Transpose of two)
    reshape = producer(node.inputs[0])
    if not only(node.inputs[0], node) or reshape is None or not _splits_heads(reshape):
        return None
    return (add, at), (reshape, 0)


def _above_scalars(t: gs.Tensor, reader: gs.Node, only) -> gs.Node | None:
    """The node above t and any Mul or Div by a scalar constant, each tensor read by the next
    node alone (else None)."""
    while only(t, reader):
        node = producer(t)
        if node is None or node.op not in ("Mul", "Div") or _scalar_operand(node) is None:
            return node
        t, reader = node.inputs[1 - _scalar_operand(node)], node
    return None


def _scalar_operand(node: gs.Node) -> int | None:
    """The index of a Mul's or a Div's scalar constant operand (a Div's divisor only), else None."""
    if node.domain not in STANDARD_DOMAINS or len(node.inputs) != 2:
        return None
    for j in (1, 0) if node.op == "Mul" else (1,):
        c = node.inputs[j]
        if is_constant(c) and np.asarray(values(c)).size == 1 and np.isfinite(values(c)).all():
            return j
    return None


def _splits_heads(node: gs.Node) -> bool:
    """A Reshape of a 3-D [B, L, hidden] tensor to [B, L, H, D] (axes 0 and 1 kept), as fuse's
    attention rules check it."""
    if node.op != "Reshape" or node.domain not in STANDARD_DOMAINS or not is_constant(node.inputs[1]):
        return False
    shape = node.inputs[0].shape
    spec = [int(v) for v in np.asarray(values(node.inputs[1])).ravel()]
    if shape is None or len(shape) != 3 or len(spec) != 4 or not isinstance(shape[2], int) or spec[3] <= 0:
        return False
    if spec[2] == -1:
        heads_known = -1 not in spec[:2] and shape[2] % spec[3] == 0
    else:
        heads_known = spec[2] > 0 and spec[2] * spec[3] == shape[2]
    return heads_known and keeps_leading(spec, shape, node)


def _eligible(mask: gs.Tensor, k: gs.Tensor) -> bool:
    """A float32 additive mask that broadcasts over the heads ([B or 1, 1, S, L], or [S, L]) and
    hides some key from every query, beside a 3-D K not already rewritten."""
    if mask.dtype is None or np.dtype(mask.dtype) != np.float32 or mask.shape is None:
        return False
    if k.shape is None or len(k.shape) != 3:
        return False
    shape = list(mask.shape)
    if len(shape) not in (2, 4) or (len(shape) == 4 and shape[1] != 1) or shape[-1] == 1:
        return False
    if is_constant(mask):
        return bool(np.any(np.max(np.asarray(values(mask)), axis=-2) <= HIDDEN))
    return not _done(mask, k)


def _done(mask: gs.Tensor, k: gs.Tensor) -> bool:
    """Whether the rewrite already made this mask and K (a second fuse run leaves them)."""
    where, mul = producer(mask), producer(k)
    if where is None or mul is None or where.op != "Where" or mul.op != "Mul" or len(where.inputs) != 3:
        return False
    floor = where.inputs[2]
    return is_constant(floor) and np.asarray(values(floor)).size == 1 and float(values(floor)) == FLOOR


def _hidden_keys(env, mask: gs.Tensor) -> tuple[tuple[gs.Tensor, gs.Tensor], list[gs.Node]]:
    """((the mask with hidden keys' entries at FLOOR, [B or 1, L, 1] with 0 at hidden keys, else
    1), the nodes computing them)."""
    names, opset = env.names, env.opset
    base = mask.name
    rank = len(mask.shape)

    def var(suffix, dtype=np.float32, shape=None):
        return gs.Variable(names.new(f"{base}_{suffix}"), dtype, shape)

    def const(suffix, value):
        return env.constant(f"{base}_{suffix}", value)

    def reduce_max(x, axis, out):  # keeping the axis; its axes an input from opset 18, an attribute before
        name = names.new(f"{out.name}_max")
        if opset >= 18:
            return gs.Node("ReduceMax", name, {"keepdims": 1}, [x, const("axes", np.array([axis], np.int64))], [out])
        return gs.Node("ReduceMax", name, {"axes": [axis], "keepdims": 1}, [x], [out])

    top = var("top", shape=list(mask.shape[:-2]) + [1, mask.shape[-1]])  # each key's highest entry
    best = var("best", shape=list(top.shape[:-1]) + [1])  # the highest entry of the sample's mask
    seen_now, none_seen, seen = var("seen_now", bool, top.shape), var("none_seen", bool, best.shape), \
        var("seen", bool, top.shape)
    factor = var("seen_f", np.float32, top.shape)
    keep = var("key_rows", np.float32, [mask.shape[0] if rank == 4 else 1, mask.shape[-1], 1])
    new_mask = var("keys_hidden", np.float32, mask.shape)
    hidden = const("hidden", np.float32(HIDDEN))
    nodes = [
        reduce_max(mask, -2, top),
        gs.Node("Greater", names.new(f"{base}_seen_now"), inputs=[top, hidden], outputs=[seen_now]),
        reduce_max(top, -1, best),
        gs.Node("LessOrEqual", names.new(f"{base}_none_seen"), inputs=[best, hidden], outputs=[none_seen]),
        gs.Node("Or", names.new(f"{base}_seen"), inputs=[seen_now, none_seen], outputs=[seen]),
        gs.Node("Cast", names.new(f"{base}_seen_f"), {"to": 1}, [seen], [factor]),
        gs.Node("Reshape", names.new(f"{base}_key_rows"), outputs=[keep],
                inputs=[factor, const("rows", np.array([0 if rank == 4 else 1, -1, 1], np.int64))]),
        gs.Node("Where", names.new(f"{base}_keys_hidden"), inputs=[seen, mask, const("floor", np.float32(FLOOR))],
                outputs=[new_mask]),
    ]
    return (new_mask, keep), nodes

