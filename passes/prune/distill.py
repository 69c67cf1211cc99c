"""Distillation with the masks fixed: after pruning, the weights each pruned layer kept, the
layers' biases and the LayerNormalizations downstream are trained together by gradient descent
(Adam) so the pruned model's normalized hidden states and outputs match the original model's on
the calibration samples. The layer-wise refits (sparse.py, teacher.py) each match one layer's
output; this matches the whole, so the layers make up for each other's errors.

The forward runs in onnxruntime: a copy of the model whose trained weights are graph inputs and
whose intermediate values are also outputs. The reverse pass is numpy, node by node from the
outputs back (GRADIENTS: the ops it knows; a model with another op on the way is left as it is,
and the log says which). The original model runs beside it for the targets, one sample at a
time. After each epoch the result is measured on the held-back samples; the best epoch is kept,
and only where it measures better than the model before. Every epoch runs: the first, at the
highest rate, may measure worse than none and the later ones better (MiniLM, 960 samples).

On MiniLM at 50% unstructured on 4960 calibration sentences (bench/prune_data.md) it takes the
sentence-embedding cosine from 0.9865 to 0.9904 in 6 epochs (about 230 s each here), as torch
did in a scratch run of the same training. It needs thousands of samples: on 960 it gains 0.0013
(bench/prune_1k.md).
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import STANDARD_DOMAINS, values

from ..quant.budget import copy_model
from ..quant.calib import tapped

EPOCHS = 6
BATCH = 16  # samples per step
LEARNING_RATE = 1e-4  # Adam's, decayed to 0 over the steps on a cosine
BETAS, EPS = (0.9, 0.999), 1e-8
MIN_SAMPLES = 256  # below this many calibration samples nothing is trained (it only fits noise)
MAX_PARAMS = 1 << 27  # above this many trained values (with Adam's two moments, 1.5 GB) nothing is trained
NORMS = ("LayerNormalization",)  # whose outputs are targets, and whose scale and bias train
NO_GRADIENT = {"Shape", "Size", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or",
               "Not", "Xor", "ArgMax", "ArgMin", "NonZero", "IsNaN", "IsInf", "Sign"}  # outputs constant


class Unsupported(Exception):
    pass


def trainable(graph: gs.Graph, nodes: list[gs.Node]) -> dict[str, str]:
    """name -> kind (weight | bias | norm) of the constants that train: each pruned node's weight
    (input 1) and its bias (a 1-D constant added to its output: Gemm's C, or a following Add's),
    and the scale and bias of every LayerNormalization downstream. A constant another node also
    reads is left alone."""
    out: dict[str, str] = {}

    def own(t, kind):
        if isinstance(t, gs.Constant) and len(t.outputs) == 1 and np.dtype(t.dtype) == np.float32:
            out.setdefault(t.name, kind)

    for node in nodes:
        own(node.inputs[1], "weight")
        n = int(node.inputs[1].shape[0 if node.op == "Gemm" and node.attrs.get("transB", 0) else 1])
        if node.op == "Gemm" and len(node.inputs) > 2 and tuple(node.inputs[2].shape) == (n,):
            own(node.inputs[2], "bias")
        consumers = node.outputs[0].outputs
        if len(consumers) == 1 and consumers[0].op == "Add":
            for t in consumers[0].inputs:
                if t is not node.outputs[0] and tuple(t.shape or ()) == (n,):
                    own(t, "bias")
    live = _live(graph, set(out))
    for node in graph.nodes:
        if node.op in NORMS and node.domain in STANDARD_DOMAINS and id(node.inputs[0]) in live:
            for t in node.inputs[1:3]:
                own(t, "norm")
    return out


def _live(graph: gs.Graph, params: set[str]) -> set[int]:
    """ids of the tensors whose value depends on the params through ops with a gradient (float32
    ones: integers and booleans carry none). Raises Unsupported where such a value becomes
    another floating type, which the reverse pass does not follow."""
    live = {id(t) for t in graph.tensors().values() if t.name in params}
    for node in graph.nodes:
        if node.op not in NO_GRADIENT and any(id(t) in live for t in node.inputs):
            for t in node.outputs:
                kind = np.float32 if t.dtype is None else _dtype(t.dtype)
                if kind == np.float32:
                    live.add(id(t))
                elif kind is None or np.issubdtype(kind, np.floating):
                    raise Unsupported(f"{node.op} ({node.name}) makes {t.name} of type {t.dtype}")
    return live


def _dtype(dtype) -> np.dtype | None:
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


class Plan:
    """What one reverse pass needs: the nodes on a path from a param to a target, in reverse
    order; the targets (normalization outputs and graph outputs downstream of a param); the
    values to fetch from the forward run."""

    def __init__(self, graph: gs.Graph, params: set[str]):
        live = _live(graph, params)
        self.opset = graph.opset
        self.targets = [n.outputs[0].name for n in graph.nodes if n.op in NORMS and id(n.outputs[0]) in live]
        self.targets += [t.name for t in graph.outputs if id(t) in live and t.name not in self.targets]
        wanted = {n for n in self.targets}
        self.nodes = []
        for node in reversed(graph.nodes):
            if not any(t.name in wanted for t in node.outputs):
                continue
            inputs = [t for t in node.inputs if id(t) in live]
            if not inputs:
                continue
            if node.domain not in STANDARD_DOMAINS or node.op not in GRADIENTS:
                raise Unsupported(f"{node.op} ({node.name}) has no gradient here")
            if any(t.name in wanted for t in node.outputs[1:]):
                raise Unsupported(f"{node.op} ({node.name}): only its first output has a gradient here")
            self.nodes.append(node)
            wanted.update(t.name for t in inputs)
        self.live = {t.name for n in self.nodes for t in n.inputs + n.outputs if id(t) in live}
        self.constants = {t.name: np.asarray(values(t)) for n in self.nodes for t in n.inputs
                          if isinstance(t, gs.Constant) and t.name not in params}
        fed = {t.name for t in graph.inputs}
        self.fetch = sorted({t.name for n in self.nodes for t in n.inputs + n.outputs
                             if t.name and not isinstance(t, gs.Constant) and t.name not in fed} | set(self.targets))

    def backward(self, vals: dict, seeds: dict, pending: dict | None = None) -> dict[str, np.ndarray]:
        """name -> gradient of the loss, for every live tensor (params included), from `seeds`
        (the loss's gradient at the targets) through the plan's nodes. With `pending`, a 2-D
        param a MatMul reads as its weight gets no gradient here: the MatMul's input and output
        gradient, as rows, go to pending[name] (`weight_gradients` then takes a batch's rows in
        one product, far cheaper than one small product per sample)."""
        grads = dict(seeds)
        for node in self.nodes:
            g = grads.get(node.outputs[0].name)
            if g is None:
                continue
            xs = [None if not t.name else vals[t.name] if t.name in vals else self.constants.get(t.name)
                  for t in node.inputs]
            ys = [vals.get(t.name) for t in node.outputs]
            need = [t.name in self.live for t in node.inputs]
            if pending is not None and node.op == "MatMul" and node.inputs[1].name in pending and xs[1].ndim == 2:
                pending[node.inputs[1].name].append((xs[0].reshape(-1, xs[0].shape[-1]), g.reshape(-1, g.shape[-1])))
                need[1] = False
            for t, d in zip(node.inputs, GRADIENTS[node.op](node, xs, ys, g, need, self.opset)):
                if d is not None and t.name in self.live:
                    grads[t.name] = grads[t.name] + d if t.name in grads else d
        return grads


def weight_gradients(pending: dict) -> dict[str, np.ndarray]:
    """The gradients of the weights `Plan.backward` deferred: X^T G over all rows gathered."""
    return {n: np.concatenate([x for x, _ in rows]).T @ np.concatenate([g for _, g in rows])
            for n, rows in pending.items() if rows}


def _fit(g: np.ndarray, shape) -> np.ndarray:
    """g summed over the axes it was broadcast along to reach `shape`."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _same(node, xs, ys, g, need, opset):  # Reshape, Flatten, Squeeze, Unsqueeze, Identity
    return [g.reshape(xs[0].shape)] + [None] * (len(xs) - 1)


def _expand(node, xs, ys, g, need, opset):
    return [_fit(g, xs[0].shape), None]


def _add(node, xs, ys, g, need, opset):
    return [_fit(g, x.shape) if n else None for x, n in zip(xs, need)]


def _sub(node, xs, ys, g, need, opset):
    return [_fit(g, xs[0].shape) if need[0] else None, _fit(-g, xs[1].shape) if need[1] else None]


def _mul(node, xs, ys, g, need, opset):
    a, b = xs
    return [_fit(g * b, a.shape) if need[0] else None, _fit(g * a, b.shape) if need[1] else None]


def _div(node, xs, ys, g, need, opset):
    a, b = xs
    return [_fit(g / b, a.shape) if need[0] else None, _fit(-g * a / (b * b), b.shape) if need[1] else None]


def _neg(node, xs, ys, g, need, opset):
    return [-g]


def _matmul(node, xs, ys, g, need, opset):
    a, b = xs
    if a.ndim < 2 or b.ndim < 2:
        raise Unsupported("MatMul of a 1-D tensor")
    da = _fit(g @ np.swapaxes(b, -1, -2), a.shape) if need[0] else None
    db = None
    if need[1]:
        if b.ndim == 2:
            db = a.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
        else:
            db = _fit(np.swapaxes(a, -1, -2) @ g, b.shape)
    return [da, db]


def _gemm(node, xs, ys, g, need, opset):
    a, b = xs[0], xs[1]
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    ta, tb = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
    a2, b2 = (a.T if ta else a), (b.T if tb else b)
    out = [None] * len(xs)
    if need[0]:
        d = alpha * g @ b2.T
        out[0] = d.T if ta else d
    if need[1]:
        d = alpha * a2.T @ g
        out[1] = d.T if tb else d
    if len(xs) > 2 and need[2]:
        out[2] = _fit(beta * g, xs[2].shape)
    return out


def _transpose(node, xs, ys, g, need, opset):
    perm = node.attrs.get("perm") or list(range(g.ndim))[::-1]
    return [np.transpose(g, np.argsort(perm))]


def _layer_norm(node, xs, ys, g, need, opset):
    x, scale = xs[0], xs[1]
    axis = node.attrs.get("axis", -1) % x.ndim
    axes = tuple(range(axis, x.ndim))
    eps = node.attrs.get("epsilon", 1e-5)
    mu = x.mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    out = [None] * len(xs)
    if need[0]:
        d = g * scale
        out[0] = rstd * (d - d.mean(axis=axes, keepdims=True) - xhat * (d * xhat).mean(axis=axes, keepdims=True))
    if need[1]:
        out[1] = _fit(g * xhat, scale.shape)
    if len(xs) > 2 and xs[2] is not None and need[2]:
        out[2] = _fit(g, xs[2].shape)
    return out


def _softmax(node, xs, ys, g, need, opset):
    y = ys[0]
    if opset >= 13:
        axis = node.attrs.get("axis", -1)
        return [y * (g - (g * y).sum(axis=axis, keepdims=True))]
    axis = node.attrs.get("axis", 1) % y.ndim  # before 13: over all axes from `axis`, as one
    y2, g2 = y.reshape(int(np.prod(y.shape[:axis])), -1), g.reshape(int(np.prod(y.shape[:axis])), -1)
    return [(y2 * (g2 - (g2 * y2).sum(axis=1, keepdims=True))).reshape(y.shape)]


def _erf(node, xs, ys, g, need, opset):
    return [g * (2.0 / math.sqrt(math.pi)) * np.exp(-xs[0] * xs[0])]


def _gelu(node, xs, ys, g, need, opset):
    x = xs[0].astype(np.float64)
    if node.attrs.get("approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = np.tanh(c * (x + 0.044715 * x ** 3))
        slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    else:  # 0.5 (1 + erf(x / sqrt 2)) + x phi(x), the first read off the output (numpy has no erf)
        tiny = np.abs(x) < 1e-6
        first = np.where(tiny, 0.5, ys[0].astype(np.float64) / np.where(tiny, 1.0, x))
        slope = first + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return [(g * slope).astype(np.float32)]


def _slice(node, xs, ys, g, need, opset):
    x = xs[0]
    if opset < 10:
        starts, ends, axes, steps = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes"), None
    else:
        starts, ends = xs[1].tolist(), xs[2].tolist()
        axes = xs[3].tolist() if len(xs) > 3 and xs[3] is not None else None
        steps = xs[4].tolist() if len(xs) > 4 and xs[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.ndim
    for a, b, e, step in zip(axes, starts, ends, steps):
        index[a % x.ndim] = slice(b, e, step)
    d = np.zeros_like(x)
    d[tuple(index)] = g
    return [d] + [None] * (len(xs) - 1)


def _gather(node, xs, ys, g, need, opset):
    x, idx = xs
    axis = node.attrs.get("axis", 0) % x.ndim
    idx = np.where(idx < 0, idx + x.shape[axis], idx).ravel()
    d = np.zeros_like(x)
    np.add.at(d, (slice(None),) * axis + (idx,), g.reshape(x.shape[:axis] + (idx.size,) + x.shape[axis + 1:]))
    return [d, None]


def _tanh(node, xs, ys, g, need, opset):
    return [g * (1.0 - ys[0] * ys[0])]


def _sigmoid(node, xs, ys, g, need, opset):
    return [g * ys[0] * (1.0 - ys[0])]


def _relu(node, xs, ys, g, need, opset):
    return [g * (xs[0] > 0)]


def _sqrt(node, xs, ys, g, need, opset):
    return [g * 0.5 / ys[0]]


def _exp(node, xs, ys, g, need, opset):
    return [g * ys[0]]


def _pow(node, xs, ys, g, need, opset):
    if need[1]:
        raise Unsupported("Pow with a trained exponent")
    x, p = xs
    return [_fit(g * p * np.power(x, p - 1), x.shape), None]


def _reduce_axes(node, xs) -> tuple[tuple[int, ...], bool]:
    axes = node.attrs.get("axes")
    if axes is None and len(xs) > 1 and xs[1] is not None:
        axes = [int(a) for a in np.asarray(xs[1]).ravel()]
    ndim = xs[0].ndim
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            raise Unsupported(f"{node.op} with no axes and noop_with_empty_axes")
        axes = range(ndim)
    return tuple(sorted(a % ndim for a in axes)), bool(node.attrs.get("keepdims", 1))


def _kept(g, axes, keepdims):
    return g if keepdims else np.expand_dims(g, axes)


def _reduce_sum(node, xs, ys, g, need, opset):
    axes, keep = _reduce_axes(node, xs)
    return [np.broadcast_to(_kept(g, axes, keep), xs[0].shape).copy()] + [None] * (len(xs) - 1)


def _reduce_mean(node, xs, ys, g, need, opset):
    axes, keep = _reduce_axes(node, xs)
    count = int(np.prod([xs[0].shape[a] for a in axes]))
    return [np.broadcast_to(_kept(g, axes, keep) / count, xs[0].shape).copy()] + [None] * (len(xs) - 1)


def _reduce_l2(node, xs, ys, g, need, opset):
    axes, keep = _reduce_axes(node, xs)
    x = xs[0]
    y = _kept(ys[0], axes, keep)
    ratio = np.divide(x, y, out=np.zeros_like(x), where=y != 0)
    return [_kept(g, axes, keep) * ratio] + [None] * (len(xs) - 1)


def _clip(node, xs, ys, g, need, opset):
    x = xs[0]
    lo = node.attrs.get("min") if opset < 11 else (xs[1] if len(xs) > 1 else None)
    hi = node.attrs.get("max") if opset < 11 else (xs[2] if len(xs) > 2 else None)
    inside = np.ones(x.shape, bool)
    if lo is not None:
        inside &= x >= lo
    if hi is not None:
        inside &= x <= hi
    return [g * inside] + [None] * (len(xs) - 1)


def _where(node, xs, ys, g, need, opset):
    c = xs[0]
    return [None, _fit(np.where(c, g, 0), xs[1].shape) if need[1] else None,
            _fit(np.where(c, 0, g), xs[2].shape) if need[2] else None]


def _concat(node, xs, ys, g, need, opset):
    axis = node.attrs["axis"] % g.ndim
    cuts = np.cumsum([x.shape[axis] for x in xs])[:-1]
    return np.split(g, cuts, axis=axis)


def _sum(node, xs, ys, g, need, opset):
    return [_fit(g, x.shape) if n else None for x, n in zip(xs, need)]


def _cast(node, xs, ys, g, need, opset):
    if ys[0] is not None and ys[0].dtype != np.float32 or xs[0].dtype != np.float32:
        raise Unsupported("Cast away from float32")
    return [g]


GRADIENTS = {
    "Add": _add, "Sub": _sub, "Mul": _mul, "Div": _div, "Sum": _sum, "Neg": _neg,
    "MatMul": _matmul, "Gemm": _gemm, "Transpose": _transpose,
    "Reshape": _same, "Flatten": _same, "Squeeze": _same, "Unsqueeze": _same, "Identity": _same,
    "Expand": _expand, "Concat": _concat, "Where": _where, "Cast": _cast, "Slice": _slice, "Gather": _gather,
    "LayerNormalization": _layer_norm, "Softmax": _softmax,
    "Erf": _erf, "Gelu": _gelu, "Tanh": _tanh, "Sigmoid": _sigmoid, "Relu": _relu,
    "Sqrt": _sqrt, "Exp": _exp, "Pow": _pow,
    "ReduceSum": _reduce_sum, "ReduceMean": _reduce_mean, "ReduceL2": _reduce_l2, "Clip": _clip,
}


def loss_seeds(student: dict, teacher: dict, names: list[str]) -> tuple[float, dict]:
    """The loss, the sum over `names` of mean((s - t)^2) / mean(t^2), and its gradient at each."""
    total, seeds = 0.0, {}
    for name in names:
        s, t = student[name], teacher[name]
        scale = 1.0 / (float(np.mean(t.astype(np.float64) ** 2)) * t.size + 1e-12)
        d = s - t
        total += float(np.sum(d.astype(np.float64) ** 2)) * scale
        seeds[name] = (2.0 * scale) * d
    return total, seeds


def distill(model, teacher, nodes: list[gs.Node], samples: list[dict], score, ctx,
            epochs: int = EPOCHS, rate: float = LEARNING_RATE) -> dict | None:
    """Train `model` (the pruned copy of `teacher`; `nodes` its pruned linear nodes) in place
    toward `teacher` on `samples`, keeping each weight's zeros; score(model) -> the held-back
    measure. Returns what the report says of the kept result (its score as `score`), or None
    where nothing was trained or nothing measured better (`model` then as it was)."""
    if len(samples) < MIN_SAMPLES:
        ctx.log(f"prune: distillation needs at least {MIN_SAMPLES} calibration samples (have {len(samples)}): "
                "not run")
        return None
    graph = model.graph
    try:
        kinds = trainable(graph, nodes)
        plan = Plan(graph, set(kinds))
    except Unsupported as e:
        ctx.log(f"prune: distillation not run: {e}")
        return None
    if not plan.targets:
        ctx.log("prune: distillation not run: no output or LayerNormalization depends on the pruned weights")
        return None
    tensors = graph.tensors()
    size = sum(int(np.prod(tensors[n].shape)) for n in kinds)
    if size > MAX_PARAMS:
        ctx.log(f"prune: distillation not run: {size} values to train (at most {MAX_PARAMS} here)")
        return None
    params = {n: np.asarray(values(tensors[n]), np.float32).copy() for n in kinds}
    masks = {n: params[n] != 0 for n, k in kinds.items() if k == "weight"}
    before = score(model)
    best, kept, chosen = before, None, 0
    m1 = {n: np.zeros_like(p) for n, p in params.items()}
    m2 = {n: np.zeros_like(p) for n, p in params.items()}
    steps = epochs * math.ceil(len(samples) / BATCH)
    step = 0
    rng = np.random.default_rng(0)
    with (tapped(teacher, plan.targets, spin=False) as targets,  # no spinning: numpy runs between runs
          tapped(with_inputs(model, params), plan.fetch, spin=False) as forward):
        for epoch in range(epochs):
            start, total = time.time(), 0.0
            order = rng.permutation(len(samples))
            for i in range(0, len(order), BATCH):
                grads = {n: np.zeros_like(p) for n, p in params.items()}
                pending = {n: [] for n in masks}
                batch = order[i:i + BATCH]
                for j in batch:
                    feeds = {**samples[j], **params}
                    vals = forward(feeds)
                    loss, seeds = loss_seeds(vals, targets(samples[j]), plan.targets)
                    total += loss
                    vals.update(feeds)
                    try:
                        got = plan.backward(vals, seeds, pending)
                    except Unsupported as e:
                        ctx.log(f"prune: distillation not run: {e}")
                        return None
                    for n in params:
                        if n in got:
                            grads[n] += _fit(got[n], params[n].shape)
                for n, g in weight_gradients(pending).items():
                    grads[n] += g
                step += 1
                lr = rate * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
                c1, c2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
                for n, p in params.items():
                    g = grads[n]
                    g /= len(batch)
                    m, v = m1[n], m2[n]
                    m *= BETAS[0]
                    m += (1 - BETAS[0]) * g
                    v *= BETAS[1]
                    v += (1 - BETAS[1]) * g * g
                    p -= (lr / c1) * m / (np.sqrt(v / c2) + EPS)
                    if n in masks:
                        p *= masks[n]
            trial = copy_model(model)
            _set(trial.graph, params)
            now = score(trial)
            ctx.log(f"prune: distillation epoch {epoch + 1}/{epochs}: loss {total / len(samples):.6f}, "
                    f"held-back score {now:.6f} ({time.time() - start:.0f} s)")
            if now > best:  # every epoch runs: the first ones, at the highest rate, may measure worse
                best, kept, chosen = now, {n: p.copy() for n, p in params.items()}, epoch + 1
    if kept is None:
        ctx.log(f"prune: distillation on {len(samples)} samples measured no better than {before:.6f}: not kept")
        return None
    _set(graph, kept)
    ctx.log(f"prune: distilled ({len(kept)} tensors trained on {len(samples)} samples, epoch {chosen} kept): "
            f"held-back score {before:.6f} -> {best:.6f}")
    return {"samples": len(samples), "tensors": len(kept), "values": size, "epochs": chosen,
            "score_before": round(before, 6), "score": round(best, 6)}


def _set(graph: gs.Graph, params: dict) -> None:
    """Point the graph's constants named in `params` at new Constants holding those values (a
    copied graph shares the old ones)."""
    for node in graph.nodes:
        for k, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and t.name in params:
                node.inputs[k] = gs.Constant(t.name, params[t.name].copy())


def with_inputs(model, params: dict):
    """A copy of the model whose constants named in `params` (name -> value) are graph inputs."""
    m = copy_model(model)
    swap = {name: gs.Variable(name, dtype=np.float32, shape=list(p.shape)) for name, p in params.items()}
    m.graph.inputs.extend(swap.values())
    for node in m.graph.nodes:
        for k, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and t.name in swap:
                node.inputs[k] = swap[t.name]
    return m
