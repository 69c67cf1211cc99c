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
constant: pruning W* by SparseGPT on H (sparse.py) with its exact refit solves the teacher's
problem for the mask it picks. The first stage sees the original inputs, so W* = W there.
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


def teacher_weight(w: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
    """W* [K, N] = (H + dI)^-1 (C W + d W): the layer's best fit on its current inputs (H = Xs^T Xs)
    to the teacher's outputs (C = Xs^T Xd), damped toward W as `calib.damped` damps H."""
    k = w.shape[0]
    hh, dead = damped(h, k)
    w64 = w.astype(np.float64)
    rhs = c @ w64 + (hh - h) @ w64  # C W + d W (the dead inputs' rows aside)
    rhs[dead] = 0.0
    return np.linalg.solve(hh, rhs).astype(np.float32)


def prune_sequential(model, teacher, sites: list, levels: dict, n_m, samples: list[dict], weight_of, put) -> None:
    """Prune `sites` of `model` (a copy of `teacher`) in place, stage by stage: site.index -> its
    level in `levels`; weight_of(node, site) -> (W [K, N], transposed); put(node, site, W). Both
    models run forward a stage at a time (`calib.Forward`), so the whole costs about two runs of
    each over the samples, not two per stage."""
    nodes = model.graph.nodes
    active = [s for s in sites if levels.get(s.index, 0.0) > 0]
    student, original = Forward(samples), Forward(samples)
    for group in stages(model.graph, active):
        wanted = sorted({nodes[s.index].inputs[0].name for s in group})
        grams = {name: Gram() for name in wanted}
        for now, then in zip(student.step(model, wanted), original.step(teacher, wanted)):
            for name in wanted:
                grams[name].add(channel_rows(now[name], ROWS), channel_rows(then[name], ROWS))
        for site in group:
            node = nodes[site.index]
            h, c = grams[node.inputs[0].name].total()
            w, _ = weight_of(node, site)
            pruned, _ = sparse.prune(teacher_weight(w, h, c), h, levels[site.index], n_m)
            put(node, site, pruned)
