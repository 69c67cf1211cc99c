"""Intermediate activations of the float model on calibration samples.

`observe` runs a copy of the model whose chosen tensors are also graph outputs, one sample at a
time, and hands each sample's values to a callback, so statistics are gathered without holding
every sample's activations.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import verify as verification
from onnxopt.graph import export_model, subgraphs

from .budget import copy_model


def observe(model, names: list[str], samples: list[dict], each: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Call `each({name: value})` for every sample, with the float model's values of `names`."""
    with tapped(model, names) as run:
        for feeds in samples:
            each(run(feeds))


@contextmanager
def tapped(model, names: list[str], spin: bool = True) -> Iterator[Callable[[dict], dict[str, np.ndarray]]]:
    """A session of a copy of `model` whose tensors `names` are also outputs: yields
    run(feeds) -> {name: value} for one sample (spin: `verify.reference_session`'s)."""
    m = copy_model(model)
    tensors = m.graph.tensors()
    have = {t.name for t in m.graph.outputs}
    for name in names:
        t = tensors[name]
        if name not in have:
            if t.dtype is None:
                t.dtype = np.float32
            m.graph.outputs.append(t)
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
        path = verification.write_for_runtime(export_model(m), tmp, consume=True)
        del m
        session = verification.reference_session(path, spin)
        wanted = {i.name for i in session.get_inputs()}

        def run(feeds: dict) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))

        yield run


CACHE_BYTES = 1 << 30  # Forward keeps at most this many bytes of activations in memory over all samples


class Forward:
    """Runs a model forward over the samples a segment at a time, for passes that change weights
    as they go (teacher.py prunes a stage, then needs the next stage's inputs): `step(model,
    names)` runs only the nodes the named tensors need that no earlier step ran, from the values
    it kept, and keeps per sample the values that nodes not run yet read. A value is final once
    computed, so the caller may change only weights of nodes no step has run yet (a stage's own
    sites, which are never upstream of the tensors a step is asked for). The same kernels run as
    in a whole-model run, so the values are the same.

    Values past CACHE_BYTES in memory (large feature maps, or many samples) go to a temporary
    file, one per step, read back a sample at a time and deleted once no node left reads them.
    A graph whose nodes hold subgraphs (which read outer values unseen) runs each step from the
    graph inputs."""

    def __init__(self, samples: list[dict], limit: int = CACHE_BYTES):
        self.samples, self.limit = samples, limit
        self.kept: list[dict] | None = [{} for _ in samples]  # per sample: tensor name -> value
        self.done: set[int] = set()  # positions in graph.nodes run by earlier steps
        self.open = False  # a step has started and not yet done its bookkeeping
        self.size = 0  # bytes of kept values in memory
        self.disk: tempfile.TemporaryDirectory | None = None  # the spill files
        self.files: list[Path] = []  # spill files that kept values may still point into
        self.spills = 0  # spill files made so far

    def step(self, model, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Yield {name: value} per sample, in the samples' order. The bookkeeping is done before
        the last sample's values are yielded, so a consumer that stops there (zip over two
        steps never resumes the second) leaves nothing undone; one that stops earlier leaves the
        kept values partial, and the next step starts over from the graph inputs."""
        graph = model.graph
        if self.open or (self.kept is not None and any(True for n in graph.nodes for _ in subgraphs(n))):
            self._drop()
        self.open = False
        if self.kept is None:
            with tapped(model, names) as run:
                for feeds in self.samples:
                    yield run(feeds)
            return
        at = {id(n): i for i, n in enumerate(graph.nodes)}
        tensors = graph.tensors()
        fed = {t.name for t in graph.inputs}
        have = set(self.kept[0]) | fed
        segment, todo = set(), [tensors[n] for n in names]
        while todo:
            t = todo.pop()
            if t.name in have or isinstance(t, gs.Constant) or not t.inputs:
                continue
            i = at[id(t.inputs[0])]
            if i not in segment:
                segment.add(i)
                todo.extend(graph.nodes[i].inputs)
        if not segment:
            for feeds, kept in zip(self.samples, self.kept):
                yield {n: _load(kept[n]) if n in kept else feeds[n] for n in names}
            return
        run_nodes = [graph.nodes[i] for i in sorted(segment)]
        read = {t.name for n in run_nodes for t in n.inputs if t.name in have}
        later = self.done | segment
        # a name asked for again while kept (a later node still reads it) is served from `kept`:
        # only what the segment makes is an output of its model
        made = {t.name for n in run_nodes for t in n.outputs}
        out = {n for n in names if n in made} | {t.name for n in run_nodes for t in n.outputs
                                                 if any(at.get(id(c), -1) not in later for c in t.outputs)}
        sub = copy_model(model)
        st = sub.graph.tensors()
        example = {**self.samples[0], **self.kept[0]}
        for name in read:
            t = st[name]
            if t.dtype is None:
                t.dtype = example[name].dtype
        inputs, outputs = sorted(read), sorted(out)
        sub.graph.inputs = [st[n] for n in inputs]
        sub.graph.outputs = [st[n] for n in outputs]
        sub.graph.nodes = [sub.graph.nodes[i] for i in sorted(segment)]
        for t in sub.graph.outputs:
            if t.dtype is None:
                t.dtype = np.float32
        with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
            session = verification.reference_session(
                verification.write_for_runtime(export_model(sub), tmp, consume=True))
            del sub
            self.open = True
            given = (set(inputs) | set(names)) - made  # from kept values or the feeds, as for every sample
            spill = None
            try:
                for k, (feeds, kept) in enumerate(zip(self.samples, self.kept)):
                    values = {n: _load(kept[n]) if n in kept else feeds[n] for n in given}
                    got = dict(zip(outputs, session.run(outputs, {n: values[n] for n in inputs})))
                    for name, v in got.items():
                        if self.size + v.nbytes <= self.limit:
                            kept[name] = v
                            self.size += v.nbytes
                        else:
                            if spill is None:
                                spill = self._spill_file()
                            kept[name] = _OnDisk.write(spill, v)
                    result = {n: got[n] if n in got else values[n] for n in names}
                    if k == len(self.samples) - 1:
                        if spill is not None:
                            spill.close()
                            spill = None
                        self._finish(graph, segment)
                    yield result
            finally:
                if spill is not None:
                    spill.close()

    def _spill_file(self):
        if self.disk is None:
            self.disk = tempfile.TemporaryDirectory(prefix="onnxopt-forward-")
        path = Path(self.disk.name) / f"{self.spills}.bin"  # a new name: an older file may still be read
        self.spills += 1
        self.files.append(path)
        return open(path, "wb")

    def _finish(self, graph, segment: set[int]) -> None:
        """After a step: its nodes are done, and only values that nodes not run yet read stay
        kept; spill files nothing kept points into any more are deleted."""
        self.open = False
        self.done |= segment
        wanted = {t.name for i, n in enumerate(graph.nodes) if i not in self.done for t in n.inputs}
        used = set()
        for kept in self.kept:
            for name in [n for n in kept if n not in wanted]:
                v = kept.pop(name)
                if isinstance(v, np.ndarray):
                    self.size -= v.nbytes
            used.update(v.path for v in kept.values() if isinstance(v, _OnDisk))
        for path in set(self.files) - used:
            path.unlink(missing_ok=True)
        self.files = [p for p in self.files if p in used]

    def _drop(self) -> None:
        """Nothing kept any more: every later step runs from the graph inputs."""
        self.kept, self.size, self.files = None, 0, []
        self.close()

    def close(self) -> None:
        """Delete the spill files (a `with` block does it on leaving)."""
        if self.disk is not None:
            self.disk.cleanup()
            self.disk = None

    def __enter__(self) -> "Forward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _OnDisk:
    """A kept value in a spill file: where its bytes are, read back on demand."""
    __slots__ = ("path", "offset", "shape", "dtype")

    def __init__(self, path: Path, offset: int, shape: tuple, dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype

    @classmethod
    def write(cls, f, v: np.ndarray) -> "_OnDisk":
        offset = f.tell()
        f.write(np.ascontiguousarray(v).tobytes())
        return cls(Path(f.name), offset, v.shape, v.dtype)

    def read(self) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        return np.fromfile(self.path, self.dtype, count, offset=self.offset).reshape(self.shape)


def _load(v):
    return v.read() if isinstance(v, _OnDisk) else v


def channel_rows(x: np.ndarray, limit: int = 4096) -> np.ndarray:
    """A [rows, channels] view of an activation whose last axis is the channel (at most `limit`
    rows, evenly spaced)."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).astype(int)]
    return rows.astype(np.float32, copy=False)


DAMP = 0.01  # fraction of H's mean diagonal added to it (GPTQ's and SparseGPT's dampening)


def input_products(model, names: list[str], samples: list[dict]) -> dict[str, np.ndarray]:
    """X^T X [K, K] of each named tensor (channels on its last axis) over the samples: the H that
    GPTQ and SparseGPT compensate errors through."""
    grams: dict[str, Gram] = {}

    def add(outs):
        for name, x in outs.items():
            grams.setdefault(name, Gram()).add(channel_rows(x, 1 << 16))

    observe(model, sorted(set(names)), samples, add)
    return {name: g.total()[0] for name, g in grams.items()}


class Gram:
    """A^T A (and A^T B, or A^T (B R) for a fixed R) summed in float64 over row blocks, gathered up
    to `flush_rows` rows before each product: a product per short sample (a sentence's tokens)
    costs far more, the more so between onnxruntime runs whose threads still spin."""

    def __init__(self, flush_rows: int = 4096, right: np.ndarray | None = None):
        self.aa, self.ab = 0.0, 0.0
        self.pending: list[tuple] = []
        self.rows, self.flush_rows, self.right = 0, flush_rows, right

    def add(self, a: np.ndarray, b: np.ndarray | None = None) -> None:
        self.pending.append((a, b))
        self.rows += len(a)
        if self.rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        a = np.concatenate([p[0] for p in self.pending]).astype(np.float64)
        self.aa = self.aa + a.T @ a
        if self.pending[0][1] is not None:
            b = np.concatenate([p[1] for p in self.pending]).astype(np.float64)
            self.ab = self.ab + a.T @ (b if self.right is None else b @ self.right)
        self.pending, self.rows = [], 0

    def total(self) -> tuple[np.ndarray, np.ndarray | float]:
        """(A^T A, A^T B; 0.0 where no B was given)."""
        self._flush()
        return self.aa, self.ab


def damped(h: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(H padded with zeros to [k, k], inputs that never varied (zero diagonal, and the padding)
    given a unit diagonal and the whole damped by DAMP of its mean diagonal; the dead inputs)."""
    hh = np.zeros((k, k))
    hh[:h.shape[0], :h.shape[0]] = h
    dead = np.diag(hh) == 0
    hh[dead, dead] = 1.0
    hh += DAMP * np.mean(np.diag(hh)) * np.eye(k)
    return hh, dead


def inverse_factor(h: np.ndarray, k: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(the upper Cholesky factor of H^-1 for H [<=k, <=k] damped as `damped` does, or None where
    H stays singular; the dead inputs)."""
    hh, dead = damped(h, k)
    try:
        return np.linalg.cholesky(np.linalg.inv(hh)).T, dead
    except np.linalg.LinAlgError:
        return None, dead


GPTQ_BATCH = 128  # columns updated together (GPTQ's lazy batch); a multiple of int4's 32-wide blocks


def gptq_columns(wt: np.ndarray, u: np.ndarray, round_column) -> None:
    """GPTQ's loop over the columns of wt [N, K] (float64, a row per output, updated in place):
    `round_column(col, batch, i)` returns column `col`'s rounded (dequantized) values, `batch`
    being the current batch of columns as compensated so far and `i` the column's place in it;
    its error is compensated in the columns not yet rounded through u, the upper Cholesky factor
    of H^-1 (`inverse_factor`), lazily a batch at a time."""
    n, k = wt.shape
    for i1 in range(0, k, GPTQ_BATCH):
        i2 = min(i1 + GPTQ_BATCH, k)
        w1, err1, u1 = wt[:, i1:i2], np.zeros((n, i2 - i1)), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            err = (w1[:, i] - round_column(i1 + i, w1, i)) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        wt[:, i2:] -= err1 @ u[i1:i2, i2:]


def conv_patches(x: np.ndarray, node, limit: int = 4096) -> list[np.ndarray] | None:
    """The rows a 2-D Conv's weight multiplies: for each group, [rows, C/g * kh * kw] (its input
    channels, then the kernel window, as the weight [M, C/g, kh, kw] flattens); at most `limit`
    output positions, evenly spaced. None for a Conv this does not cover (not 2-D, auto_pad)."""
    a = node.attrs
    if x.ndim != 4 or a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    kh, kw = node.inputs[1].shape[2:]
    sh, sw = a.get("strides", [1, 1])
    dh, dw = a.get("dilations", [1, 1])
    p = a.get("pads", [0, 0, 0, 0])
    group = a.get("group", 1)
    x = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, OH, OW, kh, kw], a view
    n, c, oh, ow = win.shape[:4]
    at = np.linspace(0, n * oh * ow - 1, min(limit, n * oh * ow)).astype(int)
    i, rest = np.divmod(at, oh * ow)
    rows = win[i, :, rest // ow, rest % ow]  # [R, C, kh, kw]
    cg = c // group
    return [rows[:, g * cg:(g + 1) * cg].reshape(len(at), -1).astype(np.float64) for g in range(group)]


def weight_products(model, nodes: dict[int, object], samples: list[dict]) -> dict[int, list[np.ndarray]]:
    """X^T X of the rows each weighted node's weight multiplies, over the samples: one per group
    for a Conv (`conv_patches`), one for Gemm/MatMul (the input's last axis). nodes: position ->
    node; a Conv `conv_patches` does not cover is left out."""
    products: dict[int, list[np.ndarray]] = {}
    readers: dict[str, list[int]] = {}
    for i, node in nodes.items():
        readers.setdefault(node.inputs[0].name, []).append(i)

    def add(outs):
        for name, x in outs.items():
            for i in readers[name]:
                node = nodes[i]
                if node.op == "Conv":
                    groups = conv_patches(x, node)
                    if groups is None:
                        continue
                else:
                    groups = [channel_rows(x, 1 << 16).astype(np.float64)]
                have = products.get(i)
                products[i] = [r.T @ r + (have[g] if have else 0) for g, r in enumerate(groups)]

    observe(model, sorted(readers), samples, add)
    return products
