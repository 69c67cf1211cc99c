"""prune: weight pruning inside the error budget.

`--prune structured` removes whole attention heads, FFN neurons and conv channels (see
structured.py and groups.py): tensors shrink, so every runtime runs faster. The rest of this
module zeroes single weights.

`--prune unstructured` zeroes a fraction of the layers' weights (`--sparsity S`, or without it
the largest fraction whose result stays inside `--min-cosine`). With calibration data each layer
gets its own level, chosen from its measured sensitivity so the mean is S with the least
estimated loss (see `sensitivity` and `allocation`), kept where it measures better than S in
every layer;
`--prune 2:4` zeroes 2 of every 4 consecutive weights along the reduction axis (the pattern
sparse tensor cores and TensorRT run), in every layer the budget allows, the most sensitive
layers kept dense. Both prune with calibration data by a mask search on each layer's calibration
inputs and a least-squares refit of the weights kept (sparse.py); without, by magnitude. The
plan found on the original model's activations is then pruned again stage by stage against the
original model (teacher.py), and that is kept where it measures better. Last, with enough
calibration samples, the kept weights, biases and LayerNormalizations are trained end to end
toward the original model with the zeros fixed (distill.py), kept where that measures better.

Sites: MatMul and Gemm with a constant 2-D weight, and onnxruntime's Attention (its packed QKV
weight). A weight another node also reads is left alone. Zeros in dense tensors shrink the file
only after compression and speed nothing up on dense kernels; structured pruning (whole heads,
neurons and channels) is what makes a model smaller and faster everywhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import UsageError
from onnxopt.graph import STANDARD_DOMAINS, is_constant, values
from onnxopt.pipeline import Pass

from ..quant.budget import Measure, copy_model, fit_budget, score_name
from ..quant.calib import input_products
from . import sparse
from .distill import EPOCHS as DISTILL_EPOCHS
from .distill import LEARNING_RATE as DISTILL_RATE
from .distill import distill as distill_end_to_end
from .structured import budget_share, run_structured
from .teacher import prune_sequential

METHODS = ("structured", "unstructured", "2:4")
MIN_ELEMENTS = 1024  # smaller weights are left alone
SEARCH_STEPS = 7  # bisection steps for the largest uniform sparsity inside the budget
MAX_SPARSITY = 0.95
EXTEND_SPAN, EXTEND_TRIALS = 0.12, 3  # past the budget's sparsity, stage by stage: how far up, how many trials


@dataclass
class Site:
    """A linear node whose weight may be pruned: its position in graph.nodes (stable in a copy)."""

    index: int
    kind: str  # matmul | gemm | attention
    label: str
    params: int


class PrunePass(Pass):
    name = "prune"
    summary = "weight pruning inside an error budget (--prune structured|unstructured|2:4, --sparsity S)"
    after = ("fold", "cleanup", "fuse")
    tolerance = "lossy"

    @dataclass
    class Options:
        fallback: bool = True  # 2:4: layers go back to dense until the budget holds
        adaptive: bool = True  # unstructured: a sparsity per layer from measured sensitivity (needs calibration data)
        sequential: bool = True  # the final plan pruned (structured: refitted) stage by stage against the original
        distill: int = DISTILL_EPOCHS  # unstructured and 2:4: epochs of end-to-end distillation (0: none)
        distill_rate: float = DISTILL_RATE  # its Adam learning rate

    def run(self, model, ctx):
        if ctx.prune not in METHODS:
            raise UsageError(f"bad --prune {ctx.prune}: expected one of {', '.join(METHODS)}")
        if ctx.prune == "structured":
            return run_structured(model, ctx, self.options.sequential)
        graph = model.graph
        original = copy_model(model)  # the teacher (a copy shares the weights; pruning replaces them)
        sites, skipped = find_sites(graph)
        for label, reason in skipped.items():
            ctx.log(f"prune: {label}: {reason}")
        if not sites:
            ctx.log("prune: nothing to prune (no MatMul, Gemm or Attention with a constant weight)")
            return Counter()
        if ctx.calibration_data:
            hessians = input_products(model, [graph.nodes[s.index].inputs[0].name for s in sites],
                                      ctx.calibration_data)
        else:
            hessians = {}
            ctx.log("prune: no --calibration-data: weights go by magnitude, nothing is refitted, and the "
                    "error is measured on generated inputs")
        measure = Measure.of(model, ctx, budget_share(ctx))
        cache: dict = {}

        def rewrite(m, chosen, sparsity):  # sparsity: one for all, or {site index: its own}
            for site in chosen:
                s = sparsity.get(site.index, 0.0) if isinstance(sparsity, dict) else sparsity
                if s > 0:
                    prune_site(m.graph.nodes[site.index], site, hessians, s, ctx.prune, cache)

        allocate, curves = None, None
        if ctx.prune == "unstructured" and hessians and self.options.adaptive:
            curves = sensitivity(model, sites, hessians, measure, rewrite, ctx)
            params = np.array([s.params for s in sites], np.float64)
            present = [_reached(site_weight(graph.nodes[s.index], s)[0]) for s in sites]

            def allocate(target):
                return {s.index: level for s, level in zip(sites, allocation(curves, params, target, present))}

        if ctx.prune == "2:4":
            fit = fit_budget(model, sites, lambda m, chosen: rewrite(m, chosen, 0.5), measure, self.options.fallback)
            chosen, sparsity, score = fit.chosen, 0.5, fit.score
            if fit.kept:
                ctx.log(f"prune: kept dense for the budget ({score_name(ctx)} >= {ctx.min_cosine}): "
                        f"{', '.join(s.label for s in fit.kept)}")
        elif ctx.sparsity is not None:
            chosen, sparsity = sites, ctx.sparsity
        else:
            sparsity, score = search_sparsity(model, sites, rewrite, measure, allocate)
            chosen = sites if sparsity > 0 else []
            ctx.log(f"prune: the largest {'mean' if allocate else 'uniform'} sparsity inside the budget "
                    f"(cosine >= {ctx.min_cosine}): {sparsity:.3f}")
        plan = sparsity
        if ctx.prune == "unstructured" and chosen:  # per-layer levels only where they measure better
            plan, score = _better(model, chosen, rewrite, measure, sparsity, allocate)
            if allocate is not None and plan is sparsity:
                ctx.log("prune: the per-layer levels measured worse than one sparsity for all: kept uniform")
        before = {s.index: int(np.sum(np.asarray(values(graph.nodes[s.index].inputs[1])) == 0)) for s in chosen}
        sequential = False
        if hessians and chosen and self.options.sequential:
            def staged_trial(p):
                m = copy_model(model)
                levels = p if isinstance(p, dict) else {s.index: p for s in chosen}
                prune_sequential(m, model, chosen, levels, (2, 4) if ctx.prune == "2:4" else None,
                                 ctx.calibration_data, site_weight, _put)
                return m, measure.score(m)

            best, staged = staged_trial(plan)
            ctx.log(f"prune: pruned stage by stage against the original model: worst output cosine {staged:.6f} "
                    f"(all layers on the original inputs: {score:.6f})")
            if staged > score:
                sequential, score = True, staged
                if ctx.prune == "unstructured" and ctx.sparsity is None and staged >= measure.budget:
                    lo, hi = sparsity, min(MAX_SPARSITY, sparsity + EXTEND_SPAN)  # further, by a short bisection
                    for _ in range(EXTEND_TRIALS):
                        mid = round((lo + hi) / 2, 4)
                        p = allocate(mid) if isinstance(plan, dict) else mid
                        m, s = staged_trial(p)
                        if s >= measure.budget:
                            lo, best, score, plan = mid, m, s, p
                        else:
                            hi = mid
                    if lo > sparsity:
                        ctx.log(f"prune: stage by stage, the largest sparsity inside the budget: {lo:.3f}")
                        sparsity = lo
                for site in chosen:  # a Constant of its own (best's node still reads the one it has)
                    w = best.graph.nodes[site.index].inputs[1]
                    graph.nodes[site.index].inputs[1] = gs.Constant(w.name, values(w))
        if not sequential:
            rewrite(model, chosen, plan)
        layers = []
        row = {s.index: i for i, s in enumerate(sites)}
        for site in chosen:
            w = np.asarray(values(graph.nodes[site.index].inputs[1]))
            zeros = int(np.sum(w == 0))
            layers.append({"node": site.label, "kind": site.kind, "weights": int(w.size), "zeros": zeros,
                           "newly_zeroed": zeros - before[site.index], "sparsity": round(zeros / w.size, 4)})
            if curves is not None and isinstance(plan, dict):  # 1 - cosine with this layer alone, estimated
                layers[-1]["estimated_loss"] = round(float(curves[row[site.index], LEVELS.index(plan[site.index])]), 6)
        distilled = None  # the zeros stay where they are: `layers` holds after it
        if hessians and self.options.distill > 0 and any(layer["newly_zeroed"] > 0 for layer in layers):
            distilled = distill_end_to_end(model, original, [graph.nodes[s.index] for s in chosen],
                                           ctx.calibration_data, measure.score, ctx, self.options.distill,
                                           self.options.distill_rate)
            score = distilled["score"] if distilled else score
        total = sum(s.params for s in sites)
        zeros = sum(layer["zeros"] for layer in layers)
        ctx.details["prune"] = {"method": ctx.prune, "sparsity": sparsity, "adaptive": isinstance(plan, dict),
                                "layers": layers,
                                "kept_dense": [s.label for s in sites if s not in chosen],
                                "linear_weights": total, "zeros": zeros,
                                "measured_cosine": round(score, 6), "refitted": bool(hessians),
                                "sequential": sequential, "distilled": distilled or False}
        ctx.log(f"prune: {ctx.prune}: {len(chosen)} of {len(sites)} layers, {zeros} of {total} weights zeroed "
                f"({zeros / max(total, 1):.1%}), worst output mean {score_name(ctx)} {score:.6f} on "
                f"{len(ctx.evaluation)} sample(s)")
        return Counter({"layers_pruned": sum(layer["newly_zeroed"] > 0 for layer in layers),
                        "weights_zeroed": sum(layer["newly_zeroed"] for layer in layers),
                        "layers_kept_dense": len(sites) - len(chosen)}) + Counter()


def find_sites(graph: gs.Graph) -> tuple[list[Site], dict[str, str]]:
    inputs = {id(t) for t in graph.inputs}
    sites, skipped = [], {}
    for i, node in enumerate(graph.nodes):
        kind = _kind(node)
        if kind is None:
            continue
        w = node.inputs[1]
        label = node.name or f"{node.op}#{i}"
        if not is_constant(w) or id(w) in inputs or len(w.shape) != 2 or np.dtype(w.dtype) != np.float32:
            continue
        if int(np.prod(w.shape)) < MIN_ELEMENTS:
            continue
        if len(w.outputs) > 1:
            skipped[label] = "its weight is shared with another node: left alone"
            continue
        sites.append(Site(i, kind, label, int(np.prod(w.shape))))
    return sites, skipped


def _kind(node: gs.Node) -> str | None:
    if node.domain in STANDARD_DOMAINS and node.op == "MatMul" and len(node.inputs) == 2:
        return "matmul"
    if node.domain in STANDARD_DOMAINS and node.op == "Gemm" and not node.attrs.get("transA", 0):
        return "gemm"
    if node.domain == "com.microsoft" and node.op == "Attention" and len(node.inputs) > 1:
        return "attention"
    return None


def site_weight(node: gs.Node, site: Site) -> tuple[np.ndarray, bool]:
    """The weight as [K, N] (y = x @ W), and whether the stored one is its transpose (Gemm transB)."""
    stored = np.asarray(values(node.inputs[1]), np.float32)
    transposed = bool(site.kind == "gemm" and node.attrs.get("transB", 0))
    return (stored.T if transposed else stored), transposed


def prune_site(node: gs.Node, site: Site, hessians: dict, sparsity: float, method: str, cache: dict) -> None:
    """Replace the node's weight with its pruned copy (a new constant: model copies share weights)."""
    key = (site.index, method, sparsity)
    if key not in cache:
        w, transposed = site_weight(node, site)
        n_m = (2, 4) if method == "2:4" else None
        pruned, _ = sparse.prune(w, hessians.get(node.inputs[0].name), sparsity, n_m)
        cache[key] = np.ascontiguousarray(pruned.T if transposed else pruned)
    node.inputs[1] = gs.Constant(node.inputs[1].name, cache[key])


def _put(node: gs.Node, site: Site, w: np.ndarray) -> None:
    """Set the node's weight to W [K, N] (stored transposed where the node reads it so)."""
    _, transposed = site_weight(node, site)
    node.inputs[1] = gs.Constant(node.inputs[1].name, np.ascontiguousarray(w.T if transposed else w))


LEVELS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the sparsities a layer may get
REFERENCE = 0.5  # the level each layer's end-to-end sensitivity is measured at
MAX_MEASURED = 48  # above this many layers, local errors alone rank them


def sensitivity(model, sites: list[Site], hessians: dict, measure: Measure, rewrite, ctx) -> np.ndarray:
    """Per layer and level of LEVELS, the estimated loss (1 - cosine) of pruning that layer alone:
    its local output error on the calibration inputs (tr(D^T H D) / tr(W^T H W), D the removed
    part after the refit) scaled to the loss measured end to end with it alone at REFERENCE. Layers
    differ by far more than their local errors show (a late layer's error reaches the outputs).
    The local errors come from SparseGPT's compensation without the exact refit (eight levels per
    layer would cost eight refits); only their shape matters once scaled."""
    nodes = model.graph.nodes
    local = np.zeros((len(sites), len(LEVELS)))
    for i, site in enumerate(sites):
        w, _ = site_weight(nodes[site.index], site)
        h = hessians.get(nodes[site.index].inputs[0].name)
        base = float(np.einsum("kn,kj,jn->", w, h, w)) or 1.0
        for j, level in enumerate(LEVELS[1:], 1):
            d = (w - sparse.prune(w, h, level, solve=False)[0]).astype(np.float64)
            local[i, j] = float(np.einsum("kn,kj,jn->", d, h, d)) / base
    if len(sites) > MAX_MEASURED:
        ctx.log(f"prune: {len(sites)} layers: their sensitivity is their local error (measured end to end "
                f"up to {MAX_MEASURED} layers)")
        return local
    ref = LEVELS.index(REFERENCE)
    scaled = np.zeros_like(local)
    for i, site in enumerate(sites):
        trial = copy_model(model)
        rewrite(trial, [site], REFERENCE)
        loss = max(0.0, 1.0 - measure.score(trial))
        scaled[i] = local[i] * (loss / local[i, ref] if local[i, ref] > 0 else 0.0)
    if ctx.explain:
        for i in np.argsort(-scaled[:, ref])[:10]:
            ctx.log(f"prune: sensitivity {sites[i].label}: cosine {1 - scaled[i, ref]:.6f} with it alone at "
                    f"{REFERENCE:.0%}")
    return scaled


def _reached(w: np.ndarray) -> int:
    """The highest of LEVELS whose zeros W [K, N] already has in every output (as many as pruning
    at that level leaves), as an index."""
    zeros = int(np.min(np.sum(w == 0, axis=0)))
    return max(i for i, level in enumerate(LEVELS) if zeros >= round(w.shape[0] * level))


def allocation(curves: np.ndarray, params: np.ndarray, target: float, present: list[int] | None = None) -> list[float]:
    """A level per layer whose parameter-weighted mean reaches `target` with the least summed
    estimated loss: greedily the step with the least added loss per weight removed. Each layer
    starts from the level its zeros already reach (`present`, indices into LEVELS), so pruning a
    pruned model again at the same target adds nothing."""
    levels = np.zeros(len(params), int) if present is None else np.array(present, int)
    steps = np.diff(np.array(LEVELS))
    goal = target * params.sum()
    removed = float(np.sum(params * np.array(LEVELS)[levels]))
    while removed < goal - 1e-9:
        room = levels < len(LEVELS) - 1
        if not room.any():
            break
        nxt = np.minimum(levels + 1, len(LEVELS) - 1)
        rows = np.arange(len(params))
        cost = (curves[rows, nxt] - curves[rows, levels]) / (params * steps[np.minimum(levels, len(steps) - 1)])
        cost[~room] = np.inf
        i = int(np.argmin(cost))
        removed += params[i] * steps[levels[i]]
        levels[i] += 1
    return [LEVELS[j] for j in levels]


def _better(model, sites, rewrite, measure: Measure, sparsity: float, allocate) -> tuple:
    """(plan, score): the per-layer levels allocate gives for `sparsity`, or `sparsity` for every
    layer when that measures better (the allocation rests on losses that do not add up exactly)."""
    candidates = [sparsity] + ([allocate(sparsity)] if allocate is not None else [])
    scored = []
    for plan in candidates:
        trial = copy_model(model)
        rewrite(trial, sites, plan)
        scored.append((measure.score(trial), isinstance(plan, dict), plan))
    score, _, plan = max(scored, key=lambda x: (x[0], x[1]))
    return plan, score


def search_sparsity(model, sites, rewrite, measure: Measure, allocate=None) -> tuple[float, float]:
    """The largest sparsity (uniform, or the mean of `allocate`'s per-layer levels) whose result
    keeps measure's budget (bisection), and its score."""
    lo, hi, best = 0.0, MAX_SPARSITY, 1.0
    for _ in range(SEARCH_STEPS):
        mid = round((lo + hi) / 2, 4)
        trial = copy_model(model)
        rewrite(trial, sites, allocate(mid) if allocate else mid)
        score = measure.score(trial)
        if score >= measure.budget:
            lo, best = mid, score
        else:
            hi = mid
    return lo, best
