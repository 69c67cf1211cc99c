"""Does onnxruntime have a kernel for a fused node?

onnxruntime's CPU kernels cover each operator for some element types and opsets only (in 1.32:
Swish is registered for opset 24 alone, Gelu and HardSwish for no float64, com.microsoft
Attention for no float64...). A fusion that produced a node the runtime cannot run would turn a
working model into one that fails to load, and verification into an error. So every rewrite's
new nodes are probed: a model of just those nodes (their inputs as graph inputs, same types and
ranks, at the graph's opsets) must give an onnxruntime session. One probe per distinct node
signature and run (milliseconds each).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.graph import onnx_dtype


def kernel_refusal(nodes: list[gs.Node], opsets: dict[str, int], probed: dict) -> str | None:
    """Why onnxruntime cannot run `nodes` (None: it can). `probed` memoizes by signature."""
    if not nodes:
        return None
    made = {id(t) for n in nodes for t in n.outputs}
    inputs = {}
    for n in nodes:
        for t in n.inputs:
            if t.name and id(t) not in made:
                inputs.setdefault(t.name, t)
    key = (tuple(_node_key(n) for n in nodes), tuple(_tensor_key(t) for t in inputs.values()),
           tuple(sorted(opsets.items())))
    if key not in probed:
        probed[key] = _probe(nodes, list(inputs.values()), opsets)
    return probed[key]


def _node_key(node: gs.Node):
    return node.op, node.domain or "", tuple(sorted((k, repr(v)) for k, v in node.attrs.items()))


def _tensor_key(t: gs.Tensor):
    return onnx_dtype(t), None if t.shape is None else len(t.shape)


def _value_info(t: gs.Tensor, fallback: int) -> onnx.ValueInfoProto:
    shape = None if t.shape is None else [d if isinstance(d, int) and d >= 0 else f"d{i}"
                                          for i, d in enumerate(t.shape)]
    return onnx.helper.make_tensor_value_info(t.name, onnx_dtype(t) or fallback, shape)


def _probe(nodes: list[gs.Node], inputs: list[gs.Tensor], opsets: dict[str, int]) -> str | None:
    fallback = next((onnx_dtype(t) for t in inputs if onnx_dtype(t)), onnx.TensorProto.FLOAT)
    domains = dict(opsets)
    for n in nodes:
        domains.setdefault(n.domain or "", 1)
    ids = {id(n) for n in nodes}
    outputs = [t for n in nodes for t in n.outputs if t.name and not any(id(c) in ids for c in t.outputs)]
    graph = onnx.helper.make_graph([OnnxExporter.export_node(n) for n in nodes], "probe",
                                   [_value_info(t, fallback) for t in inputs],
                                   [_value_info(gs.Variable(t.name, t.dtype), fallback) for t in outputs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in domains.items()])
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), True)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any failure to build a session is the answer
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"onnxruntime cannot run the fused node here: {first[:160]}"
    return None
