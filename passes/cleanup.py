"""cleanup: dead code, no-op nodes, Constant nodes, duplicate initializers, common subexpressions.

Works in the main graph and in every If/Loop/Scan body (each body with its own outputs kept);
model-local function bodies only lose their dead nodes (the pipeline removes and counts dead
nodes before every pass). Graph output
names never change: a no-op whose output is a graph output is removed only when its input's
producer can write that output itself.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (
    NONDETERMINISTIC, STANDARD_DOMAINS, all_graphs, bypass, const_value, materialize_constant_nodes,
    onnx_dtype, opset, output_tensors, replace_uses, static_shape, subgraphs, values,
)
from onnxopt.pipeline import Pass


class CleanupPass(Pass):
    name = "cleanup"
    summary = "dead nodes, unused initializers, no-op nodes, Constant nodes, duplicate weights, CSE"
    after = ("fold",)
    tolerance = "fp32"

    @dataclass
    class Options:
        noops: bool = True  # remove Identity, inference Dropout and no-op Cast/Reshape/Transpose/...
        dedup: bool = True  # merge initializers with identical type, shape and bytes
        cse: bool = True  # merge nodes computing the same op on the same inputs

    def run(self, model, ctx):
        graph = model.graph
        counts = Counter()  # dead nodes: the pipeline removes and counts them before every pass
        counts["unused_initializers_removed"] = model.dropped_initializers
        model.dropped_initializers = 0
        counts["constant_nodes_to_initializers"] = materialize_constant_nodes(graph)
        if self.options.noops:
            for g in all_graphs(graph):
                counts.update(remove_noops(g))
        if self.options.dedup:
            counts["duplicate_initializers_merged"] = merge_duplicate_constants(graph)
        if self.options.cse:
            random = random_functions(graph)
            counts["cse_merged"] = sum(eliminate_common_subexpressions(g, random) for g in all_graphs(graph))
        return counts


# ----------------------------------------------------------------------------------- no-ops


def remove_noops(graph: gs.Graph) -> Counter:
    """Bypass nodes that return their first input unchanged."""
    outs = output_tensors(graph)
    local = {id(n) for n in graph.nodes}
    counts = Counter()
    queue = list(graph.nodes)
    for node in queue:  # grows while it is walked
        if not node.outputs or not node.inputs:
            continue
        found = _noop(node, graph)
        if not found:
            continue
        out = node.outputs[0]
        if bypass(graph, node, found[1], outs, local):
            counts[found[0]] += 1
            if id(out) in outs:  # the producer now writes a graph output, whose declared shape
                # may prove consumers visited earlier no-ops too (this graph's: a subgraph's
                # reader of it is judged with that subgraph's outputs, in its own turn)
                queue.extend(n for n in out.outputs if id(n) in local)
    return counts


def _noop(node: gs.Node, graph: gs.Graph) -> tuple[str, gs.Tensor] | None:
    """(count name, the input that passes through unchanged) when the node is a no-op."""
    if node.domain not in STANDARD_DOMAINS:
        return None
    if node.op in _NEUTRAL and len(node.inputs) == 2 and len(node.outputs) == 1:
        kept = _arith_kept_input(node, graph)
        return ("noop_arithmetic_removed", kept) if kept is not None else None
    reason = _noop_reason(node, graph)
    return (reason, node.inputs[0]) if reason else None


def _noop_reason(node: gs.Node, graph: gs.Graph) -> str | None:
    op, x = node.op, node.inputs[0]
    if op == "Identity":
        return "identity_removed"
    if op == "Dropout":
        return "dropout_removed" if _inference_dropout(node, graph) else None
    if len(node.outputs) != 1:
        return None
    if op == "Cast":
        return "noop_cast_removed" if onnx_dtype(x) is not None and onnx_dtype(x) == node.attrs.get("to") else None
    if op == "Transpose":
        rank = len(x.shape) if x.shape is not None else None
        perm = node.attrs.get("perm")
        if perm is None:
            ok = rank is not None and rank <= 1
        else:
            ok = list(perm) == list(range(len(perm)))
        return "noop_transpose_removed" if ok else None
    if op == "Reshape":
        return "noop_reshape_removed" if _reshape_is_noop(node, graph) else None
    if op == "Slice":
        return "noop_slice_removed" if _slice_is_noop(node, graph) else None
    if op == "Pad":
        return "noop_pad_removed" if _pad_is_noop(node, graph) else None
    if op == "Expand":
        return "noop_expand_removed" if _expand_is_noop(node, graph) else None
    if op == "Concat":
        return "noop_concat_removed" if len(node.inputs) == 1 else None
    return None


def _inference_dropout(node: gs.Node, graph: gs.Graph) -> bool:
    if len(node.outputs) > 1 and (node.outputs[1].outputs or id(node.outputs[1]) in output_tensors(graph)):
        return False  # the mask is used
    return not _training_dropout(node, graph)


def _training_dropout(node: gs.Node, graph: gs.Graph) -> bool:
    """Whether a Dropout may run in training mode, where its output is random."""
    if opset(graph) < 7:
        return node.attrs.get("is_test", 0) != 1
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = const_value(node.inputs[2])
        return mode is None or bool(np.asarray(mode).any())
    return False


def _reshape_is_noop(node, graph) -> bool:
    """The target spells the input's own shape: each entry its dimension or 0 (copy, unless
    allowzero), and at most one -1, which then resolves to the input's own dimension at that
    position, symbolic or not (the other entries being the other dimensions)."""
    x = node.inputs[0]
    target = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if x.shape is None or target is None:
        return False
    target = [int(v) for v in np.asarray(target).reshape(-1)]
    if len(target) != len(x.shape) or target.count(-1) > 1:
        return False
    copy = not node.attrs.get("allowzero", 0)
    for v, d in zip(target, x.shape):
        if v == -1:
            continue
        if not ((v == 0 and copy) or (isinstance(d, int) and v == d)):
            return False
        if isinstance(d, int) and d == 0 and -1 in target:
            return False  # -1 next to an empty dimension cannot be resolved
    return True


def _slice_is_noop(node, graph) -> bool:
    x = node.inputs[0]
    shape = static_shape(x)
    if shape is None:
        return False
    if opset(graph) < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes"), None
        if starts is None or ends is None:
            return False
    else:
        args = [const_value(t) if t.name else None for t in node.inputs[1:]] + [None] * 4
        if any(args[i] is None and i < len(node.inputs) - 1 and node.inputs[i + 1].name for i in range(4)):
            return False
        starts, ends, axes, steps = args[:4]
        if starts is None or ends is None:
            return False
    starts = [int(v) for v in np.asarray(starts).reshape(-1)]
    ends = [int(v) for v in np.asarray(ends).reshape(-1)]
    axes = list(range(len(starts))) if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = shape[axis]
        if step != 1:
            return False
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if start > 0 or end < dim:
            return False
    return True


def _pad_is_noop(node, graph) -> bool:
    if opset(graph) < 11:
        pads = node.attrs.get("pads")
    else:
        pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return pads is not None and not np.asarray(pads).any()


def _expand_is_noop(node, graph) -> bool:
    x, target = node.inputs[0], const_value(node.inputs[1])
    shape = static_shape(x)
    if shape is None or target is None:
        return False
    target = [int(v) for v in np.asarray(target).reshape(-1)]
    if len(target) > len(shape):
        return False
    return all(t in (1, d) for t, d in zip(target[::-1], shape[::-1]))


_NEUTRAL = {"Add": (0, True), "Sub": (0, False), "Mul": (1, True), "Div": (1, False)}


def _arith_kept_input(node, graph) -> gs.Tensor | None:
    """x+0, 0+x, x-0, x*1, 1*x, x/1: the x, when the constant cannot broadcast x to a bigger shape
    or change its type."""
    neutral, commutes = _NEUTRAL[node.op]
    candidates = [(node.inputs[0], node.inputs[1])]
    if commutes:
        candidates.append((node.inputs[1], node.inputs[0]))
    for x, other in candidates:
        c = const_value(other)
        if c is None or x.shape is None or onnx_dtype(x) is None:
            continue
        if (onnx_dtype(x) == onnx_dtype(other) and c.ndim <= len(x.shape) and bool(np.all(c == neutral))
                and not np.signbit(c).any()
                and all(d == 1 or d == xd for d, xd in zip(c.shape[::-1], x.shape[::-1]))):
            return x
    return None


# ----------------------------------------------------------------------------------- duplicates


def merge_duplicate_constants(graph: gs.Graph) -> int:
    """Point every use of an initializer at the first one with the same type, shape and bytes."""
    overridable = set()
    consts: dict[int, gs.Constant] = {}
    for g in all_graphs(graph):
        overridable |= {id(t) for t in g.inputs if isinstance(t, gs.Constant)}
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    consts.setdefault(id(t), t)
    groups = defaultdict(list)
    for t in consts.values():
        if id(t) not in overridable and t.shape is not None:
            groups[(str(t.dtype), tuple(t.shape))].append(t)
    merged = 0
    for group in groups.values():
        if len(group) < 2:
            continue
        seen: dict[bytes, list[gs.Constant]] = defaultdict(list)
        for t in group:
            key = _fingerprint(values(t))  # the values are dropped at once: one tensor in memory at a time
            for other in seen[key]:
                if _same_bytes(values(t), values(other)):
                    replace_uses(t, other)
                    merged += 1
                    break
            else:
                seen[key].append(t)
    return merged


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality: -0.0 and 0.0 (x / w differs), or two NaN payloads, stay apart."""
    if a.dtype.kind == "O":  # strings
        return np.array_equal(a, b)
    return np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                          np.ascontiguousarray(b).reshape(-1).view(np.uint8))


def _fingerprint(data: np.ndarray) -> bytes:
    """A cheap key: a hash of at most 4096 evenly spaced elements. Equal tensors share it; the
    rare different tensors that also share it are told apart by a full comparison."""
    flat = data.reshape(-1)
    sample = flat[:: max(1, flat.size // 4096)]
    return hashlib.blake2b(np.ascontiguousarray(sample).tobytes(), digest_size=16).digest()


# ----------------------------------------------------------------------------------- CSE


def eliminate_common_subexpressions(graph: gs.Graph, random_fns: set[tuple] = frozenset(),
                                    only: set[int] | None = None) -> int:
    """Merge nodes with the same op, attributes and input tensors (in topological order, so merges
    cascade). Random nodes (see `_random`), nodes with subgraphs and nodes whose outputs are graph
    outputs stay. only: ids of nodes; a pair is merged only when one of them is among these."""
    outs = output_tensors(graph)
    seen: dict[tuple, gs.Node] = {}
    merged = 0
    for node in graph.nodes:
        if (not node.outputs or _random(node, graph, random_fns) or any(True for _ in subgraphs(node))
                or any(id(t) in outs for t in node.outputs)):
            continue
        key = _node_key(node)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is node or (only is not None and id(node) not in only and id(first) not in only):
            continue
        for mine, theirs in zip(node.outputs, first.outputs):
            replace_uses(mine, theirs)
        merged += 1
    return merged


def random_functions(graph: gs.Graph) -> set[tuple]:
    """(domain, name) of the model-local functions whose body, or a function it calls, is random."""
    found: set[tuple] = set()
    grew = True
    while grew:
        grew = False
        for f in graph.functions:
            if (f.domain, f.name) not in found and any(_random(n, g, found) for g in all_graphs(f) for n in g.nodes):
                found.add((f.domain, f.name))
                grew = True
    return found


def _random(node: gs.Node, graph: gs.Graph, random_fns: set[tuple]) -> bool:
    """Random ops, a Dropout that may run in training mode, calls of random local functions."""
    return (node.op in NONDETERMINISTIC or (node.op == "Dropout" and _training_dropout(node, graph))
            or (node.domain, node.op) in random_fns)


def _node_key(node: gs.Node):
    try:
        attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
    except TypeError:
        return None
    return (node.domain, node.op, tuple(id(t) for t in node.inputs), attrs, len(node.outputs))


def _attr_key(v):
    if isinstance(v, gs.Constant):
        arr = values(v)
        return ("tensor", str(arr.dtype), arr.shape, arr.tobytes())
    if isinstance(v, gs.Node.AttributeRef):
        return ("ref", v.name, str(v.type))
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(x) for x in v)
    if isinstance(v, np.ndarray):
        return ("array", str(v.dtype), v.shape, v.tobytes())
    if isinstance(v, (gs.Graph, gs.Tensor)):
        raise TypeError("unhashable attribute")
    hash(v)
    return v
