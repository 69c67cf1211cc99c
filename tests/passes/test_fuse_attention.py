"""fuse: multi-head attention into com.microsoft Attention / MultiHeadAttention (--target ort) and
standard Attention (opset 23, --target onnx)."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
from models.builders import MASKED_KEYS_OPS, op_counts, ops, optimize_checked, run

B, S, H, N = 2, 4, 8, 2
L = 5  # key length of the cross-attention models
D = H // N


def attention_model(mask_shape=(B, 1, S, S), scale_op="Mul", probs_output=False, k_perm=(0, 2, 3, 1),
                    opset=17, bias=True, cross=False, heads=lambda seq: (0, 0, -1, D), merged=(0, 0, -1),
                    allowzero=0, position_bias=False) -> onnx.ModelProto:
    """X -> Q/K/V projections -> heads -> softmax(QK^T * scale + mask) V -> merged heads -> Y.
    cross: keys and values are projected from a second input `mem` [B, L, H]. heads(sequence
    length): the head-splitting Reshape's shape; merged: the merging one's."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    for t in "qkv":
        const(f"w{t}", (rng.standard_normal((H, H)) * 0.3).astype(np.float32))
        const(f"b{t}", (rng.standard_normal(H) * 0.1).astype(np.float32))
        source = "mem" if cross and t != "q" else "x"
        nodes += [helper.make_node("MatMul", [source, f"w{t}"], [f"{t}_mm"])]
        if bias:
            nodes.append(helper.make_node("Add", [f"b{t}", f"{t}_mm"], [f"{t}_add"]))
        seq = L if cross and t != "q" else S
        nodes += [helper.make_node("Reshape", [f"{t}_add" if bias else f"{t}_mm",
                                               const(f"shape{t}", np.array(heads(seq), np.int64))],
                                   [f"{t}_heads"], **({"allowzero": 1} if allowzero else {})),
                  helper.make_node("Transpose", [f"{t}_heads"], [f"{t}_t"],
                                   perm=list(k_perm) if t == "k" else [0, 2, 1, 3])]
    nodes.append(helper.make_node("MatMul", ["q_t", "k_t"], ["scores" if scale_op else "scaled"]))
    if scale_op:  # None: unscaled scores (T5; Whisper once fuse has moved its scale into Wq)
        scale = const("scale", np.array(1 / np.sqrt(D) if scale_op == "Mul" else np.sqrt(D), np.float32))
        nodes.append(helper.make_node(scale_op, ["scores", scale], ["scaled"]))
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [B, S, H])]
    if cross:
        inputs.append(helper.make_tensor_value_info("mem", onnx.TensorProto.FLOAT, [B, L, H]))
    if position_bias:  # T5: a [1, heads, query, key] bias added before the mask
        inputs.append(helper.make_tensor_value_info("pos", onnx.TensorProto.FLOAT, [1, N, S, L if cross else S]))
        nodes.append(helper.make_node("Add", ["scaled", "pos"], ["biased"]))
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, list(mask_shape)))
        nodes.append(helper.make_node("Add", ["biased" if position_bias else "scaled", "mask"], ["masked"]))
    nodes += [helper.make_node("Softmax", ["masked" if mask_shape is not None else "scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_t"], ["context"]),
              helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", const("shape_out", np.array(merged, np.int64))], ["y"],
                               **({"allowzero": 1} if allowzero else {}))]
    context = np.zeros((B, S, N, D))
    y_shape = context.reshape([context.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(merged)]).shape
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(y_shape))]
    if probs_output:
        outputs.append(helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [B, N, S, S]))
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 23 else 8
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(mask_shape=(B, 1, S, S), cross=False):
    rng = np.random.default_rng(1)
    f = {"x": rng.standard_normal((B, S, H)).astype(np.float32)}
    if cross:
        f["mem"] = rng.standard_normal((B, L, H)).astype(np.float32)
    if mask_shape is not None:
        mask = np.zeros(mask_shape, np.float32)
        mask[..., -1] = np.finfo(np.float32).min  # the last key is padding, as exporters spell it
        if mask_shape[0] == B and B > 1:
            mask[1, ..., -2:] = -10000.0  # and a second padding key in the second sample
        f["mask"] = mask
    return f


@pytest.mark.parametrize("mask_shape", [(B, 1, S, S), (1, 1, S, S), (B, N, S, S), None])
@pytest.mark.parametrize("scale_op", ["Mul", "Div", None])
def test_attention_fused(mask_shape, scale_op):
    model = attention_model(mask_shape, scale_op)
    out, result = optimize_checked(model, ["fuse"], feeds=feeds(mask_shape), target="ort")
    assert ops(out) == ["Attention"] and result.passes[0].counts == {"attention": 1}
    node = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and attrs["num_heads"] == N
    assert attrs["scale"] == pytest.approx(1 / np.sqrt(D) if scale_op else 1.0)
    assert len(node.input) == (6 if mask_shape else 3)


@pytest.mark.parametrize("heads, merged, allowzero", [
    (lambda seq: (-1, seq, N, D), (-1, S, H), 1),  # the dynamo exporter with fixed shapes
    (lambda seq: (B, seq, N, D), (B, S, H), 0),
    (lambda seq: (0, -1, N, D), (0, -1, H), 0),
])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_fused_with_literal_head_reshapes(heads, merged, allowzero, cross):
    """Head reshapes that keep batch and sequence by their known sizes or one -1, not only by 0."""
    mask_shape = (B, 1, S, L if cross else S)
    model = attention_model(mask_shape, cross=cross, heads=heads, merged=merged, allowzero=allowzero)
    out, result = optimize_checked(model, ["fuse"], feeds=feeds(mask_shape, cross), target="ort")
    fused = "multi_head_attention" if cross else "attention"
    assert result.passes[0].counts == {fused: 1} and "Softmax" not in op_counts(out)


@pytest.mark.parametrize("heads, merged", [
    (lambda seq: (-1, seq // 2, N, D), (B, S, H)),  # attention within halves of the sequence
    (lambda seq: (0, 0, N, D), (-1, S // 2, 2 * H)),  # the context merged across positions
])
def test_attention_with_reshapes_that_regroup_positions_is_not_fused(heads, merged):
    model = attention_model(None, heads=heads, merged=merged)
    out, result = optimize_checked(model, ["fuse"], feeds=feeds(None), target="ort", explain=True)
    assert result.passes[0].counts == {} and op_counts(out) == op_counts(model)


@pytest.mark.parametrize("target, cross, fused", [
    ("ort", False, "attention"), ("ort", True, "multi_head_attention"), ("onnx", False, "attention_onnx")])
def test_position_bias_and_mask_go_in_as_their_sum(target, cross, fused):
    """T5: scores + position bias [1, N, S, L] + padding mask [B, 1, 1, L]: one Add of the two
    (shared by the layers reading the same pair), then the mask's query-axis Expand."""
    mask_shape = (B, 1, 1, L if cross else S)
    model = attention_model(mask_shape, scale_op=None, cross=cross, opset=23 if target == "onnx" else 17,
                            position_bias=True)
    f = feeds(mask_shape, cross)
    f["pos"] = np.random.default_rng(2).standard_normal((1, N, S, L if cross else S)).astype(np.float32)
    out, result = optimize_checked(model, ["fuse"], feeds=f, target=target)
    assert result.passes[0].counts == {fused: 1} and "Softmax" not in op_counts(out)
    add = next(n for n in out.graph.node if n.op_type == "Add" and "pos" in n.input)
    assert set(add.input) == {"pos", "mask"}


def test_attention_is_idempotent():
    once = onnxopt.optimize(attention_model(), passes=["fuse"], target="ort", verify="none").model
    again = onnxopt.optimize(once, passes=["fuse"], target="ort", verify="none")
    assert again.passes[0].counts == {} and ops(again.model) == ["Attention"]


def test_key_padding_mask_is_expanded_over_the_queries():
    """HF-style [B, 1, 1, S] padding mask: onnxruntime's attention_bias does not broadcast over
    the query axis, so one Expand (shared by every layer reading the mask) spells it out."""
    mask_shape = (B, 1, 1, S)
    model = attention_model(mask_shape)
    for target, fused in (("ort", "Attention"), ("onnx", "Attention")):
        out, result = optimize_checked(model, ["fuse"], feeds=feeds(mask_shape), target=target, max_opset=23)
        assert op_counts(out)[fused] == 1 and op_counts(out)["Expand"] == 1
        assert "Softmax" not in op_counts(out)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask_shape", [(B, 1, S, L), (B, 1, 1, L), None])
def test_cross_attention_into_multi_head_attention(bias, mask_shape):
    model = attention_model(mask_shape, bias=bias, cross=True)
    out, result = optimize_checked(model, ["fuse"], feeds=feeds(mask_shape, cross=True), target="ort")
    # masked_keys: a bias input would add to K's zeroed rows
    assert result.passes[0].counts == {"multi_head_attention": 1} | ({"masked_keys": 1} if mask_shape and not bias
                                                                     else {})
    assert op_counts(out)["MultiHeadAttention"] == 1 and op_counts(out)["MatMul"] == 3
    assert "Softmax" not in op_counts(out) and "Add" not in op_counts(out)
    node = next(n for n in out.graph.node if n.op_type == "MultiHeadAttention")
    assert node.domain == "com.microsoft" and (node.input[3] != "") == bias


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_onnx_opset23(cross, bias):
    mask_shape = (B, 1, S, L if cross else S)
    model = attention_model(mask_shape, opset=23, bias=bias, cross=cross)
    out, result = optimize_checked(model, ["fuse"], feeds=feeds(mask_shape, cross), target="onnx")
    assert result.passes[0].counts == {"attention_onnx": 1, "masked_keys": 1}
    assert op_counts(out) == {"MatMul": 3, "Attention": 1, **({"Add": 3} if bias else {}), **MASKED_KEYS_OPS}
    node = next(n for n in out.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "" and attrs["q_num_heads"] == attrs["kv_num_heads"] == N
    assert attrs["scale"] == pytest.approx(1 / np.sqrt(D))


def test_attention_onnx_raises_the_opset_when_allowed():
    model = attention_model(opset=17)
    out, result = optimize_checked(model, ["fuse"], feeds=feeds(), target="onnx", max_opset=23)
    assert result.passes[0].counts == {"attention_onnx": 1, "opset_raised_17_to_23": 1, "masked_keys": 1}
    assert next(o.version for o in out.opset_import if o.domain == "") == 23
    again = onnxopt.optimize(out, passes=["fuse"], target="onnx", verify="none")
    assert again.passes[0].counts == {}


@pytest.mark.parametrize("kwargs, target, reason", [
    ({"mask_shape": (S, S)}, "ort", "mask is not a 4-D"),
    ({"mask_shape": (B, 1, S, 1)}, "ort", "mask broadcasts over the key positions"),
    ({"probs_output": True}, "ort", "intermediate 'probs' is a graph output"),
    ({}, "onnx", "Attention needs opset 23, the model has 17"),
])
def test_attention_not_fused(kwargs, target, reason):
    model = attention_model(**kwargs)
    fused_feeds = feeds(kwargs.get("mask_shape", (B, 1, S, S)))
    out, result = optimize_checked(model, ["fuse"], feeds=fused_feeds, target=target, explain=True,
                                   options=["fuse.disable=masked_keys"])  # it applies to the unfused form too
    assert op_counts(out) == op_counts(model) and result.passes[0].counts == {}
    assert [line for line in result.explain if reason in line], result.explain


def packed_model(opset=17, order=(0, 1, 2)) -> onnx.ModelProto:
    """paddle2onnx's packed-QKV attention (PP-OCR's SVTR blocks): one [H, 3H] projection, the heads
    split by Reshape [0, -1, 3, N, D] + Transpose [2, 0, 3, 1, 4], Q/K/V sliced out of it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((H, 3 * H)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal(3 * H) * 0.1).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0, -1, 3, N, D], np.int64), "shape5"),
             numpy_helper.from_array(np.array([0, -1, H], np.int64), "shape_out"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array(1 / np.sqrt(D), np.float32), "scale")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["qkv"]),
             helper.make_node("Reshape", ["qkv", "shape5"], ["r5"]),
             helper.make_node("Transpose", ["r5"], ["heads"], perm=[2, 0, 3, 1, 4])]
    for name, i in zip("qkv", order):
        inits += [numpy_helper.from_array(np.array([i], np.int64), f"s{name}"),
                  numpy_helper.from_array(np.array([i + 1], np.int64), f"e{name}")]
        nodes += [helper.make_node("Slice", ["heads", f"s{name}", f"e{name}", "axis0"], [f"{name}5"]),
                  helper.make_node("Squeeze", [f"{name}5", "axis0"], [f"{name}4"])]
    nodes += [helper.make_node("Mul", ["q4", "scale"], ["qs"]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qs", "kt"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v4"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "shape_out"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "packed", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "S", H])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "S", H])], inits),
        opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 23 else 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("target, opset, expected", [
    ("ort", 17, {"Attention": 1}),
    ("onnx", 23, {"Add": 1, "MatMul": 1, "Split": 1, "Attention": 1}),
])
def test_packed_qkv_attention(target, opset, expected):
    model = packed_model(opset)
    x = {"x": np.random.default_rng(2).standard_normal((B, S, H)).astype(np.float32)}
    out, result = optimize_checked(model, ["fuse"], feeds=x, target=target)
    assert result.passes[0].counts == {"attention_packed": 1} and op_counts(out) == expected
    node = next(n for n in out.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs.get("num_heads", attrs.get("q_num_heads")) == N
    again = onnxopt.optimize(out, passes=["fuse"], target=target, verify="none")
    assert again.passes[0].counts == {}


def test_packed_qkv_attention_with_swapped_slices_is_not_fused():
    """K taken from the first block and Q from the second is not the packed layout."""
    model = packed_model(17, order=(1, 0, 2))
    x = {"x": np.random.default_rng(2).standard_normal((B, S, H)).astype(np.float32)}
    out, result = optimize_checked(model, ["fuse"], feeds=x, target="ort", explain=True)
    assert "Attention" not in op_counts(out)
    assert any("not the three slices of the packed heads" in line for line in result.explain), result.explain


# masked_keys: the keys each query's mask hides get K rows of 0 and the mask -40 (passes/fuse/masked_keys.py)
LOWEST = np.finfo(np.float32).min


def masked_feeds(kind, value=LOWEST):
    """feeds() with a [B, 1, S, S] mask: padding (the last key of sample 0, the last two of sample
    1, at `value`), causal (a key hidden from the queries before it), all (sample 1 hides every
    key), or none (nothing hidden)."""
    f = feeds()
    mask = np.zeros((B, 1, S, S), np.float32)
    if kind == "padding":
        mask[0, ..., -1] = mask[1, ..., -2:] = value
    elif kind == "causal":
        mask[..., np.triu_indices(S, 1)[0], np.triu_indices(S, 1)[1]] = value
    elif kind == "all":
        mask[0, ..., -1] = mask[1] = value
    f["mask"] = mask
    return f


@pytest.mark.parametrize("kind", ["padding", "causal", "none"])
@pytest.mark.parametrize("value", [LOWEST, -10000.0])
def test_masked_keys_keep_the_outputs(kind, value):
    model = attention_model(opset=23)
    out, result = optimize_checked(model, ["fuse"], feeds=masked_feeds(kind, value), target="onnx")
    assert result.passes[0].counts == {"attention_onnx": 1, "masked_keys": 1}
    att = next(n for n in out.graph.node if n.op_type == "Attention")
    where = next(n for n in out.graph.node if n.op_type == "Where")
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert att.input[3] == where.output[0] and att.input[1] == mul.output[0]
    floor = next(i for i in out.graph.initializer if i.name == where.input[2])
    assert numpy_helper.to_array(floor) == np.float32(-40.0)


def test_masked_keys_leave_a_sample_that_hides_every_key_as_it_was():
    """The Attention kernel alone decides what such a sample gives; the rewrite changes nothing."""
    model = attention_model(opset=23)
    on = onnxopt.optimize(model, passes=["fuse"], target="onnx", verify="none").model
    off = onnxopt.optimize(model, passes=["fuse"], target="onnx", verify="none",
                           options=["fuse.disable=masked_keys"]).model
    assert op_counts(off) == {"MatMul": 3, "Add": 3, "Attention": 1}
    for value in (LOWEST, -10000.0):
        f = masked_feeds("all", value)
        got, want = run(on, f)["y"], run(off, f)["y"]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], run(model, f)["y"][0], rtol=1e-5, atol=1e-6)


def test_masked_keys_are_idempotent():
    out = onnxopt.optimize(attention_model(opset=23), passes=["fuse"], target="onnx", verify="none").model
    again = onnxopt.optimize(out, passes=["fuse"], target="onnx", verify="none")
    assert again.passes[0].counts == {}


def test_masked_keys_not_applied_to_a_mask_per_head_or_one_that_hides_nothing():
    per_head = attention_model((B, N, S, S), opset=23)
    result = onnxopt.optimize(per_head, passes=["fuse"], target="onnx", verify="none")
    assert result.passes[0].counts == {"attention_onnx": 1}
    constant = attention_model(None, opset=23)  # a constant mask that hides nothing
    graph = constant.graph
    graph.initializer.append(numpy_helper.from_array(np.full((1, 1, S, S), -1.0, np.float32), "mask"))
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    graph.node.insert(list(graph.node).index(softmax), helper.make_node("Add", ["scaled", "mask"], ["masked"]))
    softmax.input[0] = "masked"
    result = onnxopt.optimize(constant, passes=["fuse"], target="onnx", verify="none")
    assert result.passes[0].counts == {"attention_onnx": 1}


# masked_keys on the unfused form (below opset 23, or an attention no rule fuses): K times the
# factor before its head Reshape, the new mask in the Add before the Softmax


@pytest.mark.parametrize("kind", ["padding", "causal", "none"])
@pytest.mark.parametrize("value", [LOWEST, -10000.0])
@pytest.mark.parametrize("form", ["Mul", "Div", "unscaled", "[S, S] mask"])
def test_masked_keys_on_unfused_attention_keep_the_outputs(kind, value, form):
    model = attention_model(mask_shape=(S, S) if form == "[S, S] mask" else (B, 1, S, S),
                            scale_op={"Div": "Div", "unscaled": None}.get(form, "Mul"))
    f = masked_feeds(kind, value)
    if form == "[S, S] mask":
        f["mask"] = f["mask"][0, 0]
    out, result = optimize_checked(model, ["fuse"], feeds=f, target="onnx")
    assert result.passes[0].counts == {"masked_keys": 1}
    assert op_counts(out) == op_counts(model) + Counter(MASKED_KEYS_OPS)
    made = {o: n for n in out.graph.node for o in n.output}
    mul, add = made[made["k_heads"].input[0]], made[next(n for n in out.graph.node if n.op_type == "Softmax").input[0]]
    assert mul.op_type == "Mul" and mul.input[0] == "k_add" and made[add.input[1]].op_type == "Where"
    if kind == "padding":  # a padded key's logit is exactly the floor now
        logits = out.graph.output.add()
        logits.name = add.output[0]
        got = run(out, f)[add.output[0]]
        hidden = np.broadcast_to(f["mask"], got.shape) <= -10000
        assert hidden.any() and np.all(got[hidden] == -40.0) and np.all(got[~hidden] > -40.0)


def test_masked_keys_on_unfused_attention_leave_a_sample_that_hides_every_key_as_it_was():
    model = attention_model()
    on = onnxopt.optimize(model, passes=["fuse"], target="onnx", verify="none").model
    off = onnxopt.optimize(model, passes=["fuse"], target="onnx", verify="none",
                           options=["fuse.disable=masked_keys"]).model
    assert op_counts(off) == op_counts(model) and op_counts(on) == op_counts(model) + Counter(MASKED_KEYS_OPS)
    for value in (LOWEST, -10000.0):
        f = masked_feeds("all", value)
        got, want = run(on, f)["y"], run(off, f)["y"]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_masked_keys_on_unfused_attention_are_idempotent():
    out = onnxopt.optimize(attention_model(), passes=["fuse"], target="onnx", verify="none").model
    again = onnxopt.optimize(out, passes=["fuse"], target="onnx", verify="none")
    assert again.passes[0].counts == {}


def k_heads_read_elsewhere():
    model = attention_model()
    model.graph.output.append(helper.make_tensor_value_info("k_heads", onnx.TensorProto.FLOAT, [B, S, N, D]))
    return model


@pytest.mark.parametrize("model", [
    pytest.param(lambda: attention_model((B, N, S, S)), id="a mask per head"),
    pytest.param(lambda: attention_model((B, 1, S, 1)), id="a mask per query only"),
    pytest.param(lambda: attention_model(position_bias=True), id="a position bias before the mask"),
    pytest.param(k_heads_read_elsewhere, id="K's heads an output too"),
    pytest.param(lambda: attention_model(k_perm=(0, 2, 1, 3)), id="no K^T"),
])
def test_masked_keys_not_applied_to_unfused_attention(model):
    result = onnxopt.optimize(model(), passes=["fuse"], target="onnx", verify="none")
    assert result.passes[0].counts == {}
