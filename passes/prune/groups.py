"""Dependency groups for structured pruning: the units (attention heads, FFN neurons, conv
channels) that can be removed together, and every tensor, weight, attribute and shape constant
that must shrink with them.

A group is found by walking the graph from a layer that produces the units (a MatMul or Gemm
with a constant weight: its output columns; a Conv: its output channels), through everything
that keeps the units on one axis element by element (activations, bias and scale constants,
BatchNormalization, depthwise Conv, pooling, residual Add and Mul: the other operand's producer
joins the group), up to the layers that consume them (a MatMul's weight rows, a Conv's input
channels). Attention heads are matched as a whole: the Q, K and V projections, the Reshape
constants that spell the head count, the score path (only scalars and masks that broadcast
over heads), the merge Reshape and the output projection; or onnxruntime's fused Attention
(its packed QKV weight, bias and num_heads), or the standard Attention of opset 23 (its Q, K
and V projections, past the per-position factor fuse's masked_keys puts on K, q_num_heads and
kv_num_heads). Anything the walk cannot prove safe (a Shape, a Reshape, a Concat, a graph
output, a LayerNormalization over the units...) leaves the whole group alone, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import STANDARD_DOMAINS, all_graphs, is_constant, producer, subgraphs, values

UNARY = {"Relu", "Sigmoid", "Tanh", "Erf", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus",
         "Softsign", "Gelu", "Neg", "Abs", "Exp", "Identity", "Mish", "Celu", "ThresholdedRelu", "Clip", "Dropout",
         "FastGelu", "BiasGelu", "QuickGelu"}  # Clip's min/max and the Gelus' bias are constants (checked)
BINARY = {"Add", "Sum", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}  # Sum: fuse's residual before a LayerNorm
POOLS = {"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool"}


@dataclass
class Cut:
    """A constant input (node, input index) losing the units' positions along `axis`; `offset`:
    where the units start on that axis (the sections of a packed QKV weight)."""

    node: int
    input: int
    axis: int
    offset: int = 0


@dataclass
class Group:
    label: str
    kind: str  # heads | neurons | channels
    units: int  # heads or channels
    width: int  # positions per unit on every cut axis (head size, or 1)
    cuts: list[Cut] = field(default_factory=list)
    consumers: list[int] = field(default_factory=list)  # linear layers reading the units (input rows/channels)
    consumer_reads: list[str] = field(default_factory=list)  # the tensor each consumer reads
    consumer_offsets: list = field(default_factory=list)  # where the units start in it (None: it is the group's)
    attrs: list[tuple[int, str]] = field(default_factory=list)  # (node, attribute) equal to the unit count
    reshapes: list[tuple[int, int, int]] = field(default_factory=list)  # (node, position, scale): units * scale
    tensors: list[str] = field(default_factory=list)  # tensors whose shape shrinks (cleared, then inferred again)
    reads: str = ""  # the tensor the refitted consumer reads (its Gram drives importance and the refit)
    refit: tuple | None = None  # the one consumer that can be refitted: (node, its bias (node, input) or None)
    producers: list[int] = field(default_factory=list)
    attention: list[int] = field(default_factory=list)  # score MatMuls (heads): their work goes with the heads


def _kind_linear(node: gs.Node) -> str | None:
    if node.domain in STANDARD_DOMAINS:
        if node.op == "MatMul" and len(node.inputs) == 2:
            return "matmul"
        if node.op == "Gemm" and not node.attrs.get("transA", 0):
            return "gemm"
        if node.op == "Conv":
            return "conv"
    return None


def _const2(t: gs.Tensor, ndim: int | None = None) -> bool:
    return (is_constant(t) and t.dtype is not None and np.dtype(t.dtype) == np.float32
            and (ndim is None or len(t.shape) == ndim))


def _reshape_spec(node: gs.Node) -> list[int] | None:
    if node.op != "Reshape" or len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return None
    spec = [int(v) for v in np.asarray(values(node.inputs[1])).ravel()]
    if node.attrs.get("allowzero", 0) and 0 in spec:  # a literal 0; without one allowzero changes nothing
        return None  # (the dynamo exporter writes [-1, 65, 3, 64] with allowzero=1)
    return spec


class Finder:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}
        self.outputs = {id(t) for t in graph.outputs}
        self.inputs = {id(t) for t in graph.inputs}
        # a tensor a subgraph (If, Loop, Scan) reads from outside is as fixed as a graph output
        read_inside = {x.name for node in graph.nodes for sub in subgraphs(node) for g in all_graphs(sub)
                       for n in g.nodes for x in n.inputs}
        self.outputs |= {id(t) for name, t in graph.tensors().items() if name in read_inside}

    def single(self, t: gs.Tensor) -> gs.Node | None:
        """The one node reading t (None when several, none, or t is a graph output)."""
        if id(t) in self.outputs or len(t.outputs) != 1:
            return None
        return t.outputs[0]

    def node_index(self, node: gs.Node) -> int:
        return self.index[id(node)]


def find_groups(graph: gs.Graph) -> tuple[list[Group], dict[str, str]]:
    """(the groups that can be pruned, {what was left alone: why})."""
    f = Finder(graph)
    groups, skipped, taken = [], {}, set()
    for node in graph.nodes:
        got = _attention(f, node)
        if got is None:
            continue
        if isinstance(got, str):
            skipped[node.name or node.op] = got
            continue
        groups.append(got)
        taken.update(got.producers)
        taken.update(got.consumers)
    for node in graph.nodes:
        i = f.node_index(node)
        if i in taken or _kind_linear(node) is None or not node.outputs:
            continue
        if node.op == "Conv" and _depthwise(node):
            continue
        got = _walk(f, node, taken)
        if isinstance(got, str):
            skipped.setdefault(node.name or f"{node.op}#{i}", got)
        elif got is not None:
            groups.append(got)
    return groups, skipped


# ---------------------------------------------------------------------------------------------
# Attention heads


def _linear_with_bias(f: Finder, t: gs.Tensor) -> tuple[gs.Node, gs.Node | None, int] | None:
    """t = x @ W (+ b): (the MatMul, the bias Add or None, the bias input index)."""
    node = producer(t)
    add, b_index = None, 0
    if node is not None and node.op == "Add" and node.domain in STANDARD_DOMAINS:
        for j, other in ((0, 1), (1, 0)):
            if is_constant(node.inputs[j]) and len(node.inputs[j].shape) == 1 and node.inputs[other].inputs:
                add, b_index = node, j
                node = producer(node.inputs[other])
                break
        else:
            return None
    if node is None or node.op != "MatMul" or node.domain not in STANDARD_DOMAINS or not _const2(node.inputs[1], 2):
        return None
    if add is not None and (f.single(node.outputs[0]) is not add
                            or node.inputs[1].shape[1] != add.inputs[b_index].shape[0]):
        return None
    return node, add, b_index


def _through(f: Finder, t: gs.Tensor, passed: list) -> gs.Tensor | None:
    """Up from t through single-reader scalar Mul/Div (returns the tensor above them; the tensors
    passed go to `passed`)."""
    while True:
        node = producer(t)
        if node is None or node.op not in ("Mul", "Div") or len(node.inputs) != 2:
            return t
        k = 1 if is_constant(node.inputs[1]) else 0 if (node.op == "Mul" and is_constant(node.inputs[0])) else None
        if k is None or np.asarray(values(node.inputs[k])).size != 1:
            return t
        src = node.inputs[1 - k]
        if f.single(src) is not node:
            return None
        passed.append(t.name)
        t = src


def _split_heads(f: Finder, t: gs.Tensor, perm: tuple) -> tuple[gs.Node, list[str], list[int]] | None:
    """t = Transpose(perm)(Reshape(x @ W + b, [.., .., H or -1, dh])): (Reshape, the tensors from
    the Reshape's output to t, spec)."""
    passed = [t.name]
    tr = producer(t)
    if tr is None or tr.op != "Transpose":
        return None
    p = tuple(tr.attrs.get("perm", ()))
    src = tr.inputs[0]
    if p == (0, 1, 3, 2) and perm == (0, 2, 3, 1):  # K^T spelled as two transposes
        inner = producer(src)
        if inner is None or inner.op != "Transpose" or tuple(inner.attrs.get("perm", ())) != (0, 2, 1, 3):
            return None
        if f.single(src) is not tr:
            return None
        passed.append(src.name)
        tr, p, src = inner, (0, 2, 1, 3), inner.inputs[0]
    if p != perm or f.single(src) is not tr:
        return None
    rs = producer(src)
    spec = _reshape_spec(rs) if rs is not None else None
    if spec is None or len(spec) != 4 or spec[3] <= 0 or f.single(rs.inputs[0]) is not rs:
        return None
    passed.append(src.name)
    return rs, passed, spec


def _attention(f: Finder, node: gs.Node) -> Group | str | None:
    """A head group ending at this output projection (MatMul), or from a fused Attention."""
    if node.domain == "com.microsoft" and node.op == "Attention":
        return _fused_attention(f, node)
    if node.domain in STANDARD_DOMAINS and node.op == "Attention":
        return _standard_attention(f, node)
    if node.op != "MatMul" or node.domain not in STANDARD_DOMAINS or not _const2(node.inputs[1], 2):
        return None
    merge = producer(node.inputs[0])
    spec_m = _reshape_spec(merge) if merge is not None else None
    if spec_m is None or len(spec_m) != 3:
        return None
    tr_o = producer(merge.inputs[0])
    if tr_o is None or tr_o.op != "Transpose" or tuple(tr_o.attrs.get("perm", ())) != (0, 2, 1, 3):
        return None
    pv = producer(tr_o.inputs[0])
    if pv is None or pv.op != "MatMul" or pv.domain not in STANDARD_DOMAINS:
        return None
    label = node.name or "attention"
    v = _split_heads(f, pv.inputs[1], (0, 2, 1, 3))
    if v is None:
        return None  # not an attention block
    if not (f.single(pv.outputs[0]) is tr_o and f.single(tr_o.outputs[0]) is merge
            and f.single(merge.outputs[0]) is node and f.single(pv.inputs[1]) is pv):
        return f"{label}: a head-split tensor is read elsewhere (a graph output, a cache): heads left alone"
    # the score path: Softmax(last axis) over scalars and masks that broadcast over heads
    t = pv.inputs[0]
    sm = producer(t)
    if sm is None or sm.op != "Softmax" or sm.attrs.get("axis", -1) not in (-1, 3) or f.single(t) is not pv:
        return f"{label}: the attention probabilities are not a Softmax over the keys: heads left alone"
    t = sm.inputs[0]
    while True:
        if f.single(t) is None:
            return f"{label}: an attention score is read elsewhere: heads left alone"
        n = producer(t)
        if n is None:
            return None
        if n.op == "MatMul":
            qk = n
            break
        if n.op not in ("Add", "Sub", "Mul", "Div") or len(n.inputs) != 2:
            return f"{label}: {n.op} on the attention scores: heads left alone"
        path = [x for x in n.inputs if x.inputs and x.inputs[0].op in ("MatMul", "Add", "Sub", "Mul", "Div")
                and _reaches_scores(x)]
        if len(path) != 1:
            return f"{label}: the score path could not be followed: heads left alone"
        other = n.inputs[1] if n.inputs[0] is path[0] else n.inputs[0]
        if not _broadcasts_over_heads(other):
            return f"{label}: {n.op} with {other.name} that may vary per head: heads left alone"
        t = path[0]
    if f.single(qk.inputs[0]) is not qk or f.single(qk.inputs[1]) is not qk:
        return f"{label}: a head-split tensor is read elsewhere (a graph output, a cache): heads left alone"
    scaled: list[str] = []
    q_t = _through(f, qk.inputs[0], scaled)
    k_t = _through(f, qk.inputs[1], scaled)
    q = _split_heads(f, q_t, (0, 2, 1, 3)) if q_t is not None else None
    k = _split_heads(f, k_t, (0, 2, 3, 1)) if k_t is not None else None
    if q is None or k is None:
        return f"{label}: Q or K is not split into heads by Reshape and Transpose: heads left alone"
    lins = []
    for rs, _, _ in (q, k, v):
        lin = _projection(f, rs.inputs[0], rs, scaled)
        if lin is None:
            return f"{label}: Q, K or V is not a MatMul with a constant weight read by it alone: heads left alone"
        lins.append(lin)
    dh = v[2][3]
    width = node.inputs[1].shape[0]
    if any(m.inputs[1].shape[1] != width for m, _, _ in lins) or width % dh or q[2][3] != dh or k[2][3] != dh:
        return f"{label}: the projections' widths and the head size do not agree: heads left alone"
    heads = width // dh
    for spec in (q[2], k[2], v[2]):
        if spec[2] not in (-1, heads) or spec[2] == -1 and min(spec[:2]) < 0:
            return f"{label}: a head Reshape spells {spec}: heads left alone"
    if spec_m[2] not in (-1, width):
        return f"{label}: the merge Reshape spells {spec_m}: heads left alone"
    if heads < 2:
        return None
    g = Group(label=label, kind="heads", units=heads, width=dh, reads=node.inputs[0].name)
    idx = f.node_index
    _cut_projections(g, lins, idx)
    for rs, passed, spec in (q, k, v):
        if spec[2] == heads:
            g.reshapes.append((idx(rs), 2, 1))
        g.tensors += passed
    if spec_m[2] == width:
        g.reshapes.append((idx(merge), 2, dh))
    g.tensors += scaled + [pv.outputs[0].name, tr_o.outputs[0].name, merge.outputs[0].name]
    s = qk.outputs[0]
    while True:  # the score tensors carry the head axis too
        g.tensors.append(s.name)
        n = s.outputs[0]
        if n is pv:
            break
        s = n.outputs[0]
    return _read_by(f, g, node, qk)


def _cut_projections(g: Group, lins: list, idx) -> None:
    """The Q, K and V projections (`_linear_with_bias` each) join the head group: their weights'
    columns and biases are cut, their outputs carry the heads."""
    for m, add, b in lins:
        g.cuts.append(Cut(idx(m), 1, 1))
        if add is not None:
            g.cuts.append(Cut(idx(add), b, 0))
            g.tensors.append(add.outputs[0].name)
        g.tensors.append(m.outputs[0].name)
        g.producers.append(idx(m))


def _reaches_scores(t: gs.Tensor) -> bool:
    """Whether t comes from the QK MatMul through elementwise ops (a short bounded walk up)."""
    for _ in range(8):
        n = t.inputs[0] if t.inputs else None
        if n is None:
            return False
        if n.op == "MatMul":
            return not is_constant(n.inputs[1])
        if n.op not in ("Add", "Sub", "Mul", "Div"):
            return False
        ins = [x for x in n.inputs if not is_constant(x)]
        if not ins:
            return False
        t = ins[0]
    return False


def _broadcasts_over_heads(t: gs.Tensor) -> bool:
    """A tensor added to or multiplying [B, H, S, S] scores that is the same for every head."""
    if is_constant(t):
        shape = np.asarray(values(t)).shape
    else:
        shape = t.shape
    if shape is None:
        return False
    shape = list(shape)
    return len(shape) < 3 or shape[-3] == 1


def _fused_attention(f: Finder, node: gs.Node) -> Group | str | None:
    label = node.name or "Attention"
    ins = node.inputs
    if len(ins) < 3 or not _const2(ins[1], 2) or not is_constant(ins[2]):
        return f"{label}: its weights are not constants: heads left alone"
    if len(ins) > 5 and ins[5].name and not _broadcasts_over_heads(ins[5]):
        return f"{label}: its attention bias may vary per head: heads left alone"
    if node.attrs.get("qkv_hidden_sizes") or any(x.name for x in ins[4:5] + ins[6:]) or any(
            len(o.outputs) or o.name in {t.name for t in f.graph.outputs} for o in node.outputs[1:]):
        return f"{label}: unequal Q/K/V sizes or past state: heads left alone"
    heads = int(node.attrs.get("num_heads", 0))
    width = ins[1].shape[1] // 3
    if heads < 2 or ins[1].shape[1] % 3 or width % heads:
        return None
    dh = width // heads
    consumer = _output_projection(f, node)
    if consumer is None:
        return f"{label}: its output is not read by one MatMul with a constant weight: heads left alone"
    idx = f.node_index
    g = Group(label=label, kind="heads", units=heads, width=dh, reads=node.outputs[0].name)
    for sec in range(3):
        g.cuts += [Cut(idx(node), 1, 1, sec * width), Cut(idx(node), 2, 0, sec * width)]
    g.attrs.append((idx(node), "num_heads"))
    g.tensors.append(node.outputs[0].name)
    g.producers.append(idx(node))
    return _read_by(f, g, consumer, node)


def _standard_attention(f: Finder, node: gs.Node) -> Group | str | None:
    """The standard Attention (opset 23) over projected [B, S, hidden] Q, K and V, as fuse writes
    it: the projections' columns and biases, q_num_heads and kv_num_heads, the output projection."""
    label = node.name or "Attention"
    ins = node.inputs
    heads = int(node.attrs.get("q_num_heads", 0))
    if not heads or int(node.attrs.get("kv_num_heads", 0)) != heads:
        return f"{label}: 4-D inputs or grouped key/value heads: heads left alone"
    if any(x.name for x in ins[4:]) or any(o.name and (o.outputs or id(o) in f.outputs) for o in node.outputs[1:]):
        return f"{label}: past state or extra outputs: heads left alone"
    if len(ins) > 3 and ins[3].name and not _broadcasts_over_heads(ins[3]):
        return f"{label}: its mask may vary per head: heads left alone"
    scaled: list[str] = []
    lins = [_projection(f, x, node, scaled) for x in ins[:3]]
    if any(lin is None for lin in lins):
        return f"{label}: Q, K or V is not a MatMul with a constant weight read by it alone: heads left alone"
    width = lins[0][0].inputs[1].shape[1]
    if any(m.inputs[1].shape[1] != width for m, _, _ in lins) or width % heads or heads < 2:
        return None
    consumer = _output_projection(f, node)
    if consumer is None:
        return f"{label}: its output is not read by one MatMul with a constant weight: heads left alone"
    idx = f.node_index
    g = Group(label=label, kind="heads", units=heads, width=width // heads, reads=node.outputs[0].name)
    _cut_projections(g, lins, idx)
    g.attrs += [(idx(node), "q_num_heads"), (idx(node), "kv_num_heads")]
    g.tensors += scaled + [node.outputs[0].name]
    return _read_by(f, g, consumer, node)


def _projection(f: Finder, x: gs.Tensor, reader: gs.Node, scaled: list) -> tuple | None:
    """`_linear_with_bias` of x, which `reader` alone reads, or of the tensor above the [B, L, 1]
    factor fuse's masked_keys multiplies K by (x then joins `scaled`); None if a tensor on the way
    has another reader."""
    above = _row_factor(f, x, reader)
    if above is not x:
        scaled.append(x.name)
        reader = producer(x)
    return _linear_with_bias(f, above) if f.single(above) is reader else None


def _row_factor(f: Finder, t: gs.Tensor, reader: gs.Node) -> gs.Tensor:
    """The tensor above a Mul by a factor per position ([.., L, 1], same for every column) that
    only `reader` reads: the columns, and so the heads, pass through it unchanged. Else t."""
    mul = producer(t)
    if mul is None or mul.op != "Mul" or mul.domain not in STANDARD_DOMAINS or f.single(t) is not reader:
        return t
    x, factor = mul.inputs
    if factor.shape is None or len(factor.shape) != 3 or factor.shape[-1] != 1 or is_constant(x):
        return t
    return x


def _output_projection(f: Finder, node: gs.Node) -> gs.Node | None:
    """The one MatMul with a constant weight that reads a fused attention's output, or None."""
    consumer = f.single(node.outputs[0])
    if consumer is None or consumer.op != "MatMul" or not _const2(consumer.inputs[1], 2) \
            or consumer.inputs[0] is not node.outputs[0]:
        return None
    return consumer


def _read_by(f: Finder, g: Group, consumer: gs.Node, scores: gs.Node) -> Group:
    """A head group completed with its output projection and the node computing the scores."""
    g.cuts.append(Cut(f.node_index(consumer), 1, 0))
    g.consumers.append(f.node_index(consumer))
    g.consumer_reads.append(consumer.inputs[0].name)
    g.consumer_offsets.append(None)
    g.attention.append(f.node_index(scores))
    g.refit = _consumer_bias(f, consumer)
    return g


def _consumer_bias(f: Finder, node: gs.Node) -> tuple[int, int | None]:
    """(the consumer, its bias as (node, input)) for the refit: Gemm's C, Conv's B, or a following Add."""
    i = f.node_index(node)
    if node.op in ("Gemm", "Conv"):
        if len(node.inputs) > 2 and is_constant(node.inputs[2]) and np.asarray(values(node.inputs[2])).ndim == 1:
            return i, (i, 2)
        return i, None
    nxt = f.single(node.outputs[0])
    if nxt is not None and nxt.op == "Add" and nxt.domain in STANDARD_DOMAINS:
        for j in (0, 1):
            c = nxt.inputs[j]
            if is_constant(c) and len(c.shape) == 1 and c.shape[0] == node.inputs[1].shape[1]:
                return i, (f.node_index(nxt), j)
    return i, None


# ---------------------------------------------------------------------------------------------
# Neurons and channels


def _depthwise(node: gs.Node) -> bool:
    w = node.inputs[1]
    return (is_constant(w) and node.attrs.get("group", 1) > 1 and len(w.shape) >= 3
            and w.shape[1] == 1 and w.shape[0] == node.attrs.get("group", 1))


def _walk(f: Finder, start: gs.Node, taken: set) -> Group | str | None:
    """The group of the units `start` produces, or why it cannot be pruned."""
    kind = _kind_linear(start)
    w = start.inputs[1]
    if not _const2(w) or id(w) in f.inputs:
        return None
    if (start.attrs.get("group", 1) != 1 or len(w.shape) < 3) if kind == "conv" else len(w.shape) != 2:
        return None
    units = w.shape[_weight_axis(start, kind, output=True)]
    axis = -(len(w.shape) - 1) if kind == "conv" else -1
    if units < 4:
        return None
    label = start.name or f"{start.op}#{f.node_index(start)}"
    g = Group(label=label, kind="channels" if kind == "conv" else "neurons", units=units, width=1)
    idx = f.node_index
    seen_nodes: set[int] = set()
    seen_tensors: set[int] = set()
    work: list[gs.Tensor] = []

    def join(t: gs.Tensor) -> str | None:
        if id(t) in seen_tensors:
            return None
        if id(t) in f.outputs:
            return f"{label}: {t.name} is a graph output or read inside a subgraph"
        if id(t) in f.inputs or is_constant(t):
            return f"{label}: {t.name} is a graph input"
        if t.shape is not None and len(t.shape) >= -axis and isinstance(t.shape[axis], int) \
                and t.shape[axis] != units:
            return f"{label}: {t.name} has {t.shape[axis]} channels where {units} were expected"
        seen_tensors.add(id(t))
        work.append(t)
        g.tensors.append(t.name)
        return None

    def const_cut(node: gs.Node, j: int) -> str | None:
        shape = np.asarray(values(node.inputs[j])).shape
        if len(shape) < -axis or shape[axis] == 1:
            return None
        if shape[axis] != units:
            return f"{label}: {node.op} {node.name} broadcasts a constant of shape {list(shape)}"
        g.cuts.append(Cut(idx(node), j, axis + len(shape)))
        return None

    def linear(node: gs.Node, k: str, output: bool, offset: int = 0) -> str | None:
        """Cut a producer's output units (and its bias) or a consumer's input units (from `offset`)."""
        if (k == "conv") != (kind == "conv"):
            return f"{label}: {node.op} {node.name} holds the units on another axis"
        wt, i = node.inputs[1], idx(node)
        if not _const2(wt) or (k != "conv" and len(wt.shape) != 2):
            return f"{label}: {node.op} {node.name} has no constant weight"
        if k == "conv" and node.attrs.get("group", 1) != 1:
            return f"{label}: grouped Conv {node.name}"
        g.cuts.append(Cut(i, 1, _weight_axis(node, k, output), offset))
        if output and k != "matmul" and len(node.inputs) > 2 and node.inputs[2].name:
            if not is_constant(node.inputs[2]):
                return f"{label}: {node.op} {node.name} has a computed bias"
            if k == "conv":
                g.cuts.append(Cut(i, 2, 0))
            elif err := const_cut(node, 2):
                return err
        return None

    def produce(node: gs.Node) -> str | None:
        """A node whose output is in the group: a producer, or a channel-wise op (its inputs join)."""
        if id(node) in seen_nodes:
            return None
        seen_nodes.add(id(node))
        i = idx(node)
        k = _kind_linear(node)
        if k is not None and not (k == "conv" and _depthwise(node)):
            if i in taken:
                return f"{label}: {node.name} already belongs to another group"
            g.producers.append(i)
            taken.add(i)
            return linear(node, k, output=True)
        return channelwise(node)

    def channelwise(node: gs.Node) -> str | None:
        """An op that keeps the units on their axis: constants sliced, other inputs join."""
        seen_nodes.add(id(node))
        op = node.op if node.domain in STANDARD_DOMAINS or node.domain == "com.microsoft" else None
        i = idx(node)
        if op in UNARY:
            for j, x in enumerate(node.inputs[1:], 1):
                if x.name and not is_constant(x):
                    return f"{label}: {op} {node.name} has a computed parameter"
                if x.name and op in ("BiasGelu", "FastGelu"):
                    if err := const_cut(node, j):
                        return err
            data = [node.inputs[0]]
        elif op in BINARY:
            data = []
            for j, x in enumerate(node.inputs):
                if is_constant(x):
                    if err := const_cut(node, j):
                        return err
                elif x.shape is not None and (len(x.shape) < -axis or x.shape[axis] == 1):
                    continue  # the same for every unit
                else:
                    data.append(x)
            if op == "PRelu" and node.inputs[0] not in data:
                return f"{label}: PRelu {node.name}"
        elif op == "BatchNormalization" and (kind == "conv" or node.inputs[0].shape is not None
                                              and len(node.inputs[0].shape) + axis == 1):
            if not all(is_constant(x) for x in node.inputs[1:5]) or len(node.outputs) > 1 and any(
                    o.name for o in node.outputs[1:]):
                return f"{label}: BatchNormalization {node.name} in training mode"
            g.cuts += [Cut(i, j, 0) for j in range(1, 5)]
            data = [node.inputs[0]]
        elif op == "Conv" and _depthwise(node) and kind == "conv":
            g.cuts.append(Cut(i, 1, 0))
            if len(node.inputs) > 2 and node.inputs[2].name:
                if not is_constant(node.inputs[2]):
                    return f"{label}: depthwise Conv {node.name} has a computed bias"
                g.cuts.append(Cut(i, 2, 0))
            g.attrs.append((i, "group"))
            data = [node.inputs[0]]
        elif op in POOLS and kind == "conv":
            data = [node.inputs[0]]
        else:
            return f"{label}: read by {node.op} {node.name}"
        for x in data:
            if err := join(x):
                return err
        for o in node.outputs[:1]:
            if err := join(o):
                return err
        for o in node.outputs[1:]:
            if o.name and (o.outputs or id(o) in f.outputs):
                return f"{label}: {node.op} {node.name} has a second output in use"
        return None

    def consume(node: gs.Node, t: gs.Tensor) -> str | None:
        k = _kind_linear(node)
        i = idx(node)
        if k is not None and not (k == "conv" and _depthwise(node)) and node.inputs[0] is t:
            if err := linear(node, k, output=False):
                return err
            if i not in g.consumers:
                g.consumers.append(i)
                g.consumer_reads.append(t.name)
                g.consumer_offsets.append(None)
            return None
        if node.op == "Concat" and node.domain in STANDARD_DOMAINS:
            return concat(node, t)
        if id(node) in seen_nodes:
            return None
        return channelwise(node)

    def concat(node: gs.Node, t: gs.Tensor) -> str | None:
        """A Concat along the units' axis read only by linear layers: they lose the units' input
        positions, shifted by the channels before t (no refit: they read other channels too)."""
        out = node.outputs[0]
        rank = len(t.shape) if t.shape is not None else (-axis + 1 if kind == "conv" else None)
        cat = node.attrs.get("axis", 0)
        if rank is None or (cat if cat < 0 else cat - rank) != axis or sum(x is t for x in node.inputs) != 1:
            return f"{label}: read by Concat {node.name} on another axis"
        offset = 0
        for x in node.inputs:
            if x is t:
                break
            if x.shape is None or len(x.shape) != rank or not isinstance(x.shape[axis], int):
                return f"{label}: Concat {node.name} joins an input of unknown channels"
            offset += x.shape[axis]
        if id(out) in f.outputs or not out.outputs:
            return f"{label}: Concat {node.name} is a graph output"
        for reader in out.outputs:
            k = _kind_linear(reader)
            if k is None or (k == "conv" and _depthwise(reader)) or reader.inputs[0] is not out:
                return f"{label}: read by Concat {node.name}, then by {reader.op} {reader.name}"
            if err := linear(reader, k, output=False, offset=offset):
                return err
            g.consumers.append(idx(reader))
            g.consumer_reads.append(out.name)
            g.consumer_offsets.append(offset)
        g.tensors.append(out.name)
        return None

    if err := produce(start):
        return err
    if err := join(start.outputs[0]):
        return err
    while work:
        t = work.pop()
        p = producer(t)
        if p is not None and id(p) not in seen_nodes:
            if err := produce(p):
                return err
        for n in list(t.outputs):
            if err := consume(n, t):
                return err
    if not g.consumers:
        return f"{label}: no layer reads its units"
    taken.update(g.producers)
    # the refit: of the consumers reading the units alone, the largest MatMul, Gemm or 1x1 Conv
    # (an SE block's squeeze or a second reader of a residual stream keeps its weights)
    fits = [(int(np.prod(f.graph.nodes[i].inputs[1].shape)), i, read)
            for i, read, offset in zip(g.consumers, g.consumer_reads, g.consumer_offsets)
            if offset is None and (_kind_linear(f.graph.nodes[i]) in ("matmul", "gemm")
                                   or _pointwise_conv(f.graph.nodes[i]))]
    if fits:
        _, i, g.reads = max(fits)
        g.refit = _consumer_bias(f, f.graph.nodes[i])
    return g


def _weight_axis(node: gs.Node, k: str, output: bool) -> int:
    """The weight's axis of a linear layer's output units (or input units)."""
    if k == "conv":
        return 0 if output else 1
    out = 0 if k == "gemm" and node.attrs.get("transB", 0) else 1
    return out if output else 1 - out


def _pointwise_conv(node: gs.Node) -> bool:
    w = node.inputs[1]
    return (node.op == "Conv" and node.attrs.get("group", 1) == 1 and all(d == 1 for d in w.shape[2:])
            and not any(node.attrs.get("pads", [0]))
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
