"""The ONNX backend test suite through every lossless pass, checked against the expected outputs.

Cases, all from the installed `onnx` package:

- `node`: the node test cases (`onnx.backend.test.case.node.collect_testcases()`), each a model
  with inputs and expected outputs computed by the ONNX project;
- `pytorch-converted`, `pytorch-operator`, `simple`: folders under `onnx/backend/test/data`, each
  a `model.onnx` with `test_data_set_*/input_*.pb, output_*.pb`;
- `light`: `onnx/backend/test/data/light/light_*.onnx` (the `real` folder only names these by
  URL), fed as onnx's backend runner feeds them and checked against `light_*_output_*.pb`.

A case is first run as it is on onnxruntime (CPU, graph optimizations off, as `onnxopt.verify`
runs models). If onnxruntime cannot load or run it, or its outputs differ from the expected ones
within the case's tolerance, the case is skipped with the reason: there is nothing to compare
against. Otherwise, for each pass configuration (`configs()`: each lossless pass alone, both
targets for target-sensitive passes, and all lossless passes together) the model goes through
`onnxopt.optimize(..., verify="none")` and the result must pass `onnx.checker` (at the level the
original passes: full_check, or plain when only that passes), load on onnxruntime, and produce
the expected outputs (same dtype, same shape, values within the case's rtol/atol). Anything
else, an exception from optimize included, is a failure.

The original is checked and run once per case; an optimized model whose bytes equal the original
or an earlier configuration's result reuses that verdict (one onnxruntime session fewer).
"""

from __future__ import annotations

import gc
import glob
import json
import os
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper

import onnxopt
from onnxopt.pipeline import order_passes, registry

DATA_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
DATA_KINDS = ("pytorch-converted", "pytorch-operator", "simple")  # folders of model.onnx + test_data_set_*
SOURCES = ("node", *DATA_KINDS, "light")
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7  # onnx's loader uses these when a case names none

# Passes whose result depends on `--target`: swept with each target.
TARGETS = {"fuse": ("onnx", "ort")}

# Why a case is skipped (decided on the original model, before any pass runs).
SKIP_UNREADABLE = "cannot read test data"
SKIP_NON_TENSOR = "non-tensor inputs/outputs"
SKIP_ARITY = "data does not match the graph inputs/outputs"
SKIP_NO_EXPECTED = "no expected outputs"
SKIP_CHECKER = "original fails onnx.checker"
SKIP_ORT_LOAD = "ort cannot load"
SKIP_ORT_RUN = "ort run error"
SKIP_ORT_MISMATCH = "ort mismatch vs expected"
SKIP_REASONS = (SKIP_UNREADABLE, SKIP_NON_TENSOR, SKIP_ARITY, SKIP_NO_EXPECTED, SKIP_CHECKER, SKIP_ORT_LOAD,
                SKIP_ORT_RUN, SKIP_ORT_MISMATCH)

# Why a configuration fails on a case the original passes.
FAIL_REFUSED = "optimize refused the model"  # UsageError / ModelError: a clean refusal, still a failure
FAIL_OPTIMIZE = "optimize raised"  # any other exception
FAIL_INTERFACE = "graph inputs/outputs changed"
FAIL_CHECKER = "checker fails"
FAIL_ORT_LOAD = "ort cannot load the result"
FAIL_ORT_RUN = "ort run error on the result"
FAIL_MISMATCH = "mismatch vs expected"
FAIL_REASONS = (FAIL_REFUSED, FAIL_OPTIMIZE, FAIL_INTERFACE, FAIL_CHECKER, FAIL_ORT_LOAD, FAIL_ORT_RUN, FAIL_MISMATCH)


# ----------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """One way to optimize: the passes (in pipeline order) and the target."""

    name: str
    passes: tuple[str, ...]
    target: str = "onnx"
    max_opset: int | None = None  # fuse may raise the opset this far (--max-opset)


MAX_OPSET = 24  # the newest opset a fusion asks for (Swish); raising further gains nothing


def lossless_passes() -> list[str]:
    """Registry passes whose tolerance is not lossy, in pipeline order."""
    return order_passes(sorted(name for name, cls in registry().items() if cls.tolerance != "lossy"))


def configs() -> list[Config]:
    """Each lossless pass alone (once per target for target-sensitive passes), then all of them
    together (once per target any of them is sensitive to)."""
    names = lossless_passes()
    out = []
    for name in names:
        targets = TARGETS.get(name, ("onnx",))
        out.extend(Config(name if len(targets) == 1 else f"{name}:{t}", (name,), t) for t in targets)
    all_targets = sorted({t for n in names for t in TARGETS.get(n, ("onnx",))}, key=("onnx", "ort").index)
    out.extend(Config("all" if len(all_targets) == 1 else f"all:{t}", tuple(names), t) for t in all_targets)
    if "fuse" in names:  # and with the opset raised where a fusion needs it (onnx's version converter)
        out.extend(Config(f"all:{t}:max-opset-{MAX_OPSET}", tuple(names), t, MAX_OPSET) for t in all_targets)
    return out


def select_configs(names: str | list[str] | None) -> list[Config]:
    """The configurations named (comma-separated or a list), all when None. Raises ValueError."""
    every = configs()
    if names is None:
        return every
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    by_name = {c.name: c for c in every}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown config(s) {', '.join(unknown)}; available: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


# ----------------------------------------------------------------------------------- cases


class Skip(Exception):
    """The case cannot be judged: `reason` is one of SKIP_REASONS, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Case:
    """A model with data sets: `load()` returns (model, [(inputs, expected outputs), ...]) where
    each value is an ndarray, a list of ndarrays (a sequence) or anything else (not supported)."""

    source: str
    name: str
    rtol: float
    atol: float
    load: Callable[[], tuple[onnx.ModelProto, list]] = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.source}/{self.name}"


def collect_cases(sources=SOURCES, data_dir: str = DATA_DIR) -> list[Case]:
    """Every case from the given sources, sorted by id (names are unique within a source)."""
    cases: list[Case] = []
    if "node" in sources:
        cases.extend(_node_cases())
    for kind in DATA_KINDS:
        if kind in sources:
            cases.extend(_data_cases(os.path.join(data_dir, kind), kind))
    if "light" in sources:
        cases.extend(_light_cases(os.path.join(data_dir, "light")))
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RuntimeError(f"duplicate case ids: {', '.join(duplicates)}")
    return sorted(cases, key=lambda c: c.id)


def _node_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):  # the cases compute inf, nan on purpose
        warnings.simplefilter("ignore")
        found = collect_testcases()

    def loader(tc):
        return lambda: (tc.model, [(list(i), list(o)) for i, o in tc.data_sets])

    return [Case("node", tc.name, tc.rtol, tc.atol, loader(tc)) for tc in found]


def _data_cases(folder: str, kind: str) -> list[Case]:
    cases = []
    for name in sorted(os.listdir(folder)):
        case_dir = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(case_dir, "model.onnx")):
            continue
        rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
        meta = os.path.join(case_dir, "data.json")
        if os.path.exists(meta):
            with open(meta) as f:
                data = json.load(f)
            rtol, atol = data.get("rtol", rtol), data.get("atol", atol)
        cases.append(Case(kind, name, rtol, atol, lambda d=case_dir: _load_data_dir(d)))
    return cases


def _load_data_dir(case_dir: str):
    model = onnx.load(os.path.join(case_dir, "model.onnx"))
    feeds = _feed_inputs(model)
    data_sets = []
    for set_dir in sorted(glob.glob(os.path.join(case_dir, "test_data_set_*"))):
        n_in = len(glob.glob(os.path.join(set_dir, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(set_dir, "output_*.pb")))
        if n_in > len(feeds) or n_out > len(model.graph.output):
            raise Skip(SKIP_ARITY, f"{os.path.basename(set_dir)}: {n_in} inputs, {n_out} outputs for "
                                   f"{len(feeds)} graph inputs, {len(model.graph.output)} outputs")
        inputs = [_read_value(os.path.join(set_dir, f"input_{i}.pb"), feeds[i].type) for i in range(n_in)]
        outputs = [_read_value(os.path.join(set_dir, f"output_{i}.pb"), model.graph.output[i].type)
                   for i in range(n_out)]
        data_sets.append((inputs, outputs))
    return model, data_sets


def _read_value(path: str, type_proto: onnx.TypeProto):
    """A .pb file as the graph's type for it says (as onnx's backend runner reads it)."""
    with open(path, "rb") as f:
        content = f.read()
    kind = type_proto.WhichOneof("value")
    try:
        if kind == "tensor_type":
            return onnx.numpy_helper.to_array(onnx.TensorProto.FromString(content))
        if kind == "sequence_type":
            return onnx.numpy_helper.to_list(onnx.SequenceProto.FromString(content))
    except Exception as e:  # noqa: BLE001 - a malformed file is a property of the case
        raise Skip(SKIP_UNREADABLE, f"{os.path.basename(path)}: {_one_line(e)}") from None
    raise Skip(SKIP_NON_TENSOR, f"{os.path.basename(path)} is a {kind}")


def _light_cases(folder: str) -> list[Case]:
    cases = []
    for path in sorted(glob.glob(os.path.join(folder, "light_*.onnx"))):
        name = os.path.splitext(os.path.basename(path))[0]
        cases.append(Case("light", name, DEFAULT_RTOL, DEFAULT_ATOL, lambda p=path: _load_light(p)))
    return cases


def _load_light(path: str):
    """Inputs as onnx's backend runner generates them for light models (arange / size, float32,
    unknown dims 1); expected outputs from `<model>_output_<i>.pb`."""
    model = onnx.load(path)
    inputs = []
    for vi in _feed_inputs(model):
        tt = vi.type.tensor_type
        if vi.type.WhichOneof("value") != "tensor_type" or tt.elem_type != onnx.TensorProto.FLOAT:
            raise Skip(SKIP_NON_TENSOR, f"input {vi.name!r} is not a float tensor")
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim)
        n = int(np.prod(shape))
        inputs.append((np.arange(n).reshape(shape) / n).astype(np.float32))
    prefix = os.path.splitext(path)[0]
    outputs = []
    for i, vi in enumerate(model.graph.output):
        out_path = f"{prefix}_output_{i}.pb"
        if not os.path.exists(out_path):
            raise Skip(SKIP_NO_EXPECTED, f"{os.path.basename(out_path)} missing")
        outputs.append(_read_value(out_path, vi.type))
    return model, [(inputs, outputs)]


def _feed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds: all but initializers listed as inputs (IR < 4)."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


# ----------------------------------------------------------------------------------- results


@dataclass
class Record:
    """One verdict: a skipped case (config None) or one configuration on a case."""

    case: str
    config: str | None
    status: str  # passed | skipped | failed
    reason: str = ""  # a SKIP_* or FAIL_* constant
    detail: str = ""

    def as_dict(self) -> dict:
        return {"case": self.case, "config": self.config, "status": self.status, "reason": self.reason,
                "detail": self.detail}


@dataclass
class Original:
    """A case that onnxruntime runs and matches: what every configuration is checked against."""

    case: Case
    model_bytes: bytes
    feeds: list[dict[str, Any]]  # one dict per data set
    expected: list[dict[str, Any]]
    full_check: bool  # whether the original passes onnx.checker with full_check


def prepare(case: Case, session_options=None) -> Original:
    """Load the case and check the original: raises Skip with the reason when it cannot be
    judged."""
    try:
        model, data_sets = case.load()
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001
        raise Skip(SKIP_UNREADABLE, _one_line(e)) from None
    if not data_sets:
        raise Skip(SKIP_NO_EXPECTED, "no test_data_set")
    feed_vis = _feed_inputs(model)
    for vi in [*feed_vis, *model.graph.output]:
        if not _supported_type(vi.type):
            raise Skip(SKIP_NON_TENSOR, f"{vi.name!r} is a {vi.type.WhichOneof('value')}")
    feeds, expected = [], []
    for inputs, outputs in data_sets:
        inputs = [_normalize(v) for v in inputs]
        outputs = [_normalize(v) for v in outputs]
        for v in [*inputs, *outputs]:
            if not _supported_value(v):
                raise Skip(SKIP_NON_TENSOR, f"a value of type {type(v).__name__}")
        if len(inputs) != len(feed_vis) or len(outputs) != len(model.graph.output):
            raise Skip(SKIP_ARITY, f"{len(inputs)} inputs, {len(outputs)} outputs for {len(feed_vis)} graph "
                                   f"inputs, {len(model.graph.output)} outputs")
        feeds.append({vi.name: v for vi, v in zip(feed_vis, inputs)})
        expected.append({vi.name: v for vi, v in zip(model.graph.output, outputs)})

    full_check = True
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception:  # noqa: BLE001
        full_check = False
        try:
            onnx.checker.check_model(model)
        except Exception as e:  # noqa: BLE001
            raise Skip(SKIP_CHECKER, _one_line(e)) from None

    model_bytes = model.SerializeToString()
    original = Original(case, model_bytes, feeds, expected, full_check)
    problem = _judge_on_runtime(original, model_bytes, session_options)
    if problem is not None:
        reason, detail = problem
        raise Skip({FAIL_ORT_LOAD: SKIP_ORT_LOAD, FAIL_ORT_RUN: SKIP_ORT_RUN,
                    FAIL_MISMATCH: SKIP_ORT_MISMATCH}[reason], detail)
    return original


def _normalize(v):
    """TensorProtos and numpy scalars (some node cases hold them) as arrays."""
    if isinstance(v, onnx.TensorProto):
        return onnx.numpy_helper.to_array(v)
    if isinstance(v, np.generic):
        return np.asarray(v)
    if isinstance(v, list):
        return [_normalize(x) for x in v]
    return v


def _supported_type(t: onnx.TypeProto) -> bool:
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        return True
    return kind == "sequence_type" and t.sequence_type.elem_type.WhichOneof("value") == "tensor_type"


def _supported_value(v) -> bool:
    if isinstance(v, list):
        return all(isinstance(x, np.ndarray) for x in v)
    return isinstance(v, np.ndarray)


def run_config(original: Original, config: Config, optimize=onnxopt.optimize, session_options=None,
               seen: dict[bytes, Record] | None = None) -> Record:
    """Optimize the original with one configuration and judge the result. `seen` maps the bytes
    of models already judged for this case to their record (the original's is a pass)."""
    case_id = original.case.id
    model = onnx.ModelProto.FromString(original.model_bytes)  # each run gets its own copy
    try:
        result = optimize(model, passes=list(config.passes), verify="none", target=config.target,
                          max_opset=config.max_opset)
    except (onnxopt.UsageError, onnxopt.ModelError) as e:
        return Record(case_id, config.name, "failed", FAIL_REFUSED, f"{type(e).__name__}: {_one_line(e)}")
    except Exception as e:  # noqa: BLE001 - any exception on a valid model is a failure
        return Record(case_id, config.name, "failed", FAIL_OPTIMIZE, _exception_detail(e))
    out = result.model
    out_bytes = out.SerializeToString()
    if out_bytes == original.model_bytes:
        return Record(case_id, config.name, "passed", detail="unchanged")
    if seen is not None and out_bytes in seen:
        return replace(seen[out_bytes], config=config.name)
    record = _judge(original, out, out_bytes, config, session_options)
    if seen is not None:
        seen[out_bytes] = record
    return record


def _judge(original: Original, out: onnx.ModelProto, out_bytes: bytes, config: Config, session_options) -> Record:
    case_id = original.case.id
    want = (list(original.feeds[0]), list(original.expected[0]))
    got = ([vi.name for vi in _feed_inputs(out)], [vi.name for vi in out.graph.output])
    if got != want:
        return Record(case_id, config.name, "failed", FAIL_INTERFACE,
                      f"inputs {got[0]}, outputs {got[1]} instead of {want[0]}, {want[1]}")
    try:
        onnx.checker.check_model(out, full_check=original.full_check)
    except Exception as e:  # noqa: BLE001
        level = "full_check" if original.full_check else "plain check"
        return Record(case_id, config.name, "failed", FAIL_CHECKER, f"{level}: {_one_line(e)}")
    problem = _judge_on_runtime(original, out_bytes, session_options)
    if problem is not None:
        return Record(case_id, config.name, "failed", *problem)
    return Record(case_id, config.name, "passed")


def run_case(case: Case, selected: list[Config], optimize=onnxopt.optimize, session_options=None) -> list[Record]:
    """The case's records: one `skipped` record, or one record per configuration."""
    try:
        original = prepare(case, session_options)
    except Skip as s:
        return [Record(case.id, None, "skipped", s.reason, s.detail)]
    seen: dict[bytes, Record] = {}
    return [run_config(original, c, optimize, session_options, seen) for c in selected]


# ----------------------------------------------------------------------------------- onnxruntime


def session_options():
    """onnxruntime settings of `onnxopt.verify.run_model` (CPU, graph optimizations off, quiet),
    with one intra-op thread: sessions for tiny models start faster and results do not depend on
    how work is split between threads."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return opts


def _judge_on_runtime(original: Original, model_bytes: bytes, opts) -> tuple[str, str] | None:
    """(FAIL_* reason, detail) when onnxruntime cannot load or run the model or its outputs differ
    from the expected ones; None when every data set matches."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model_bytes, opts or session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        return FAIL_ORT_LOAD, _one_line(e)
    names = [o.name for o in session.get_outputs()]
    declared = [o.type for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    case = original.case
    for i, (feeds, expected) in enumerate(zip(original.feeds, original.expected)):
        if list(expected) != names:
            return FAIL_MISMATCH, f"outputs {names} instead of {list(expected)}"
        try:
            got = session.run(names, {k: _to_runtime(v) for k, v in feeds.items() if k in wanted})
        except Exception as e:  # noqa: BLE001
            return FAIL_ORT_RUN, _one_line(e)
        for name, kind, value in zip(names, declared, got):
            problem = mismatch(expected[name], _from_runtime(value, kind), case.rtol, case.atol)
            if problem is not None:
                where = f"data set {i}, " if len(original.feeds) > 1 else ""
                return FAIL_MISMATCH, f"{where}output {name!r}: {problem}"
    return None


def _bits_type(dtype: np.dtype) -> int | None:
    """The ONNX type of a float8 / bfloat16 numpy dtype (ml_dtypes), which onnxruntime's Python API
    exchanges as unsigned integers of the same size; None for any other dtype."""
    if not (dtype.name.startswith("float8") or dtype.name == "bfloat16"):
        return None
    return onnx.helper.np_dtype_to_tensor_dtype(dtype)


def _to_runtime(value):
    if isinstance(value, np.ndarray) and _bits_type(value.dtype) is not None:
        import onnxruntime as ort

        bits = value.view(np.dtype(f"uint{8 * value.dtype.itemsize}"))
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _bits_type(value.dtype))
    return value


def _from_runtime(value, declared: str):
    """onnxruntime returns a float8 output as its uint8 bit patterns: view them as the declared type."""
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and declared.startswith("tensor(float8"):
        name = declared[len("tensor("):-1]
        for t in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
                  onnx.TensorProto.FLOAT8E5M2FNUZ):
            if onnx.TensorProto.DataType.Name(t).lower() == name:
                return value.view(onnx.helper.tensor_dtype_to_np_dtype(t))
    return value


def mismatch(expected, got, rtol: float, atol: float) -> str | None:
    """Why `got` differs from `expected` (dtype, shape, or a value outside atol + rtol * |expected|;
    NaN only where NaN is expected; exact for non-float types), or None when it matches."""
    if isinstance(expected, list):
        if not isinstance(got, list):
            return f"a {type(got).__name__} instead of a sequence"
        if len(got) != len(expected):
            return f"a sequence of {len(got)} instead of {len(expected)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            problem = mismatch(e, g, rtol, atol)
            if problem is not None:
                return f"item {i}: {problem}"
        return None
    if not isinstance(got, np.ndarray):
        return f"a {type(got).__name__} instead of a tensor"
    if expected.dtype.kind in "OUS" or got.dtype.kind in "OUS":
        if expected.dtype.kind not in "OUS" or got.dtype.kind not in "OUS":
            return f"dtype {got.dtype} instead of {expected.dtype}"
        if got.shape != expected.shape:
            return f"shape {list(got.shape)} instead of {list(expected.shape)}"
        same = got.shape == expected.shape and all(
            _text(a) == _text(b) for a, b in zip(got.reshape(-1), expected.reshape(-1)))
        return None if same else "strings differ"
    if got.dtype != expected.dtype:
        return f"dtype {got.dtype} instead of {expected.dtype}"
    if got.shape != expected.shape:
        return f"shape {list(got.shape)} instead of {list(expected.shape)}"
    if expected.dtype.kind in "biu":
        if np.array_equal(got, expected):
            return None
        return f"{int(np.count_nonzero(got != expected))} of {expected.size} values differ"
    try:
        e64, g64 = expected.astype(np.float64), got.astype(np.float64)
    except (TypeError, ValueError):
        e64, g64 = expected.astype(np.complex128), got.astype(np.complex128)
    e_nan, g_nan = np.isnan(e64), np.isnan(g64)
    if np.any(e_nan != g_nan):
        return "NaN positions differ"
    both = ~e_nan
    e64, g64 = e64[both], g64[both]
    inf = np.isinf(e64) | np.isinf(g64)
    if np.any(e64[inf] != g64[inf]):
        return "Inf positions differ"
    err = np.abs(g64[~inf] - e64[~inf])
    bad = err > atol + rtol * np.abs(e64[~inf])
    if not np.any(bad):
        return None
    return (f"{int(np.count_nonzero(bad))} of {expected.size} values outside rtol {rtol:g} / atol {atol:g} "
            f"(max abs err {float(err.max()):.3g})")


def _text(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:500] + ("..." if len(text) > 500 else "")


def _exception_detail(e: BaseException) -> str:
    """`Type: message` and the innermost frame in onnxopt, for a failure report."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "site-packages" not in f.filename]
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {_one_line(e)}{where}"


# ----------------------------------------------------------------------------------- sweeps


def sample(cases: list[Case], every: int) -> list[Case]:
    """Every `every`-th case of each source (by sorted id, starting with the first): a fixed,
    deterministic sample that covers every source."""
    out = []
    for source in SOURCES:
        mine = [c for c in cases if c.source == source]
        out.extend(mine[::every])
    return out


def sweep(cases: list[Case], selected: list[Config], jobs: int = 1,
          progress: Callable[[int, int], None] | None = None) -> list[Record]:
    """Run every case through the selected configurations; records in case order. `jobs` 2 runs
    cases in two forked worker processes (this machine has 2 cores).

    The collected cases (thousands of models and arrays) stay alive throughout, and optimize()
    runs a full garbage collection after every pass pipeline: they are frozen out of the
    collector's way (gc.freeze), which makes the sweep about five times faster."""
    gc.collect()
    gc.freeze()
    try:
        return _sweep(cases, selected, jobs, progress)
    finally:
        gc.unfreeze()


def _sweep(cases, selected, jobs, progress) -> list[Record]:
    if jobs <= 1:
        opts = session_options()
        records = []
        for i, case in enumerate(cases):
            records.extend(run_case(case, selected, session_options=opts))
            if progress:
                progress(i + 1, len(cases))
        return records
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # workers inherit the collected cases: nothing is pickled
    results: list[list[Record] | None] = [None] * len(cases)
    with ctx.Pool(jobs, initializer=_worker_init, initargs=(cases, selected)) as pool:
        for done, (i, recs) in enumerate(pool.imap_unordered(_worker_run, range(len(cases)), chunksize=4)):
            results[i] = recs
            if progress:
                progress(done + 1, len(cases))
    return [r for recs in results for r in recs]


_WORKER: dict = {}  # per worker process: the cases and configs it was forked with


def _worker_init(cases, selected):
    _WORKER.update(cases=cases, selected=selected, opts=session_options())


def _worker_run(i: int):
    return i, run_case(_WORKER["cases"][i], _WORKER["selected"], session_options=_WORKER["opts"])
