"""fold: shape inference and constant folding.

- `Constant` nodes become initializers.
- Nodes whose inputs are all constants are evaluated (numpy for exact data-movement ops,
  onnxruntime with its optimizations off for everything else) and replaced by initializers. A size
  cap keeps folding from inflating the model: a result is kept only if it is small
  (`size_limit` bytes) or no bigger than the constant inputs it frees (so DequantizeLinear of int8
  weights, Expand or ConstantOfShape into big tensors stay as nodes).
- Shape arithmetic on dynamic shapes (Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape):
  dimensions known from shape inference fold to constants, and a Reshape target whose unknown
  entries copy the input's own dimensions (or are the single remaining one) becomes a constant
  with 0 / -1 entries, so the whole Shape chain disappears.

Works in the main graph and inside If/Loop/Scan bodies; model-local function bodies are left
untouched. Initializers that are also graph inputs (overridable) are never treated as constants.
"""

from __future__ import annotations

from collections import Counter
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.graph import (
    NONDETERMINISTIC, STANDARD_DOMAINS, Names, all_graphs, bypass, cleanup, const_value, is_constant,
    materialize_constant_nodes, opset, output_tensors, refresh_shapes, replace_uses, subgraphs, values,
)
from onnxopt.pipeline import Pass

# Ops never folded: random, side-channel or sequence/optional producers.
_NEVER = NONDETERMINISTIC | {
    "Constant", "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
    "SplitToSequence", "ConcatFromSequence", "SequenceAt", "SequenceLength", "SequenceMap", "Optional",
    "OptionalGetElement", "OptionalHasElement",
}
# Ops whose output can be much larger than their inputs: evaluated only when the size is known.
_GENERATORS = {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike"}
_MAX_ROUNDS = 4


class FoldPass(Pass):
    name = "fold"
    summary = "shape inference, constant folding and shape-arithmetic folding, with a size cap"
    after = ()
    tolerance = "fp32"

    @dataclass
    class Options:
        size_limit: int = 4096  # bytes a folded tensor may always take; bigger ones only replace what they free
        shapes: bool = True  # fold Shape/Gather/Concat arithmetic over partially known shapes
        weights: bool = True  # BatchNormalization / per-channel Mul, Add into Conv (either side); bias Add into Gemm

    def run(self, model, ctx):
        graph = model.graph
        counts = Counter()
        counts["constant_nodes_to_initializers"] = materialize_constant_nodes(graph)
        evaluator = Evaluator(graph)
        names = Names(graph)
        for _ in range(_MAX_ROUNDS):
            changed = 0
            for g in all_graphs(graph):
                if self.options.shapes:
                    shape_counts = fold_shapes(g, names)
                    counts.update(shape_counts)
                    changed += sum(shape_counts.values())
                n = fold_cast_like(g)
                counts["cast_like_folded"] += n
                changed += n
                n = fold_constants(g, evaluator, self.options.size_limit)
                counts["nodes_folded"] += n
                changed += n
                if self.options.weights:
                    weight_counts = (fold_into_conv(g, names) + fold_into_conv_input(g, names)
                                     + fold_bias_into_matmul(g))
                    counts.update(weight_counts)
                    changed += sum(weight_counts.values())
            if not changed:
                break
            cleanup(graph)
            if _shapes_missing(graph):
                refresh_shapes(model)  # what this round made inferable, for the next round and later passes
        return counts


def _shapes_missing(graph: gs.Graph) -> bool:
    return any(t.shape is None or None in t.shape for g in all_graphs(graph) for t in g.tensors().values()
               if isinstance(t, gs.Variable) and t.name)


# ----------------------------------------------------------------------------------- constants


def fold_constants(graph: gs.Graph, evaluator: "Evaluator", size_limit: int) -> int:
    """Evaluate nodes whose inputs are all constant, in topological order, and replace their outputs
    with initializers when the size cap allows. Returns the number of nodes folded."""
    outs = output_tensors(graph)
    folded = 0
    for node in list(graph.nodes):
        if not _foldable(node, graph, outs):
            continue
        inputs = [const_value(t) if t.name else None for t in node.inputs]
        if not _size_known_small(node, inputs, size_limit):
            continue
        results = evaluator.run(node, inputs)
        if results is None:
            continue
        produced = sum(r.nbytes for r in results)
        sources = {id(t): v for t, v in zip(node.inputs, inputs) if v is not None and all(c is node for c in t.outputs)}
        freed = sum(v.nbytes for v in sources.values())
        if produced > max(size_limit, freed):
            continue
        for t, value in zip(node.outputs, results):
            replace_uses(t, gs.Constant(t.name, value))
        node.outputs.clear()
        folded += 1
    return folded


def fold_cast_like(graph: gs.Graph) -> int:
    """CastLike(constant, x) with x's element type known is a constant of that type, whatever x
    holds (torch's dynamo exporter without its optimizer writes a conv's absent bias as
    Expand(CastLike(0.0, input), [C]), which then keeps BatchNormalization out of the Conv).
    Numeric types only: the conversion is numpy's astype, as Cast's for them."""
    outs = output_tensors(graph)
    folded = 0
    for node in graph.nodes:
        if (node.op != "CastLike" or node.domain not in STANDARD_DOMAINS or len(node.inputs) != 2
                or not node.outputs or id(node.outputs[0]) in outs or not is_constant(node.inputs[0])):
            continue
        target = node.inputs[1].dtype
        source = values(node.inputs[0])
        if target is None or not _numeric(np.dtype(target)) or not _numeric(source.dtype):
            continue
        replace_uses(node.outputs[0], gs.Constant(node.outputs[0].name, source.astype(np.dtype(target))))
        node.outputs.clear()
        folded += 1
    return folded


def _numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf"


def _foldable(node: gs.Node, graph: gs.Graph, outs: set[int]) -> bool:
    if node.op in _NEVER or node.domain not in STANDARD_DOMAINS or not node.outputs or not node.inputs:
        return False
    if any(True for _ in subgraphs(node)) or any(id(t) in outs for t in node.outputs):
        return False
    if not any(t.outputs for t in node.outputs):
        return False  # dead: cleanup removes it
    return all(not t.name or is_constant(t) for t in node.inputs)


def _size_known_small(node: gs.Node, inputs, size_limit: int) -> bool:
    """Whether the result may fit the size cap, judged before evaluating it from the outputs'
    inferred shapes and types: a node whose result would be refused is not evaluated at all, and
    a generator (ConstantOfShape, Expand...) whose output size is unknown is never evaluated."""
    sizes = []
    for t in node.outputs:
        if t.shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in t.shape):
            if node.op in _GENERATORS:
                return False
            return True  # unknown: evaluate, then the cap decides
        itemsize = np.dtype(t.dtype).itemsize if t.dtype is not None and not isinstance(t.dtype, int) else 8
        sizes.append(math.prod(t.shape) * itemsize)
    freed = sum(v.nbytes for t, v in zip(node.inputs, inputs) if v is not None and all(c is node for c in t.outputs))
    return sum(sizes) <= max(size_limit, freed)


class Evaluator:
    """Computes one node's outputs from constant inputs: numpy for a few exact data-movement and
    integer ops, otherwise onnxruntime (CPU, graph optimizations off) on a one-node model."""

    def __init__(self, main: gs.Graph):
        self.opsets = [onnx.helper.make_opsetid(d.domain, d.version) for d in (main.import_domains or ())] or [
            onnx.helper.make_opsetid("", main.opset or 17)]
        self.ir_version = max(int(main.ir_version or 8), 8)
        self.opset = int(main.opset or 17)

    def run(self, node: gs.Node, inputs: list) -> list[np.ndarray] | None:
        try:
            fast = _numpy_eval(node, inputs, self.opset)
        except Exception:  # noqa: BLE001 - anything odd goes to onnxruntime
            fast = None
        if fast is not None:
            return [np.asarray(r) for r in fast]  # numpy gives scalars for some 0-d results
        return self._ort(node, inputs)

    def _ort(self, node: gs.Node, inputs: list) -> list[np.ndarray] | None:
        import onnxruntime as ort

        names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
        out_names = [f"out{i}" for i in range(len(node.outputs))]
        proto = onnx.helper.make_node(node.op, names, out_names)
        proto.attribute.extend(OnnxExporter.export_attributes(node.attrs))
        inits = [onnx.numpy_helper.from_array(v, n) for n, v in zip(names, inputs) if v is not None]
        graph = onnx.helper.make_graph([proto], "fold", [], [onnx.ValueInfoProto(name=n) for n in out_names],
                                       initializer=inits)
        model = onnx.helper.make_model(graph, opset_imports=self.opsets)
        model.ir_version = self.ir_version
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 4
        try:
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            results = session.run(None, {})
        except Exception:  # noqa: BLE001 - not foldable here; the node stays
            return None
        if not all(isinstance(r, np.ndarray) and r.dtype.kind in "biuf" for r in results):
            return None
        declared = [o.type for o in session.get_outputs()]
        if any(t != _ort_type(r.dtype) for t, r in zip(declared, results)):
            return None  # float8 comes back as its uint8 bit patterns: not a value to fold
        return results


def _ort_type(dtype: np.dtype) -> str:
    """onnxruntime's name for the tensor type of a numpy dtype: `tensor(float)`, `tensor(int64)`..."""
    return f"tensor({onnx.TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(dtype)).lower()})"


def _numpy_eval(node: gs.Node, x: list, opset_version: int) -> list[np.ndarray] | None:
    """Exact numpy versions of ops that only move data or do integer arithmetic."""
    op, a = node.op, node.attrs
    if op == "Identity":
        return [x[0]]
    if op == "Shape":
        shape = np.array(x[0].shape, dtype=np.int64)
        return [shape[a.get("start", 0): a.get("end", None)]]
    if op == "Size":
        return [np.array(x[0].size, dtype=np.int64)]
    if op == "Unsqueeze":
        axes = a.get("axes") if opset_version < 13 else x[1]
        if axes is None:
            return None
        axes = [int(v) for v in np.asarray(axes).reshape(-1)]
        rank = x[0].ndim + len(axes)
        out = x[0]
        for axis in sorted(v + rank if v < 0 else v for v in axes):
            out = np.expand_dims(out, axis)
        return [out]
    if op == "Squeeze":
        axes = a.get("axes") if opset_version < 13 else (x[1] if len(x) > 1 else None)
        if axes is None:
            return [np.squeeze(x[0])]
        return [np.squeeze(x[0], axis=tuple(int(v) for v in np.asarray(axes).reshape(-1)))]
    if op == "Concat":
        return [np.concatenate([v for v in x if v is not None], axis=a["axis"])]
    if op == "Gather":
        return [np.take(x[0], x[1].astype(np.int64), axis=a.get("axis", 0))]
    if op == "Transpose":
        return [np.transpose(x[0], a.get("perm"))]
    if op in ("Add", "Sub", "Mul") and x[0].dtype == x[1].dtype and x[0].dtype.kind in "iu":
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
        return [fn(x[0], x[1]).astype(x[0].dtype)]
    if op == "Cast" and x[0].dtype.kind in "iu":
        to = onnx.helper.tensor_dtype_to_np_dtype(a["to"])
        if to.kind in "iu" and np.can_cast(x[0].dtype, to, "safe"):
            return [x[0].astype(to)]
    return None


# ----------------------------------------------------------------------------------- weights


def fold_into_conv(graph: gs.Graph, names: Names) -> Counter:
    """Fold an inference BatchNormalization, or a Mul/Add by a per-output-channel constant, that
    alone consumes a Conv's (or a group-1 ConvTranspose's) output into its weight and bias
    (computed in float64, stored in the weight's type). The Conv then writes the folded node's
    output."""
    counts = Counter()
    outs = output_tensors(graph)
    for node in list(graph.nodes):
        if (node.op not in ("Conv", "ConvTranspose") or node.domain not in STANDARD_DOMAINS
                or len(node.outputs) != 1 or (node.op == "ConvTranspose" and node.attrs.get("group", 1) != 1)):
            continue
        while True:
            nxt = _conv_consumer(node, graph, outs)
            if nxt is None:
                break
            scale_shift = _channel_affine(nxt, node, graph)
            if scale_shift is None:
                break
            _rescale_conv(node, *scale_shift, names)
            node.outputs[0] = nxt.outputs[0]
            nxt.outputs.clear()
            nxt.inputs.clear()
            counts[{"BatchNormalization": "conv_bn_folded", "Mul": "conv_mul_folded"}.get(nxt.op, "conv_add_folded")] += 1
    return counts


def fold_into_conv_input(graph: gs.Graph, names: Names) -> Counter:
    """Fold a Mul/Add/Sub by a scalar or per-input-channel constant whose output a Conv alone
    reads into that Conv: y = conv(x * c) is conv with its weight's input channels scaled by c;
    y = conv(x + c) is conv(x) with bias + sum over the window of W * c, exact only without
    padding (zeros padded after the Add would be c before it), so a padded Conv folds Mul only.
    PP-OCRv4's learnable affine blocks (HardSwish, then * a + b, then a Conv) lose both kernels
    at every 1x1 Conv."""
    counts = Counter()
    outs = output_tensors(graph)
    for conv in list(graph.nodes):
        if conv.op != "Conv" or conv.domain not in STANDARD_DOMAINS or len(conv.outputs) != 1:
            continue
        while True:
            x = conv.inputs[0]
            prev = x.inputs[0] if len(x.inputs) == 1 else None
            if prev is None or id(x) in outs or len(x.outputs) != 1 or not _input_affine_ok(conv):
                break
            c = _input_channel_constant(prev, x, conv)
            if c is None or (prev.op != "Mul" and not _unpadded(conv)):
                break
            weight = conv.inputs[1]
            w = values(weight).astype(np.float64)
            group = conv.attrs.get("group", 1)
            m, cg = w.shape[0], w.shape[1]
            per = c.reshape(group, 1, cg, *([1] * (w.ndim - 2)))  # input channel -> its group's column
            wg = w.reshape(group, m // group, cg, *w.shape[2:])
            if prev.op == "Mul":
                weight.values = (wg * per).reshape(w.shape).astype(weight.dtype)
            else:
                shift = (wg * per).reshape(m, -1).sum(axis=1) * (1.0 if prev.op == "Add" else -1.0)
                if len(conv.inputs) > 2 and conv.inputs[2].name:
                    conv.inputs[2].values = (values(conv.inputs[2]).astype(np.float64) + shift).astype(weight.dtype)
                else:
                    bias = gs.Constant(names.new(weight.name + "_bias"), shift.astype(weight.dtype))
                    conv.inputs[2:] = [bias]
            conv.inputs[0] = next(t for t in prev.inputs if not is_constant(t))
            prev.inputs.clear()
            prev.outputs.clear()
            counts["conv_input_mul_folded" if prev.op == "Mul" else "conv_input_add_folded"] += 1
    return counts


def _input_affine_ok(conv: gs.Node) -> bool:
    """Whether the Conv's weight and bias are constants only it reads (ours to change)."""
    params = [t for t in conv.inputs[1:] if t.name]
    return bool(params) and all(is_constant(t) and len(t.outputs) == 1 for t in params) \
        and conv.inputs[1].shape is not None and len(conv.inputs[1].shape) >= 3


def _unpadded(conv: gs.Node) -> bool:
    return conv.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(conv.attrs.get("pads", []))


def _input_channel_constant(prev: gs.Node, x: gs.Tensor, conv: gs.Node) -> np.ndarray | None:
    """The per-input-channel constant [C] of prev = x' * c, x' + c or x' - c (prev writes x, the
    Conv's input), or None when prev is not one of those over the channel axis alone."""
    if prev.op not in ("Mul", "Add", "Sub") or prev.domain not in STANDARD_DOMAINS or len(prev.inputs) != 2:
        return None
    consts = [t for t in prev.inputs if is_constant(t)]
    if len(consts) != 1 or (prev.op == "Sub" and prev.inputs[1] is not consts[0]):
        return None
    data = next(t for t in prev.inputs if t is not consts[0])
    weight = conv.inputs[1]
    rank, channels = len(weight.shape), weight.shape[1] * conv.attrs.get("group", 1)
    if data.shape is None or x.shape is None or list(data.shape) != list(x.shape) or len(x.shape) != rank:
        return None  # the constant must not broadcast the data to a new shape
    return per_channel(const_value(consts[0]), weight.dtype, rank, channels)


def per_channel(c: np.ndarray | None, dtype, rank: int, channels: int) -> np.ndarray | None:
    """A constant of the weight's type that broadcasts over axis 1 of a rank-`rank` tensor alone
    (a scalar or one value per channel), as [channels] float64; else None."""
    if c is None or c.dtype != dtype or c.ndim > rank:
        return None
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != 1) or full.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1).astype(np.float64), (channels,))


def fold_bias_into_matmul(graph: gs.Graph) -> Counter:
    """MatMul(x, W) + bias with a 2-D x, a constant 2-D W and a constant bias of shape [N] or
    [1, N] becomes one Gemm(x, W, bias) that writes the Add's output."""
    counts = Counter()
    outs = output_tensors(graph)
    for node in list(graph.nodes):
        if node.op != "MatMul" or node.domain not in STANDARD_DOMAINS or len(node.outputs) != 1:
            continue
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if (x.shape is None or len(x.shape) != 2 or not is_constant(w) or len(w.shape) != 2
                or isinstance(w.dtype, int) or np.dtype(w.dtype).kind != "f" or id(y) in outs
                or len(y.outputs) != 1):
            continue
        add = y.outputs[0]
        if add.op != "Add" or add.domain not in STANDARD_DOMAINS or len(add.inputs) != 2:
            continue
        bias = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        if (bias is y or not is_constant(bias) or bias.dtype != w.dtype
                or tuple(bias.shape) not in ((w.shape[1],), (1, w.shape[1]))):
            continue
        node.op = "Gemm"
        node.inputs.append(bias)
        node.outputs[0] = add.outputs[0]
        add.outputs.clear()
        add.inputs.clear()
        counts["matmul_add_to_gemm"] += 1
    return counts


def _conv_consumer(conv: gs.Node, graph: gs.Graph, outs: set[int]) -> gs.Node | None:
    """The single consumer of the Conv's output, when the Conv's weights are ours to change."""
    y = conv.outputs[0]
    if id(y) in outs:
        return None
    if len(y.outputs) > 1 and not (_channel_affine(y.outputs[0], conv, graph) is not None
                                   and _merge_identical(list(y.outputs), outs)):
        return None  # several readers: only identical foldable ones, merged into one
    params = [t for t in conv.inputs[1:] if t.name]
    if not all(is_constant(t) and len(t.outputs) == 1 for t in params):
        return None  # a weight that is a graph input or shared with another node stays
    return y.outputs[0]


def _merge_identical(readers: list[gs.Node], outs: set[int]) -> bool:
    """When every reader is the same node (op, domain, attributes, the very same inputs) with one
    output, keep the first: the others' readers read its output. Without this, cleanup's CSE
    would merge them after fold ran, and only a second run would fold (found by fuzzing).
    Returns False, changing nothing, when they differ."""
    first = readers[0]
    for other in readers[1:]:
        if (other.op != first.op or other.domain != first.domain or other.attrs != first.attrs
                or len(other.inputs) != len(first.inputs)
                or any(a is not b for a, b in zip(other.inputs, first.inputs))
                or len(other.outputs) != 1 or len(first.outputs) != 1 or id(other.outputs[0]) in outs
                or any(True for _ in subgraphs(other))):
            return False
    for other in readers[1:]:
        replace_uses(other.outputs[0], first.outputs[0])
        other.inputs.clear()
        other.outputs.clear()
    return True


def _channel_affine(nxt: gs.Node, conv: gs.Node, graph: gs.Graph):
    """(scale, shift) per output channel such that nxt(y) == y * scale + shift, or None."""
    weight = conv.inputs[1]
    channels, rank = weight.shape[_out_axis(conv)], len(weight.shape)
    if nxt.domain not in STANDARD_DOMAINS or len(nxt.outputs) != 1:
        return None
    if nxt.op == "BatchNormalization":
        if nxt.attrs.get("training_mode", 0) or nxt.attrs.get("spatial", 1) != 1 or nxt.inputs[0] is not conv.outputs[0]:
            return None
        params = [const_value(t) for t in nxt.inputs[1:5]]
        if any(p is None or p.shape != (channels,) for p in params):
            return None
        scale, bias, mean, var = (p.astype(np.float64) for p in params)
        factor = scale / np.sqrt(var + float(nxt.attrs.get("epsilon", 1e-5)))
        return factor, bias - mean * factor
    if nxt.op not in ("Mul", "Add", "Sub"):
        return None
    other = [t for t in nxt.inputs if t is not conv.outputs[0]]
    if len(other) != 1 or len(nxt.inputs) != 2:
        return None
    if nxt.op == "Sub" and nxt.inputs[0] is not conv.outputs[0]:
        return None  # c - y is not a shift of y
    c = per_channel(const_value(other[0]), weight.dtype, rank, channels)
    if c is None:
        return None  # not per output channel: it would broadcast along space or batch
    if nxt.op == "Mul":
        return c, np.zeros(channels)
    return np.ones(channels), c if nxt.op == "Add" else -c


def _out_axis(conv: gs.Node) -> int:
    """The weight axis of the output channels: Conv [M, C/g, k...], ConvTranspose [C, M/g, k...]."""
    return 1 if conv.op == "ConvTranspose" else 0


def _rescale_conv(conv: gs.Node, scale: np.ndarray, shift: np.ndarray, names: Names) -> None:
    weight = conv.inputs[1]
    w = values(weight)
    shape = [1] * w.ndim
    shape[_out_axis(conv)] = -1
    weight.values = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        b = values(conv.inputs[2]).astype(np.float64)
        conv.inputs[2].values = (b * scale + shift).astype(w.dtype)
    else:
        bias = gs.Constant(names.new(weight.name + "_bias"), shift.astype(w.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias
        else:
            conv.inputs.append(bias)


# ----------------------------------------------------------------------------------- shapes


class _Sym:
    """An unknown dimension. Two are equal only when proven equal: the same symbolic name from the
    model, or the same dimension carried through ops whose output dims are exact functions of
    their inputs' dims (elementwise broadcast, MatMul, Transpose, Reshape, ...)."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __eq__(self, other):
        return isinstance(other, _Sym) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return f"Sym{self.key}"


def _dims(t: gs.Tensor) -> list | None:
    """Dims from the tensor's declared or inferred shape; unknown ones get a fresh symbol."""
    if t.shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0
            else _Sym(("param", d)) if isinstance(d, str) and d
            else _Sym(("dim", id(t), i)) for i, d in enumerate(t.shape)]


# Ops whose single output has the shape of their inputs broadcast together.
_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "PRelu",
}
# Ops whose first output has exactly the shape of their first input.
_SAME_SHAPE = {
    "Identity", "Cast", "CastLike", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "Tanh",
    "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Not", "Sign", "Floor", "Ceil", "Round", "Clip",
    "Softmax", "LogSoftmax", "Gelu", "HardSwish", "Mish", "Softplus", "Softsign", "Sin", "Cos", "IsNaN", "IsInf",
    "LayerNormalization", "RMSNormalization", "BatchNormalization", "InstanceNormalization", "Dropout",
    "QuantizeLinear", "DequantizeLinear", "Swish",
}


def _broadcast(shapes: list[list]) -> list:
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        dims = [d for d in dims if not (isinstance(d, int) and d == 1)] or [1]
        ints = {d for d in dims if isinstance(d, int)}
        syms = {d for d in dims if not isinstance(d, int)}
        # min(a, k) broadcast with a: equal, or min(a, k) == 1 == a; else the model fails anyway
        syms -= {d for d in syms if d.key[0] == "min" and d.key[1] in syms}
        if ints:
            out.append(max(ints))  # a symbol broadcast against k > 1 is 1 or k: the result is k
        elif len(syms) == 1:
            out.append(next(iter(syms)))
        else:
            out.append(None)  # unknown: could be either
    return out


def _infer_dims(node: gs.Node, dims_of, value, opset_version: int) -> list | None:
    """The first output's dims from the inputs' dims (and small constant values), or None."""
    op, a = node.op, node.attrs
    ins = [dims_of(t) if t.name else None for t in node.inputs]
    if op in _SAME_SHAPE:
        return ins[0]
    if op in _ELEMENTWISE:
        return _broadcast(ins) if all(d is not None for d in ins) else None
    if op == "MatMul" and ins[0] is not None and ins[1] is not None and len(ins[0]) >= 2 and len(ins[1]) >= 2:
        batch = _broadcast([ins[0][:-2], ins[1][:-2]]) if len(ins[0]) > 2 or len(ins[1]) > 2 else []
        return batch + [ins[0][-2], ins[1][-1]]
    if op == "Transpose" and ins[0] is not None:
        perm = a.get("perm") or list(range(len(ins[0])))[::-1]
        return [ins[0][p] for p in perm]
    if op == "Reshape" and ins[0] is not None and len(ins) > 1:
        target = value(node.inputs[1])
        if target is None:
            return None
        out = []
        for i, e in enumerate(target[0]):
            if isinstance(e, int) and e == 0 and not a.get("allowzero", 0):
                out.append(ins[0][i] if i < len(ins[0]) else None)
            elif isinstance(e, int) and e < 0:
                out.append(-1)
            else:
                out.append(e)
        if out.count(-1) == 1:
            out[out.index(-1)] = _quotient(ins[0], [d for d in out if d != -1])
        return [None if isinstance(d, int) and d < 0 else d for d in out]
    if op in ("Unsqueeze", "Squeeze") and ins[0] is not None:
        axes = a.get("axes") if opset_version < 13 else (value(node.inputs[1]) or (None,))[0] \
            if len(node.inputs) > 1 else None
        if axes is None or any(not isinstance(x, int) for x in axes):
            return None
        if op == "Squeeze":
            rank = len(ins[0])
            drop = {x + rank if x < 0 else x for x in axes}
            return [d for i, d in enumerate(ins[0]) if i not in drop]
        rank = len(ins[0]) + len(axes)
        out, src = [], iter(ins[0])
        add = {x + rank if x < 0 else x for x in axes}
        return [1 if i in add else next(src) for i in range(rank)]
    if op == "Slice" and ins[0] is not None and opset_version >= 10:
        return _slice_dims(node, ins[0], value)
    if op in ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool") and ins[0] is not None:
        return _window_dims(node, ins)
    if op == "Concat" and ins and all(d is not None and len(d) == len(ins[0]) for d in ins):
        axis = a.get("axis", 0) % max(len(ins[0]), 1)
        parts = [d[axis] for d in ins]
        out = []
        for i, ds in enumerate(zip(*ins)):  # off the axis every input has the same size: a known one
            out.append((sum(parts) if all(isinstance(x, int) for x in parts) else None) if i == axis
                       else next((x for x in ds if isinstance(x, int)), next((x for x in ds if x is not None), None)))
        return out
    if op in _REDUCE and ins[0] is not None:
        return _reduce_dims(node, ins[0], value, opset_version)
    if op == "Expand" and ins[0] is not None:
        target = value(node.inputs[1])
        return _broadcast([ins[0], target[0]]) if target is not None else None
    if op == "Range":
        start, limit, delta = (value(t) for t in node.inputs[:3])
        if start and delta and limit and start[0] == [0] and delta[0] == [1]:
            return [limit[0][0]]
        return None
    if op == "ConstantOfShape":
        shape = value(node.inputs[0])
        return shape[0] if shape is not None else None
    if op == "Flatten" and ins[0] is not None:
        axis = a.get("axis", 1)
        axis = axis + len(ins[0]) if axis < 0 else axis
        return [_product(ins[0][:axis]), _product(ins[0][axis:])]
    if op == "Gather" and ins[0] is not None and ins[1] is not None:
        axis = a.get("axis", 0)
        axis = axis + len(ins[0]) if axis < 0 else axis
        return ins[0][:axis] + ins[1] + ins[0][axis + 1:]
    return None


_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
           "ReduceLogSumExp", "ReduceSumSquare"}


def _window_dims(node: gs.Node, ins: list) -> list | None:
    """Conv and pooling: batch from the input, channels from the weight (Conv) or the input, and
    each spatial size where the input's is known and padding explicit (else None: the caller
    keeps what shape inference declared)."""
    x, a = ins[0], node.attrs
    if len(x) < 3:
        return None
    if node.op.startswith("Global"):
        return x[:2] + [1] * (len(x) - 2)
    w = ins[1] if node.op == "Conv" and len(ins) > 1 else None
    if node.op == "Conv" and (w is None or len(w) != len(x)):
        return None
    kernel = a.get("kernel_shape") or (w[2:] if w is not None else None)
    n = len(x) - 2
    pads = a.get("pads") or [0] * (2 * n)
    strides, dilations = a.get("strides") or [1] * n, a.get("dilations") or [1] * n
    spatial = [None] * n
    if kernel is not None and a.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET", "VALID", b"VALID") \
            and not a.get("ceil_mode", 0):
        if a.get("auto_pad", "NOTSET") in ("VALID", b"VALID"):
            pads = [0] * (2 * n)
        for i in range(n):
            if isinstance(x[2 + i], int) and isinstance(kernel[i], int):
                span = dilations[i] * (kernel[i] - 1) + 1
                spatial[i] = (x[2 + i] + pads[i] + pads[n + i] - span) // strides[i] + 1
    return [x[0], w[0] if w is not None else x[1]] + spatial


def _reduce_dims(node: gs.Node, data: list, value, opset_version: int) -> list | None:
    """A reduction's output dims: axes from the attribute, or from the input from opset 18 (13
    for ReduceSum); no axes reduces all of them unless noop_with_empty_axes."""
    if opset_version >= 18 or (node.op == "ReduceSum" and opset_version >= 13):
        given = len(node.inputs) > 1 and node.inputs[1].name
        axes = value(node.inputs[1]) if given else ([], False)
        if axes is None:
            return None
        axes = axes[0]
    else:
        axes = node.attrs.get("axes", [])
    rank = len(data)
    if not all(isinstance(x, int) and -rank <= x < rank for x in axes):
        return None
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return data
        axes = range(rank)
    axes = {x % rank for x in axes}
    if node.attrs.get("keepdims", 1):
        return [1 if i in axes else d for i, d in enumerate(data)]
    return [d for i, d in enumerate(data) if i not in axes]


def _quotient(total: list, part: list):
    """prod(total) / prod(part) when it is an int or a single symbol, else None (for Reshape -1)."""
    if any(d is None for d in total + part):
        return None
    rest = list(total)
    for d in part:
        if not isinstance(d, int):
            if d not in rest:
                return None
            rest.remove(d)
    syms = [d for d in rest if not isinstance(d, int)]
    num = math.prod(d for d in rest if isinstance(d, int))
    den = math.prod(d for d in part if isinstance(d, int))
    if den == 0 or num % den:
        return None
    if not syms:
        return num // den
    return syms[0] if len(syms) == 1 and num == den else None


def _product(dims: list):
    """The product of dims when it is an int, or the only non-1 symbol; else None."""
    syms = [d for d in dims if not isinstance(d, int)]
    ints = math.prod(d for d in dims if isinstance(d, int))
    if not syms:
        return ints
    return syms[0] if len(syms) == 1 and ints == 1 else None


def _slice_dims(node: gs.Node, data: list, value) -> list | None:
    args = [value(t) if t.name else None for t in node.inputs[1:]] + [None] * 4
    starts, ends, axes, steps = (x[0] if x is not None else None for x in args[:4])
    if starts is None or ends is None or (axes is None and len(node.inputs) > 3 and node.inputs[3].name):
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    out = list(data)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not isinstance(axis, int):
            return None
        axis = axis + len(data) if axis < 0 else axis
        dim = data[axis]
        if isinstance(start, int) and isinstance(end, int) and isinstance(step, int) and isinstance(dim, int):
            out[axis] = len(range(dim)[slice(start, end, step)])
        elif start == 0 and step == 1 and isinstance(end, int) and end >= 2**31 - 1:
            out[axis] = dim
        elif start == 0 and step == 1 and isinstance(end, _Sym) and isinstance(dim, int):
            out[axis] = _Sym(("min", end, dim))
        else:
            return None
    return out


def fold_shapes(graph: gs.Graph, names: Names) -> Counter:
    """Propagate symbolic dims and partially known integer vectors (from Shape) through shape
    arithmetic; fold the fully known vectors and resolve Reshape targets. One walk in topological
    order."""
    counts = Counter()
    outs = output_tensors(graph)
    known: dict[int, tuple[list, bool]] = {}  # id(tensor) -> (entries, is_scalar)
    dims: dict[int, list] = {}  # id(tensor) -> dims (int | _Sym), proven for this walk
    version = opset(graph)
    local = {id(n) for n in graph.nodes}
    alive = list(graph.tensors().values())  # noqa: F841 - ids key the maps: no tensor may be freed and its id reused

    def dims_of(t):
        if id(t) not in dims:
            dims[id(t)] = _dims(t)
        return dims[id(t)]

    def value(t):
        if id(t) in known:
            return known[id(t)]
        if not (isinstance(t, gs.Constant) and t.shape is not None and len(t.shape) <= 1
                and not isinstance(t.dtype, int)  # gs's dtype is the ONNX type number where numpy has none
                and np.dtype(t.dtype).kind in "iu" and math.prod(t.shape) <= 64):
            return None  # look only at small integer vectors, never load weights
        c = const_value(t)
        return ([int(v) for v in c.reshape(-1)], c.ndim == 0) if c is not None else None

    for node in list(graph.nodes):
        if node.domain not in STANDARD_DOMAINS or not node.outputs:
            continue
        out = node.outputs[0]
        inferred = _infer_dims(node, dims_of, value, version)
        computed_target = node.op == "Reshape" and len(node.inputs) == 2 and not is_constant(node.inputs[1])
        if computed_target:
            target = value(node.inputs[1])
            if target is not None and _resolve_reshape(node, target[0], dims_of(node.inputs[0]), names):
                counts["reshape_shapes_resolved"] += 1
                if inferred is None or None in inferred:  # the constant target may tell more
                    inferred = _infer_dims(node, dims_of, value, version)
        if inferred is not None:
            declared = _dims(out)
            if declared is not None and len(declared) == len(inferred):
                # keep what inference knew for certain where our rule could not tell
                inferred = [d if d is not None else declared[i] for i, d in enumerate(inferred)]
            if all(d is not None for d in inferred):
                dims[id(out)] = inferred
            if id(out) not in outs and (out.shape is None or len(out.shape) == len(inferred)):
                out.shape = _as_gs_shape(inferred, out.shape)  # what inference missed, for later rules
        if node.op == "Expand" and len(node.inputs) == 2 and not is_constant(node.inputs[1]):
            target, data = value(node.inputs[1]), dims_of(node.inputs[0])
            if (target is not None and data is not None and len(target[0]) <= len(data)
                    and all(t == 1 or t == d for t, d in zip(target[0][::-1], data[::-1]))
                    and bypass(graph, node, node.inputs[0], outs, local)):
                counts["noop_expand_removed"] += 1
                continue
        if computed_target:
            continue
        result = _propagate(node, value, dims_of, version)
        if result is None:
            continue
        entries, scalar = result
        if all(isinstance(e, int) for e in entries) and id(out) not in outs:
            if all(not t.name or is_constant(t) for t in node.inputs):
                known[id(out)] = result  # fold_constants replaces the node itself
                continue
            dtype = _int_dtype(node)
            if dtype is None:  # e.g. a bool vector from Equal: keep tracking it, do not fold it
                known[id(out)] = result
                continue
            arr = np.array(entries, dtype=dtype).reshape(() if scalar else (len(entries),))
            replace_uses(out, gs.Constant(out.name, arr))
            node.outputs.clear()
            counts["shape_values_folded"] += 1
        else:
            known[id(out)] = result
    return counts


def _int_dtype(node: gs.Node) -> np.dtype | None:
    if node.op == "Cast":
        dtype = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
    elif node.op in ("Shape", "Size"):
        dtype = np.dtype(np.int64)
    else:
        known = [t.dtype for t in (node.outputs[0], node.inputs[0]) if t.dtype is not None and not isinstance(t.dtype, int)]
        dtype = np.dtype(known[0]) if known else np.dtype(np.int64)  # shape arithmetic is int64
    return dtype if dtype.kind in "iu" else None


def _propagate(node: gs.Node, value, dims_of, opset_version: int):
    """The partial value of the node's first output, or None when it cannot be tracked."""
    op, a, ins = node.op, node.attrs, node.inputs
    if op == "Shape" and len(node.outputs) == 1:
        dims = dims_of(ins[0])
        if dims is None:
            return None
        start, end = a.get("start", 0), a.get("end", None)
        return dims[start:end], False
    if op == "Size":
        dims = dims_of(ins[0])
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        return [int(np.prod(dims, dtype=np.int64))], True
    vals = [value(t) if t.name else None for t in ins]
    if op in ("Identity", "Cast") and vals[0] is not None:
        if op == "Cast" and onnx.helper.tensor_dtype_to_np_dtype(a["to"]).kind not in "iu":
            return None
        return vals[0]
    if op == "Gather" and a.get("axis", 0) == 0 and vals[0] is not None and vals[1] is not None:
        entries, scalar = vals[0]
        idx, idx_scalar = vals[1]
        if scalar or not all(isinstance(i, int) and -len(entries) <= i < len(entries) for i in idx):
            return None
        return [entries[i] for i in idx], idx_scalar
    if op == "Unsqueeze" and vals[0] is not None and vals[0][1]:
        axes = a.get("axes") if opset_version < 13 else (vals[1][0] if len(vals) > 1 and vals[1] else None)
        return (vals[0][0], False) if axes is not None and list(axes) in ([0], [-1]) else None
    if op == "Squeeze" and vals[0] is not None and not vals[0][1] and len(vals[0][0]) == 1:
        return vals[0][0], True
    if op == "Concat" and a.get("axis") in (0, -1) and all(v is not None and not v[1] for v in vals):
        return [e for v in vals for e in v[0]], False
    if op == "Slice" and vals[0] is not None and not vals[0][1]:
        return _slice_entries(node, vals, opset_version)
    if op == "Reshape" and vals[0] is not None and vals[1] is not None and len(vals[1][0]) == 1 \
            and vals[1][0][0] in (-1, len(vals[0][0])):
        return vals[0][0], False
    if op == "ConstantOfShape" and vals[0] is not None and len(vals[0][0]) == 1 and isinstance(vals[0][0][0], int):
        fill = a.get("value")
        fill = values(fill) if isinstance(fill, gs.Constant) else np.zeros(1, np.float32)
        if fill.dtype.kind in "iu" and 0 <= vals[0][0][0] <= 64:
            return [int(fill.reshape(-1)[0])] * vals[0][0][0], False
        return None
    if op in _ENTRYWISE and len(vals) in (2, 3) and all(v is not None for v in vals):
        return _entrywise(op, vals)
    return None


def _sym_equal(x, y):
    if isinstance(x, int) and isinstance(y, int):
        return int(x == y)
    if x == y:
        return 1
    if (isinstance(x, int) and x < 0) or (isinstance(y, int) and y < 0):
        return 0  # a dimension is never negative
    return None


# Element-wise rules on partially known int vectors: None where the entry cannot be told.
_ENTRYWISE = {
    "Equal": _sym_equal,
    "Mul": lambda x, y: x * y if isinstance(x, int) and isinstance(y, int) else x if y == 1 else y if x == 1 else None,
    "Add": lambda x, y: x + y if isinstance(x, int) and isinstance(y, int) else x if y == 0 else y if x == 0 else None,
    "Sub": lambda x, y: x - y if isinstance(x, int) and isinstance(y, int) else x if y == 0 else None,
    # tracked values are integers (a Cast to another type ends the tracking): Div truncates toward 0
    "Div": lambda x, y: _int_div(x, y) if isinstance(x, int) and isinstance(y, int) and y else x if y == 1 else None,
    "Where": lambda c, x, y: (x if c else y) if isinstance(c, int) else None,
}


def _int_div(x: int, y: int) -> int:
    q = abs(x) // abs(y)
    return q if (x >= 0) == (y > 0) else -q


def _entrywise(op, vals):
    n = max(len(v[0]) for v in vals)
    if any(len(v[0]) not in (1, n) for v in vals):
        return None
    rows = [v[0] if len(v[0]) == n else v[0] * n for v in vals]
    entries = [_ENTRYWISE[op](*args) for args in zip(*rows)]
    if any(e is None for e in entries):
        return None
    return entries, all(v[1] for v in vals)


def _slice_entries(node, vals, opset_version):
    entries = vals[0][0]
    if opset_version < 10:
        starts, ends, axes, steps = node.attrs.get("starts"), node.attrs.get("ends"), node.attrs.get("axes"), None
    else:
        args = [v[0] if v is not None else None for v in vals[1:]] + [None] * 4
        if any(args[i] is None and len(node.inputs) > i + 1 and node.inputs[i + 1].name for i in range(4)):
            return None
        starts, ends, axes, steps = args[:4]
    if starts is None or ends is None or len(starts) != 1 or (axes is not None and list(axes) not in ([0], [-1])):
        return None
    step = steps[0] if steps else 1
    if step == 0:
        return None
    idx = np.arange(len(entries))[slice(starts[0], ends[0], step)]
    return [entries[i] for i in idx], False


def _as_gs_shape(inferred: list, declared) -> list:
    """Merge proven dims into a gs shape: a proven size replaces a symbol or an unknown; a proven
    model symbol fills only an unknown; declared sizes stay."""
    shape = list(declared) if declared is not None else [None] * len(inferred)
    for i, d in enumerate(inferred):
        known = shape[i]
        if isinstance(known, (int, np.integer)) and known >= 0:
            continue
        if isinstance(d, int):
            shape[i] = d
        elif not (isinstance(known, str) and known):
            shape[i] = d.key[1] if isinstance(d, _Sym) and d.key[0] == "param" else None
    return shape


def _resolve_reshape(node: gs.Node, target: list, data: list | None, names: Names) -> bool:
    """Replace a computed Reshape target by a constant: an unknown entry proven equal to the
    input's own dimension at the same position becomes 0 (copy), and a single remaining unknown
    becomes -1. A literal 0 (paddle2onnx writes [0, S, heads, size]) means "copy" in the computed
    target as in the constant one, unless allowzero=1: then the result is the same only when the
    target holds no literal 0 (which is refused), and the attribute is dropped where copies are used."""
    allowzero = node.attrs.get("allowzero", 0)
    resolved = []
    for i, e in enumerate(target):
        if isinstance(e, int):
            if e == 0 and allowzero:
                return False  # a literal 0 is a zero-size dimension there, but copies would be 0s too
            resolved.append(e)
        elif data is not None and i < len(data) and data[i] == e:
            resolved.append(0)
        else:
            resolved.append(None)
    if resolved.count(None) + resolved.count(-1) > 1:
        return False
    resolved = [-1 if e is None else e for e in resolved]
    if 0 in resolved:
        node.attrs.pop("allowzero", None)
    node.inputs[1] = gs.Constant(names.new(node.inputs[1].name + "_resolved"), np.array(resolved, dtype=np.int64))
    return True
