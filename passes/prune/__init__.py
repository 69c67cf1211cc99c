"""prune: weight pruning of linear layers, inside the error budget.

`--prune unstructured` zeroes a fraction of each layer's weights (`--sparsity S`, or without it
the largest fraction, the same for every layer, whose result stays inside `--min-cosine`);
`--prune 2:4` zeroes 2 of every 4 consecutive weights along the reduction axis (the pattern
sparse tensor cores and TensorRT run), in every layer the budget allows, the most sensitive
layers kept dense. Both prune by SparseGPT (sparse.py): with calibration data each layer's
weights are refitted to its calibration inputs as they are removed; without, by magnitude.

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

from ..quant.budget import Measure, copy_model, fit_budget
from ..quant.calib import channel_rows, observe
from . import sparse

METHODS = ("unstructured", "2:4")
MIN_ELEMENTS = 1024  # smaller weights are left alone
SEARCH_STEPS = 7  # bisection steps for the largest uniform sparsity inside the budget
MAX_SPARSITY = 0.95


@dataclass
class Site:
    """A linear node whose weight may be pruned: its position in graph.nodes (stable in a copy)."""

    index: int
    kind: str  # matmul | gemm | attention
    label: str
    params: int


class PrunePass(Pass):
    name = "prune"
    summary = "weight pruning inside an error budget (--prune unstructured|2:4, --sparsity S)"
    after = ("fold", "cleanup", "fuse")
    tolerance = "lossy"

    @dataclass
    class Options:
        fallback: bool = True  # 2:4: layers go back to dense until the budget holds

    def run(self, model, ctx):
        if ctx.prune not in METHODS:
            raise UsageError(f"bad --prune {ctx.prune}: expected one of {', '.join(METHODS)}")
        graph = model.graph
        sites, skipped = find_sites(graph)
        for label, reason in skipped.items():
            ctx.log(f"prune: {label}: {reason}")
        if not sites:
            ctx.log("prune: nothing to prune (no MatMul, Gemm or Attention with a constant weight)")
            return Counter()
        if ctx.calibration_data:
            hessians = input_products(model, sites, ctx.calibration_data)
        else:
            hessians = {}
            ctx.log("prune: no --calibration-data: weights go by magnitude, nothing is refitted, and the "
                    "error is measured on generated inputs")
        measure = Measure(model, ctx.evaluation, ctx.min_cosine)
        cache: dict = {}

        def rewrite(m, chosen, sparsity):
            for site in chosen:
                prune_site(m.graph.nodes[site.index], site, hessians, sparsity, ctx.prune, cache)

        if ctx.prune == "2:4":
            fit = fit_budget(model, sites, lambda m, chosen: rewrite(m, chosen, 0.5), measure, self.options.fallback)
            chosen, sparsity, score = fit.chosen, 0.5, fit.score
            if fit.kept:
                ctx.log(f"prune: kept dense for the budget (cosine >= {ctx.min_cosine}): "
                        f"{', '.join(s.label for s in fit.kept)}")
        elif ctx.sparsity is not None:
            chosen, sparsity = sites, ctx.sparsity
            trial = copy_model(model)
            rewrite(trial, chosen, sparsity)
            score = measure.score(trial)
        else:
            sparsity, score = search_sparsity(model, sites, rewrite, measure)
            chosen = sites if sparsity > 0 else []
            ctx.log(f"prune: the largest uniform sparsity inside the budget (cosine >= {ctx.min_cosine}): "
                    f"{sparsity:.3f}")
        before = {s.index: int(np.sum(np.asarray(values(graph.nodes[s.index].inputs[1])) == 0)) for s in chosen}
        rewrite(model, chosen, sparsity)
        layers = []
        for site in chosen:
            w = np.asarray(values(graph.nodes[site.index].inputs[1]))
            zeros = int(np.sum(w == 0))
            layers.append({"node": site.label, "kind": site.kind, "weights": int(w.size), "zeros": zeros,
                           "newly_zeroed": zeros - before[site.index], "sparsity": round(zeros / w.size, 4)})
        total = sum(s.params for s in sites)
        zeros = sum(layer["zeros"] for layer in layers)
        ctx.details["prune"] = {"method": ctx.prune, "sparsity": sparsity, "layers": layers,
                                "kept_dense": [s.label for s in sites if s not in chosen],
                                "linear_weights": total, "zeros": zeros,
                                "measured_cosine": round(score, 6), "refitted": bool(hessians)}
        ctx.log(f"prune: {ctx.prune}: {len(chosen)} of {len(sites)} layers, {zeros} of {total} weights zeroed "
                f"({zeros / max(total, 1):.1%}), worst output mean cosine {score:.6f} on "
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


def input_products(model, sites: list[Site], samples: list[dict]) -> dict[str, np.ndarray]:
    """X^T X of every site's input over the calibration samples."""
    nodes = model.graph.nodes
    names = sorted({nodes[s.index].inputs[0].name for s in sites})
    products: dict[str, np.ndarray] = {}

    def add(outs):
        for name, x in outs.items():
            rows = channel_rows(x, 1 << 16).astype(np.float64)
            products[name] = products.get(name, 0) + rows.T @ rows

    observe(model, names, samples, add)
    return products


def prune_site(node: gs.Node, site: Site, hessians: dict, sparsity: float, method: str, cache: dict) -> None:
    """Replace the node's weight with its pruned copy (a new constant: model copies share weights)."""
    key = (site.index, method, sparsity)
    if key not in cache:
        stored = np.asarray(values(node.inputs[1]), np.float32)
        transposed = site.kind == "gemm" and node.attrs.get("transB", 0)
        w = stored.T if transposed else stored  # [K, N]
        n_m = (2, 4) if method == "2:4" else None
        pruned, _ = sparse.prune(w, hessians.get(node.inputs[0].name), sparsity, n_m)
        cache[key] = np.ascontiguousarray(pruned.T if transposed else pruned)
    node.inputs[1] = gs.Constant(node.inputs[1].name, cache[key])


def search_sparsity(model, sites, rewrite, measure: Measure) -> tuple[float, float]:
    """The largest uniform sparsity whose result keeps measure's budget (bisection), and its score."""
    lo, hi, best = 0.0, MAX_SPARSITY, 1.0
    for _ in range(SEARCH_STEPS):
        mid = round((lo + hi) / 2, 4)
        trial = copy_model(model)
        rewrite(trial, sites, mid)
        score = measure.score(trial)
        if score >= measure.budget:
            lo, best = mid, score
        else:
            hi = mid
    return lo, best
