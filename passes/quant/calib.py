"""Intermediate activations of the float model on calibration samples.

`observe` runs a copy of the model whose chosen tensors are also graph outputs, one sample at a
time, and hands each sample's values to a callback, so statistics are gathered without holding
every sample's activations.
"""

from __future__ import annotations

import tempfile
from typing import Callable

import numpy as np

from onnxopt import verify as verification
from onnxopt.graph import export_model

from .budget import copy_model


def observe(model, names: list[str], samples: list[dict], each: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Call `each({name: value})` for every sample, with the float model's values of `names`."""
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
        session = verification.reference_session(path)
        wanted = {i.name for i in session.get_inputs()}
        for feeds in samples:
            outs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
            each(dict(zip(names, outs)))


def channel_rows(x: np.ndarray, limit: int = 4096) -> np.ndarray:
    """A [rows, channels] view of an activation whose last axis is the channel (at most `limit`
    rows, evenly spaced)."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).astype(int)]
    return rows.astype(np.float32, copy=False)
