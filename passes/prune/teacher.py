"""Sequential, teacher-guided pruning: each layer is pruned on the inputs that the layers pruned
before it give, and refitted to the outputs that the original (teacher) model gives.

Pruning every layer on the original model's activations (`input_products` once) ignores that a
layer's inputs change once the layers before it are pruned: the errors add up through the depth
of the model. Here the layers are taken in stages, a stage being the layers whose inputs no
unpruned layer feeds (in a transformer block: Q/K/V, then the output projection, then the FFN's
up- and down-projection). For each stage the model pruned so far and the original model run side
by side on the calibration samples, giving for each layer H = Xs^T Xs (its inputs now) and
C = Xs^T Xd (against its original inputs Xd).

The teacher's target is Xd W. Its least-squares fit on the inputs the layer now gets is
W* = H^-1 C W (damped toward W), and for any W', ||Xs W' - Xd W||^2 = ||Xs W' - Xs W*||^2 plus a
constant: pruning W* on H (sparse.py) with its exact refit solves the teacher's problem for the
mask it picks. The first stage sees the original inputs, so W* = W there.

Where the layer's output is added to a residual R (a transformer block's output projection and
FFN down-projection), what the block passes on is Xs W' + Rs against the teacher's Xd W + Rd:
the target becomes Xd W + (Rd - Rs), so the layer also takes up what the residual stream has
drifted by (on MiniLM's structured pruning at --min-cosine 0.95: held-back cosine 0.9471 without
this term, 0.9545 with it, against 0.9506 for the refit on the original inputs).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..quant.calib import Forward, Gram, channel_rows, damped
from . import sparse

ROWS = 1 << 16  # at most this many rows of a tensor per sample (as input_products takes)


def stages(graph: gs.Graph, sites: list) -> list[list]:
    """The sites grouped by how many sites lie upstream of their input, in that order (one sweep
    over the nodes, which are in topological order)."""
    at = {s.index: s for s in sites}
    depth: dict[int, int] = {}  # id(tensor) -> the most sites on a path into it
    out: dict[int, list] = {}
    for i, node in enumerate(graph.nodes):
        d = max((depth.get(id(t), 0) for t in node.inputs), default=0)
        if i in at:
            stage = depth.get(id(node.inputs[0]), 0)
            out.setdefault(stage, []).append(at[i])
            d = max(d, stage + 1)
        for t in node.outputs:
            depth[id(t)] = d
    return [out[k] for k in sorted(out)]


def residual(graph: gs.Graph, index: int, at: dict[int, int]) -> str | None:
    """The tensor the output of graph.nodes[index] (past a bias Add) is added to, as in a residual
    block, where it comes from before the node in the graph's order (and so not from its output);
    None where there is none. at: id(node) -> position."""
    out = graph.nodes[index].outputs[0]
    for _ in range(2):
        # a Sum of two is the same residual (fuse writes the one a LayerNormalization reads so)
        if len(out.outputs) != 1 or out.outputs[0].op not in ("Add", "Sum") or len(out.outputs[0].inputs) != 2:
            return None
        add = out.outputs[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if not isinstance(other, gs.Constant):
            return other.name if not other.inputs or at.get(id(other.inputs[0]), index) < index else None
        out = add.outputs[0]
    return None


def teacher_weight(w: np.ndarray, h: np.ndarray, c: np.ndarray, drift: np.ndarray | None = None) -> np.ndarray:
    """W* [K, N] = (H + dI)^-1 (C W + d W + D): the layer's best fit on its current inputs (H =
    Xs^T Xs) to the teacher's outputs (C = Xs^T Xd), damped toward W as `calib.damped` damps H.
    D = Xs^T (Rd - Rs) where the output is added to a residual R: the fit then also takes up what
    R drifted by, so the sum matches the teacher's."""
    k = w.shape[0]
    hh, dead = damped(h, k)
    w64 = w.astype(np.float64)
    rhs = c @ w64 + (hh - h) @ w64  # C W + d W (the dead inputs' rows aside)
    if drift is not None:
        rhs += drift
    rhs[dead] = 0.0
    return np.linalg.solve(hh, rhs).astype(np.float32)


def prune_sequential(model, teacher, sites: list, levels: dict, n_m, samples: list[dict], weight_of, put) -> None:
    """Prune `sites` of `model` (a copy of `teacher`) in place, stage by stage: site.index -> its
    level in `levels`; weight_of(node, site) -> (W [K, N], transposed); put(node, site, W). Both
    models run forward a stage at a time (`calib.Forward`), so the whole costs about two runs of
    each over the samples, not two per stage."""
    nodes = model.graph.nodes
    active = [s for s in sites if levels.get(s.index, 0.0) > 0]
    at = {id(n): i for i, n in enumerate(nodes)}
    with Forward(samples) as student, Forward(samples) as original:
        for group in stages(model.graph, active):
            skips = {s.index: residual(model.graph, s.index, at) for s in group}
            wanted = sorted({nodes[s.index].inputs[0].name for s in group} | {r for r in skips.values() if r})
            grams = {s.index: Gram() for s in group}
            for now, then in zip(student.step(model, wanted), original.step(teacher, wanted)):
                for site in group:
                    x, skip = nodes[site.index].inputs[0].name, skips[site.index]
                    a, b = channel_rows(now[x], ROWS), channel_rows(then[x], ROWS)
                    if skip:
                        b = np.hstack([b, channel_rows(then[skip], ROWS) - channel_rows(now[skip], ROWS)])
                    grams[site.index].add(a, b)
            for site in group:
                node = nodes[site.index]
                h, c = grams[site.index].total()
                w, _ = weight_of(node, site)
                k = w.shape[0]
                target = teacher_weight(w, h, c[:, :k], c[:, k:] if skips[site.index] else None)
                pruned, _ = sparse.prune(target, h, levels[site.index], n_m)
                put(node, site, pruned)
