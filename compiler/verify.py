"""Verification against onnxruntime: input generation, reference runs, error metrics.

The reference is onnxruntime on CPU with its own graph optimizations off (ORT_DISABLE_ALL), so it
does not fuse for us and hide a bug. Models reach it through files, so the 2 GB protobuf limit never
applies.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import UsageError

TOLERANCES = {"fp32": (1e-4, 1e-5), "exact": (0.0, 0.0)}

# Ops through which an integer input keeps its meaning (indices stay indices).
_TRANSPARENT = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Transpose"}
# (op, input slot) pairs where an integer tensor is a shape, a size or an index we cannot bound.
_SHAPE_SLOTS = {("Reshape", 1), ("Expand", 1), ("Tile", 1), ("ConstantOfShape", 0), ("Range", 0),
                ("Range", 1), ("Range", 2), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4),
                ("TopK", 1), ("Resize", 3), ("Pad", 1), ("OneHot", 0), ("OneHot", 1), ("GatherND", 1),
                ("ScatterND", 1), ("ScatterElements", 1), ("Scatter", 1), ("Upsample", 1), ("Trilu", 1)}


@dataclass
class OutputMetrics:
    name: str
    max_abs: float
    max_rel: float
    cosine: float  # over several samples: the mean of the samples' cosines
    ok: bool
    note: str = ""
    worst_cosine: float | None = None  # the lowest sample's cosine, over several samples
    samples: int = 1
    # for an output a Softmax or LogSoftmax computes (`argmax_axes`): the fraction of its argmaxes
    # (one per position along the other axes) that agree with the reference's, over all samples
    # (`argmax_agreement`: the original's close calls aside)
    agreement: float | None = None
    positions: int = 0  # how many argmaxes `agreement` counts
    plain_agreement: float | None = None  # the same, every changed argmax counted (--min-agreement)

    def as_dict(self):
        return asdict(self)

    def miss(self) -> str:
        """How it missed a budget: its note, or its cosine (and argmax agreement)."""
        if self.note:
            return self.note
        if self.agreement is None:
            return f"cosine {self.cosine:.6f}"
        return (f"cosine {self.cosine:.6f}, argmax agreement {self.plain_agreement:.4f} "
                f"({self.agreement:.4f} with the original's close calls aside)")


# ----------------------------------------------------------------------------------- inputs


def parse_input_shapes(items) -> dict[str, list[int]]:
    """`NAME=1x3x224x224` (or `NAME=1,3,224,224`) into {NAME: [1, 3, 224, 224]}."""
    shapes = {}
    for item in items or ():
        m = re.fullmatch(r"\s*([^=]+?)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)?\s*", item)
        if not m:
            raise UsageError(f"bad --input-shape {item!r}: expected NAME=DxDx... such as x=1x3x224x224")
        dims = re.split(r"\s*[x,]\s*", m.group(2)) if m.group(2) else []
        shapes[m.group(1)] = [int(d) for d in dims]
    return shapes


def load_inputs(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UsageError(f"--inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds for bad files
        raise UsageError(f"--inputs {path} is not a readable .npz file: {e}") from None


def load_calibration(source, graph: gs.Graph) -> list[dict[str, np.ndarray]]:
    """Calibration samples as feed dicts: an .npz with one array per graph input whose first axis
    is the sample, a folder of .npz files with one sample each, or (from Python) any iterable of
    feed dicts. Every sample must feed every graph input."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
            if not files:
                raise UsageError(f"--calibration-data folder has no .npz files: {path}")
            samples = [load_inputs(os.path.join(path, f)) for f in files]
        elif os.path.isfile(path):
            arrays = load_inputs(path)
            counts = {len(a) if a.ndim else 0 for a in arrays.values()}
            if len(counts) != 1 or 0 in counts:
                raise UsageError(f"--calibration-data {path}: every array needs the same number of samples "
                                 "along its first axis")
            n = counts.pop()
            ranks = {t.name: len(t.shape) for t in graph_inputs(graph) if t.shape is not None}
            # the first axis is the sample: it is the batch axis when the array has the input's
            # own rank (a batch of 1 per sample), and dropped when it has one axis more
            samples = [{k: a[i] if ranks.get(k) == a.ndim - 1 else a[i:i + 1] for k, a in arrays.items()}
                       for i in range(n)]
        else:
            raise UsageError(f"--calibration-data not found: {path}")
    else:
        samples = [dict(s) for s in source]
    names = {t.name for t in graph_inputs(graph)}
    for i, sample in enumerate(samples):
        if set(sample) != names:
            raise UsageError(f"calibration sample {i} feeds {', '.join(sorted(sample)) or 'nothing'}; "
                             f"the model's inputs are {', '.join(sorted(names))}")
    if not samples:
        raise UsageError("--calibration-data holds no samples")
    return samples


def graph_inputs(graph: gs.Graph) -> list[gs.Tensor]:
    """The inputs a caller must feed (not initializers that are also listed as inputs)."""
    return [t for t in graph.inputs if not isinstance(t, gs.Constant)]


def make_inputs(graph: gs.Graph, shapes: dict[str, list[int]] | None = None,
                given: dict[str, np.ndarray] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every graph input: the user's arrays, else values generated from the input specs.

    Dynamic dimensions come from `shapes`; otherwise the same symbolic name gets the same size,
    the first axis 1 and the others 32. Float inputs are standard normal; integer inputs that index
    a constant table (Gather) are uniform over its rows; other integer inputs are ones; an integer
    input that feeds a shape or an index we cannot bound is refused with a clear message.
    """
    shapes = dict(shapes or {})
    given = dict(given or {})
    names = [t.name for t in graph_inputs(graph)]
    for name in list(shapes) + list(given):
        if name not in names:
            raise UsageError(f"model has no input named {name!r}; its inputs are: {', '.join(names)}")
    rng = np.random.default_rng(seed)
    symbols: dict[str, int] = {}
    feeds = {}
    for t in graph_inputs(graph):
        if t.name in given:
            feeds[t.name] = _check_given(t, given[t.name])
            continue
        if t.dtype is None:
            raise UsageError(f"input {t.name!r} has no type; give its values with --inputs FILE.npz")
        dtype = np.dtype(t.dtype)
        shape = _concrete_shape(t, shapes.get(t.name), symbols)
        if dtype.kind == "f":
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[t.name] = np.ones(shape, dtype=dtype)
        elif dtype.kind in "iu":
            bound = _index_bound(t)
            if bound is None:
                feeds[t.name] = np.ones(shape, dtype=dtype)
            else:
                feeds[t.name] = rng.integers(0, bound, size=shape).astype(dtype)
        else:
            raise UsageError(f"cannot generate values for input {t.name!r} of type {dtype}; use --inputs FILE.npz")
    return feeds


def _check_given(t: gs.Tensor, value) -> np.ndarray:
    """The user's array for input `t`, refused when its type, rank or a fixed dimension differs."""
    arr = np.asarray(value)
    try:
        want = np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        want = None
    if want is not None and arr.dtype != want:
        raise UsageError(f"--inputs {t.name}: type {arr.dtype} but the model expects {want}")
    if t.shape is not None:
        if arr.ndim != len(t.shape):
            raise UsageError(f"--inputs {t.name}: shape {list(arr.shape)} but the input has rank {len(t.shape)}")
        for axis, (got, dim) in enumerate(zip(arr.shape, t.shape)):
            if isinstance(dim, int) and dim >= 0 and got != dim:
                raise UsageError(f"--inputs {t.name}: shape {list(arr.shape)} but the model fixes axis {axis} "
                                 f"to {dim}")
    return arr


def _concrete_shape(t: gs.Tensor, override, symbols) -> list[int]:
    if override is not None:
        if t.shape is not None and len(override) != len(t.shape):
            raise UsageError(f"--input-shape {t.name}: rank {len(override)} but the input has rank {len(t.shape)}")
        for given, dim in zip(override, t.shape or ()):
            if isinstance(dim, int) and dim >= 0 and given != dim:
                raise UsageError(f"--input-shape {t.name}: dimension {given} but the model fixes it to {dim}")
        for given, dim in zip(override, t.shape or ()):
            if isinstance(dim, str) and dim:
                symbols.setdefault(dim, given)
        return list(override)
    if t.shape is None:
        raise UsageError(f"input {t.name!r} has unknown rank; give --input-shape {t.name}=DxD...")
    shape = []
    for axis, dim in enumerate(t.shape):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim and dim in symbols:
            shape.append(symbols[dim])
        else:
            size = 1 if axis == 0 else 32
            if isinstance(dim, str) and dim:
                symbols[dim] = size
            shape.append(size)
    return shape


def _index_bound(t: gs.Tensor) -> int | None:
    """For an integer input: the row count of the constant table it indexes, None when it is not an
    index at all. Raises UsageError when it drives a shape or indexes something unbounded."""
    bound = None
    seen = set()
    stack = [t]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        for node in cur.outputs:
            slots = [i for i, x in enumerate(node.inputs) if x is cur]
            if node.op in _TRANSPARENT and slots == [0]:
                stack.extend(node.outputs)
                continue
            if node.op in ("Gather", "GatherElements") and 1 in slots:
                data = node.inputs[0]
                axis = node.attrs.get("axis", 0)
                if isinstance(data, gs.Constant) and data.shape is not None:
                    rows = data.shape[axis]
                    bound = rows if bound is None else min(bound, rows)
                    continue
                raise UsageError(f"input {t.name!r} holds indices into a non-constant tensor; "
                                 "give real values with --inputs FILE.npz")
            if any((node.op, s) in _SHAPE_SLOTS for s in slots):
                raise UsageError(f"input {t.name!r} drives a shape or an index ({node.op}); "
                                 "give real values with --inputs FILE.npz")
    return bound


# ----------------------------------------------------------------------------------- running


class RuntimeUnavailable(Exception):
    """onnxruntime cannot load this model (an operator or opset it lacks): verification is
    skipped, with this reason."""


class RunFailed(Exception):
    """onnxruntime loaded the model but failed to run it on the given inputs."""


def run_model(path: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a model file on onnxruntime's CPU provider with graph optimizations off."""
    return run_samples(path, [feeds])[0]


def reference_session(path: str, spin: bool = True):
    """An onnxruntime session on the CPU provider with graph optimizations off, as every
    reference and verification run uses. Raises RuntimeUnavailable when it cannot load.
    spin=False: its threads do not spin once a run ends (for callers that compute on the same
    cores between runs)."""
    import onnxruntime as ort

    options = reference_options()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise RuntimeUnavailable(f"onnxruntime cannot load the model: {_short(e)}") from None


def reference_options():
    """The SessionOptions of reference_session (for runs that must compute exactly as it does)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # errors reach the user as one line, not as ORT's log
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    # keep a verification run near the model's own size: prepacked kernel weights would be a second
    # copy of every weight; the arena keeps every scratch buffer for the session's lifetime; and in
    # the default order the float32 Casts onnxruntime inserts before CPU nodes without a float16
    # kernel (MatMul on x86) all run first, so every weight is held in float32 at once, where the
    # priority-based order runs each one just before its consumer
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = False
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return opts


def run_samples(path: str, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """run_model over several feed dicts, with one session."""
    session = reference_session(path)
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    results = []
    for feeds in samples:
        missing = wanted - set(feeds)
        if missing:
            raise UsageError(f"no values for input(s) {', '.join(sorted(missing))}")
        try:
            outs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        except Exception as e:  # noqa: BLE001
            raise RunFailed(f"onnxruntime fails to run the model on these inputs: {_short(e)}") from None
        results.append(dict(zip(names, outs)))
    return results


MAX_EVALUATION_SAMPLES = 64  # held-out calibration samples the budget and the final check are measured on


def split_samples(samples: list[dict]) -> tuple[list[dict], list[dict]]:
    """Calibration data as (calibration, evaluation): the last quarter (at least one sample, at most
    MAX_EVALUATION_SAMPLES) is held back for measuring the error, and everything else calibrates;
    a single sample serves both."""
    if len(samples) < 2:
        return samples, samples
    held = min(MAX_EVALUATION_SAMPLES, max(1, len(samples) // 4))
    return samples[:-held], samples[-held:]


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    # onnxruntime's status prefix and the C++ source location and signature say nothing to a user
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/\S+\.(?:h|cc|cpp):\d+ [^()]*\([^()]*\)(?: const)? ", "", text)
    return text[:300] + ("..." if len(text) > 300 else "")


# ----------------------------------------------------------------------------------- argmax

PROBABILITY_OPS = ("Softmax", "LogSoftmax")
# A changed argmax counts as a disagreement only where the reference gave the new class at least
# this much less probability than its own choice: closer calls of the original flip under any
# rounding (float16 on PP-OCRv4 rec: 6 of 2560 characters, 5 of them within 0.05)
CLOSE_CALL = 0.05


def argmax_axis(op: str, domain: str, attrs: dict, opset: int) -> tuple[int, bool, bool] | None:
    """For a node computing a graph output: (axis, flat, log) where it is a Softmax or LogSoftmax
    (the axis its probabilities run along; flat before opset 13, where the op normalizes over all
    the axes from `axis` on, as one; log for LogSoftmax), else None."""
    if op not in PROBABILITY_OPS or domain not in ("", "ai.onnx"):
        return None
    return int(attrs.get("axis", -1 if opset >= 13 else 1)), opset < 13, op == "LogSoftmax"


def argmax_axes(model: onnx.ModelProto) -> dict[str, tuple[int, bool, bool]]:
    """The graph outputs that a Softmax or LogSoftmax computes (through Identity nodes): name ->
    `argmax_axis`. Their argmax is what a classifier's user reads (a class, a character), and a
    cosine of probabilities can stay high while decisions flip, so the lossy budget also bounds
    their argmax agreement (`compare`)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for t in model.graph.output:
        node = producers.get(t.name)
        while node is not None and node.op_type == "Identity":
            node = producers.get(node.input[0])
        if node is not None:
            found = argmax_axis(node.op_type, node.domain, {a.name: a.i for a in node.attribute}, opset)
            if found is not None:
                out[t.name] = found
    return out


def _rows(x: np.ndarray, axis: int, flat: bool) -> np.ndarray:
    """The probabilities as [positions, classes]."""
    axis = axis % max(x.ndim, 1)
    if flat:
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def argmax_agreement(ref: np.ndarray, got: np.ndarray, axis: int, flat: bool, log: bool) -> tuple[int, int, int]:
    """(positions whose argmax agrees, positions whose argmax is the same, positions): a position
    agrees when both pick the same class, or the reference gave the class `got` picks within
    CLOSE_CALL of its own choice's probability."""
    r, g = _rows(ref, axis, flat), _rows(got, axis, flat)
    if not r.size:
        return 0, 0, 0
    p = np.exp(r.astype(np.float64)) if log else r.astype(np.float64)
    at = np.arange(len(p))
    picked, got_picked = np.argmax(r, axis=-1), np.argmax(g, axis=-1)
    gap = p[at, picked] - p[at, got_picked]
    return int(np.count_nonzero(gap <= CLOSE_CALL)), int(np.count_nonzero(picked == got_picked)), len(p)


def _agreement_ok(m: "OutputMetrics", min_cosine: float, min_agreement: float | None) -> bool:
    """Whether an output's argmax agreement is within the budget: the plain agreement at least
    `min_agreement` where one is given, else the agreement with close calls aside at least
    `min_cosine`."""
    if m.agreement is None:
        return True
    if min_agreement is not None:
        return m.plain_agreement >= min_agreement
    return m.agreement >= min_cosine


# ----------------------------------------------------------------------------------- metrics


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tolerance: str = "fp32",
            min_cosine: float = 0.99, argmax: dict[str, tuple] | None = None,
            min_agreement: float | None = None) -> list[OutputMetrics]:
    """Per-output metrics; `ok` follows the tolerance class (`fp32`: rtol 1e-4 / atol 1e-5;
    `lossy`: the cosine against the reference at least `min_cosine`, and no NaN or Inf the
    reference does not have). For the outputs named in `argmax` (`argmax_axes`), the agreement of
    the argmaxes too (`argmax_agreement`); in `lossy`, it must also be within the budget
    (`_agreement_ok`: the plain agreement at least `min_agreement`, or without one, the agreement
    with close calls aside at least `min_cosine`)."""
    rtol, atol = TOLERANCES.get(tolerance, TOLERANCES["fp32"])
    result = []
    for name, a in ref.items():
        b = got.get(name)
        if b is None:
            result.append(OutputMetrics(name, float("inf"), float("inf"), 0.0, False, "output missing"))
            continue
        a, b = _as_array(a), _as_array(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            result.append(OutputMetrics(name, float("inf"), float("inf"), 0.0, False,
                                        f"shape/type {b.dtype}{list(b.shape)} instead of {a.dtype}{list(a.shape)}"))
            continue
        if a.dtype.kind not in "fc":
            same = bool(np.array_equal(a, b))
            diff = 0.0 if same else float("inf")
            result.append(OutputMetrics(name, diff, diff, 1.0 if same else 0.0, same))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        nan_mismatch = bool(np.any(np.isnan(a64) != np.isnan(b64)))
        finite = np.isfinite(a64) & np.isfinite(b64)
        inf_mismatch = bool(np.any(~finite & ~np.isnan(a64) & (a64 != b64)))
        err = np.abs(a64[finite] - b64[finite])  # inf - inf would warn on stderr
        max_abs = float(err.max()) if err.size else 0.0
        rel = err / np.maximum(np.abs(a64[finite]), 1e-12)
        max_rel = float(rel.max()) if rel.size else 0.0
        cosine = _cosine(a64[finite], b64[finite])
        m = OutputMetrics(name, max_abs, max_rel, cosine, False,
                          "NaN/Inf positions differ" if nan_mismatch or inf_mismatch else "")
        if argmax and name in argmax and a.ndim:
            agreed, same, m.positions = argmax_agreement(a, b, *argmax[name])
            m.agreement = agreed / m.positions if m.positions else 1.0
            m.plain_agreement = same / m.positions if m.positions else 1.0
        if tolerance == "lossy":
            close = cosine >= min_cosine and _agreement_ok(m, min_cosine, min_agreement)
        else:
            close = bool(np.all(err <= atol + rtol * np.abs(a64[finite])))
        m.ok = not nan_mismatch and not inf_mismatch and close
        result.append(m)
    return result


def compare_samples(refs: list[dict], gots: list[dict], tolerance: str = "fp32", min_cosine: float = 0.99,
                    argmax: dict[str, tuple] | None = None, min_agreement: float | None = None) -> list[OutputMetrics]:
    """compare() over several samples: per output, the largest errors, the mean of the samples'
    cosines (what the budget applies to) and the worst sample's in `worst_cosine`, the argmax
    agreement over all the samples' positions; `ok` when every sample is within the fp32
    tolerance, or for `lossy`, when the mean cosine (and the agreement) is within the budget and
    no sample has NaN or Inf where the reference does not."""
    if len(refs) == 1:
        return compare(refs[0], gots[0], tolerance, min_cosine, argmax, min_agreement)
    per = [compare(r, g, tolerance, min_cosine, argmax, min_agreement) for r, g in zip(refs, gots)]
    result = []
    for i, first in enumerate(per[0]):
        column = [p[i] for p in per]
        cosines = [x.cosine for x in column]
        mean = float(np.mean(cosines))
        broken = [x.note for x in column if x.note]
        m = OutputMetrics(first.name, max(x.max_abs for x in column), max(x.max_rel for x in column), mean,
                          False, broken[0] if broken else "", worst_cosine=min(cosines), samples=len(column),
                          positions=sum(x.positions for x in column))
        if any(x.agreement is not None for x in column):
            m.agreement, m.plain_agreement = (
                sum((getattr(x, k) or 0.0) * x.positions for x in column) / m.positions if m.positions else 1.0
                for k in ("agreement", "plain_agreement"))
        if tolerance == "lossy":
            m.ok = not broken and mean >= min_cosine and _agreement_ok(m, min_cosine, min_agreement)
        else:
            m.ok = all(x.ok for x in column)
        result.append(m)
    return result


def _as_array(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def write_for_runtime(model: onnx.ModelProto, folder: str, name: str = "model.onnx", consume: bool = False) -> str:
    """Write a model into `folder` for onnxruntime to load. A model over the protobuf limit goes
    out with external data, which moves its tensors out of the proto: then a copy is written
    unless `consume` says the proto is not needed afterwards."""
    from .io import PROTOBUF_LIMIT

    path = os.path.join(folder, name)
    if model.ByteSize() < PROTOBUF_LIMIT:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return path
    if not consume:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=1024)
    return path
