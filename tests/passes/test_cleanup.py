"""cleanup, rule by rule.

Each test builds a small graph from ONNX text, runs `cleanup` alone through onnxopt.optimize
(models.builders.optimize_checked: onnx.checker + bitwise equality with onnxruntime, its
optimizations off) and asserts the exact counts, the exact op sequence, unchanged graph output
names, and that a second run changes nothing. Negative cases assert the graph is left as it was.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

import onnxopt
from models.builders import from_text, optimize_checked, ops, random_feeds, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
INT64_MAX = 9223372036854775807


def model(text: str) -> onnx.ModelProto:
    return from_text(HEADER + text)


def cleanup(m: onnx.ModelProto, options=None, feeds=None):
    """cleanup alone, checked; returns (optimized model, counts)."""
    out, result = optimize_checked(m, ["cleanup"], feeds=feeds, exact=True, options=options)
    assert [r.name for r in result.passes] == ["cleanup"]
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]
    return out, result.passes[0].counts


def check(m: onnx.ModelProto, counts: dict, sequence: list[str], options=None, feeds=None) -> onnx.ModelProto:
    """Assert the exact counts and op sequence, then that a second run is a no-op."""
    out, got = cleanup(m, options, feeds)
    assert got == counts
    assert ops(out) == sequence
    again, got = cleanup(out, options, feeds)
    assert got == {}
    assert ops(again) == sequence
    return out


def unchanged(m: onnx.ModelProto, options=None, feeds=None) -> onnx.ModelProto:
    """A negative case: nothing counted, the op sequence as it was."""
    return check(m, {}, ops(m), options, feeds)


def body(m: onnx.ModelProto, attr: str, node: int = -1) -> onnx.GraphProto:
    """A subgraph attribute of a main-graph node."""
    (g,) = [a.g for a in m.graph.node[node].attribute if a.name == attr]
    return g


def body_ops(m: onnx.ModelProto, attr: str, node: int = -1) -> list[str]:
    return [n.op_type for n in body(m, attr, node).node]


def producer_of(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (node,) = [n for n in m.graph.node if name in n.output]
    return node


def init_names(m: onnx.ModelProto) -> list[str]:
    return [t.name for t in m.graph.initializer]


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    want, got = run(a, feeds), run(b, feeds)
    assert list(want) == list(got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ----------------------------------------------------------------------------------- dead code


def test_dead_nodes_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        d = Relu(x)
        e = Exp(d)
        y = Neg(x)
    }""")
    check(m, {"dead_nodes_removed": 2}, ["Neg"])


def test_dead_node_takes_its_initializer_with_it():
    # The initializer was used (by the dead node), so only the node is counted.
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float[3] w = {1, 2, 3}> {
        d = Add(x, w)
        y = Neg(x)
    }""")
    out = check(m, {"dead_nodes_removed": 1}, ["Neg"])
    assert init_names(out) == []


def test_unused_initializers_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float[3] w = {1, 2, 3}, float[3] u = {4, 5, 6}, float[3] v = {0, 0, 0}> {
        y = Add(x, w)
    }""")
    out = check(m, {"unused_initializers_removed": 2}, ["Add"])
    assert init_names(out) == ["w"]


def test_unused_graph_input_is_kept():
    m = model("""
    g (float[2,3] x, float[2,3] unused) => (float[2,3] y) {
        y = Relu(x)
    }""")
    unchanged(m)


def test_dead_node_in_local_function_counted():
    # gs's cleanup drops dead nodes of function bodies too; the count says so.
    m = from_text("""<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2,3] x) => (float[2,3] y) {
        y = local.F(x)
    }
    <domain: "local", opset_import: ["" : 17]>
    F (v) => (w) {
        d = Exp(v)
        w = Neg(v)
    }""")
    out = check(m, {"dead_nodes_removed": 1}, ["F"])
    assert [n.op_type for n in out.functions[0].node] == ["Neg"]


def test_dead_node_in_if_branch():
    m = model("""
    g (float[2,3] x, bool c) => (float[2,3] y) {
        y = If(c) <then_branch = t () => (float[2,3] z1) { z1 = Relu(x) },
                   else_branch = e () => (float[2,3] z2) { d = Exp(x)
                                                           z2 = Neg(x) }>
    }""")
    out = check(m, {"dead_nodes_removed": 1}, ["If"])
    assert body_ops(out, "else_branch") == ["Neg"]
    assert_same_outputs(m, out, {"x": random_feeds(m)["x"], "c": np.array(False)})


def test_unused_initializer_in_if_branch_is_counted():
    m = model("""
    g (float[2,3] x, bool c) => (float[2,3] y) {
        y = If(c) <then_branch = t () => (float[2,3] z1) <float[3] w = {1, 2, 3}> { z1 = Relu(x) },
                   else_branch = e () => (float[2,3] z2) { z2 = Neg(x) }>
    }""")
    out = check(m, {"unused_initializers_removed": 1}, ["If"])
    assert [t.name for t in body(out, "then_branch").initializer] == []


# ----------------------------------------------------------------------------------- Identity


def test_identity_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        a = Identity(x)
        b = Identity(a)
        y = Relu(b)
    }""")
    out = check(m, {"identity_removed": 2}, ["Relu"])
    assert list(out.graph.node[0].input) == ["x"]


def test_identity_to_graph_output_keeps_the_output_name():
    m = model("""
    g (float[2,3] x) => (float[2,3] y, float[2,3] w) {
        a = Relu(x)
        y = Identity(a)
        w = Exp(a)
    }""")
    out = check(m, {"identity_removed": 1}, ["Relu", "Exp"])
    assert list(producer_of(out, "y").input) == ["x"] and producer_of(out, "y").op_type == "Relu"
    assert list(producer_of(out, "w").input) == ["y"]


def test_identity_from_graph_input_to_graph_output_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        y = Identity(x)
    }""")
    unchanged(m)


def test_identity_from_initializer_to_graph_output_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y, float[3] z) <float[3] w = {1, 2, 3}> {
        y = Relu(x)
        z = Identity(w)
    }""")
    unchanged(m)


def test_identity_between_two_graph_outputs_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] a, float[2,3] y) {
        a = Relu(x)
        y = Identity(a)
    }""")
    unchanged(m)


def test_two_identities_of_one_tensor_to_two_outputs():
    # The first takes over the producer's output; the second then copies a graph output and stays.
    m = model("""
    g (float[2,3] x) => (float[2,3] y1, float[2,3] y2) {
        a = Relu(x)
        y1 = Identity(a)
        y2 = Identity(a)
    }""")
    out = check(m, {"identity_removed": 1}, ["Relu", "Identity"])
    assert list(producer_of(out, "y2").input) == ["y1"]


def test_identity_in_if_branch():
    # Inside a body: an Identity of a body-local tensor to the body output goes (the output name
    # survives); one reading the outer scope straight to the body output must stay.
    m = model("""
    g (float[2,3] x, bool c) => (float[2,3] y) {
        y = If(c) <then_branch = t () => (float[2,3] z1) { a = Relu(x)
                                                           b = Identity(a)
                                                           z1 = Identity(b) },
                   else_branch = e () => (float[2,3] z2) { z2 = Identity(x) }>
    }""")
    out = check(m, {"identity_removed": 2}, ["If"])
    assert body_ops(out, "then_branch") == ["Relu"]
    assert [o.name for o in body(out, "then_branch").output] == ["z1"]
    assert list(body(out, "then_branch").node[0].output) == ["z1"]
    assert body_ops(out, "else_branch") == ["Identity"]
    assert_same_outputs(m, out, {"x": random_feeds(m)["x"], "c": np.array(False)})


def test_identity_in_loop_body():
    # The loop-carried condition copied from the body input must stay; the inner Identity goes.
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <int64 n = {3}, bool go = {1}> {
        y = Loop(n, go, x) <body = b (int64 i, bool c_in, float[2,3] v) => (bool c_out, float[2,3] v_out) {
            c_out = Identity(c_in)
            a = Identity(v)
            v_out = Add(a, x)
        }>
    }""")
    out = check(m, {"identity_removed": 1}, ["Loop"])
    assert body_ops(out, "body") == ["Identity", "Add"]
    assert list(body(out, "body").node[1].input) == ["v", "x"]


# ----------------------------------------------------------------------------------- Dropout


def test_inference_dropout_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        d = Dropout(x)
        y = Relu(d)
    }""")
    check(m, {"dropout_removed": 1}, ["Relu"])


def test_dropout_with_constant_false_training_mode_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float r = {0.5}, bool t = {0}> {
        d = Dropout(x, r, t)
        y = Relu(d)
    }""")
    check(m, {"dropout_removed": 1}, ["Relu"])


def test_dropout_with_constant_node_training_mode_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        t = Constant<value = bool {0}>()
        d = Dropout(x, , t)
        y = Relu(d)
    }""")
    check(m, {"constant_nodes_to_initializers": 1, "dropout_removed": 1}, ["Relu"])


def test_opset10_dropout_removed():
    m = from_text("""<ir_version: 7, opset_import: ["" : 10]>
    g (float[2,3] x) => (float[2,3] y) {
        d = Dropout<ratio = 0.3>(x)
        y = Relu(d)
    }""")
    check(m, {"dropout_removed": 1}, ["Relu"])


def test_dropout_with_unused_mask_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        d, mask = Dropout(x)
        y = Relu(d)
    }""")
    check(m, {"dropout_removed": 1}, ["Relu"])


def test_dropout_to_graph_output_keeps_the_output_name():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        a = Relu(x)
        y = Dropout(a)
    }""")
    out = check(m, {"dropout_removed": 1}, ["Relu"])
    assert list(out.graph.node[0].output) == ["y"]


def test_dropout_with_used_mask_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y, bool[2,3] m) {
        d, m = Dropout(x)
        y = Relu(d)
    }""")
    unchanged(m)


def test_dropout_with_mask_consumed_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        d, mask = Dropout(x)
        f = Cast<to = 1>(mask)
        y = Mul(d, f)
    }""")
    unchanged(m)


def test_training_dropout_stays():
    # ratio 0 keeps the training-mode output deterministic for the numeric check.
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float r = {0.0}, bool t = {1}> {
        d = Dropout(x, r, t)
        y = Relu(d)
    }""")
    unchanged(m)


def test_dropout_with_runtime_training_mode_stays():
    m = model("""
    g (float[2,3] x, bool t) => (float[2,3] y) <float r = {0.0}> {
        d = Dropout(x, r, t)
        y = Relu(d)
    }""")
    unchanged(m, feeds={"x": np.ones((2, 3), np.float32), "t": np.array(False)})


# ----------------------------------------------------------------------------------- Cast


def test_noop_cast_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        c = Cast<to = 1>(x)
        y = Relu(c)
    }""")
    check(m, {"noop_cast_removed": 1}, ["Relu"])


def test_real_cast_stays():
    m = model("""
    g (float[2,3] x) => (int32[2,3] y) {
        r = Relu(x)
        y = Cast<to = 6>(r)
    }""")
    unchanged(m)


def test_noop_cast_of_graph_input_to_graph_output_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        y = Cast<to = 1>(x)
    }""")
    unchanged(m)


# ----------------------------------------------------------------------------------- Reshape


@pytest.mark.parametrize("target", ["2, 3, 4", "0, -1, 4", "0, 0, 0", "-1, 3, 0", "2, 0, -1"])
def test_noop_reshape_removed(target):
    m = model(f"""
    g (float[2,3,4] x) => (float[2,3,4] y) <int64[3] s = {{{target}}}> {{
        r = Reshape(x, s)
        y = Relu(r)
    }}""")
    check(m, {"noop_reshape_removed": 1}, ["Relu"])


@pytest.mark.parametrize("target,shape", [("6, 4", "6,4"), ("3, 2, 4", "3,2,4"), ("-1, 2, 4", "3,2,4"),
                                          ("0, 4, -1", "2,4,3"), ("24", "24")])
def test_real_reshape_stays(target, shape):
    n = len(shape.split(","))
    m = model(f"""
    g (float[2,3,4] x) => (float[{shape}] y) <int64[{n}] s = {{{target}}}> {{
        r = Reshape(x, s)
        y = Relu(r)
    }}""")
    unchanged(m)


@pytest.mark.parametrize("target, removed", [("-1, 8", True), ("0, 8", True), ("0, -1", True), ("-1, 4", False),
                                             ("2, -1", False), ("B, 8", False)])
def test_reshape_with_symbolic_batch(target, removed):
    """[-1, 8] on a [B, 8] input is a no-op whatever B is; [-1, 4] is not."""
    target = target.replace("B", "2")
    out_shape = "B,8" if removed else "N,M"
    m = model(f"""
    g (float[B,8] x) => (float[{out_shape}] y) <int64[2] s = {{{target}}}> {{
        r = Reshape(x, s)
        y = Relu(r)
    }}""")
    feeds = {"x": np.ones((2, 8), np.float32)}
    if removed:
        check(m, {"noop_reshape_removed": 1}, ["Relu"], feeds=feeds)
    else:
        unchanged(m, feeds=feeds)


def test_reshape_to_runtime_shape_stays():
    m = model("""
    g (float[2,3,4] x, int64[3] s) => (float[2,3,4] y) {
        r = Reshape(x, s)
        y = Relu(r)
    }""")
    unchanged(m, feeds={"x": np.ones((2, 3, 4), np.float32), "s": np.array([2, 3, 4], np.int64)})


def test_reshape_to_overridable_shape_stays():
    m = model("""
    g (float[2,3,4] x, int64[3] s) => (float[2,3,4] y) <int64[3] s = {2, 3, 4}> {
        r = Reshape(x, s)
        y = Relu(r)
    }""")
    unchanged(m)


# ----------------------------------------------------------------------------------- Transpose


def test_identity_transpose_removed():
    m = model("""
    g (float[2,3,4] x) => (float[2,3,4] y) {
        t = Transpose<perm = [0, 1, 2]>(x)
        y = Relu(t)
    }""")
    check(m, {"noop_transpose_removed": 1}, ["Relu"])


def test_rank1_transpose_without_perm_removed():
    m = model("""
    g (float[5] x) => (float[5] y) {
        t = Transpose(x)
        y = Relu(t)
    }""")
    check(m, {"noop_transpose_removed": 1}, ["Relu"])


@pytest.mark.parametrize("perm,shape", [("perm = [0, 2, 1]", "2,4,3"), ("perm = [2, 1, 0]", "4,3,2"), ("", "4,3,2")])
def test_real_transpose_stays(perm, shape):
    attrs = f"<{perm}>" if perm else ""
    m = model(f"""
    g (float[2,3,4] x) => (float[{shape}] y) {{
        t = Transpose{attrs}(x)
        y = Relu(t)
    }}""")
    unchanged(m)


# ----------------------------------------------------------------------------------- Slice


@pytest.mark.parametrize("starts,ends,axes", [
    ("0", str(INT64_MAX), "1"),
    ("-3", str(INT64_MAX), "1"),
    ("-100", "100", "-1"),
    ("0, 0", "2, 3", "0, 1"),
    ("0", "2", "0"),
])
def test_full_range_slice_removed(starts, ends, axes):
    k = len(starts.split(","))
    m = model(f"""
    g (float[2,3] x) => (float[2,3] y) <int64[{k}] s = {{{starts}}}, int64[{k}] e = {{{ends}}},
                                        int64[{k}] a = {{{axes}}}> {{
        t = Slice(x, s, e, a)
        y = Relu(t)
    }}""")
    check(m, {"noop_slice_removed": 1}, ["Relu"])


def test_full_range_slice_without_axes_removed():
    m = model(f"""
    g (float[2,3] x) => (float[2,3] y) <int64[2] s = {{0, -3}}, int64[2] e = {{{INT64_MAX}, {INT64_MAX}}}> {{
        t = Slice(x, s, e)
        y = Relu(t)
    }}""")
    check(m, {"noop_slice_removed": 1}, ["Relu"])


@pytest.mark.parametrize("starts,ends,axes,steps,shape", [
    ("1", str(INT64_MAX), "-1", None, "2,2"),
    ("-2", str(INT64_MAX), "1", None, "2,2"),
    ("0", "-1", "1", None, "2,2"),
    ("0", "2", "1", None, "2,2"),
    ("0", str(INT64_MAX), "1", "2", "2,2"),
    ("2", str(-INT64_MAX), "1", "-1", "2,3"),  # the full range, reversed
])
def test_partial_slice_stays(starts, ends, axes, steps, shape):
    step_init, step_arg = (f", int64[1] p = {{{steps}}}", ", p") if steps else ("", "")
    m = model(f"""
    g (float[2,3] x) => (float[{shape}] y) <int64[1] s = {{{starts}}}, int64[1] e = {{{ends}}},
                                           int64[1] a = {{{axes}}}{step_init}> {{
        t = Slice(x, s, e, a{step_arg})
        y = Relu(t)
    }}""")
    unchanged(m)


def test_slice_with_runtime_ends_stays():
    m = model("""
    g (float[2,3] x, int64[1] e) => (float[2,?] y) <int64[1] s = {0}, int64[1] a = {1}> {
        t = Slice(x, s, e, a)
        y = Relu(t)
    }""")
    unchanged(m, feeds={"x": np.ones((2, 3), np.float32), "e": np.array([3], np.int64)})


# ----------------------------------------------------------------------------------- Pad


def test_zero_pad_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <int64[4] p = {0, 0, 0, 0}> {
        t = Pad(x, p)
        y = Relu(t)
    }""")
    check(m, {"noop_pad_removed": 1}, ["Relu"])


def test_nonzero_pad_stays():
    m = model("""
    g (float[2,3] x) => (float[2,5] y) <int64[4] p = {0, 1, 0, 1}> {
        t = Pad(x, p)
        y = Relu(t)
    }""")
    unchanged(m)


def test_negative_pad_stays():
    m = model("""
    g (float[2,3] x) => (float[2,2] y) <int64[4] p = {0, 0, 0, -1}> {
        t = Pad(x, p)
        y = Relu(t)
    }""")
    unchanged(m)


# ----------------------------------------------------------------------------------- Expand


@pytest.mark.parametrize("target", ["2, 3", "1, 3", "3", "1", "2, 1"])
def test_noop_expand_removed(target):
    k = len(target.split(","))
    m = model(f"""
    g (float[2,3] x) => (float[2,3] y) <int64[{k}] s = {{{target}}}> {{
        t = Expand(x, s)
        y = Relu(t)
    }}""")
    check(m, {"noop_expand_removed": 1}, ["Relu"])


@pytest.mark.parametrize("x,target,shape", [("1,3", "2, 3", "2,3"), ("2,3", "1, 2, 3", "1,2,3"),
                                            ("2,1", "2, 3", "2,3"), ("2,3", "4, 2, 3", "4,2,3")])
def test_broadcasting_expand_stays(x, target, shape):
    k = len(target.split(","))
    m = model(f"""
    g (float[{x}] x) => (float[{shape}] y) <int64[{k}] s = {{{target}}}> {{
        t = Expand(x, s)
        y = Relu(t)
    }}""")
    unchanged(m)


# ----------------------------------------------------------------------------------- Concat


def test_single_input_concat_removed():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        t = Concat<axis = 1>(x)
        y = Relu(t)
    }""")
    check(m, {"noop_concat_removed": 1}, ["Relu"])


def test_two_input_concat_stays():
    m = model("""
    g (float[2,3] x) => (float[2,6] y) {
        t = Concat<axis = 1>(x, x)
        y = Relu(t)
    }""")
    unchanged(m)


# ----------------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("expr", [
    "Add(x, zero)", "Add(zero, x)", "Add(x, zero_row)", "Add(x, zero_scalar)", "Sub(x, zero)",
    "Mul(x, one)", "Mul(one, x)", "Mul(x, one_row)", "Mul(one_col, x)", "Div(x, one)", "Div(x, one_scalar)",
])
def test_neutral_arithmetic_removed(expr):
    m = model(f"""
    g (float[2,3] x) => (float[2,3] y) <float[3] zero = {{0, 0, 0}}, float[1,3] zero_row = {{0, 0, 0}},
                                        float zero_scalar = {{0}}, float[3] one = {{1, 1, 1}},
                                        float[1,3] one_row = {{1, 1, 1}}, float[2,1] one_col = {{1, 1}},
                                        float one_scalar = {{1}}> {{
        t = {expr}
        y = Relu(t)
    }}""")
    out = check(m, {"unused_initializers_removed": 6, "noop_arithmetic_removed": 1}, ["Relu"])
    assert list(out.graph.node[0].input) == ["x"]
    assert len(out.graph.initializer) == 0


def test_neutral_integer_arithmetic_removed():
    m = model("""
    g (int64[2,3] x) => (int64[2,3] y) <int64[3] zero = {0, 0, 0}, int64 one = {1}> {
        a = Add(x, zero)
        b = Mul(a, one)
        y = Neg(b)
    }""")
    check(m, {"noop_arithmetic_removed": 2}, ["Neg"])


def test_neutral_arithmetic_to_graph_output_keeps_the_output_name():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float[3] zero = {0, 0, 0}> {
        a = Relu(x)
        y = Add(a, zero)
    }""")
    out = check(m, {"noop_arithmetic_removed": 1}, ["Relu"])
    assert list(out.graph.node[0].output) == ["y"]


@pytest.mark.parametrize("expr,shape", [
    ("Sub(zero, x)", "2,3"),  # 0 - x
    ("Div(one, x)", "2,3"),  # 1 / x
    ("Add(x, zero_big)", "4,2,3"),  # zeros of a bigger shape broadcast x
    ("Add(x, one)", "2,3"),
    ("Mul(x, zero)", "2,3"),
    ("Mul(x, almost_one)", "2,3"),
    ("Sub(x, neg_zero)", "2,3"),  # x - (-0) is x + 0: not the same bits for x = -0
])
def test_non_neutral_arithmetic_stays(expr, shape):
    m = model(f"""
    g (float[2,3] x) => (float[{shape}] y) <float[3] zero = {{0, 0, 0}}, float[3] one = {{1, 1, 1}},
                                           float[4,2,3] zero_big = {{{", ".join(["0"] * 24)}}},
                                           float[3] almost_one = {{1, 1, 1.0001}},
                                           float neg_zero = {{-0.0}}> {{
        t = {expr}
        y = Relu(t)
    }}""")
    check(m, {"unused_initializers_removed": 4}, [expr[:3], "Relu"])


def test_neutral_arithmetic_from_graph_input_to_graph_output_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float[3] zero = {0, 0, 0}> {
        y = Add(x, zero)
    }""")
    unchanged(m)


def test_neutral_arithmetic_with_dynamic_dims():
    # [N,3] + [1,3] is [N,3] whatever N is; [N,3] + [2,3] broadcasts when N is 1: stays.
    m = model("""
    g (float[N,3] x) => (float[N,3] y, float[2,3] z) <float[1,3] zero_row = {0, 0, 0},
                                                      float[2,3] zeros = {0, 0, 0, 0, 0, 0}> {
        a = Add(x, zero_row)
        y = Relu(a)
        b = Add(x, zeros)
        z = Relu(b)
    }""")
    check(m, {"noop_arithmetic_removed": 1}, ["Relu", "Add", "Relu"], feeds={"x": np.ones((2, 3), np.float32)})
    check(m, {"noop_arithmetic_removed": 1}, ["Relu", "Add", "Relu"], feeds={"x": np.ones((1, 3), np.float32)})


def test_neutral_arithmetic_in_loop_body():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <int64 n = {3}, bool go = {1}> {
        y = Loop(n, go, x) <body = b (int64 i, bool c_in, float[2,3] v) => (bool c_out, float[2,3] v_out)
                                <float[3] one = {1, 1, 1}> {
            c_out = Identity(c_in)
            a = Mul(v, one)
            r = Relu(a)
            v_out = Add(r, x)
        }>
    }""")
    out = check(m, {"noop_arithmetic_removed": 1}, ["Loop"])
    assert body_ops(out, "body") == ["Identity", "Relu", "Add"]


@pytest.mark.parametrize("expr,count", [
    ("Dropout(x)", "dropout_removed"),
    ("Cast<to = 1>(x)", "noop_cast_removed"),
    ("Reshape(x, shape)", "noop_reshape_removed"),
    ("Transpose<perm = [0, 1]>(x)", "noop_transpose_removed"),
    ("Slice(x, starts, ends)", "noop_slice_removed"),
    ("Pad(x, pads)", "noop_pad_removed"),
    ("Expand(x, shape)", "noop_expand_removed"),
    ("Concat<axis = 0>(x)", "noop_concat_removed"),
    ("Mul(x, ones)", "noop_arithmetic_removed"),
])
def test_noops_removed_inside_if_branch(expr, count):
    # The body reads x and the initializers from the outer scope; each body keeps its output name.
    m = model(f"""
    g (float[2,3] x, bool c) => (float[2,3] y) <int64[2] shape = {{2, 3}}, int64[2] starts = {{0, -3}},
                                               int64[2] ends = {{{INT64_MAX}, 3}}, int64[4] pads = {{0, 0, 0, 0}},
                                               float[3] ones = {{1, 1, 1}}> {{
        y = If(c) <then_branch = t () => (float[2,3] z1) {{ a = {expr}
                                                            z1 = Relu(a) }},
                   else_branch = e () => (float[2,3] z2) {{ b = {expr}
                                                            z2 = Neg(b) }}>
    }}""")
    unused = sum(not re.search(rf"\b{name}\b", expr) for name in ("shape", "starts", "ends", "pads", "ones"))
    out = check(m, {"unused_initializers_removed": unused, count: 2}, ["If"])
    assert body_ops(out, "then_branch") == ["Relu"] and body_ops(out, "else_branch") == ["Neg"]
    assert list(body(out, "then_branch").node[0].input) == ["x"]
    assert [o.name for o in body(out, "else_branch").output] == ["z2"]
    assert_same_outputs(m, out, {"x": random_feeds(m)["x"], "c": np.array(False)})


# ----------------------------------------------------------------------------------- Constant nodes


def test_constant_nodes_to_initializers():
    m = model("""
    g (float[2,3] x) => (float[6] y) {
        w = Constant<value = float[3] {1, 2, 3}>()
        f = Constant<value_float = 2.5>()
        s = Constant<value_ints = [6]>()
        a = Add(x, w)
        b = Mul(a, f)
        y = Reshape(b, s)
    }""")
    out = check(m, {"constant_nodes_to_initializers": 3}, ["Add", "Mul", "Reshape"])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert sorted(inits) == ["f", "s", "w"]
    np.testing.assert_array_equal(inits["w"], np.array([1, 2, 3], np.float32))
    assert inits["f"].dtype == np.float32 and inits["f"].shape == () and inits["f"] == 2.5
    assert inits["s"].dtype == np.int64 and list(inits["s"]) == [6]


def test_constant_node_as_graph_output_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y, float[3] w) {
        w = Constant<value = float[3] {1, 2, 3}>()
        y = Add(x, w)
    }""")
    unchanged(m)


def test_string_constant_node_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y, string[1] s) {
        c = Constant<value = string[1] {"a"}>()
        s = Identity(c)
        y = Relu(x)
    }""")
    # The Constant node stays (string tensors are left alone); it takes over the Identity's output.
    out = check(m, {"identity_removed": 1}, ["Constant", "Relu"])
    assert list(out.graph.node[0].output) == ["s"]


def test_constant_node_in_if_branch():
    m = model("""
    g (float[2,3] x, bool c) => (float[2,3] y) {
        y = If(c) <then_branch = t () => (float[2,3] z1) { w = Constant<value = float[3] {1, 2, 3}>()
                                                           z1 = Add(x, w) },
                   else_branch = e () => (float[2,3] z2) { z2 = Neg(x) }>
    }""")
    out = check(m, {"constant_nodes_to_initializers": 1}, ["If"])
    assert body_ops(out, "then_branch") == ["Add"]
    assert [t.name for t in body(out, "then_branch").initializer] == ["w"]
    assert_same_outputs(m, out, {"x": random_feeds(m)["x"], "c": np.array(False)})


# ----------------------------------------------------------------------------------- duplicate initializers


def test_duplicate_initializers_merged():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float[3] a = {1, 2, 3}, float[3] b = {1, 2, 3}, float[3] c = {1, 2, 3}> {
        p = Add(x, a)
        q = Mul(p, b)
        y = Sub(q, c)
    }""")
    out = check(m, {"duplicate_initializers_merged": 2}, ["Add", "Mul", "Sub"])
    assert init_names(out) == ["a"]
    assert [n.input[1] for n in out.graph.node] == ["a", "a", "a"]


def test_duplicate_constant_nodes_merged():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float[3] a = {1, 2, 3}> {
        b = Constant<value = float[3] {1, 2, 3}>()
        p = Add(x, a)
        y = Mul(p, b)
    }""")
    out = check(m, {"constant_nodes_to_initializers": 1, "duplicate_initializers_merged": 1}, ["Add", "Mul"])
    assert init_names(out) == ["a"]


@pytest.mark.parametrize("a,b", [
    ("float[3] a = {1, 2, 3}", "float[3] b = {1, 2, 4}"),  # values
    ("float[3] a = {1, 2, 3}", "float[1,3] b = {1, 2, 3}"),  # shape
    ("float[3] a = {0, 0, 0}", "float[3] b = {0, 0, -0.0}"),  # bytes (-0.0 is not 0.0)
])
def test_different_initializers_not_merged(a, b):
    m = model(f"""
    g (float[2,3] x) => (float[2,3] y) <{a}, {b}> {{
        p = Mul(x, a)
        y = Add(p, b)
    }}""")
    unchanged(m)


def test_initializers_with_the_same_nan_merged():
    w = np.array([1, np.nan, 3], np.float32)
    m = from_text(HEADER + """
    g (float[2,3] x) => (float[2,3] y) {
        p = Add(x, a)
        y = Mul(p, b)
    }""", check=False)
    m.graph.initializer.extend([onnx.numpy_helper.from_array(w, "a"), onnx.numpy_helper.from_array(w.copy(), "b")])
    onnx.checker.check_model(m, full_check=True)
    out = check(m, {"duplicate_initializers_merged": 1}, ["Add", "Mul"])
    assert init_names(out) == ["a"]


def test_big_initializers_differing_in_one_zero_sign_not_merged():
    # x / +0 and x / -0 are infinities of opposite signs: equal values, different bytes.
    size = 8192
    a = onnx.numpy_helper.from_array(np.zeros(size, np.float32), "a")
    b = onnx.numpy_helper.from_array(np.where(np.arange(size) == 4097, np.float32(-0.0), np.float32(0)), "b")
    m = from_text(HEADER + f"""
    g (float[{size}] x) => (float[{size}] y) {{
        p = Div(x, a)
        q = Div(x, b)
        y = Sub(p, q)
    }}""", check=False)
    m.graph.initializer.extend([a, b])
    onnx.checker.check_model(m, full_check=True)
    out = unchanged(m, feeds={"x": np.ones(size, np.float32)})
    assert init_names(out) == ["a", "b"]


def test_initializers_of_different_dtype_not_merged():
    m = model("""
    g (float[2,3] x, double[2,3] d) => (float[2,3] y, double[2,3] z) <float[3] a = {1, 2, 3}, double[3] b = {1, 2, 3}> {
        y = Add(x, a)
        z = Add(d, b)
    }""")
    out = unchanged(m)
    assert init_names(out) == ["a", "b"]


def test_initializer_that_is_a_graph_input_not_merged():
    m = model("""
    g (float[2,3] x, float[3] a) => (float[2,3] y) <float[3] a = {1, 2, 3}, float[3] b = {1, 2, 3}> {
        p = Add(x, a)
        y = Mul(p, b)
    }""")
    out = unchanged(m)
    assert init_names(out) == ["a", "b"]


def test_duplicate_initializers_in_if_branch_merged():
    m = model("""
    g (float[2,3] x, bool c) => (float[2,3] y) {
        y = If(c) <then_branch = t () => (float[2,3] z1) <float[3] a = {1, 2, 3}, float[3] b = {1, 2, 3}> {
                                                           p = Add(x, a)
                                                           z1 = Mul(p, b) },
                   else_branch = e () => (float[2,3] z2) { z2 = Neg(x) }>
    }""")
    out = check(m, {"duplicate_initializers_merged": 1}, ["If"])
    then = body(out, "then_branch")
    assert [n.input[1] for n in then.node] == ["a", "a"]
    assert [t.name for t in then.initializer] == ["a"]


# ----------------------------------------------------------------------------------- CSE


def test_cse_merges_identical_nodes():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        a = Relu(x)
        b = Relu(x)
        y = Add(a, b)
    }""")
    out = check(m, {"cse_merged": 1}, ["Relu", "Add"])
    assert list(out.graph.node[1].input) == ["a", "a"]


def test_cse_merges_matmuls_and_cascades():
    m = model("""
    g (float[2,3] x) => (float[2,4] y) <float[3,4] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> {
        a = MatMul(x, w)
        b = MatMul(x, w)
        c = Tanh(a)
        d = Tanh(b)
        y = Sub(c, d)
    }""")
    out = check(m, {"cse_merged": 2}, ["MatMul", "Tanh", "Sub"])
    assert list(out.graph.node[2].input) == ["c", "c"]


def test_cse_in_if_branch_and_across_scopes():
    # Duplicates inside a body merge; a main-graph duplicate read by a body is replaced there too.
    m = model("""
    g (float[2,3] x, bool c) => (float[2,3] y) {
        a = Exp(x)
        b = Exp(x)
        y = If(c) <then_branch = t () => (float[2,3] z1) { p = Sigmoid(a)
                                                           q = Sigmoid(a)
                                                           z1 = Add(p, q) },
                   else_branch = e () => (float[2,3] z2) { z2 = Neg(b) }>
    }""")
    out = check(m, {"cse_merged": 2}, ["Exp", "If"])
    assert body_ops(out, "then_branch") == ["Sigmoid", "Add"]
    assert list(body(out, "else_branch").node[0].input) == ["a"]
    assert_same_outputs(m, out, {"x": random_feeds(m)["x"], "c": np.array(False)})


@pytest.mark.parametrize("first,second,shape", [
    ("LeakyRelu<alpha = 0.1>", "LeakyRelu<alpha = 0.2>", "2,3"),
    ("Softmax<axis = 0>", "Softmax<axis = 1>", "2,3"),
    ("Relu", "Sigmoid", "2,3"),
])
def test_cse_different_attributes_or_ops_not_merged(first, second, shape):
    m = model(f"""
    g (float[2,3] x) => (float[{shape}] y) {{
        a = {first}(x)
        b = {second}(x)
        y = Add(a, b)
    }}""")
    unchanged(m)


def test_cse_different_inputs_not_merged():
    m = model("""
    g (float[2,3] x, float[2,3] z) => (float[2,3] y) {
        a = Relu(x)
        b = Relu(z)
        y = Add(a, b)
    }""")
    unchanged(m)


@pytest.mark.parametrize("op", [
    "RandomNormalLike<mean = 1.0, scale = 1e-30>(x)",
    "RandomNormal<shape = [2, 3], mean = 1.0, scale = 1e-30>()",
])
def test_cse_random_ops_not_merged(op):
    # A negligible spread keeps the outputs deterministic for the numeric check.
    m = model(f"""
    g (float[2,3] x) => (float[2,3] y) {{
        a = {op}
        b = {op}
        y = Add(a, b)
    }}""")
    unchanged(m)


@pytest.mark.parametrize("mode", ["train", "t"])
def test_cse_training_dropouts_not_merged(mode):
    # Training-mode Dropout draws a random mask (ratio 0 keeps the numeric check deterministic);
    # so may one whose mode is only known at run time.
    m = model(f"""
    g (float[2,3] x, bool t) => (float[2,3] y) <float r = {{0.0}}{", bool train = {1}" if mode == "train" else ""}> {{
        a = Dropout(x, r, {mode})
        b = Dropout(x, r, {mode})
        y = Add(a, b)
    }}""")
    unchanged(m, feeds={"x": np.ones((2, 3), np.float32), "t": np.array(True)})


def test_cse_merges_inference_dropouts_when_kept():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float r = {0.5}, bool t = {0}> {
        a = Dropout(x, r, t)
        b = Dropout(x, r, t)
        y = Add(a, b)
    }""")
    check(m, {"cse_merged": 1}, ["Dropout", "Add"], options=["cleanup.noops=false"])


LOCAL_FUNCTIONS = """
    <domain: "local", opset_import: ["" : 17]>
    Noise (v) => (w) {
        n = RandomNormalLike<mean = 0.0, scale = 1e-30>(v)
        w = Add(v, n)
    }
    <domain: "local", opset_import: ["" : 17, "local" : 1]>
    Outer (v) => (w) {
        w = local.Noise(v)
    }
    <domain: "local", opset_import: ["" : 17]>
    Square (v) => (w) {
        w = Mul(v, v)
    }"""


@pytest.mark.parametrize("fn", ["Noise", "Outer"])
def test_cse_calls_of_random_local_functions_not_merged(fn):
    m = from_text(f"""<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2,3] x) => (float[2,3] y) {{
        a = local.{fn}(x)
        b = local.{fn}(x)
        y = Add(a, b)
    }}""" + LOCAL_FUNCTIONS)
    unchanged(m)


def test_cse_merges_calls_of_deterministic_local_functions():
    m = from_text("""<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2,3] x) => (float[2,3] y) {
        a = local.Square(x)
        b = local.Square(x)
        y = Add(a, b)
    }""" + LOCAL_FUNCTIONS)
    out = check(m, {"cse_merged": 1}, ["Square", "Add"])
    assert sorted(f.name for f in out.functions) == ["Noise", "Outer", "Square"]


def test_cse_graph_outputs_not_merged():
    m = model("""
    g (float[2,3] x) => (float[2,3] y1, float[2,3] y2) {
        y1 = Relu(x)
        y2 = Relu(x)
    }""")
    unchanged(m)


# ----------------------------------------------------------------------------------- options


EVERYTHING = """
    g (float[2,3] x) => (float[2,3] y) <float[3] a = {1, 2, 3}, float[3] b = {1, 2, 3}> {
        i = Identity(x)
        p = Add(i, a)
        q = Add(i, a)
        r = Mul(p, b)
        y = Sub(r, q)
    }"""


@pytest.mark.parametrize("options,counts,sequence", [
    ([], {"identity_removed": 1, "duplicate_initializers_merged": 1, "cse_merged": 1}, ["Add", "Mul", "Sub"]),
    (["cleanup.cse=false"], {"identity_removed": 1, "duplicate_initializers_merged": 1}, ["Add", "Add", "Mul", "Sub"]),
    (["cleanup.noops=false"], {"duplicate_initializers_merged": 1, "cse_merged": 1}, ["Identity", "Add", "Mul", "Sub"]),
    (["cleanup.dedup=false"], {"identity_removed": 1, "cse_merged": 1}, ["Add", "Mul", "Sub"]),
    (["cleanup.noops=0", "cleanup.dedup=off", "cleanup.cse=no"], {}, ["Identity", "Add", "Add", "Mul", "Sub"]),
])
def test_options(options, counts, sequence):
    out = check(model(EVERYTHING), counts, sequence, options=options)
    assert len(out.graph.initializer) == (1 if "duplicate_initializers_merged" in counts else 2)


def test_options_as_dict():
    check(model(EVERYTHING), {"identity_removed": 1, "duplicate_initializers_merged": 1},
          ["Add", "Add", "Mul", "Sub"], options={"cleanup": {"cse": False}})


@pytest.mark.parametrize("item,message", [
    ("cleanup.nope=1", "has no option 'nope'"),
    ("cleanup.cse=maybe", "bad value 'maybe'"),
])
def test_bad_options(item, message):
    with pytest.raises(onnxopt.UsageError, match=message):
        onnxopt.optimize(model(EVERYTHING), passes=["cleanup"], verify="none", options=[item])


def test_a_noop_writing_a_graph_output_leaves_subgraph_readers_alone():
    """Found by the long fuzz run: a no-op Reshape writing a graph output renames its producer's
    output; the walk then revisited that tensor's readers, among them an Identity inside an If
    branch, judged it with the outer graph's outputs and removed it, leaving the branch output
    without a producer (an invalid model). A subgraph's nodes are judged in the subgraph's turn."""
    m = model("""
        g (float[1] x, bool c) => (float[1] r, float[1] y) <int64[1] k = {1}> {
            a = Relu(x)
            y = If(c) <then_branch = then_g () => (float[1] t) { t = Neg(a) },
                       else_branch = else_g () => (float[1] e) { e = Identity(a) }>
            r = Reshape(a, k)
        }""")
    feeds = {"x": np.array([-0.5], np.float32), "c": np.array(False)}
    out, result = optimize_checked(m, ["cleanup"], feeds=feeds)
    assert result.passes[0].counts == {"noop_reshape_removed": 1}
    assert ops(out) == ["Relu", "If"]
    else_branch = next(a.g for a in out.graph.node[1].attribute if a.name == "else_branch")
    assert [n.op_type for n in else_branch.node] == ["Identity"]
