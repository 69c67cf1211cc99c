"""Small test graphs, written as ONNX text, and helpers to check an optimized model against the
original with onnxruntime (its own graph optimizations off).

    m = from_text('''
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) { y = Identity(x) }
    ''')
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnx.parser

import onnxopt
from onnxopt.verify import run_model

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_MODEL = os.path.join(HERE, "ch_ppocr_mobile_v2.0_cls_infer.onnx")
SAMPLE_SHAPE = "x=1x3x48x192"


def from_text(text: str, check: bool = True) -> onnx.ModelProto:
    """Parse ONNX text into a model (and run onnx.checker on it)."""
    model = onnx.parser.parse_model(text)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, folder: str, name: str = "model.onnx") -> str:
    path = os.path.join(folder, name)
    onnx.save(model, path)
    return path


# the nodes fuse's masked_keys adds for one mask and one attention node (passes/fuse/masked_keys.py)
MASKED_KEYS_OPS = {"ReduceMax": 2, "Greater": 1, "LessOrEqual": 1, "Or": 1, "Cast": 1, "Reshape": 1, "Where": 1,
                   "Mul": 1}


def op_counts(model: onnx.ModelProto) -> Counter:
    """Op types of the main graph's nodes."""
    return Counter(n.op_type for n in model.graph.node)


def ops(model: onnx.ModelProto) -> list[str]:
    """The main graph's op sequence, in order."""
    return [n.op_type for n in model.graph.node]


def random_feeds(model: onnx.ModelProto, seed: int = 0, shapes: dict | None = None) -> dict[str, np.ndarray]:
    """Feeds for every non-initializer input: normal floats, ones for ints and bools."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = (shapes or {}).get(vi.name) or [d.dim_value if d.dim_value > 0 else 2 for d in tt.shape.dim]
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.ones(shape, dtype=dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """onnxruntime CPU, graph optimizations off."""
    with tempfile.TemporaryDirectory() as tmp:
        return run_model(save(model, tmp), feeds)


def runtime_ops(model: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """The op sequence of onnxruntime's own optimized graph of a model (CPU, all its fusions on)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "runtime.onnx")
        options.log_severity_level = 4
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return ops(onnx.load(options.optimized_model_filepath))


def optimize_checked(model: onnx.ModelProto, passes, feeds: dict | None = None, exact: bool = False, **kwargs):
    """Optimize a ModelProto, then assert: onnx.checker passes, onnxruntime loads the result, and its
    outputs equal the original's (bitwise with exact=True, else rtol 1e-4 / atol 1e-5).
    Returns (optimized model, result)."""
    result = onnxopt.optimize(model, passes=passes, verify="none", **kwargs)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    feeds = feeds if feeds is not None else random_feeds(model)
    want, got = run(model, feeds), run(out, feeds)
    assert list(want) == list(got)
    for name in want:
        assert want[name].dtype == got[name].dtype and want[name].shape == got[name].shape, name
        if exact:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    return out, result
