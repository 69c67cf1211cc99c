"""float32 -> float16 conversion of a model's main graph, in place (`convert_to_fp16`).

Rules:
1. A node runs in float16 when it is in the default domain (or com.microsoft: then the probe
   alone decides), not in `block`, has no subgraph attribute (If/Loop/Scan stay float32 and their
   bodies are not visited), every float32 tensor it reads or writes through a type variable
   (onnx schema, e.g. "T") is allowed as tensor(float16) by that variable, its output types follow
   its inputs (not an attribute: ConstantOfShape, EyeLike, ...), no float32 constant it would read
   in float16 holds a finite value beyond +-65504, and onnxruntime can build a session for the
   float16 node (kernel_refusal). Formals of fixed type ("tensor(float)": Resize scales, ...) keep
   their float32 tensor while the node runs in float16. Shape, Size and Cast read either type.
2. Tensors: an fp16 node's converted outputs become float16. float32 readers of such a tensor (fp32
   nodes, subgraph nodes, graph outputs when keep_io_types) keep reading the original name, now
   written by a Cast(to=FLOAT) from a new float16 tensor; fp16 readers of a float32 tensor (graph
   input, fp32 node output) read a Cast(to=FLOAT16) of it; one Cast per tensor either way.
   Constants read in float16 are replaced by float16 copies (the float32 original stays only when
   something else still reads it); Constant nodes likewise. A Cast(to=FLOAT) read only in float16
   becomes Cast(to=FLOAT16). Constants out of float16 range keep their readers float32 (reported,
   never clamped); non-zero values that round to 0 in float16 are only counted.
3. keep_io_types (default): graph inputs and outputs keep their names and types. Otherwise the
   float32 inputs and outputs become float16 (names unchanged).
4. Only float32 changes; subgraph bodies and model-local functions are untouched (reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import Names, constant_node_value, is_constant, onnx_dtype, subgraphs, values
from onnxopt.passes.fuse.runtime import kernel_refusal

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)  # 65504

# Ops kept in float32 by default. Short on purpose: onnxruntime runs the rest in float16 well.
DEFAULT_BLOCK = frozenset({
    # results used as indices/positions or random draws: float16 holds integers exactly only to 2048
    "Range", "CumSum", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    # selection by value: float16 rounding makes ties and changes which elements/boxes win
    "TopK", "NonMaxSuppression", "RoiAlign",
    # an internal sum of squares/exponentials overflows 65504 while the (small) result would fit
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "LpNormalization",
})
# Not blocked: Exp, Pow, ReduceSum(Square). Their result itself is what overflows, so keeping one
# of them float32 between float16 neighbours only moves the overflow to the Cast after it.

FLEXIBLE = {"Shape", "Size", "Cast"}  # read a float tensor of either type: never need a Cast in front
SOURCES = {"Constant"}  # handled as constants, not as nodes


@dataclass
class Fp16Report:
    converted: list[str] = field(default_factory=list)  # nodes now running in float16
    converted_at: list[int] = field(default_factory=list)  # their positions in graph.nodes
    kept: dict[str, str] = field(default_factory=dict)  # node -> why it stays float32
    constants_converted: int = 0
    constant_bytes_before: int = 0  # float32 bytes of the converted constants
    constant_bytes_after: int = 0  # their float16 bytes
    constants_copied: list[str] = field(default_factory=list)  # converted, but float32 original still read
    out_of_range: dict[str, float] = field(default_factory=dict)  # constant -> max finite |x| (> 65504)
    underflow: int = 0  # non-zero constant elements that became 0 in float16
    casts_inserted: int = 0
    casts_retargeted: int = 0  # Cast(to=FLOAT) turned into Cast(to=FLOAT16)
    functions_untouched: int = 0


@dataclass
class _Plan:
    """An fp16 node: which of its inputs/outputs (indices) become float16."""
    inputs: set[int]
    outputs: set[int]


def convert_to_fp16(graph: gs.Graph, opset: int, names: Names, keep_io_types: bool = True,
                    block: frozenset[str] = DEFAULT_BLOCK, probed: dict | None = None,
                    keep: frozenset[int] = frozenset()) -> Fp16Report:
    """Convert the main graph's float32 computation to float16 in place (see the module docstring).
    keep: positions in graph.nodes of nodes that stay float32 (the mixed mode's choice)."""
    report = Fp16Report(functions_untouched=len(graph.functions))
    probed = {} if probed is None else probed
    opsets = {o.domain: o.version for o in (graph.import_domains or [])}
    opsets[""] = opset
    opsets.pop("ai.onnx", None)
    const_nodes = {id(n.outputs[0]): n for n in graph.nodes if n.op in SOURCES and len(n.outputs) == 1}
    tops: dict[int, float | None] = {}  # per constant, its largest finite |x| (never the values: memory)

    def const(t):  # float32 values of an initializer or a main-graph Constant node's output (read afresh)
        node = const_nodes.get(id(t))
        v = constant_node_value(node) if node is not None else values(t) if is_constant(t) else None
        return v if v is not None and v.dtype == np.float32 else None

    def top(t):  # the largest finite |x| of a float32 constant, None when t is not one
        if id(t) not in tops:
            v = const(t)
            tops[id(t)] = None if v is None else _max_finite_abs(v)
        return tops[id(t)]

    plans: dict[int, _Plan] = {}
    local_functions = {(f.domain, f.name) for f in graph.functions}
    for i, node in enumerate(graph.nodes):
        if node.op in SOURCES or node.op in FLEXIBLE:
            continue
        plan, reason = _decide(node, opset, opsets, block, probed, top, report, local_functions)
        if plan and i in keep:
            plan, reason = None, "kept float32 for the error budget"
        if reason:
            report.kept[_label(node, i)] = reason
        elif plan:
            plans[id(node)] = plan
            report.converted.append(_label(node, i))
            report.converted_at.append(i)

    main = {id(n) for n in graph.nodes}
    out_ids = {id(t) for t in graph.outputs}
    in_ids = {id(t) for t in graph.inputs}

    def uses(t):
        """(fp16 uses, fp32 uses, either-type uses) of t, as (node, input index); a graph output
        counts as a use of the type it is declared with afterwards (node None)."""
        u16, u32, anyt, seen = [], [], [], set()
        for n in t.outputs:
            if id(n) in seen:
                continue
            seen.add(id(n))
            for k, x in enumerate(n.inputs):
                if x is not t:
                    continue
                plan = plans.get(id(n))
                if id(n) not in main:
                    u32.append((n, k))
                elif plan is not None and k in plan.inputs:
                    u16.append((n, k))
                elif n.op in FLEXIBLE and n.domain in ("", None, "ai.onnx"):
                    anyt.append((n, k))
                else:
                    u32.append((n, k))
        if id(t) in out_ids:
            (u32 if keep_io_types else u16).append((None, None))
        return u16, u32, anyt

    # Cast(to=FLOAT) read only in float16 writes float16 instead
    for i, node in enumerate(graph.nodes):
        if node.op == "Cast" and node.attrs.get("to") == FLOAT:
            u16, u32, _ = uses(node.outputs[0])
            if u16 and not u32:
                node.attrs["to"] = FLOAT16
                plans[id(node)] = _Plan(set(), {0})
                report.converted.append(_label(node, i))
                report.casts_retargeted += 1

    # every tensor whose type changes for someone
    tensors: dict[int, gs.Tensor] = {}
    for node in graph.nodes:
        plan = plans.get(id(node))
        if plan is not None:
            for k in plan.inputs:
                tensors.setdefault(id(node.inputs[k]), node.inputs[k])
            for k in plan.outputs:
                tensors.setdefault(id(node.outputs[k]), node.outputs[k])
    if not keep_io_types:
        for t in list(graph.inputs) + list(graph.outputs):
            if onnx_dtype(t) == FLOAT and not isinstance(t, gs.Constant):
                tensors.setdefault(id(t), t)

    front: list[gs.Node] = []
    after: dict[int, list[gs.Node]] = {}
    dead_sources: set[int] = set()

    def cast(src, dst, to):
        node = gs.Node("Cast", name=names.new(f"{dst.name}_cast"), attrs={"to": to}, inputs=[src], outputs=[dst])
        producer = src.inputs[0] if src.inputs else None
        (after.setdefault(id(producer), []) if producer is not None else front).append(node)
        report.casts_inserted += 1

    def repoint(pairs, new):
        for n, k in pairs:
            if n is not None:
                n.inputs[k] = new

    for t in tensors.values():
        u16, u32, anyt = uses(t)
        producer = t.inputs[0] if t.inputs else None
        is_input = id(t) in in_ids
        native16 = (producer is not None and id(producer) in plans) or (
            is_input and not keep_io_types and not isinstance(t, gs.Constant))
        if not native16 and top(t) is not None:  # a float32 constant (initializer or Constant node)
            if u16:  # its values are read here, one constant at a time
                _convert_constant(t, const(t), u16, u32, anyt, names, report)
                if not u32 and id(t) in const_nodes:
                    dead_sources.add(id(const_nodes[id(t)]))
        elif native16:
            if not u32:
                t.dtype = np.float16
            elif is_input or (id(t) in out_ids and not keep_io_types):  # the name must stay float16
                t.dtype = np.float16
                f32 = gs.Variable(names.new(f"{t.name}_fp32"), np.float32, t.shape)
                repoint([p for p in u32 if p[0] is not None], f32)
                cast(t, f32, FLOAT)
            else:  # the name stays float32, written by a Cast from the new float16 tensor
                h = gs.Variable(names.new(f"{t.name}_fp16"), np.float16, t.shape)
                producer.outputs[producer.outputs.index(t)] = h
                repoint(u16 + anyt, h)
                cast(h, t, FLOAT)
        elif id(t) in out_ids and not keep_io_types and producer is not None:
            # written in float32 but declared float16: the producer writes a new float32 tensor
            f32 = gs.Variable(names.new(f"{t.name}_fp32"), np.float32, t.shape)
            producer.outputs[producer.outputs.index(t)] = f32
            repoint([p for p in u32 if p[0] is not None] + anyt, f32)
            t.dtype = np.float16
            cast(f32, t, FLOAT16)
        elif u16:
            h = gs.Variable(names.new(f"{t.name}_fp16"), np.float16, t.shape)
            repoint(u16, h)
            cast(t, h, FLOAT16)

    nodes = list(front)
    for node in graph.nodes:
        if id(node) not in dead_sources:
            nodes.append(node)
        nodes.extend(after.get(id(node), []))
    for node in graph.nodes:
        if id(node) in dead_sources:
            node.outputs.clear()
    graph.nodes = nodes
    return report


def _convert_constant(t, value, u16, u32, anyt, names, report):
    """Give the float16 readers of constant `t` a float16 copy (same name when nothing else reads t)."""
    v16 = value.astype(np.float16)
    report.constants_converted += 1
    report.constant_bytes_before += value.nbytes
    report.constant_bytes_after += v16.nbytes
    report.underflow += int(np.count_nonzero((value != 0) & (v16 == 0)))
    if u32:
        report.constants_copied.append(t.name)
        new = gs.Constant(names.new(f"{t.name}_fp16"), v16)
        pairs = u16
    else:
        new = gs.Constant(t.name, v16)  # the float32 one is read by nothing afterwards
        pairs = u16 + anyt
    for n, k in pairs:
        if n is not None:  # a constant graph output keeps its type
            n.inputs[k] = new


def _label(node: gs.Node, index: int) -> str:
    return node.name or f"{node.op}#{index}"


def _decide(node, opset, opsets, block, probed, top, report, local_functions):
    """(plan, None) for an fp16 node, (None, reason) for one kept float32, (None, None) when the
    node has no float32 computation to convert."""
    domain = node.domain or ""
    f32 = [t for t in list(node.inputs) + list(node.outputs) if onnx_dtype(t) == FLOAT]
    if not f32:
        return None, None
    if any(True for _ in subgraphs(node)):
        return None, "has a subgraph (body left untouched)"
    if (domain, node.op) in local_functions:
        return None, "calls a model-local function"
    if domain not in ("", "ai.onnx", "com.microsoft"):
        return None, f"domain {domain} is not converted"
    if node.op in block:
        return None, "in the blocklist"
    if domain == "com.microsoft":  # no onnx schema: every float32 tensor, the probe judges
        plan = _Plan({k for k, t in enumerate(node.inputs) if onnx_dtype(t) == FLOAT},
                     {k for k, t in enumerate(node.outputs) if onnx_dtype(t) == FLOAT})
    else:
        plan, reason = _schema_plan(node, opset)
        if reason or plan is None:
            return None, reason
    for k in sorted(plan.inputs):
        biggest = top(node.inputs[k])
        if biggest is not None and biggest > FP16_MAX:
            report.out_of_range[node.inputs[k].name] = biggest
            return None, f"constant {node.inputs[k].name} out of float16 range (max |x| = {biggest:.4g})"
    refusal = _probe(node, plan, opsets, probed)
    if refusal:
        return None, f"no float16 kernel: {refusal}"
    return plan, None


def _max_finite_abs(v: np.ndarray, chunk: int = 1 << 22) -> float:
    """max |x| over the finite elements, a chunk at a time (no full-size temporaries)."""
    flat, best = v.reshape(-1), 0.0
    for i in range(0, flat.size, chunk):
        part = np.abs(flat[i:i + chunk])
        part = part[np.isfinite(part)]
        if part.size:
            best = max(best, float(part.max()))
    return best


def _schema_plan(node, opset):
    """Which inputs/outputs change type, from the onnx schema's type variables."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None, f"no onnx schema for {node.op} at opset {opset}"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    sides = [(True, node.inputs, schema.inputs), (False, node.outputs, schema.outputs)]
    variables, hetero, bound_by_input = set(), set(), set()
    slots = []  # (is_input, index, tensor, formal)
    for is_input, actual, formals in sides:
        for k, t in enumerate(actual):
            if k < len(formals):
                p = formals[k]
            elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
                p = formals[-1]
            else:
                return None, f"more {'inputs' if is_input else 'outputs'} than the schema has"
            slots.append((is_input, k, t, p))
            if is_input and t.name:
                bound_by_input.add(p.type_str)
    for is_input, k, t, p in slots:
        if onnx_dtype(t) != FLOAT or p.type_str not in allowed:
            continue  # not float32, or a fixed type (Resize scales...): stays as it is
        if "tensor(float16)" not in allowed[p.type_str]:
            return None, f"type {p.type_str} ({p.name}) allows no float16"
        if p.is_homogeneous:
            variables.add(p.type_str)
        else:  # heterogeneous variadic: each tensor has its own type
            hetero.add((is_input, k))
    if not variables and not hetero:
        return None, None
    if variables - bound_by_input:
        return None, "output type set by an attribute"
    plan = _Plan(set(), set())
    for is_input, k, t, p in slots:
        if t.name and (p.type_str in variables and p.is_homogeneous or (is_input, k) in hetero):
            (plan.inputs if is_input else plan.outputs).add(k)
    return plan, None


def _probe(node, plan, opsets, probed):
    """kernel_refusal for a float16 copy of the node's signature."""
    def twin(t, k, convert, prefix):
        if not t.name:
            return gs.Variable("")
        return gs.Variable(f"{prefix}{k}", np.float16 if convert else t.dtype, t.shape)
    inputs = [twin(t, k, k in plan.inputs, "i") for k, t in enumerate(node.inputs)]
    outputs = [twin(t, k, k in plan.outputs, "o") for k, t in enumerate(node.outputs)]
    probe = gs.Node(node.op, domain=node.domain, attrs=dict(node.attrs), inputs=inputs, outputs=outputs)
    return kernel_refusal([probe], opsets, probed)
