"""Load and save ONNX models: validation, external data, atomic writes.

Protobuf lives here and at the other boundaries (shape inference, onnxruntime sessions); passes work
on the onnx-graphsurgeon graph built from the loaded model.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError, OnnxoptError, UsageError

# The protobuf serialization limit is 2 GiB; stay clearly below it.
PROTOBUF_LIMIT = 2**31 - 2**26
# Tensors at least this big go to the external data file when external data is used.
EXTERNAL_THRESHOLD = 1024


def check_input_path(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"input is a folder, not an ONNX file: {path}")
    if os.path.getsize(path) == 0:
        raise ModelError(f"input file is empty: {path}")


def check_output_path(input_path: str | None, output_path: str) -> None:
    """Refuse an output that would overwrite the input or cannot be written, before any work."""
    if os.path.isdir(output_path):
        raise UsageError(f"output path is a folder: {output_path}")
    if input_path is not None and (os.path.realpath(input_path) == os.path.realpath(output_path) or (
            os.path.exists(output_path) and os.path.samefile(input_path, output_path))):
        raise UsageError("output path is the input path; the input is never overwritten")
    check_folder_writable(output_path, "output")


def check_folder_writable(path: str, what: str) -> None:
    """Refuse a path whose folder is missing or not writable: `cannot write WHAT: ...`."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        problem = "not a folder" if os.path.exists(folder) else "folder does not exist"
        raise OnnxoptError(f"cannot write {what}: {problem}: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxoptError(f"cannot write {what}: folder is not writable: {folder}")


def load_model(path: str) -> onnx.ModelProto:
    """Load a model file with its external data; any failure becomes a one-line ModelError."""
    return load_model_sized(path)[0]


def load_model_sized(path: str, keep_external: bool = False) -> tuple[onnx.ModelProto, int]:
    """load_model, and the bytes the model takes on disk: its file and its external data files.

    With `keep_external` the external weights are not read: the tensors keep pointing into the
    files beside the model (graph.import_model(..., base_dir) reads each when it is looked at)."""
    check_input_path(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"not a readable ONNX model: {path}: {_one_line(e) or 'protobuf parse error'}") from None
    # Fields this onnx does not know (a newer schema, or damage the parser skipped) mean nothing to
    # the checker or the passes, and the export could not keep them anyway; a TypeProto holding only
    # such a field would reach the graph IR as a type without a value.
    model.DiscardUnknownFields()
    _check_strings(model, path)
    if not model.HasField("graph") or (not model.opset_import and model.ir_version == 0):
        raise ModelError(f"not an ONNX model (no graph or opset): {path}")
    folder = os.path.dirname(os.path.abspath(path))
    locations = {e.value for t in _all_tensors(model) for e in t.external_data if e.key == "location"}
    size = os.path.getsize(path) + sum(os.path.getsize(os.path.join(folder, loc)) for loc in locations
                                       if os.path.isfile(os.path.join(folder, loc)))
    missing = sorted(loc for loc in locations if not os.path.isfile(os.path.join(folder, loc)))
    if missing:
        raise ModelError(f"cannot load external data of {path}: no file {missing[0]!r} beside it")
    check_model(path=path)  # from the file: the checker parses its own copy, so none is serialized here
    check_types(model, path)  # works without the large tensors' data
    if keep_external:
        return model, size
    try:
        onnx.external_data_helper.load_external_data_for_model(model, folder)
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ModelError(f"cannot load external data of {path}: {_one_line(e)}") from None
    return model, size


def check_model(model: onnx.ModelProto | None = None, path: str | None = None) -> None:
    """Run onnx.checker on the proto when it fits in memory's protobuf limit, else on the file."""
    try:
        if model is not None and _fits_protobuf(model):
            onnx.checker.check_model(model)
        elif path is not None:
            onnx.checker.check_model(path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        where = f"{path}: " if path else ""
        raise ModelError(f"model fails onnx.checker: {where}{_one_line(e)}") from None


def check_types(model: onnx.ModelProto, path: str | None = None) -> None:
    """What onnx.checker's default check leaves out, over an input model: the graph must have
    outputs, and strict type and shape inference must pass, as in the checker's full check, except
    that shapes declared on graph outputs and value_info (subgraphs' too) are not held against the
    model: a stale declared shape is harmless (onnxruntime runs such models), while an operator fed
    the wrong types (Add of float and int64), an output declared with the wrong type or an invalid
    attribute make a model onnxruntime refuses and the passes cannot reason about. A model that
    strict inference refuses but onnxruntime loads is accepted. Works on a copy without the large
    tensor data."""
    from .graph import _without_large_data, proto_graphs

    where = f"{path}: " if path else ""
    if not model.graph.output:
        raise ModelError(f"model has no graph outputs: {where}nothing to compute")
    skeleton = _without_large_data(model)
    graph = skeleton.graph
    for g in proto_graphs(graph):
        for vi in list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
    for vi in graph.input:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()  # some exporters write -1 for "unknown"; inference rejects it
    try:
        onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        if _runtime_loads(model, path):
            return  # onnx's strict inference is stricter than the runtime (e.g. inside function bodies)
        raise ModelError(f"model fails type and shape inference: {where}{_one_line(e)}") from None


def _runtime_loads(model: onnx.ModelProto, path: str | None) -> bool:
    """Whether onnxruntime accepts the model: the tie-breaker when onnx's strict inference refuses
    a model that the checker passes (only reached on that failure, so its cost is rare)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    try:
        source = path if path is not None else model.SerializeToString()
        ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001 - any refusal (or a model too big to serialize) means no
        return False


def _check_strings(model: onnx.ModelProto, path: str) -> None:
    """Refuse a string field that is not UTF-8 (a damaged name or doc string). The protobuf parser
    accepts it and hands it to Python as bytes, which the graph IR cannot name a tensor or a graph
    with. Tensor data is not walked: only tensors' names, doc strings and external data entries."""
    from .graph import _is_repeated

    stack: list = [model]
    while stack:
        message = stack.pop()
        if isinstance(message, onnx.TensorProto):
            texts = [message.name, message.doc_string] + [s for e in message.external_data for s in (e.key, e.value)]
            if any(isinstance(s, bytes) for s in texts):
                raise ModelError(f"not a readable ONNX model: {path}: tensor name or doc string is not UTF-8 text")
            continue
        for fd, value in message.ListFields():
            if fd.type == fd.TYPE_STRING:
                if any(isinstance(s, bytes) for s in (value if _is_repeated(fd) else [value])):
                    raise ModelError(f"not a readable ONNX model: {path}: {fd.full_name} is not UTF-8 text")
            elif fd.type == fd.TYPE_MESSAGE:
                stack.extend(value if _is_repeated(fd) else [value])


def _all_tensors(model: onnx.ModelProto):
    """Every dense tensor of the model: initializers and tensor attributes (Constant values) of the
    graph, its subgraphs and the model-local functions, as external data conversion sees them."""
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        yield from _node_tensors(f.node)


def _graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_tensors(g)


class PendingOutput:
    """An output written completely to temporary files in the target folder; `commit` renames
    it into place, `discard` removes it. Nothing at the target path changes before `commit`.

    With external data the temporary model points at the temporary data file, so it can be
    loaded (for verification) before the commit; `commit` rewrites the small model file with the
    final data file name.
    """

    @classmethod
    def streamed(cls, build, path: str, external_data: bool) -> "PendingOutput":
        """An output whose large tensors `build(sink)` streams to the file while it builds the
        model proto, so the weights are never held twice: into the external-data file, or, for a
        single-file model, appended after the rest of the serialized model."""
        self = cls.__new__(cls)
        self._start(path, external_data)

        def write():
            if not external_data:
                sink = InlineSink()
                self.checkable = build(sink)
                with open(self.tmp_model, "wb") as f:
                    sink.finish(self.checkable, f)
                return
            with open(self.tmp_data, "wb") as f:
                self.model = build(DataSink(f, os.path.basename(self.tmp_data)))
            self._write_model()  # what the sink does not see (Constant-node attributes...) goes after it

        self._attempt(write)
        return self

    def __init__(self, model: onnx.ModelProto, path: str, external_data: bool | None = None):
        if external_data is None:
            external_data = not _fits_protobuf(model)
        self._start(path, external_data)
        self.model = model
        self._attempt(self._write_model)
        if not external_data:
            self.model = None  # commit rewrites it only with external data (the final data name)

    def _start(self, path: str, external_data: bool) -> None:
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        base = os.path.basename(path)
        self.data_name = base + ".data" if external_data else None
        self.tmp_model = self.tmp_data = self.model = self.checkable = None
        fd, tmp = self._attempt(lambda: tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=self.folder))
        os.close(fd)
        self.tmp_model = tmp
        self.tmp_data = tmp + ".data" if external_data else None

    def _write_model(self) -> None:
        """Write self.model, its remaining large tensors appended to the data file when there is one."""
        if self.tmp_data is not None:
            # not onnx's convert_model_to_external_data: it refuses a location that exists
            # relative to the working directory, which the streamed data file does when the
            # output goes to the current folder
            with open(self.tmp_data, "ab") as f:
                sink = DataSink(f, os.path.basename(self.tmp_data))
                sink.offset = f.tell()
                for t in _all_tensors(self.model):
                    if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= EXTERNAL_THRESHOLD:
                        sink.append(t)
        with open(self.tmp_model, "wb") as f:
            f.write(self.model.SerializeToString())

    def _attempt(self, work):
        """Run `work`; on any failure remove what was written (an OSError as one clear line)."""
        try:
            return work()
        except OSError as e:
            self.discard()
            raise _write_error(self.path, e) from None
        except BaseException:
            self.discard()
            raise

    def check(self) -> None:
        """onnx.checker on the written model (from the file, or from the proto that stands for a
        streamed single file, so the weights are not read back)."""
        if self.checkable is not None:
            check_model(self.checkable)
        else:
            check_model(path=self.tmp_model)

    def commit(self) -> list[str]:
        """Move the files into place; returns the paths written."""
        written = [self.path]

        def move():
            if self.tmp_data is not None and os.path.exists(self.tmp_data) and not os.path.getsize(self.tmp_data):
                os.remove(self.tmp_data)  # streamed, but no tensor was big enough to move
            if self.tmp_data is not None and not os.path.exists(self.tmp_data):
                self.tmp_data = None  # no tensor was big enough to move: the model is self-contained
            if self.tmp_data is not None:
                _set_external_location(self.model, self.data_name)
                with open(self.tmp_model, "wb") as f:
                    f.write(self.model.SerializeToString())
                final_data = os.path.join(self.folder, self.data_name)
                os.chmod(self.tmp_data, _file_mode())
                os.replace(self.tmp_data, final_data)
                written.append(final_data)
            os.chmod(self.tmp_model, _file_mode())  # temporary files are private; outputs follow the umask
            os.replace(self.tmp_model, self.path)

        self._attempt(move)
        return written

    def discard(self) -> None:
        for p in (self.tmp_model, self.tmp_data):
            if p is not None and os.path.exists(p):
                os.remove(p)


class DataSink:
    """An external-data file tensors are streamed into while the model proto is built
    (graph.export_model(m, sink)): each tensor's bytes are written once, at a page-aligned
    offset (onnxruntime can then map them), and the proto keeps only the reference."""

    ALIGN = 4096
    nested = True  # subgraphs' tensors go to the file too

    def __init__(self, file, location: str):
        self.file, self.location, self.offset = file, location, 0

    def takes(self, t) -> bool:
        """Numeric tensors of EXTERNAL_THRESHOLD bytes or more go to the file."""
        if t.shape is None or t.dtype is None or isinstance(t.dtype, int):
            return False
        dtype = np.dtype(t.dtype)
        return dtype.kind in "biufc" and math.prod(t.shape) * dtype.itemsize >= EXTERNAL_THRESHOLD

    def write(self, proto: onnx.TensorProto, t) -> None:
        """Fill `proto` with `t`'s name, type and dims and a reference to its bytes in the file."""
        stub, data = _tensor_parts(t)
        proto.CopyFrom(stub)
        self._put(proto, data)

    def append(self, proto: onnx.TensorProto) -> None:
        """Move a tensor proto's raw_data into the file."""
        data = proto.raw_data
        proto.ClearField("raw_data")
        self._put(proto, data)

    def _put(self, proto: onnx.TensorProto, data: bytes) -> None:
        pad = -self.offset % self.ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(data)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(data)))):
            proto.external_data.add(key=key, value=value)
        self.offset += len(data)


class StubSink:
    """export_model(m, StubSink()) gives a skeleton: large tensors keep only name, type and dims
    (marked external, with no file behind them), for shape inference at no weight cost."""

    nested = True
    takes = DataSink.takes

    def write(self, proto: onnx.TensorProto, t) -> None:
        proto.CopyFrom(_tensor_parts(t, data=False)[0])
        proto.data_location = onnx.TensorProto.EXTERNAL
        proto.external_data.add(key="location", value="stripped")


class InlineSink:
    """Streams a single-file model: export_model(m, sink) leaves the main graph's large tensors
    out of the proto (they are noted here), the proto is serialized, and each tensor is then
    appended as one more `graph { initializer { ... raw_data } }` record, which protobuf parsers
    merge into the same graph (repeated fields concatenate). The weights are read from their
    source one at a time and never held twice, where serializing the whole proto would."""

    nested = False  # subgraph tensors stay in the proto

    def __init__(self):
        self.pending: list[tuple[onnx.TensorProto, object]] = []

    takes = DataSink.takes

    def write(self, proto: onnx.TensorProto, t) -> None:
        proto.name = t.name  # a placeholder: removed before serializing, written by `finish`
        self.pending.append((proto, t))

    def finish(self, model: onnx.ModelProto, file) -> None:
        """Write `model` without the noted tensors, then each of them after it."""
        names = {p.name for p, _ in self.pending}
        kept = [t for t in model.graph.initializer if t.name not in names]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        file.write(model.SerializeToString())
        # the proto now stands for the file for onnx.checker, the appended tensors as graph inputs
        # of their type and shape (the checker reading the file back would hold the weights twice)
        listed = {i.name for i in model.graph.input}  # an overridable initializer is already there
        for _, t in self.pending:
            stub = _tensor_parts(t, data=False)[0]
            if stub.name not in listed:
                model.graph.input.append(onnx.helper.make_tensor_value_info(stub.name, stub.data_type, stub.dims))
        for _, t in self.pending:
            stub, data = _tensor_parts(t)
            tensor = stub.SerializeToString() + _field(9, len(data))  # TensorProto.raw_data
            graph_field = _field(5, len(tensor) + len(data))  # GraphProto.initializer
            file.write(_field(7, len(graph_field) + len(tensor) + len(data)))  # ModelProto.graph
            file.write(graph_field)
            file.write(tensor)
            file.write(data)
            del data  # before the next tensor's bytes are made: one tensor in memory at a time
        self.pending.clear()


def _field(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def external_base(t) -> str:
    from .graph import EXTERNAL_BASE

    return getattr(t._values, EXTERNAL_BASE, "")


def _tensor_parts(t, data: bool = True) -> tuple[onnx.TensorProto, bytes | None]:
    """A gs constant as (a TensorProto with its name, type and dims, its raw bytes or None)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from .graph import read_external

    stub = onnx.TensorProto()
    stub.name = t.name
    stub.dims.extend(int(d) for d in t.shape)
    source = t._values.tensor if isinstance(t._values, LazyValues) else None
    if source is not None and onnx.external_data_helper.uses_external_data(source):
        stub.data_type = source.data_type  # read from the input's file, no conversion
        return stub, read_external(source, external_base(t)) if data else None
    if source is not None and source.HasField("raw_data"):
        stub.data_type = source.data_type
        return stub, source.raw_data if data else None  # the input's own bytes: no conversion
    if not data:
        stub.data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
        return stub, None
    array = np.ascontiguousarray(t.values)
    stub.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    return stub, array.tobytes()


def save_model(model: onnx.ModelProto, path: str, external_data: bool | None = None) -> list[str]:
    """Write the model atomically (see PendingOutput). external_data None: only when the model
    does not fit in one protobuf (over 2 GB)."""
    return PendingOutput(model, path, external_data).commit()


def _fits_protobuf(model: onnx.ModelProto) -> bool:
    """Whether the model serializes into one protobuf: estimated from the tensors held inline
    (their dims and types), which is fast and what dominates the size."""
    from .graph import _tensor_nbytes

    inline = sum(_tensor_nbytes(t) for t in _all_tensors(model) if t.data_location != onnx.TensorProto.EXTERNAL)
    return inline < PROTOBUF_LIMIT


def _set_external_location(model: onnx.ModelProto, location: str) -> None:
    for t in _all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location


def _write_error(path: str, e: OSError) -> OnnxoptError:
    return OnnxoptError(f"cannot write output {path}: {e.strerror or e}")


def _file_mode() -> int:
    """The permissions a newly created file gets: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The whole message on one line (the checker puts the node that fails on the next lines)."""
    text = " ".join(str(e).split())
    return text[:limit] + ("..." if len(text) > limit else "")
