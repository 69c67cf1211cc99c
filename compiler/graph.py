"""Helpers over onnx-graphsurgeon: import/export that keep model-level fields, walking subgraphs,
constants, consumers, replacing tensors and fresh names.

The graph IR is onnx-graphsurgeon's `gs.Graph`. A tensor's `.inputs` are its producers and its
`.outputs` its consumers (including nodes inside subgraphs that read it from the outer scope).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.logger import G_LOGGER

G_LOGGER.severity = G_LOGGER.ERROR

# Ops whose result is not a function of their inputs: never folded nor merged.
NONDETERMINISTIC = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
}
STANDARD_DOMAINS = ("", "ai.onnx", None)  # gs spells the default domain None


@dataclass
class Model:
    """An imported model: the graph passes rewrite, plus what the exporter must put back."""

    graph: gs.Graph
    meta: onnx.ModelProto  # model-level fields only (graph left empty)
    value_info_names: set[str] = field(default_factory=set)  # names that had value_info in the input
    dropped_initializers: int = 0  # initializers no node used (gs drops them at import)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference (with data propagation) on a copy stripped of large tensor data.

    Returns the inferred copy; the caller takes value_info from it. Inference never needs the
    values of large weights, so this works for models over 2 GB and costs little memory.
    """
    skeleton = _without_large_data(model)
    for vi in list(skeleton.graph.input) + list(skeleton.graph.output) + list(skeleton.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()  # some exporters write -1 for "unknown"; inference rejects it
    try:
        return onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; passes work without shapes
        return skeleton


def _without_large_data(model: onnx.ModelProto, limit: int = 4096) -> onnx.ModelProto:
    """A copy of the model whose large main-graph initializers are stubs (dims and type only)."""
    out = onnx.ModelProto()
    _copy_model_fields(model, out)
    out.functions.extend(model.functions)
    for fd, value in model.graph.ListFields():
        if fd.name == "initializer":
            continue
        if _is_repeated(fd):
            getattr(out.graph, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out.graph, fd.name).CopyFrom(value)
        else:
            setattr(out.graph, fd.name, value)
    for t in model.graph.initializer:
        if _tensor_nbytes(t) <= limit or t.data_location == onnx.TensorProto.EXTERNAL:
            out.graph.initializer.append(t)
        else:
            stub = out.graph.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", "stripped"
    return out


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its dims and type, without touching the data."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return math.prod(t.dims) * itemsize


EXTERNAL_BASE = "_onnxopt_external_base"  # on a LazyValues whose tensor's data is still in a file


def import_model(model: onnx.ModelProto, shapes: bool = True, base_dir: str | None = None) -> Model:
    """Build the graph IR from a ModelProto. The proto's tensors are shared, not copied; tensors
    whose data is still in external files (base_dir: the model's folder) are read when looked at."""
    value_info_names = _value_info_names(model.graph)
    n_value_info = len(model.graph.value_info)
    dropped = _unused_initializers(model.graph)
    if shapes:
        inferred = infer_shapes(model)
        known = value_info_names | {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
        extra = [vi for vi in inferred.graph.value_info if vi.name not in known]
        model.graph.value_info.extend(extra)
    try:
        graph = gs.import_onnx(model)
    finally:
        if shapes:
            del model.graph.value_info[n_value_info:]
    # gs keeps the proto's own opset list: a copy, so a domain a pass adds never reaches the input
    graph.import_domains = [onnx.helper.make_opsetid(o.domain, o.version) for o in model.opset_import]
    _attach_node_metadata(model.graph, graph)
    if model.ir_version >= 4:  # before IR 4 all initializers are inputs: export lists them again
        _restore_initializer_inputs(model.graph, graph)
    if base_dir is not None:
        for g in all_graphs(graph):
            for t in g.tensors().values():
                if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and \
                        onnx.external_data_helper.uses_external_data(t._values.tensor):
                    setattr(t._values, EXTERNAL_BASE, base_dir)
    meta = onnx.ModelProto()
    _copy_model_fields(model, meta)
    meta.graph.metadata_props.extend(model.graph.metadata_props)
    return Model(graph, meta, value_info_names, dropped)


def _attach_node_metadata(proto: onnx.GraphProto, graph: gs.Graph) -> None:
    """gs drops a node's metadata_props (onnxruntime's `layer_ann`, exporters' source locations):
    keep them on the IR node as a dict `metadata_props`, for the exporter to write back."""
    for pn, node in zip(proto.node, graph.nodes):
        if pn.metadata_props:
            node.metadata_props = {e.key: e.value for e in pn.metadata_props}
        for attr in pn.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _attach_node_metadata(attr.g, node.attrs[attr.name])
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub_proto, sub in zip(attr.graphs, node.attrs[attr.name]):
                    _attach_node_metadata(sub_proto, sub)


def node_metadata(node: gs.Node) -> dict[str, str]:
    """The node's metadata_props (a dict the caller may change); created empty when it has none."""
    if getattr(node, "metadata_props", None) is None:
        node.metadata_props = {}
    return node.metadata_props


def _restore_initializer_inputs(proto: onnx.GraphProto, graph: gs.Graph) -> None:
    """gs drops initializers from the graph inputs; put them back, in order. Such an initializer
    is only a default the caller may override: mark it so no pass treats it as a constant."""
    inits = {t.name: t for t in proto.initializer}
    if not any(i.name in inits for i in proto.input):
        return
    tensors = graph.tensors()
    inputs = []
    for vi in proto.input:
        if vi.name in inits:
            t = tensors.get(vi.name) or gs.Constant(vi.name, LazyValues(inits[vi.name]))  # unused ones too
            setattr(t, OVERRIDABLE, True)
            inputs.append(t)
        else:
            inputs.append(tensors[vi.name])
    graph.inputs = inputs


def _unused_initializers(graph: onnx.GraphProto) -> int:
    """Initializers, in the graph and its subgraphs, that no node reads and no output names."""
    used = _used_names(graph) | {i.name for i in graph.input}
    return (sum(1 for t in graph.initializer if t.name not in used)
            + sum(_unused_initializers(sub) for sub in _proto_subgraphs(graph)))


def _copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Copy every model-level field but the graph and functions (no tensor data is copied)."""
    for fd, value in src.ListFields():
        if fd.name in ("graph", "functions"):
            continue
        dst.ClearField(fd.name)
        if _is_repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _is_repeated(fd) -> bool:
    repeated = getattr(fd, "is_repeated", None)  # protobuf >= 6; `label` before
    return repeated if repeated is not None else fd.label == fd.LABEL_REPEATED


def _value_info_names(graph: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in graph.value_info}
    for sub in _proto_subgraphs(graph):
        names |= _value_info_names(sub)
    return names


def proto_graphs(graph: onnx.GraphProto):
    """The graph proto and every subgraph nested in its nodes' attributes, at any depth."""
    yield graph
    for sub in _proto_subgraphs(graph):
        yield from proto_graphs(sub)


def _proto_subgraphs(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
    for sub in _proto_subgraphs(graph):
        used |= _used_names(sub)
    return used


def export_model(m: Model, sink=None) -> onnx.ModelProto:
    """Build the ModelProto: graph from the IR, model-level fields and opset imports from the input.

    Written straight into one new ModelProto so each weight is copied once (gs.export_onnx and
    onnx.helper.make_model would copy every tensor twice more). With a `sink` (io.DataSink),
    tensors of its threshold size or more are streamed to its external-data file instead and the
    proto holds only their references: the weights are then never in memory twice.
    """
    graph = m.graph
    out = onnx.ModelProto()
    _copy_model_fields(m.meta, out)  # metadata, doc string, producer, IR version, opsets...
    out.graph.metadata_props.extend(m.meta.graph.metadata_props)
    _export_graph(graph, out.graph, m.value_info_names, frozenset(), sink)
    out.functions.extend(OnnxExporter.export_function(f) for f in graph.functions)
    have = {o.domain for o in out.opset_import}
    out.opset_import.extend(o for o in update_import_domains(graph) if o.domain not in have)  # new domains
    if out.ir_version < 4:
        _initializers_as_inputs(out.graph)
    _unique_node_names(out.graph, set())
    return out


def _unique_node_names(graph: onnx.GraphProto, used: set[str]) -> None:
    """Rename the later of two nodes that share a name (onnxruntime refuses such models)."""
    for node in graph.node:
        if node.name:
            name, i = node.name, 0
            while name in used:
                i += 1
                name = f"{node.name}_{i}"
            node.name = name
            used.add(name)
    for sub in _proto_subgraphs(graph):
        _unique_node_names(sub, used)


def _export_graph(graph: gs.Graph, dst: onnx.GraphProto, keep: set[str], outer: frozenset = frozenset(),
                  sink=None) -> None:
    """Write a graph into `dst`. Constants already written by an enclosing graph (`outer`: their
    ids) are read from there, not written again into a subgraph; value_info is written only for
    names the input had (inferred shapes are for the passes, not for the output file)."""
    dst.name = graph.name or ""
    if graph.doc_string:
        dst.doc_string = graph.doc_string
    dst.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs)
    dst.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    io_names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) and t.name in keep and t.name not in io_names and (
                t.dtype is not None or t.shape is not None):
            dst.value_info.append(OnnxExporter.export_value_info_proto(t, False))
    mine = _constants_owned(graph, outer)
    for t in mine.values():
        if isinstance(t._values, SparseValues):
            dst.sparse_initializer.append(OnnxExporter.export_sparse_tensor_proto(t))
        elif sink is not None and sink.takes(t):
            sink.write(dst.initializer.add(), t)
        else:
            proto = dst.initializer.add()  # append fails past 2 GB
            proto.CopyFrom(OnnxExporter.export_tensor_proto(t))
            if onnx.external_data_helper.uses_external_data(proto) and hasattr(t._values, EXTERNAL_BASE):
                onnx.external_data_helper.load_external_data_for_tensor(proto, getattr(t._values, EXTERNAL_BASE))
    visible = outer | frozenset(mine)
    for node in graph.nodes:
        dst.node.append(_export_node(node, keep, visible, sink))


def _constants_owned(graph: gs.Graph, outer: frozenset) -> dict:
    """The constants a graph writes as its initializers: those its own nodes read, and those read
    in two or more of its subgraphs (written once here, where all of them can see it), less the
    ones an enclosing graph already wrote."""
    owned = {id(t): t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    seen: dict[int, gs.Constant] = {}
    shared: set[int] = set()
    for node in graph.nodes:
        for sub in subgraphs(node):
            below = {id(t): t for g in all_graphs(sub) for t in g.tensors().values() if isinstance(t, gs.Constant)}
            shared |= below.keys() & seen.keys()
            seen.update(below)
    owned.update((i, seen[i]) for i in shared)
    return {i: t for i, t in owned.items() if i not in outer}


def _export_node(node: gs.Node, keep: set[str], visible: frozenset, sink=None) -> onnx.NodeProto:
    proto = onnx.helper.make_node(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs],
                                  name=node.name, domain=node.domain)
    plain = {k: v for k, v in node.attrs.items() if not _is_graph_attr(v)}
    proto.attribute.extend(OnnxExporter.export_attributes(plain))
    for key, value in (getattr(node, "metadata_props", None) or {}).items():
        proto.metadata_props.add(key=key, value=value)
    inner = sink if sink is not None and sink.nested else None  # the sink for subgraphs' tensors
    for key, value in node.attrs.items():
        if isinstance(value, gs.Graph):
            attr = proto.attribute.add(name=key, type=onnx.AttributeProto.GRAPH)
            _export_graph(value, attr.g, keep, visible, inner)
        elif _is_graph_attr(value):
            attr = proto.attribute.add(name=key, type=onnx.AttributeProto.GRAPHS)
            for sub in value:
                _export_graph(sub, attr.graphs.add(), keep, visible, inner)
    return proto


def _is_graph_attr(value) -> bool:
    return isinstance(value, gs.Graph) or (isinstance(value, (list, tuple)) and bool(value)
                                           and all(isinstance(v, gs.Graph) for v in value))


def _initializers_as_inputs(graph: onnx.GraphProto) -> None:
    # IR version 3 requires every initializer to be listed among the graph inputs.
    names = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name not in names:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


# ----------------------------------------------------------------------------------- walking


def all_graphs(graph: gs.Graph):
    """The graph and every subgraph nested in its nodes' attributes, parents first."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def subgraphs(node: gs.Node):
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, gs.Graph):
                    yield v


def count_nodes(graph: gs.Graph, functions: bool = False) -> int:
    """Nodes in the graph and its subgraphs (and in model-local function bodies if asked)."""
    total = sum(len(g.nodes) for g in all_graphs(graph))
    if functions:
        total += sum(len(g.nodes) for f in graph.functions for g in all_graphs(f))
    return total


def count_params(graph: gs.Graph) -> int:
    """Elements in initializers and Constant nodes."""
    seen: dict[int, int] = {}
    for g in all_graphs(graph):
        for node in g.nodes:
            tensors = list(node.inputs)
            if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
                tensors.append(node.attrs["value"])
            for t in tensors:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen[id(t)] = math.prod(t.shape) if t.shape is not None else 0
    return sum(seen.values())


# ----------------------------------------------------------------------------------- tensors


OVERRIDABLE = "_onnxopt_overridable"  # set by import_model on initializers that are also inputs


def is_constant(t: gs.Tensor) -> bool:
    """A constant the graph can rely on: an initializer that is not also an overridable graph
    input (of this graph or of an enclosing one: import_model marks those)."""
    return isinstance(t, gs.Constant) and not getattr(t, OVERRIDABLE, False)


def values(t: gs.Constant) -> np.ndarray:
    """A constant's values without caching them on the tensor: gs's `.values` keeps the loaded
    array, which would double the memory of every weight we look at and stop the exporter from
    reusing the input's TensorProto."""
    if isinstance(t._values, SparseValues):
        return t._values.load()
    if isinstance(t._values, LazyValues):
        # read-only, over one copy of the bytes (gs's load copies them twice): a weight looked at
        # costs its size once, and nothing can change the input's tensor by accident
        tensor = t._values.tensor
        if onnx.external_data_helper.uses_external_data(tensor):
            return _external_array(tensor, getattr(t._values, EXTERNAL_BASE, ""))
        return onnx.numpy_helper.to_array(tensor)
    return np.asarray(t.values)


def read_external(tensor: onnx.TensorProto, base_dir: str) -> bytes:
    """The bytes of a tensor kept in an external-data file (the tensor itself is left as is)."""
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    with open(os.path.join(base_dir, info.location), "rb") as f:
        f.seek(info.offset or 0)
        data = f.read(info.length) if info.length else f.read()
    if info.length and len(data) != info.length:
        raise OSError(f"external data of {tensor.name!r} is cut short in {info.location}")
    return data


def _external_array(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """A read-only array over the external bytes (one copy); odd element types go through onnx."""
    data = read_external(tensor, base_dir)
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError):
        dtype = None
    if dtype is not None and dtype.kind in "biufc" and tensor.data_type not in _PACKED_TYPES:
        return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    del copy.external_data[:]
    copy.data_location = onnx.TensorProto.DEFAULT
    copy.raw_data = data
    return onnx.numpy_helper.to_array(copy)


# element types numpy cannot read straight from bytes: packed sub-byte ones, and ml_dtypes ones
_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3",
                                                       "FLOAT6E3M2", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
                                                       "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0")
                 if hasattr(onnx.TensorProto, n)}


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> int:
    """Point every consumer of `old` (in any graph) at `new`. Returns the number of inputs changed."""
    changed = 0
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
                changed += 1
    return changed


def output_tensors(graph: gs.Graph) -> set[int]:
    return {id(t) for t in graph.outputs}


def bypass(graph: gs.Graph, node: gs.Node, keep: gs.Tensor, graph_outputs: set[int], local: set[int]) -> bool:
    """Remove a node that passes `keep` through unchanged to its single output.

    Consumers of the output read `keep` instead. When the output is a graph output its name must
    survive: the producer of `keep` is then renamed to write the output directly, which is only
    possible when `keep` is a plain intermediate of this graph (`local`: ids of the graph's nodes).
    Returns False if not possible.
    """
    out = node.outputs[0]
    if id(out) not in graph_outputs:
        replace_uses(out, keep)
        node.outputs.clear()
        node.inputs.clear()
        return True
    src = producer(keep)
    if (src is None or id(keep) in graph_outputs or keep in graph.inputs
            or isinstance(keep, gs.Constant) or id(src) not in local):
        return False
    node.outputs.clear()
    node.inputs.clear()
    replace_uses(keep, out)
    src.outputs[src.outputs.index(keep)] = out
    if out.dtype is None:
        out.dtype = keep.dtype
    if out.shape is None:
        out.shape = keep.shape
    return True


class Names:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, graph: gs.Graph):
        self.used = set()
        self.counter: dict[str, int] = {}  # per base, the last suffix tried: k calls cost O(k), not O(k^2)
        for g in all_graphs(graph):
            self.used.update(g.tensors().keys())
            self.used.update(n.name for n in g.nodes)

    def new(self, base: str) -> str:
        name, i = base, self.counter.get(base, 0)
        if i:
            name = f"{base}_{i}"
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.counter[base] = i
        self.used.add(name)
        return name


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value of a `Constant` node, or None for forms we leave alone (sparse, strings, refs)."""
    if node.op != "Constant" or node.domain not in STANDARD_DOMAINS or len(node.attrs) != 1:
        return None
    (key, v), = node.attrs.items()
    if isinstance(v, gs.Node.AttributeRef):
        return None
    if key == "value" and isinstance(v, gs.Constant):
        arr = values(v)
        return None if arr.dtype.kind in "OUS" else arr
    if key == "value_float":
        return np.array(v, dtype=np.float32)
    if key == "value_floats":
        return np.array(v, dtype=np.float32).reshape(-1)
    if key == "value_int":
        return np.array(v, dtype=np.int64)
    if key == "value_ints":
        return np.array(v, dtype=np.int64).reshape(-1)
    return None


def materialize_constant_nodes(graph: gs.Graph) -> int:
    """Turn `Constant` nodes into initializers, in the graph and its subgraphs (not in functions,
    which have no initializers). A Constant that is a graph output stays a node."""
    count = 0
    for g in all_graphs(graph):
        outs = output_tensors(g)
        for node in g.nodes:
            if node.op != "Constant" or len(node.outputs) != 1 or id(node.outputs[0]) in outs:
                continue
            value = constant_node_value(node)
            if value is None:
                continue
            out = node.outputs[0]
            const = gs.Constant(out.name, value)
            replace_uses(out, const)
            node.outputs.clear()
            count += 1
    return count



def onnx_dtype(t: gs.Tensor) -> int | None:
    """The tensor's element type as an onnx.TensorProto enum, None when unknown."""
    dtype = t.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def static_shape(t: gs.Tensor) -> list[int] | None:
    """The shape when every dimension is a known non-negative int, else None."""
    if t.shape is None:
        return None
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in t.shape):
        return [int(d) for d in t.shape]
    return None


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The values of a constant (see is_constant), else None."""
    return values(t) if is_constant(t) else None


def opset(graph: gs.Graph) -> int:
    """The default-domain opset the graph (or the subgraph's model) imports."""
    return int(graph.opset or 0)


def refresh_shapes(m: Model) -> int:
    """Shapes onnx inference now finds that the IR lacks (a folded Reshape target makes everything
    after it inferable), for tensors other than graph inputs and outputs, as import_model would
    find them in a second run. Returns how many tensors gained a shape."""
    from .io import StubSink

    inferred = infer_shapes(export_model(m, StubSink()))
    found = {vi.name: vi.type.tensor_type for vi in proto_value_infos(inferred.graph)}
    gained = 0
    for g in all_graphs(m.graph):
        io_names = {t.name for t in g.inputs} | {t.name for t in g.outputs}
        for name, t in g.tensors().items():
            tt = found.get(name)
            if isinstance(t, gs.Constant) or name in io_names or tt is None or not tt.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            if t.shape is None:
                t.shape = dims
            elif len(t.shape) == len(dims) and any(a is None and b is not None for a, b in zip(t.shape, dims)):
                t.shape = [a if a is not None else b for a, b in zip(t.shape, dims)]
            else:
                continue
            if t.dtype is None and tt.elem_type:
                t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            gained += 1
    return gained


def proto_value_infos(graph: onnx.GraphProto):
    """The value_info of a graph proto and of its subgraphs."""
    for g in proto_graphs(graph):
        yield from g.value_info


def raise_opset(m: Model, version: int) -> None:
    """Convert the model to default-domain opset `version` in place (onnx's version converter
    rewrites the operators whose definition changed). Raises ValueError when it cannot.

    The converter runs on a copy without the large weights (it never needs their values), which
    are put back afterwards: memory stays near twice the model."""
    proto = export_model(m)
    large = {t.name: t for t in proto.graph.initializer if _tensor_nbytes(t) > 4096
             and t.data_location != onnx.TensorProto.EXTERNAL}
    skeleton = _without_large_data(proto)
    try:
        converted = onnx.version_converter.convert_version(skeleton, version)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise ValueError(f"onnx's version converter failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    del skeleton
    for t in converted.graph.initializer:
        if t.name in large and t.data_location == onnx.TensorProto.EXTERNAL:
            t.CopyFrom(large.pop(t.name))
    del proto, large
    converted.ir_version = max(converted.ir_version,
                               onnx.helper.find_min_ir_version_for(list(converted.opset_import), True))
    new = import_model(converted)
    # onnx inference may know less than the passes proved (fold's symbolic dimensions): keep that
    known = {name: t for g in all_graphs(m.graph) for name, t in g.tensors().items() if t.shape is not None}
    for g in all_graphs(new.graph):
        for name, t in g.tensors().items():
            old = known.get(name)
            if old is not None and not isinstance(t, gs.Constant) and (
                    t.shape is None or len(t.shape) == len(old.shape) and not all(isinstance(d, int) for d in t.shape)):
                t.shape = old.shape
    m.graph, m.meta = new.graph, new.meta


def cleanup(graph: gs.Graph, functions: bool = True) -> gs.Graph:
    """What `graph.cleanup(remove_unused_graph_inputs=False)` does (dead nodes out, in subgraphs
    and local functions too), in linear time.

    gs disconnects each dead node from every tensor it reads with `list.remove`, a scan that
    compares nodes with its structural `Node.__eq__`: with a constant read by thousands of nodes
    (after duplicate merging, every GELU's 0.5) each removal cost O(n) and a fuse sweep O(n^2).
    Here the consumer lists are rebuilt once per touched tensor, by identity."""
    for node in graph.nodes:
        for sub in subgraphs(node):
            cleanup(sub, functions=False)
    if functions:
        for func in graph.functions:
            cleanup(func, functions=False)
    for t in graph.inputs:
        t.inputs.clear()  # a graph input has no producer (as gs's cleanup ensures)
    with graph.node_ids():
        used, _ = graph._get_used_node_ids()  # noqa: SLF001 - gs's own liveness walk, subgraph reads included
        keep = [n for n in graph.nodes if n.id in used]
        dead = [n for n in graph.nodes if n.id not in used]
    if not dead:
        return graph
    # a dead If/Loop/Scan takes its bodies along: their nodes must stop counting as readers of
    # outer tensors too, or a rule would still see those tensors as used elsewhere
    dead += [n for node in dead for sub in subgraphs(node) for g in all_graphs(sub) for n in g.nodes]
    dead_ids = {id(n) for n in dead}
    touched = {}
    for node in dead:
        for t in list(node.inputs) + list(node.outputs):
            touched[id(t)] = t
        list.clear(node.inputs)  # the base list's clear: no per-element synchronization
        list.clear(node.outputs)
    for t in touched.values():
        for side in (t.inputs, t.outputs):
            if any(id(n) in dead_ids for n in side):
                kept = [n for n in side if id(n) not in dead_ids]
                list.clear(side)
                list.extend(side, kept)
    graph.nodes = keep
    return graph


def constant_bytes(graph: gs.Graph) -> int:
    """Bytes of the graph's constants (subgraphs included), from their shapes and types."""
    total, seen = 0, set()
    for g in all_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and id(t) not in seen and t.shape is not None:
                seen.add(id(t))
                dtype = t.dtype if t.dtype is not None and not isinstance(t.dtype, int) else np.float32
                total += math.prod(t.shape) * np.dtype(dtype).itemsize
    return total
