"""Device capability specs: which operators, opsets and element types a device runs, and a simple
throughput model (compute rate per operator class, memory bandwidth, per-node overhead, the link
to the host).

Built-in: `cpu` (the kernels the installed onnxruntime registers for its CPU provider), `cuda`
(the installed onnxruntime's CUDA kernels when it has them, else onnxruntime's documented
operator list, specs/cuda.json) and `tensorrt` (onnx-tensorrt's documented operator list,
specs/tensorrt.json). A user spec is a JSON or YAML file:

    name: npu                       # [A-Za-z0-9_.-]+
    designator: npu                 # onnxruntime's device designator in session.layer_assignment_settings
    provider: QNNExecutionProvider  # the execution provider the split runner uses
    based_on: cuda                  # optional: start from a built-in spec's operators
    ops: [Conv, Relu, Add]          # or {Conv: {types: [int8, uint8]}, Relu: {}}; replaces based_on's
    exclude_ops: [Softmax]          # taken away from ops
    types: [float16, int8, uint8]   # every tensor a node reads or writes must have one of these
    max_opset: 17                   # newest default-domain opset version it implements
    throughput: {default: 1.0e+12, conv: 8.0e+12, matmul: 8.0e+12}   # operations per second
    bandwidth: 5.0e+10              # bytes per second of device memory
    launch: 2.0e-5                  # seconds of overhead per node
    link: {bandwidth: 8.0e+9, latency: 5.0e-5}   # to and from the host; latency includes the synchronisation

The figures of the built-in throughput models are rough orders of magnitude (a server CPU core
set, a data-center GPU over PCIe 4): they rank plans, they do not predict times.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from dataclasses import dataclass, field

import onnx

from onnxopt.errors import UsageError
from onnxopt.graph import onnx_dtype

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")
BUILTIN = ("cpu", "cuda", "tensorrt")
OP_CLASSES = ("conv", "matmul", "default")
TYPE_NAMES = {
    "float16", "bfloat16", "float32", "float64", "int4", "uint4", "int8", "int16", "int32", "int64", "uint8",
    "uint16", "uint32", "uint64", "bool", "string", "complex64", "complex128", "float8e4m3fn", "float8e4m3fnuz",
    "float8e5m2", "float8e5m2fnuz", "float4e2m1",
}
_ONNX_TYPE_NAMES = {"float": "float32", "double": "float64"}
KEYS = {"name", "designator", "provider", "based_on", "ops", "exclude_ops", "types", "max_opset", "throughput",
        "bandwidth", "launch", "link", "source"}
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes per second
    latency: float  # seconds per transfer

    def seconds(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclass
class DeviceSpec:
    name: str
    designator: str
    provider: str
    # op key ("Conv", "com.microsoft.Attention") -> [(first opset, last opset or None, types or None)]
    ops: dict[str, list[tuple[int, int | None, frozenset | None]]]
    throughput: dict[str, float]
    bandwidth: float
    launch: float
    link: Link | None  # None: the host itself
    types: frozenset | None = None
    max_opset: int | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def host(self) -> bool:
        return self.link is None

    def refusal(self, op_key: str, since: int | None, types: set[str]) -> str | None:
        """Why this device cannot run the node (None: it can). `since` is the version of the op's
        schema the model's opset selects; `types` the element types of its tensors."""
        ranges = self.ops.get(op_key)
        if ranges is None:
            return f"{self.name} has no {op_key}"
        if self.max_opset is not None and "." not in op_key and since is not None and since > self.max_opset:
            return f"{self.name} implements opsets up to {self.max_opset}, {op_key} here is version {since}"
        fitting = [r for r in ranges if since is None or (r[0] <= since and (r[1] is None or since <= r[1]))]
        if not fitting:
            return f"{self.name} has no {op_key} for opset version {since}"
        allowed = set().union(*[r[2] for r in fitting]) if all(r[2] is not None for r in fitting) else None
        if self.types is not None:
            allowed = set(self.types) if allowed is None else allowed & self.types
        if allowed is not None and not types <= allowed:
            return f"{self.name} has no {op_key} for {', '.join(sorted(types - allowed))}"
        return None


THROUGHPUT = {  # built-in models: operations per second per class, bytes per second, seconds
    "cpu": dict(throughput={"conv": 1e11, "matmul": 1e11, "default": 1e10}, bandwidth=2e10, launch=1e-6),
    "cuda": dict(throughput={"conv": 1.5e13, "matmul": 1.5e13, "default": 1e12}, bandwidth=1.5e12, launch=5e-6,
                 link=Link(2.4e10, 5e-5)),
    "tensorrt": dict(throughput={"conv": 3e13, "matmul": 3e13, "default": 2e12}, bandwidth=1.5e12, launch=2e-6,
                     link=Link(2.4e10, 5e-5)),
}
DESIGNATORS = {"cpu": ("cpu", "CPUExecutionProvider"), "cuda": ("cuda", "CUDAExecutionProvider"),
               "tensorrt": ("cuda", "TensorrtExecutionProvider")}


def builtin(name: str) -> DeviceSpec:
    if name not in BUILTIN:
        raise UsageError(f"unknown device {name!r}: built-in devices are {', '.join(BUILTIN)}, "
                         "or give a spec file (.json, .yaml)")
    designator, provider = DESIGNATORS[name]
    ops, source = _kernel_ops(provider)
    max_opset = None
    if not ops:  # not in this onnxruntime build: the documented list
        data = _shipped(name)
        ops, source, max_opset = _parse_ranges(data["ops"]), data.get("source", ""), data.get("max_opset")
    model = THROUGHPUT[name]
    return DeviceSpec(name, designator, provider, ops, dict(model["throughput"]), model["bandwidth"],
                      model["launch"], model.get("link"), max_opset=max_opset, source=source)


@functools.cache
def _shipped(name: str) -> dict:
    with open(os.path.join(HERE, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def _kernel_ops(provider: str) -> tuple[dict, str]:
    """The operators the installed onnxruntime registers kernels for on `provider`."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    ops: dict[str, list] = {}
    for k in C.get_all_opkernel_def():
        if k.provider != provider:
            continue
        key = k.op_name if k.domain in ("", "ai.onnx") else f"{k.domain}.{k.op_name}"
        first, last = k.version_range
        types = frozenset(t for ts in k.type_constraints.values() for t in map(_type_name, ts) if t)
        ops.setdefault(key, []).append((first, None if last >= 2 ** 31 - 1 else last, types))
    return ops, f"onnxruntime {onnxruntime.__version__} kernel registry ({provider})"


def _type_name(text: str) -> str | None:
    m = re.fullmatch(r"tensor\((\w+)\)", text)
    if not m:
        return None  # seq(...), map(...), optional(...)
    name = m.group(1).lower()
    return _ONNX_TYPE_NAMES.get(name, name)


def _parse_ranges(ops: dict) -> dict:
    return {k: [(int(a), None if b is None else int(b), frozenset(t) or None) for a, b, t in v] for k, v in ops.items()}


def load(item: str) -> DeviceSpec:
    """A built-in device name or a spec file path."""
    if item in BUILTIN:
        return builtin(item)
    if not item.lower().endswith((".json", ".yaml", ".yml")):
        raise UsageError(f"unknown device {item!r}: built-in devices are {', '.join(BUILTIN)}, "
                         "or give a spec file (.json, .yaml)")
    if not os.path.isfile(item):
        raise UsageError(f"device spec file not found: {item}")
    try:
        with open(item, encoding="utf-8") as f:
            text = f.read()
        if item.lower().endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read device spec {item}: {e}") from None
    except ValueError as e:  # json.JSONDecodeError and yaml.YAMLError's position text
        raise UsageError(f"device spec {item} is not valid JSON: {e}") from None
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError without importing yaml at module level
        raise UsageError(f"device spec {item} is not valid YAML: {' '.join(str(e).split())}") from None
    return from_dict(data, os.path.basename(item))


def from_dict(data, label: str = "spec") -> DeviceSpec:
    """A user spec from its parsed JSON/YAML; every mistake is a UsageError naming it."""
    if not isinstance(data, dict):
        raise UsageError(f"device spec {label}: expected a mapping of keys to values at the top level")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"device spec {label}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(KEYS))})")
    for key in ("name", "provider"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise UsageError(f"device spec {label}: {key!r} is required (a string)")
    name = data["name"]
    if not NAME.match(name):
        raise UsageError(f"device spec {label}: bad name {name!r}: letters, digits, '_', '.' and '-' only")
    base = None
    if "based_on" in data:
        if data["based_on"] not in BUILTIN:
            raise UsageError(f"device spec {label}: based_on must be one of {', '.join(BUILTIN)}")
        base = builtin(data["based_on"])
    if "ops" not in data and base is None:
        raise UsageError(f"device spec {label}: give 'ops' (the operators it runs) or 'based_on'")
    ops = dict(base.ops) if base is not None and "ops" not in data else _user_ops(data["ops"], label)
    for op in _names(data.get("exclude_ops", []), label, "exclude_ops"):
        _check_op(op, label)
        ops.pop(op, None)
    types = None
    if "types" in data:
        types = frozenset(_type_list(data["types"], label, "types"))
    max_opset = data.get("max_opset", base.max_opset if base is not None else None)
    if max_opset is not None and (not isinstance(max_opset, int) or max_opset < 1):
        raise UsageError(f"device spec {label}: max_opset must be a positive integer")
    model = THROUGHPUT.get(data.get("based_on", ""), THROUGHPUT["cuda"])
    throughput = dict(model["throughput"])
    given = data.get("throughput", {})
    if not isinstance(given, dict):
        raise UsageError(f"device spec {label}: throughput must be a mapping like {{default: 1.0e+12}}")
    for key, value in given.items():
        if key not in OP_CLASSES:
            raise UsageError(f"device spec {label}: throughput class {key!r} unknown "
                             f"(classes: {', '.join(OP_CLASSES)})")
        throughput[key] = _positive(value, label, f"throughput.{key}")
    link = data.get("link", {})
    if not isinstance(link, dict) or set(link) - {"bandwidth", "latency"}:
        raise UsageError(f"device spec {label}: link must be a mapping with bandwidth and latency")
    default_link = model.get("link", Link(1e10, 2e-5))
    return DeviceSpec(
        name=name, designator=str(data.get("designator", "accelerator")), provider=data["provider"], ops=ops,
        throughput=throughput,
        bandwidth=_positive(data.get("bandwidth", model["bandwidth"]), label, "bandwidth"),
        launch=_positive(data.get("launch", model["launch"]), label, "launch", zero=True),
        link=Link(_positive(link.get("bandwidth", default_link.bandwidth), label, "link.bandwidth"),
                  _positive(link.get("latency", default_link.latency), label, "link.latency", zero=True)),
        types=types, max_opset=max_opset, source=str(data.get("source", label)))


def _user_ops(ops, label: str) -> dict:
    if isinstance(ops, list):
        ops = {op: {} for op in _names(ops, label, "ops")}
    if not isinstance(ops, dict) or not ops:
        raise UsageError(f"device spec {label}: ops must be a non-empty list of operator names or a mapping")
    out = {}
    for op, detail in ops.items():
        _check_op(op, label)
        detail = detail or {}
        if not isinstance(detail, dict) or set(detail) - {"types", "since", "until"}:
            raise UsageError(f"device spec {label}: ops.{op} may give types, since and until only")
        types = frozenset(_type_list(detail["types"], label, f"ops.{op}.types")) if "types" in detail else None
        out[op] = [(int(detail.get("since", 1)), detail.get("until"), types)]
    return out


def _names(value, label: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"device spec {label}: {key} must be a list of names")
    return value


def _type_list(value, label: str, key: str) -> list[str]:
    names = _names(value, label, key)
    for t in names:
        if t not in TYPE_NAMES:
            close = difflib.get_close_matches(t, sorted(TYPE_NAMES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"device spec {label}: unknown type {t!r} in {key}{hint}")
    return names


def _positive(value, label: str, key: str, zero: bool = False) -> float:
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-6, without a dot, as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero):
        raise UsageError(f"device spec {label}: {key} must be a {'non-negative' if zero else 'positive'} number")
    return float(value)


@functools.cache
def known_ops() -> frozenset[str]:
    """Operator keys onnx and onnxruntime know: 'Conv', 'com.microsoft.Attention', ..."""
    names = {s.name if s.domain in ("", "ai.onnx") else f"{s.domain}.{s.name}" for s in onnx.defs.get_all_schemas()}
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        names |= {s.name if s.domain in ("", "ai.onnx") else f"{s.domain}.{s.name}"
                  for s in C.get_all_operator_schema()}
    except (ImportError, AttributeError):
        pass
    return frozenset(names)


def _check_op(op: str, label: str) -> None:
    if op not in known_ops():
        close = difflib.get_close_matches(op, sorted(known_ops()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"device spec {label}: unknown operator {op!r}{hint}")


def type_name(enum: int) -> str:
    """onnx's element type enum as a spec type name: FLOAT -> float32, DOUBLE -> float64, INT8 -> int8."""
    name = onnx.TensorProto.DataType.Name(enum).lower()
    return _ONNX_TYPE_NAMES.get(name, name)


def node_types(node, schema=None) -> set[str]:
    """Element type names of the tensors a gs node reads and writes (those known) whose type the
    operator leaves open: a tensor whose formal parameter in `schema` (an onnx OpSchema) allows a
    single type (Where's bool condition, Gather's int64 indices under a one-type constraint) says
    nothing about the kernels, which list only the types they choose between."""
    out = set()
    for tensors, formals in ((node.inputs, schema.inputs if schema else None),
                             (node.outputs, schema.outputs if schema else None)):
        for i, t in enumerate(tensors):
            if not t.name or (e := onnx_dtype(t)) is None:
                continue
            formal = formals[min(i, len(formals) - 1)] if formals else None
            # onnx's FormalParameter says type_str, onnxruntime's typeStr
            if formal is not None and not _open_type(schema, getattr(formal, "type_str", None) or formal.typeStr):
                continue
            out.add(type_name(e))
    return out


def _open_type(schema, type_str: str) -> bool:
    for c in schema.type_constraints:
        if c.type_param_str == type_str:
            return len(c.allowed_type_strs) > 1
    return False  # a concrete type such as tensor(int64)


def schema(op: str, version: int | None, domain: str):
    """The op's schema for the model's opset of its domain (onnx's, or onnxruntime's for its own
    domains); None when unknown."""
    if version:
        try:
            return onnx.defs.get_schema(op, version, domain)
        except onnx.defs.SchemaError:
            pass
    found = _runtime_schemas().get((domain, op), [])
    fitting = [s for s in found if not version or s.since_version <= version]
    return max(fitting or found, key=lambda s: s.since_version, default=None)


@functools.cache
def _runtime_schemas() -> dict:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        schemas = C.get_all_operator_schema()
    except (ImportError, AttributeError):
        return {}
    out: dict = {}
    for s in schemas:
        out.setdefault((s.domain, s.name), []).append(s)
    return out
