"""Sparse weights with reconstruction: SparseGPT's one-shot pruning of a linear layer.

For a weight W [K, N] (y = x @ W) and H = X^T X of the layer's calibration inputs, the weights
are visited along the reduction axis in blocks of BLOCK rows. In each block the ones to drop
are those with the least OBS saliency w^2 / [H^-1]_kk^2 (the output error their removal causes,
given the inputs), either the same fraction of every output's weights in the block
(unstructured) or n of every m consecutive ones along the reduction axis (2:4). Each dropped
weight's error is then compensated in the weights of the same output not visited yet, through
the Cholesky factor of H^-1: a least-squares refit of the layer's outputs on its calibration
inputs, done as the weights are removed.

That compensation is greedy (a removed weight's error only moves into the weights after it, a
block at a time), so once the mask is chosen `refit` solves the least-squares problem outright:
each output's kept weights become those that best reproduce the dense layer's output on the
calibration inputs. On MiniLM at a uniform 50% this takes the sentence-embedding cosine from
0.934 to 0.950 (bench/prune.md). It costs a solve per output of the size of its removed or of its
kept inputs, the fewer, so a layer above SOLVE_FLOPS keeps SparseGPT's compensation (a MiniLM
FFN down-projection at 50% is 0.17e12, a few seconds here).
Without H (no calibration data) the smallest weights by magnitude go and nothing is refitted.
"""

from __future__ import annotations

import numpy as np

from onnxopt.passes.quant.calib import damped, inverse_factor

BLOCK = 128  # rows along the reduction axis pruned and compensated together
SOLVE_BYTES = 1 << 26  # the blocks of H (or its inverse) stacked for one batched solve
SOLVE_FLOPS = 1e12  # outputs x (removed or kept inputs, the fewer)^3: above it, no exact refit


def prune(w: np.ndarray, h: np.ndarray | None, sparsity: float = 0.0,
          n_m: tuple[int, int] | None = None, solve: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(pruned W [K, N] float32, mask [K, N] True where a weight was removed); solve=False keeps
    SparseGPT's own compensation instead of `refit` (several times cheaper)."""
    if h is None:
        return magnitude(w, sparsity, n_m)
    wt = w.T.astype(np.float64)  # [N, K]: a row per output
    n, k = wt.shape
    u, dead = inverse_factor(h, k)
    if u is None:
        return magnitude(w, sparsity, n_m)
    wt[:, dead] = 0.0  # inputs that never varied: their weights do nothing
    mask = np.zeros((n, k), bool)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, u1 = wt[:, i1:i2].copy(), u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        m1 = np.zeros(w1.shape, bool)
        if n_m is None:
            drop = int(round((i2 - i1) * sparsity))
            if drop:
                saliency = w1 ** 2 / np.diag(u1)[None, :] ** 2
                np.put_along_axis(m1, np.argsort(saliency, axis=1, kind="stable")[:, :drop], True, axis=1)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                j = min(i + n_m[1], i2 - i1)
                saliency = w1[:, i:j] ** 2 / np.diag(u1)[None, i:j] ** 2
                drop = n_m[0] * (j - i) // n_m[1]
                np.put_along_axis(m1[:, i:j], np.argsort(saliency, axis=1, kind="stable")[:, :drop], True, axis=1)
            q = np.where(m1[:, i], 0.0, w1[:, i])
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            w1[:, i] = q
            err1[:, i] = err
        wt[:, i1:i2] = np.where(m1, 0.0, w1)
        wt[:, i2:] -= err1 @ u[i1:i2, i2:]
        mask[:, i1:i2] = m1
    removed = int(mask.sum(axis=1).max())
    if solve and n * float(min(removed, k - removed)) ** 3 <= SOLVE_FLOPS:
        return refit(w, h, mask.T), mask.T
    return wt.T.astype(np.float32), mask.T


def refit(w: np.ndarray, h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """W [K, N] with the weights where mask is True removed and each output's kept weights w'
    re-solved: those minimizing ||X (w' - w)||^2 + d ||w' - w||^2 (d the damping). With G the
    inverse of the damped H, that is w' = w - G_:R (G_RR)^-1 w_R over the removed inputs R, or
    equally (H + dI)_SS w'_S = ((H + dI) w)_S over the kept ones S: each output solves whichever
    is smaller. The damping pulls toward the dense weights rather than toward zero (on MiniLM,
    the same masks: 0.954 against 0.950)."""
    k, n = w.shape
    hh, dead = damped(h, k)
    w0 = np.where(dead[:, None], 0.0, w.astype(np.float64))
    out = w0.copy()
    removed = np.where(np.any(mask & (w0 != 0), axis=0), mask.sum(axis=0), 0)  # 0: w is its own solution
    g = np.linalg.inv(hh) if np.any((removed > 0) & (removed < k - removed)) else None
    for c in np.unique(removed[removed > 0]):
        cols = np.flatnonzero(removed == c)
        through_removed = c < k - c
        size = c if through_removed else k - c
        step = max(1, SOLVE_BYTES // (8 * size * size))
        for j in range(0, len(cols), step):
            js = cols[j:j + step]
            chosen = mask[:, js].T if through_removed else ~mask[:, js].T
            rows = np.argsort(~chosen, axis=1, kind="stable")[:, :size]  # each output's R (or S)
            if through_removed:
                z = np.linalg.solve(g[rows[:, :, None], rows[:, None, :]], w0[rows, js[:, None]][..., None])[..., 0]
                spread = np.zeros((k, len(js)))
                spread[rows, np.arange(len(js))[:, None]] = z
                out[:, js] -= g @ spread
                out[rows, js[:, None]] = 0.0
            else:
                a = hh[rows[:, :, None], rows[:, None, :]]
                b = np.take_along_axis((hh @ w0[:, js]).T, rows, axis=1)
                out[:, js] = 0.0
                out[rows, js[:, None]] = np.linalg.solve(a, b[..., None])[..., 0]
    return out.astype(np.float32)


def magnitude(w: np.ndarray, sparsity: float = 0.0,
              n_m: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The smallest weights of each output (unstructured: a fraction; n_m: n of every m along K)."""
    k, n = w.shape
    mask = np.zeros((k, n), bool)
    if n_m is None:
        drop = int(round(k * sparsity))
        if drop:
            np.put_along_axis(mask, np.argsort(np.abs(w), axis=0, kind="stable")[:drop], True, axis=0)
    else:
        for i in range(0, k, n_m[1]):
            j = min(i + n_m[1], k)
            drop = n_m[0] * (j - i) // n_m[1]
            np.put_along_axis(mask[i:j], np.argsort(np.abs(w[i:j]), axis=0, kind="stable")[:drop], True, axis=0)
    return np.where(mask, np.float32(0), w).astype(np.float32), mask


def holds_n_m(w: np.ndarray, n: int = 2, m: int = 4) -> bool:
    """Whether W [K, N] has at least n zeros in every m consecutive weights along K (a last
    group shorter than m needs n * len // m)."""
    k = w.shape[0]
    for i in range(0, k, m):
        j = min(i + m, k)
        if np.any(np.sum(w[i:j] == 0, axis=0) < n * (j - i) // m):
            return False
    return True
