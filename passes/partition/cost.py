"""The cost model: operations and bytes per node from inferred shapes, and a node's estimated time
on a device: its launch overhead plus the longer of compute (operations / the device's rate for
the node's class) and memory traffic (bytes read and written / bandwidth).

Shapes come from onnx shape inference with the graph inputs set to the concrete shapes of a
verification sample. A tensor inference leaves unknown (the outputs of onnxruntime's fused
operators) takes the shape of its node's largest non-constant input: right for the
normalizations, activations and attention blocks that make up those operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import Model, export_model, infer_shapes, onnx_dtype, proto_value_infos

CONV = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv", "NhwcFusedConv"}
MATMUL = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "DynamicQuantizeMatMul",
          "MatMulIntegerToFloat", "MatMulNBits", "FusedGemm", "QGemm", "GatherBlockQuantized"}
ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "QAttention"}
HEAVY_ELEMENTWISE = {"Softmax", "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                     "SkipSimplifiedLayerNormalization", "RMSNormalization", "BatchNormalization", "Gelu",
                     "FastGelu", "BiasGelu", "Erf", "InstanceNormalization", "GroupNormalization", "Exp", "Tanh",
                     "Sigmoid", "HardSwish", "QuickGelu"}


@dataclass
class NodeCost:
    ops: float  # arithmetic operations
    nbytes: float  # bytes read and written
    kind: str  # the throughput class: conv, matmul or default
    known: bool  # every tensor's shape was known (or taken from a neighbour)

    def seconds(self, device) -> float:
        rate = device.throughput.get(self.kind, device.throughput["default"])
        return device.launch + max(self.ops / rate, self.nbytes / device.bandwidth)


@dataclass
class TensorInfo:
    shape: tuple | None
    itemsize: int

    @property
    def nbytes(self) -> int:
        return 0 if self.shape is None else math.prod(self.shape) * self.itemsize

    @property
    def size(self) -> int:
        return 0 if self.shape is None else math.prod(self.shape)


def tensor_infos(m: Model, feeds: dict | None) -> dict[str, TensorInfo]:
    """Concrete shapes and item sizes of the main graph's tensors, graph inputs set to the shapes
    of `feeds` (one verification sample)."""
    from onnxopt.io import StubSink

    proto = export_model(m, StubSink())
    for vi in proto.graph.input:
        if feeds and vi.name in feeds:
            dims = vi.type.tensor_type.shape
            dims.ClearField("dim")
            for d in np.shape(feeds[vi.name]):
                dims.dim.add(dim_value=int(d))
    inferred = infer_shapes(proto)
    infos: dict[str, TensorInfo] = {}
    for vi in list(inferred.graph.input) + list(proto_value_infos(inferred.graph)) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.elem_type:
            continue
        shape = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shape = tuple(d.dim_value for d in tt.shape.dim)
        old = infos.get(vi.name)
        if old is None or old.shape is None:
            infos[vi.name] = TensorInfo(shape, itemsize(tt.elem_type))
    for t in m.graph.tensors().values():
        if isinstance(t, gs.Constant):
            infos[t.name] = TensorInfo(tuple(t.shape), itemsize(onnx_dtype(t)))
    return infos


def itemsize(enum: int | None) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(enum).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def node_costs(graph: gs.Graph, infos: dict[str, TensorInfo]) -> list[NodeCost]:
    """The cost of each main-graph node, in order; a node with subgraphs counts their nodes too."""
    return [node_cost(node, infos) for node in graph.nodes]


def node_cost(node: gs.Node, infos: dict[str, TensorInfo]) -> NodeCost:
    ins = [_info(t, infos) for t in node.inputs if t.name]
    activations = [_info(t, infos) for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
    largest = max((i for i in activations or ins if i.shape is not None), key=lambda i: i.size, default=None)
    known = True
    outs = []
    for t in node.outputs:
        info = _info(t, infos)
        if info.shape is None:
            known = largest is not None
            info = largest or info
        outs.append(info)
    nbytes = float(sum(i.nbytes for i in ins) + sum(o.nbytes for o in outs))
    out_size = float(sum(o.size for o in outs))
    op = node.op
    a = ins[0].shape if ins and ins[0].shape is not None else None
    if op in CONV and len(ins) > 1 and ins[1].shape is not None and len(ins[1].shape) >= 2:
        w = ins[1].shape  # (out, in / group, k..); ConvTranspose: (in, out / group, k..)
        ops = 2.0 * (ins[0].size if op == "ConvTranspose" else out_size) * math.prod(w[1:])
        return NodeCost(ops, nbytes, "conv", known)
    if op in MATMUL and a is not None and len(a) >= 1:
        k = a[-1] if not (op == "Gemm" and node.attrs.get("transA", 0)) else a[0]
        if op == "GatherBlockQuantized":
            return NodeCost(out_size, nbytes, "default", known)
        return NodeCost(2.0 * out_size * k, nbytes, "matmul", known)
    if op in ATTENTION and a is not None and len(a) == 3:
        batch, seq, hidden = a
        ops = 4.0 * batch * seq * seq * hidden
        if op in ("Attention", "QAttention") and len(ins) > 1 and ins[1].shape is not None:
            ops += 2.0 * batch * seq * math.prod(ins[1].shape)  # the packed QKV projection
        return NodeCost(ops, nbytes, "matmul", known)
    per_element = 5.0 if op in HEAVY_ELEMENTWISE else 1.0
    reads = float(sum(i.size for i in ins if i.shape is not None))
    return NodeCost(per_element * max(out_size, reads) + _subgraph_ops(node, infos), nbytes, "default", known)


def _subgraph_ops(node: gs.Node, infos) -> float:
    from onnxopt.graph import subgraphs

    return sum(node_cost(n, infos).ops for sub in subgraphs(node) for n in sub.nodes)


def _info(t: gs.Tensor, infos: dict[str, TensorInfo]) -> TensorInfo:
    info = infos.get(t.name)
    if info is not None:
        return info
    if t.shape is not None and all(isinstance(d, int) for d in t.shape):
        return TensorInfo(tuple(t.shape), itemsize(onnx_dtype(t)))
    return TensorInfo(None, itemsize(onnx_dtype(t)))
