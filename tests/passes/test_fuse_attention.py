"""fuse: BERT self-attention into com.microsoft Attention (--target ort)."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
from models.builders import op_counts, ops, optimize_checked

B, S, H, N = 2, 4, 8, 2
D = H // N


def attention_model(mask_shape=(B, 1, S, S), scale_op="Mul", probs_output=False, k_perm=(0, 2, 3, 1),
                    opset=17) -> onnx.ModelProto:
    """X -> Q/K/V projections -> heads -> softmax(QK^T * scale + mask) V -> merged heads -> Y."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    for t in "qkv":
        const(f"w{t}", (rng.standard_normal((H, H)) * 0.3).astype(np.float32))
        const(f"b{t}", (rng.standard_normal(H) * 0.1).astype(np.float32))
        nodes += [helper.make_node("MatMul", ["x", f"w{t}"], [f"{t}_mm"]),
                  helper.make_node("Add", [f"b{t}", f"{t}_mm"], [f"{t}_add"]),
                  helper.make_node("Reshape", [f"{t}_add", const(f"shape{t}", np.array([0, 0, -1, D], np.int64))],
                                   [f"{t}_heads"]),
                  helper.make_node("Transpose", [f"{t}_heads"], [f"{t}_t"],
                                   perm=list(k_perm) if t == "k" else [0, 2, 1, 3])]
    scale = const("scale", np.array(1 / np.sqrt(D) if scale_op == "Mul" else np.sqrt(D), np.float32))
    nodes += [helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]),
              helper.make_node(scale_op, ["scores", scale], ["scaled"])]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [B, S, H])]
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, list(mask_shape)))
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"]))
    nodes += [helper.make_node("Softmax", ["masked" if mask_shape is not None else "scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_t"], ["context"]),
              helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", const("shape_out", np.array([0, 0, -1], np.int64))], ["y"])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [B, S, H])]
    if probs_output:
        outputs.append(helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [B, N, S, S]))
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(mask_shape=(B, 1, S, S)):
    rng = np.random.default_rng(1)
    f = {"x": rng.standard_normal((B, S, H)).astype(np.float32)}
    if mask_shape is not None:
        mask = np.zeros(mask_shape, np.float32)
        mask[..., -1] = np.finfo(np.float32).min  # the last key is padding, as exporters spell it
        f["mask"] = mask
    return f


@pytest.mark.parametrize("mask_shape", [(B, 1, S, S), (1, 1, S, S), (B, N, S, S), None])
@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
def test_attention_fused(mask_shape, scale_op):
    model = attention_model(mask_shape, scale_op)
    out, result = optimize_checked(model, ["fuse"], feeds=feeds(mask_shape), target="ort")
    assert ops(out) == ["Attention"] and result.passes[0].counts == {"attention": 1}
    node = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and attrs["num_heads"] == N
    assert attrs["scale"] == pytest.approx(1 / np.sqrt(D))
    assert len(node.input) == (6 if mask_shape else 3)


def test_attention_is_idempotent():
    once = onnxopt.optimize(attention_model(), passes=["fuse"], target="ort", verify="none").model
    again = onnxopt.optimize(once, passes=["fuse"], target="ort", verify="none")
    assert again.passes[0].counts == {} and ops(again.model) == ["Attention"]


@pytest.mark.parametrize("kwargs, target, reason", [
    ({"mask_shape": (S, S)}, "ort", "mask is not a 4-D"),
    ({"mask_shape": (B, 1, 1, S)}, "ort", "mask is not a 4-D"),  # HF-style [B, 1, 1, S] padding mask
    ({"probs_output": True}, "ort", "intermediate 'probs' is a graph output"),
    ({}, "onnx", "needs opset 23"),
])
def test_attention_not_fused(kwargs, target, reason):
    model = attention_model(**kwargs)
    fused_feeds = feeds(kwargs.get("mask_shape", (B, 1, S, S)))
    out, result = optimize_checked(model, ["fuse"], feeds=fused_feeds, target=target, explain=True)
    assert op_counts(out) == op_counts(model) and result.passes[0].counts == {}
    assert [line for line in result.explain if reason in line], result.explain
