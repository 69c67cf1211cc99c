"""Structured pruning: removing whole heads, neurons and channels, with the consuming layer
refitted to the teacher.

For each group (groups.py) the calibration inputs of the layer that consumes its units give
G = [X 1]^T [X 1] (the bias as one more input that is never removed). Units leave in the order
optimal brain surgery gives: the unit whose removal, with the consumer's remaining weights and
bias refitted by least squares to the original outputs, adds the least error tr(W_R^T
[(G^-1)_RR]^-1 W_R); G^-1 and the weights are updated after each removal, so the recorded errors
are those of the refitted layer and add up exactly. The refit written to the model is the same
least-squares solution, W_K + G_KK^-1 G_KR W_R. Groups read by several layers (or by a kxk
convolution) rank their units by |W| times the input's activation norm (Wanda's score) and are
not refitted.

The error curve of each group (relative to its consumer's output energy) is scaled to the loss
measured end to end with that group alone pruned half way, so groups compare by their effect on
the model's outputs. The steps (a chunk of one group's units) are then taken greedily by the
least estimated loss per multiply-add removed; the plan is a prefix of that order: the one
reaching `--sparsity` (of the prunable layers' weights), or the longest whose measured result
keeps the budget.

Those refits see the original model's activations only, but a consumer's inputs change once the
groups before it are cut. With calibration data the plan's consumers are then refitted stage by
stage to the original model's outputs on the inputs they now get (`refit_to_teacher`, the
teacher.py form); kept where it measures better, and inside a budget a few more bisection steps
look for a longer prefix with it.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import STANDARD_DOMAINS, Names, is_constant, refresh_shapes, values

from ..quant.budget import Measure, copy_model, score_name
from ..quant.calib import Forward, Gram, channel_rows, observe
from .groups import Group, find_groups
from .teacher import residual, stages

FLUSH_ROWS = 8192  # calibration rows gathered before they are added to a Gram
DAMP = 0.01  # of G's mean diagonal, added to it before inversion (as GPTQ and SparseGPT)
KEEP_HEADS = 1  # heads a group keeps at least
MAX_FRACTION = 0.875  # of neurons or channels a group may lose


@dataclass
class Stats:
    gram: np.ndarray | None = None  # [K(+1), K(+1)] of the refitted consumer's input (with the ones column)
    energy: dict = field(default_factory=dict)  # consumer index -> per-channel sum of squares of its input
    rows: int = 0  # positions (tokens or pixels) seen by the consumer
    positions: dict = field(default_factory=dict)  # tensor name -> mean positions per sample
    scores: float = 0.0  # mean multiply-adds of one head's attention per sample (heads)


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    """[positions, channels] of an activation with its channels on `axis`."""
    if axis not in (-1, x.ndim - 1):
        x = np.moveaxis(x, axis, -1)
    return x.reshape(-1, x.shape[-1])


def channel_axis(g: Group) -> int:
    return 1 if g.kind == "channels" else -1


def collect(model, groups: list[Group], samples: list[dict]) -> list[Stats]:
    """The float model's statistics for every group, from one pass over the samples."""
    graph = model.graph
    stats = [Stats() for _ in groups]
    wanted: dict[str, list] = {}
    for gi, g in enumerate(groups):
        for ci, name in zip(g.consumers, g.consumer_reads):
            wanted.setdefault(name, []).append((gi, "energy", ci))
        if g.refit is not None:
            wanted.setdefault(g.reads, []).append((gi, "gram", g.refit[0]))
        for i in g.producers + g.consumers + [n for n, _ in g.attrs]:
            wanted.setdefault(graph.nodes[i].outputs[0].name, []).append((gi, "positions", i))
        for i in g.attention:
            wanted.setdefault(graph.nodes[i].outputs[0].name, []).append((gi, "scores", i))
    counts = [0]

    def add(outs):
        counts[0] += 1
        for name, x in outs.items():
            for gi, what, node in wanted[name]:
                g, st = groups[gi], stats[gi]
                axis = channel_axis(g)
                if what == "positions":
                    st.positions[name] = st.positions.get(name, 0) + x.size / max(1, x.shape[axis])
                elif what == "scores":
                    if g.kind == "heads" and graph.nodes[node].op == "MatMul":  # [B, H, S, S]
                        st.scores += 2 * x.size / max(1, x.shape[1]) * g.width
                    else:  # fused: from the [B, S, D] output
                        st.scores += 2 * x.shape[0] * x.shape[1] ** 2 * g.width
                elif what == "energy":
                    r = _rows(x, axis).astype(np.float64)
                    st.energy[node] = st.energy.get(node, 0) + np.einsum("ij,ij->j", r, r)
                else:
                    r = channel_rows(_rows(x, axis), 1 << 16)
                    if g.refit[1] is not None:
                        r = np.hstack([r, np.ones((len(r), 1), r.dtype)])
                    grams.setdefault(gi, Gram(FLUSH_ROWS)).add(r)
                    st.rows += len(r)

    grams: dict[int, Gram] = {}
    observe(model, sorted(wanted), samples, add)
    for gi, gram in grams.items():
        stats[gi].gram = gram.total()[0]
    n = max(1, counts[0])
    for st in stats:
        st.positions = {k: v / n for k, v in st.positions.items()}
        st.scores /= n
    return stats


def consumer_matrix(graph: gs.Graph, node_index: int) -> np.ndarray:
    """The consumer's weight as [inputs, outputs] (float64), for a MatMul, Gemm or 1x1 Conv."""
    node = graph.nodes[node_index]
    w = np.asarray(values(node.inputs[1]), np.float64)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w.T
    if node.op == "Conv":
        return w.reshape(w.shape[0], w.shape[1]).T
    return w


def _bias(graph: gs.Graph, g: Group, n_out: int) -> np.ndarray | None:
    if g.refit is None or g.refit[1] is None:
        return None
    node, j = g.refit[1]
    return np.asarray(values(graph.nodes[node].inputs[j]), np.float64).reshape(n_out)


def _augmented(graph: gs.Graph, g: Group) -> np.ndarray:
    """The refitted consumer's [inputs (+ bias row), outputs] weight."""
    w = consumer_matrix(graph, g.refit[0])
    b = _bias(graph, g, w.shape[1])
    return w if b is None else np.vstack([w, b[None]])


def _damped(gram: np.ndarray) -> np.ndarray:
    """G with inputs that never varied given a unit diagonal, plus DAMP of its mean diagonal."""
    h = gram.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    return h + DAMP * np.mean(np.diag(h)) * np.eye(len(h))


@dataclass
class Curve:
    """A group's removal order and the error after removing each count of units (a chunk apart)."""

    order: list[int]
    chunk: int
    loss: np.ndarray  # [levels]: relative error with 0, chunk, 2 chunk ... units removed


def chunk_size(g: Group) -> int:
    if g.kind == "heads":
        return 1
    if g.units >= 256:
        return max(8, g.units // 32 // 8 * 8)
    return max(1, g.units // 16)


def max_removed(g: Group) -> int:
    if g.kind == "heads":
        return g.units - KEEP_HEADS
    c = chunk_size(g)
    return int(g.units * MAX_FRACTION) // c * c


def curve(graph: gs.Graph, g: Group, st: Stats) -> Curve:
    c, most = chunk_size(g), max_removed(g)
    if g.refit is not None and st.gram is not None:
        return _obs_curve(graph, g, st, c, most)
    # Wanda: |W| times the input's activation norm, summed over the consumers
    score = np.zeros(g.units)
    total = 0.0
    for ci, offset in zip(g.consumers, g.consumer_offsets):
        node = graph.nodes[ci]
        w = np.asarray(values(node.inputs[1]), np.float64)
        if node.op == "Conv":
            per_in = np.sum(w * w, axis=tuple(a for a in range(w.ndim) if a != 1))
        elif node.op == "Gemm" and node.attrs.get("transB", 0):
            per_in = np.einsum("oi,oi->i", w, w)
        else:
            per_in = np.einsum("io,io->i", w, w)
        e = st.energy.get(ci)
        if e is None or len(e) != len(per_in):
            e = np.ones_like(per_in)
        if offset is not None:  # through a Concat: the group's channels from `offset`
            per_in, e = per_in[offset:offset + g.units * g.width], e[offset:offset + g.units * g.width]
        contrib = (per_in * e).reshape(g.units, g.width).sum(axis=1)
        score += contrib
        total += contrib.sum()
    order = [int(u) for u in np.argsort(score, kind="stable")][:most]
    cum = np.concatenate([[0.0], np.cumsum(score[order])]) / (total or 1.0)
    return Curve(order, c, cum[::c][: most // c + 1])


def _obs_curve(graph: gs.Graph, g: Group, st: Stats, c: int, most: int) -> Curve:
    w = _augmented(graph, g).copy()
    base = float(np.einsum("kn,kj,jn->", w, st.gram, w)) or 1.0
    hinv = np.linalg.inv(_damped(st.gram))
    width = g.width
    active = np.ones(g.units, bool)
    order: list[int] = []
    cum = [0.0]
    err = 0.0
    step = 1 if width > 1 else max(1, c // 2)
    while len(order) < most:
        if width == 1:
            d = np.diag(hinv)[: g.units]
            s = np.einsum("kn,kn->k", w[: g.units], w[: g.units]) / np.maximum(d, 1e-300)
        else:
            s = np.full(g.units, np.inf)
            for u in np.flatnonzero(active):
                b = slice(u * width, (u + 1) * width)
                s[u] = np.trace(w[b].T @ np.linalg.solve(hinv[b, b], w[b]))
        s[~active] = np.inf
        take = [int(u) for u in np.argsort(s, kind="stable")[: min(step, most - len(order))]]
        rows = np.concatenate([np.arange(u * width, (u + 1) * width) for u in take])
        inv_rr = np.linalg.inv(hinv[np.ix_(rows, rows)])
        wr = w[rows]
        err += float(np.trace(wr.T @ inv_rr @ wr))
        e = hinv[:, rows] @ inv_rr
        w -= e @ wr
        hinv -= e @ hinv[rows, :]
        active[take] = False
        order += take
        while len(cum) * c <= len(order):
            cum.append(err / base)  # exact at multiples of the chunk: step divides it
    return Curve(order, c, np.array(cum[: most // c + 1]))


def refit(graph: gs.Graph, g: Group, st: Stats, removed: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """The consumer's weight [inputs, outputs] and bias after the least-squares refit with the
    units `removed` gone (the removed rows keep their values: they are cut afterwards)."""
    w = _augmented(graph, g)
    rows = np.concatenate([np.arange(u * g.width, (u + 1) * g.width) for u in removed])
    keep = np.setdiff1d(np.arange(len(w)), rows)
    h = _damped(st.gram)
    w = w.copy()
    w[keep] += np.linalg.solve(h[np.ix_(keep, keep)], st.gram[np.ix_(keep, rows)] @ w[rows])
    if g.refit[1] is None:
        return w, None
    return w[:-1], w[-1]


def unit_params(graph: gs.Graph, g: Group) -> int:
    """Weights (and bias values) removed with one unit."""
    total = 0
    for cut in g.cuts:
        shape = graph.nodes[cut.node].inputs[cut.input].shape
        total += int(np.prod(shape)) // shape[cut.axis] * g.width
    return total


def unit_macs(graph: gs.Graph, g: Group, st: Stats) -> float:
    """Multiply-adds per sample one unit costs: its producers, consumers, depthwise steps and attention."""
    macs = st.scores
    for i in dict.fromkeys(g.producers + g.consumers + [n for n, _ in g.attrs]):
        node = graph.nodes[i]
        w = node.inputs[1].shape
        pos = st.positions.get(node.outputs[0].name, 0.0)
        if i in g.producers:
            sections = 3 if node.op == "Attention" else 1
            fan_in = int(np.prod(w[1:])) if node.op == "Conv" else (
                w[1] if node.op == "Gemm" and node.attrs.get("transB", 0) else w[0])
            macs += pos * fan_in * g.width * sections
        elif i in g.consumers:
            fan_out = (w[0] * int(np.prod(w[2:]))) if node.op == "Conv" else (
                w[0] if node.op == "Gemm" and node.attrs.get("transB", 0) else w[1])
            macs += pos * fan_out * g.width
        elif node.op == "Conv":  # depthwise
            macs += pos * int(np.prod(w[2:]))
    return macs


class _Put:
    """put(node, j, value): a new constant for the node's input j, under the old one's name unless
    another node reads it."""

    def __init__(self, graph: gs.Graph):
        self.graph, self.names = graph, None

    def __call__(self, node: gs.Node, j: int, value: np.ndarray) -> None:
        old = node.inputs[j]
        name = old.name
        if len(old.outputs) > 1:
            self.names = self.names or Names(self.graph)
            name = self.names.new(f"{old.name}_pruned")
        node.inputs[j] = gs.Constant(name, np.ascontiguousarray(value))


def _write_consumer(graph: gs.Graph, g: Group, w: np.ndarray, b: np.ndarray | None, put: _Put) -> None:
    """Set the refitted consumer's weight from W [inputs, outputs], and its bias."""
    node = graph.nodes[g.refit[0]]
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        w = w.T
    elif node.op == "Conv":
        w = w.T.reshape(node.inputs[1].shape)
    put(node, 1, w.astype(np.float32))
    if b is not None:
        put(graph.nodes[g.refit[1][0]], g.refit[1][1], b.astype(np.float32))


def refit_to_teacher(model, teacher, groups: list[Group], samples: list[dict]) -> int:
    """Refit every refittable consumer of the pruned `model` to the outputs the unpruned `teacher`
    gives, on the inputs the consumer now gets, stage by stage (teacher.py's order, both models
    run forward a stage at a time): W' minimizing ||[Xs 1] W' - [Xd 1] [W; b]||^2, damped toward
    the weights it has (the refit on the original inputs). Units cut upstream change what later
    layers read; the refit in `apply` sees only the original activations. Returns how many.
    A consumer whose outputs are another group's units (a conv net's 1x1 convs) keeps its refit:
    matching the teacher would need its kept outputs' places."""
    graph = model.graph
    at = {g.refit[0]: g for g in groups  # a consumer whose outputs another group cut is left as it is
          if g.refit is not None and _augmented(graph, g).shape[1] == _augmented(teacher.graph, g).shape[1]}
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    with Forward(samples) as student, Forward(samples) as original:
        for stage in stages(graph, [_Site(i) for i in at]):
            todo = [at[s.index] for s in stage]
            skips = [residual(graph, g.refit[0], position) for g in todo]
            grams = []
            for g, skip in zip(todo, skips):  # Xs^T of the teacher's outputs [Xd 1] [W; b] (plus the drift
                # of what the output is added to, which the refit may take up) is all the fit needs
                t = _augmented(teacher.graph, g)
                grams.append(Gram(FLUSH_ROWS, np.vstack([t, np.eye(t.shape[1])]) if skip else t))
            wanted = sorted({g.reads for g in todo} | {r for r in skips if r})
            for now, then in zip(student.step(model, wanted), original.step(teacher, wanted)):
                for g, gram, skip in zip(todo, grams, skips):
                    axis = channel_axis(g)
                    a, b = (channel_rows(_rows(x[g.reads], axis), 1 << 16) for x in (now, then))
                    if g.refit[1] is not None:
                        a, b = (np.hstack([r, np.ones((len(r), 1), r.dtype)]) for r in (a, b))
                    if skip:
                        b = np.hstack([b, channel_rows(_rows(then[skip], axis), 1 << 16)
                                       - channel_rows(_rows(now[skip], axis), 1 << 16)])
                    gram.add(a, b)
            for g, gram in zip(todo, grams):
                h, c = gram.total()
                w = _augmented(graph, g)
                hh = _damped(h)
                new = np.linalg.solve(hh, c + (hh - h) @ w)
                parts = (new[:-1], new[-1]) if g.refit[1] is not None else (new, None)  # weight, bias
                _write_consumer(graph, g, *parts, _Put(graph))
    return len(at)


@dataclass
class _Site:  # a consumer's place in graph.nodes, as teacher.stages takes it
    index: int


def apply(model, groups: list[Group], stats: list[Stats], plan: dict[int, list[int]], cache: dict) -> None:
    """Remove the planned units ({group index: units}) from the model, refitting consumers."""
    graph = model.graph
    cuts: dict[tuple[int, int], dict[int, list[np.ndarray]]] = {}
    tensors = graph.tensors()
    put = _Put(graph)
    for gi, removed in plan.items():
        if not removed:
            continue
        g = groups[gi]
        if g.refit is not None and stats[gi].gram is not None:
            key = (gi, tuple(sorted(removed)))
            if key not in cache:
                cache[key] = refit(graph, g, stats[gi], sorted(removed))
            _write_consumer(graph, g, *cache[key], put)
        units = np.asarray(sorted(removed))
        pos = (units[:, None] * g.width + np.arange(g.width)[None]).ravel()
        for cut in g.cuts:
            cuts.setdefault((cut.node, cut.input), {}).setdefault(cut.axis, []).append(pos + cut.offset)
        for n, attr in g.attrs:
            graph.nodes[n].attrs[attr] = int(graph.nodes[n].attrs[attr]) - len(removed)
        for n, position, scale in g.reshapes:
            node = graph.nodes[n]
            spec = np.asarray(values(node.inputs[1])).copy()
            spec[position] -= len(removed) * scale
            put(node, 1, spec)
        for name in g.tensors:
            if name in tensors:
                tensors[name].shape = None
    for (n, j), axes in cuts.items():
        node = graph.nodes[n]
        arr = np.asarray(values(node.inputs[j]))
        for axis, parts in axes.items():
            arr = np.delete(arr, np.unique(np.concatenate(parts)), axis=axis)
        put(node, j, arr)


# of the loss budget (1 - --min-cosine), what prune leaves to a quant pass after it, by quant mode:
# dynamic INT8 costs MiniLM 0.003 of cosine where the budget allows 0.01-0.04 (bench/int8.md),
# float16 less still; static and int4 lose more
QUANT_SHARE = {"dynamic": 0.1, "fp16": 0.05, "mixed": 0.05}
QUANT_SHARE_OTHER = 0.25
REFERENCE_LEVEL = 0.5  # of its removable units, where each group's loss is measured alone
MAX_MEASURED = 48  # above this many groups, local errors alone rank them
EXTEND_TRIALS = 3  # measured trials of the stage-by-stage refit past the plain refit's budget (each runs both models)


def budget_share(ctx) -> float:
    """The share of the loss budget prune may spend: all of it, less QUANT_SHARE when quant follows."""
    if "quant" not in ctx.passes:
        return 1.0
    return 1.0 - QUANT_SHARE.get(ctx.quant, QUANT_SHARE_OTHER)


def run_structured(model, ctx, sequential: bool = True) -> Counter:
    graph = model.graph
    groups, skipped = find_groups(graph)
    for label, reason in skipped.items():
        ctx.log(f"prune: left alone: {reason}")
    if not groups:
        ctx.log("prune: structured: no heads, neurons or channels can be removed safely")
        ctx.details["prune"] = {"method": "structured", "groups": [], "left_alone": list(skipped.values())}
        return Counter()
    samples = ctx.calibration_data
    if not samples:
        samples = ctx.evaluation
        ctx.log("prune: no --calibration-data: units are ranked on generated inputs, which says little "
                "about real ones; give calibration data")
    stats = collect(model, groups, samples)
    for g, st in zip(groups, stats):
        if st.gram is not None and st.rows < len(st.gram):
            ctx.log(f"prune: {g.label}: {st.rows} calibration positions for {len(st.gram)} inputs: the refit "
                    f"is underdetermined (damped); give more calibration data")
    curves = [curve(graph, g, st) for g, st in zip(groups, stats)]
    macs = np.array([unit_macs(graph, g, st) for g, st in zip(groups, stats)])
    params = np.array([unit_params(graph, g) for g in groups])
    measure = Measure.of(model, ctx, budget_share(ctx))
    cache: dict = {}

    def plan_of(levels) -> dict[int, list[int]]:
        return {i: curves[i].order[:k * curves[i].chunk] for i, k in enumerate(levels) if k}

    def trial(levels) -> float:
        m = copy_model(model)
        apply(m, groups, stats, plan_of(levels), cache)
        return measure.score(m)

    losses = [c.loss.copy() for c in curves]
    if len(groups) <= MAX_MEASURED:  # local errors to end-to-end losses, one measurement per group
        for i, c in enumerate(curves):
            ref = max(1, int(round((len(c.loss) - 1) * REFERENCE_LEVEL)))
            if ref >= len(c.loss) or c.loss[ref] <= 0:
                continue
            levels = [0] * len(groups)
            levels[i] = ref
            losses[i] = c.loss * max(0.0, 1.0 - trial(levels)) / c.loss[ref]
    steps = _greedy(losses, [macs[i] * c.chunk for i, c in enumerate(curves)])
    touched = {(c.node, c.input) for g in groups for c in g.cuts}  # a weight two groups cut counts once

    def held(m) -> int:
        return sum(int(np.prod(m.graph.nodes[i].inputs[j].shape)) for i, j in touched)

    total_params = held(model)

    def levels_at(n: int) -> list[int]:
        levels = [0] * len(groups)
        for i in steps[:n]:
            levels[i] += 1
        return levels

    def removed_at(n: int) -> int:  # exact, on a copy: a weight two groups cut loses less than both estimate
        m = copy_model(model)
        apply(m, groups, stats, plan_of(levels_at(n)), cache)
        return total_params - held(m)

    if ctx.sparsity is not None:  # the shortest prefix reaching it (bisection: removal grows with the prefix)
        lo, hi = 0, len(steps)
        while lo < hi:
            mid = (lo + hi) // 2
            if removed_at(mid) >= ctx.sparsity * total_params:
                hi = mid
            else:
                lo = mid + 1
        n = lo
        score = trial(levels_at(n))
    else:  # the longest prefix whose result keeps the budget (bisection)
        lo, hi, score = 0, len(steps), 1.0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            s = trial(levels_at(mid))
            if s >= measure.budget:
                lo, score = mid, s
            else:
                hi = mid - 1
        n = lo
        ctx.log(f"prune: the most multiply-adds removed inside the budget (cosine >= {measure.budget:.4f}): "
                f"{n} of {len(steps)} steps")
    staged = False
    if sequential and ctx.calibration_data and n:  # the consumers refitted to the original model (see
        # refit_to_teacher) where that measures better; inside a budget it may then prune further
        def refitted(k: int):
            m = copy_model(model)
            apply(m, groups, stats, plan_of(levels_at(k)), cache)
            refit_to_teacher(m, model, groups, ctx.calibration_data)
            return m, measure.score(m)

        best, s = refitted(n)
        ctx.log(f"prune: consumers refitted stage by stage to the original model: worst output cosine {s:.6f} "
                f"(refitted on the original inputs: {score:.6f})")
        if s > score:
            staged, score = True, s
            if ctx.sparsity is None and s >= measure.budget:  # further: over a quarter more steps, at most
                lo, hi = n, min(len(steps), n + max(4, n // 4))  # EXTEND_TRIALS bisection steps
                for _ in range(EXTEND_TRIALS):
                    if lo >= hi:
                        break
                    mid = (lo + hi + 1) // 2
                    m, s = refitted(mid)
                    if s >= measure.budget:
                        lo, best, score = mid, m, s
                    else:
                        hi = mid - 1
                if lo > n:
                    ctx.log(f"prune: with that refit, {lo} of {len(steps)} steps inside the budget")
                n = lo
    levels = levels_at(n)
    plan = plan_of(levels)
    ops_before = model_macs(model, ctx.evaluation[0] if ctx.evaluation else None)
    apply(model, groups, stats, plan, cache)
    if staged:
        for g in groups:
            if g.refit is not None:
                for i, j in ((g.refit[0], 1),) + ((g.refit[1],) if g.refit[1] is not None else ()):
                    model.graph.nodes[i].inputs[j] = best.graph.nodes[i].inputs[j]
    refresh_shapes(model)
    ops_after = model_macs(model, ctx.evaluation[0] if ctx.evaluation else None)
    rows = []
    counts = Counter()
    for i, g in enumerate(groups):
        k = len(plan.get(i, []))
        rows.append({"group": g.label, "kind": g.kind, "units": g.units, "removed": k,
                     "sparsity": round(k / g.units, 4),
                     "params_removed": int(params[i] * k), "macs_removed": float(macs[i] * k),
                     "refitted": bool(k and g.refit is not None and stats[i].gram is not None),
                     "estimated_loss": round(float(losses[i][levels[i]]), 6)})
        if k:
            counts[f"{g.kind}_removed"] += k
            counts["groups_pruned"] += 1
    all_macs = float(sum(macs[i] * g.units for i, g in enumerate(groups)))
    removed_macs = float(sum(r["macs_removed"] for r in rows))
    removed_params = total_params - held(model)
    ctx.details["prune"] = {"method": "structured", "sparsity": round(removed_params / max(total_params, 1), 4),
                            "groups": rows, "left_alone": list(skipped.values()),
                            "prunable_params": int(total_params), "params_removed": removed_params,
                            "prunable_macs_per_sample": all_macs, "macs_removed_per_sample": removed_macs,
                            "measured_cosine": round(score, 6), "budget": round(measure.budget, 6),
                            "calibration_samples": len(samples), "sequential": staged,
                            "model_macs": {"before": ops_before, "after": ops_after}}
    ctx.log(f"prune: structured: {', '.join(f'{v} {k[:-8]}' for k, v in counts.items() if k.endswith('_removed'))}"
            f" removed in {counts['groups_pruned']} of {len(groups)} groups: {removed_params} weights "
            f"({removed_params / max(total_params, 1):.1%} of the prunable ones), "
            f"{removed_macs / max(all_macs, 1):.1%} of their multiply-adds"
            + (f" ({1 - ops_after / ops_before:.1%} of the model's MatMul/Gemm/Conv/Attention multiply-adds on "
               "the verification sample)"
               if ops_before else "") + f"; worst output mean {score_name(ctx)} "
            f"{score:.6f} on {len(ctx.evaluation)} sample(s)")
    counts["groups_left_alone"] = len(skipped)
    return +counts


def model_macs(model, feeds: dict | None) -> float:
    """The multiply-adds of the model's MatMul, Gemm, Conv and onnxruntime Attention nodes on one
    sample, from the shapes the float model's run gives (shape inference loses them in exported
    transformers)."""
    if not feeds:
        return 0.0
    nodes = [n for n in model.graph.nodes if (n.op in ("MatMul", "Gemm", "Conv") and n.domain in STANDARD_DOMAINS)
             or (n.op == "Attention" and n.domain == "com.microsoft")]
    shapes: dict[str, tuple] = {}
    names = sorted({t.name for n in nodes for t in (n.inputs[0], n.outputs[0]) if not is_constant(t)})
    observe(model, names, [feeds], lambda outs: shapes.update({k: v.shape for k, v in outs.items()}))

    def shape(t):
        return tuple(t.shape) if is_constant(t) else shapes.get(t.name)

    total = 0.0
    for n in nodes:
        a, out = shape(n.inputs[0]), shape(n.outputs[0])
        if a is None or out is None:
            continue
        size = float(np.prod(out))
        if n.op == "Conv":
            total += size * float(np.prod(n.inputs[1].shape[1:]))
        elif n.op == "Gemm":
            total += size * a[0 if n.attrs.get("transA", 0) else -1]
        elif n.op == "MatMul":
            total += size * a[-1]
        else:  # Attention [B, S, Din]: the packed projection, then QK^T and PV over the heads
            total += float(np.prod(a)) * n.inputs[1].shape[1] + 2.0 * a[0] * a[1] ** 2 * n.inputs[1].shape[1] / 3
    return total


def _greedy(losses: list[np.ndarray], step_cost: list[float]) -> list[int]:
    """The order of steps (a group index each: its next chunk) by the least added loss per
    multiply-add removed."""
    levels = [0] * len(losses)
    heap = []
    for i, loss in enumerate(losses):
        if len(loss) > 1:
            heapq.heappush(heap, ((loss[1] - loss[0]) / max(step_cost[i], 1e-9), i))
    out = []
    while heap:
        _, i = heapq.heappop(heap)
        out.append(i)
        levels[i] += 1
        k = levels[i]
        if k + 1 < len(losses[i]):
            heapq.heappush(heap, ((losses[i][k + 1] - losses[i][k]) / max(step_cost[i], 1e-9), i))
    return out
