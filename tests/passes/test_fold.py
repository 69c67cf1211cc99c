"""fold: constant folding, shape arithmetic, the size cap.

Each test builds a small graph from ONNX text, runs `fold` alone through onnxopt.optimize
(models.builders.optimize_checked: onnx.checker + equality with onnxruntime, its optimizations
off) and asserts the exact counts, the exact op sequence, unchanged graph output names, and that
a second run changes nothing. Negative cases assert the graph is left as it was.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from models.builders import from_text, optimize_checked, ops, random_feeds, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# The exporter's shape arithmetic: Reshape(x, Concat(Unsqueeze(Gather(Shape(src), i)), ...)).
SHAPE_CHAIN_INITS = "int64 i0 = {0}, int64 i1 = {1}, int64 i2 = {2}, int64[1] ax = {0}, int64[1] m1 = {-1}"


def model(text: str) -> onnx.ModelProto:
    return from_text(HEADER + text)


def fold(m: onnx.ModelProto, options=None, feeds=None, exact=True):
    """fold alone, checked; returns (optimized model, counts)."""
    out, result = optimize_checked(m, ["fold"], feeds=feeds, exact=exact, options=options)
    assert [r.name for r in result.passes] == ["fold"]
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    assert feed_names(out) == feed_names(m)
    return out, result.passes[0].counts


def feed_names(m: onnx.ModelProto) -> list[str]:
    """The graph inputs a caller may feed: all of them, but IR 3 lists every (fixed) initializer too."""
    fixed = {t.name for t in m.graph.initializer} if m.ir_version < 4 else set()
    return [i.name for i in m.graph.input if i.name not in fixed]


def check(m: onnx.ModelProto, counts: dict, sequence: list[str], options=None, feeds=None,
          exact=True) -> onnx.ModelProto:
    """Assert the exact counts and op sequence, then that a second run is a no-op."""
    out, got = fold(m, options, feeds, exact)
    assert got == counts
    assert ops(out) == sequence
    again, got = fold(out, options, feeds, exact)
    assert got == {}
    assert ops(again) == sequence
    return out


def unchanged(m: onnx.ModelProto, options=None, feeds=None) -> onnx.ModelProto:
    """A negative case: nothing counted, the op sequence as it was."""
    return check(m, {}, ops(m), options, feeds)


def inits(m: onnx.ModelProto | onnx.GraphProto) -> dict[str, np.ndarray]:
    g = m.graph if isinstance(m, onnx.ModelProto) else m
    return {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}


def body(m: onnx.ModelProto, attr: str, node: int = -1) -> onnx.GraphProto:
    (g,) = [a.g for a in m.graph.node[node].attribute if a.name == attr]
    return g


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    want, got = run(a, feeds), run(b, feeds)
    assert list(want) == list(got)
    for name in want:
        assert want[name].shape == got[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ----------------------------------------------------------------------------------- constants


def test_constant_chain_folded():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float[3] a = {1, 2, 3}, float[3] b = {4, 5, 6}, float[3] c = {2, 2, 2}> {
        s = Add(a, b)
        p = Mul(s, c)
        y = Add(x, p)
    }""")
    out = check(m, {"nodes_folded": 2}, ["Add"])
    got = inits(out)
    assert list(got) == ["p"] and list(out.graph.node[0].input) == ["x", "p"]
    np.testing.assert_array_equal(got["p"], np.array([10, 14, 18], np.float32))


def test_weight_transpose_folded():
    # Transpose is evaluated with numpy: no onnxruntime run.
    m = model("""
    g (float[2,3] x) => (float[2,2] y) <float[2,3] w = {1, 2, 3, 4, 5, 6}> {
        t = Transpose<perm = [1, 0]>(w)
        y = MatMul(x, t)
    }""")
    out = check(m, {"nodes_folded": 1}, ["MatMul"])
    np.testing.assert_array_equal(inits(out)["t"], np.array([[1, 4], [2, 5], [3, 6]], np.float32))


def test_integer_arithmetic_folded_with_numpy():
    # Integer Add/Sub/Mul are evaluated with numpy: no onnxruntime run.
    m = model("""
    g (int64[2,2] x) => (int64[2,2] y) <int64[2,2] a = {1, 2, 3, 4}, int64[2,2] b = {3, 2, 1, 0}> {
        s = Mul(a, b)
        t = Sub(s, a)
        u = Add(t, b)
        y = Add(x, u)
    }""")
    out = check(m, {"nodes_folded": 3}, ["Add"])
    assert inits(out)["u"].tolist() == [[5, 4], [1, -4]]


def test_shape_vector_arithmetic_folded():
    # Small integer vectors are shape arithmetic: the Reshape target becomes a constant.
    m = model("""
    g (float[12] x) => (float[3,4] y) <int64[2] a = {1, 2}, int64[2] b = {3, 2}> {
        s = Mul(a, b)
        t = Sub(s, a)
        u = Add(t, a)
        y = Reshape(x, u)
    }""")
    # (Mul is folded too, though its only consumer, Sub, was already replaced by a constant.)
    out = check(m, {"shape_values_folded": 1, "reshape_shapes_resolved": 1, "nodes_folded": 1}, ["Reshape"])
    assert list(inits(out).values())[0].tolist() == [3, 4]


def test_constant_nodes_to_initializers_and_folded():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) {
        a = Constant<value = float[3] {1, 2, 3}>()
        b = Constant<value_float = 2.0>()
        p = Mul(a, b)
        y = Add(x, p)
    }""")
    out = check(m, {"constant_nodes_to_initializers": 2, "nodes_folded": 1}, ["Add"])
    np.testing.assert_array_equal(inits(out)["p"], np.array([2, 4, 6], np.float32))


def test_constant_node_as_graph_output_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y, float[3] a) {
        a = Constant<value = float[3] {1, 2, 3}>()
        y = Add(x, a)
    }""")
    unchanged(m)


def test_graph_output_not_replaced_by_initializer():
    # The node computing a graph output stays, so the output keeps its producer and name.
    m = model("""
    g (float[2,3] x) => (float[2,3] y, float[3] z) <float[3] a = {1, 2, 3}> {
        y = Add(x, a)
        z = Neg(a)
    }""")
    unchanged(m)


def test_dead_constant_node_not_evaluated():
    # The pipeline removes dead nodes before the pass and reports them as the pass's; fold does
    # not evaluate it.
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <float[3] a = {1, 2, 3}> {
        d = Exp(a)
        y = Relu(x)
    }""")
    check(m, {"dead_nodes_removed": 1}, ["Relu"])


@pytest.mark.parametrize("op", [
    "RandomNormalLike<mean = 1.0, scale = 1e-30>(w)",
    "RandomNormal<shape = [2, 3], mean = 1.0, scale = 1e-30>()",
])
def test_random_ops_not_folded(op):
    # A negligible spread keeps the outputs deterministic for the numeric check.
    m = model(f"""
    g (float[2,3] x) => (float[2,3] y) <float[2,3] w = {{1, 2, 3, 4, 5, 6}}> {{
        n = {op}
        a = Add(n, w)
        y = Add(x, a)
    }}""")
    unchanged(m)


def test_overridable_initializer_not_folded():
    m = model("""
    g (float[2,3] x, float[3] w) => (float[2,3] y) <float[3] w = {1, 2, 3}> {
        n = Neg(w)
        y = Add(x, n)
    }""")
    out = unchanged(m)
    assert list(inits(out)) == ["w"]


def test_ir3_initializer_listed_as_input_is_folded():
    # Before IR 4 every initializer is listed among the inputs and is a constant.
    m = from_text("""<ir_version: 3, opset_import: ["" : 8]>
    g (float[2,3] x, float[3] w) => (float[2,3] y) <float[3] w = {1, 2, 3}> {
        n = Neg(w)
        y = Add(x, n)
    }""")
    out = check(m, {"nodes_folded": 1}, ["Add"])
    np.testing.assert_array_equal(inits(out)["n"], np.array([-1, -2, -3], np.float32))
    assert [i.name for i in out.graph.input] == ["x", "n"]


@pytest.mark.parametrize("op", ["Gather<axis = 0>(s, i)", "Add(i, i)"])
def test_scalar_result_of_numpy_fold(op):
    # numpy returns a scalar, not an array, for Gather with a scalar index and for arithmetic on
    # 0-d arrays; the folded constant must still be a (0-d) tensor.
    m = model(f"""
    g (float[2] x) => (float[2] y) <int64[3] s = {{4, 8, 2}}, int64 i = {{1}}> {{
        e = {op}
        f = Cast<to = 1>(e)
        y = Mul(x, f)
    }}""")
    out = check(m, {"nodes_folded": 2}, ["Mul"])
    assert inits(out)["f"].shape == ()


def test_float8_result_not_folded_as_its_bits():
    # onnxruntime returns float8 tensors as their uint8 bit patterns: folding the first Cast would
    # turn 1.0 into a uint8 constant 56 that the second Cast reads as 56.0.
    m = from_text("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[3] x) => (float[3] y) <float[3] c = {1, 2.5, -3}> {
        e = Cast<to = 17>(c)
        f = Cast<to = 1>(e)
        y = Add(x, f)
    }""")
    unchanged(m)


def test_float8_initializer_folded():
    # gs keeps the ONNX type number as the dtype of a float8 constant (numpy has no float8).
    m = from_text("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[3] x) => (float[3] y) <float8e4m3fn[3] c = {56, 66, 196}> {
        f = Cast<to = 1>(c)
        y = Add(x, f)
    }""")  # the bit patterns of 1, 2.5, -3
    out = check(m, {"nodes_folded": 1}, ["Add"])
    np.testing.assert_array_equal(inits(out)["f"], np.array([1, 2.5, -3], np.float32))


def test_matmul_with_bfloat16_weight_left_alone():
    # The MatMul + bias rule is for numpy float weights; a bfloat16 weight (an ONNX type number
    # for gs) is skipped, not a crash. onnxruntime has no bfloat16 MatMul: no numeric check.
    m = from_text("""<ir_version: 10, opset_import: ["" : 21]>
    g (bfloat16[2,3] x) => (bfloat16[2,2] y) <bfloat16[3,2] w = {1, 2, 3, 4, 5, 6}, bfloat16[2] b = {1, 2}> {
        p = MatMul(x, w)
        y = Add(p, b)
    }""")
    result = onnxopt.optimize(m, passes=["fold"], verify="none")
    assert result.passes[0].counts == {}
    assert ops(result.model) == ["MatMul", "Add"]
    onnx.checker.check_model(result.model, full_check=True)


# ----------------------------------------------------------------------------------- size cap


EXPAND_BIG = """
    g (float[64,64] x) => (float[64,64] y) <float[1] one = {1}, int64[2] s = {64, 64}> {
        e = Expand(one, s)
        y = Add(x, e)
    }"""
CONSTANT_OF_SHAPE_BIG = """
    g (float[64,64] x) => (float[64,64] y) <int64[2] s = {64, 64}> {
        e = ConstantOfShape<value = float[1] {2}>(s)
        y = Add(x, e)
    }"""


@pytest.mark.parametrize("text", [EXPAND_BIG, CONSTANT_OF_SHAPE_BIG], ids=["Expand", "ConstantOfShape"])
def test_big_generator_not_folded(text):
    m = model(text)
    out = unchanged(m)
    assert list(inits(out)) == list(inits(m))


@pytest.mark.parametrize("text", [EXPAND_BIG, CONSTANT_OF_SHAPE_BIG], ids=["Expand", "ConstantOfShape"])
def test_big_generator_folded_under_a_raised_size_limit(text):
    out = check(model(text), {"nodes_folded": 1}, ["Add"],
                options=["fold.size_limit=100000"])
    assert inits(out)["e"].shape == (64, 64)


def test_small_generator_folded():
    m = model("""
    g (float[4,4] x) => (float[4,4] y) <int64[2] s = {4, 4}> {
        e = ConstantOfShape<value = float[1] {2}>(s)
        y = Add(x, e)
    }""")
    out = check(m, {"nodes_folded": 1}, ["Add"])
    np.testing.assert_array_equal(inits(out)["e"], np.full((4, 4), 2, np.float32))


INT8_WEIGHT = ", ".join(str((i * 7) % 255 - 127) for i in range(64 * 64))
DEQUANTIZE = f"""
    g (float[8,64] x) => (float[8,64] y) <int8[64,64] w = {{{INT8_WEIGHT}}}, float sc = {{0.05}}, int8 zp = {{3}}> {{
        d = DequantizeLinear(w, sc, zp)
        y = MatMul(x, d)
    }}"""


def test_dequantize_of_int8_weight_not_folded():
    # The float weight would be 4x the int8 one (16 KiB, over the 4 KiB limit).
    m = model(DEQUANTIZE)
    out, counts = fold(m)
    assert "nodes_folded" not in counts
    assert ops(out) == ["DequantizeLinear", "MatMul"]
    assert set(inits(out)) == {"w", "sc", "zp"} and inits(out)["w"].dtype == np.int8


def test_refused_fold_reports_nothing():
    unchanged(model(DEQUANTIZE))


@pytest.mark.parametrize("limit,folded", [(16384, True), (16383, False)])
def test_size_limit_option(limit, folded):
    out, counts = fold(model(DEQUANTIZE), options=[f"fold.size_limit={limit}"])
    if folded:
        assert counts == {"nodes_folded": 1}
        assert ops(out) == ["MatMul"]
        assert inits(out)["d"].dtype == np.float32 and inits(out)["d"].shape == (64, 64)
    else:
        assert "nodes_folded" not in counts
        assert ops(out) == ["DequantizeLinear", "MatMul"]


# ----------------------------------------------------------------------------------- shapes


def test_shape_of_static_tensor_folded():
    m = model("""
    g (float[2,3] x, float[6] z) => (float[2,3] y) {
        s = Shape(x)
        r = Reshape(z, s)
        y = Add(x, r)
    }""")
    out = check(m, {"shape_values_folded": 1}, ["Reshape", "Add"])
    got = inits(out)["s"]
    assert got.dtype == np.int64 and list(got) == [2, 3]


def test_shape_slice_of_partly_dynamic_tensor_folded():
    # Shape(x, start=1) of [N,3,4] is the known [3,4]; Size(x) needs N and stays.
    m = model("""
    g (float[N,3,4] x) => (float[N,3,4] y, int64 n) <int64[1] m1 = {-1}> {
        s = Shape<start = 1>(x)
        t = Concat<axis = 0>(m1, s)
        y = Reshape(x, t)
        n = Size(x)
    }""")
    out = check(m, {"shape_values_folded": 1, "reshape_shapes_resolved": 1}, ["Reshape", "Size"],
                feeds={"x": np.ones((2, 3, 4), np.float32)})
    assert [v.tolist() for v in inits(out).values()] == [[-1, 3, 4]]


def test_exporter_reshape_pattern_resolved():
    # Reshape(x, [dim0(x), -1]) with a dynamic batch: the target becomes [0, -1] and the Shape chain goes.
    m = model(f"""
    g (float[N,3,4] x) => (float[N,12] y) <{SHAPE_CHAIN_INITS}> {{
        s = Shape(x)
        d = Gather(s, i0)
        u = Unsqueeze(d, ax)
        t = Concat<axis = 0>(u, m1)
        r = Reshape(x, t)
        y = Relu(r)
    }}""")
    feeds1 = {"x": np.random.default_rng(0).standard_normal((1, 3, 4)).astype(np.float32)}
    out = check(m, {"reshape_shapes_resolved": 1}, ["Reshape", "Relu"], feeds=feeds1)
    assert list(inits(out).values())[0].tolist() == [0, -1]
    assert_same_outputs(m, out, {"x": np.random.default_rng(1).standard_normal((3, 3, 4)).astype(np.float32)})


def test_shape_values_tracked_through_a_reshape_with_a_constant_target():
    """Shape(x) reshaped to [-1] (torch's legacy exporter does this) still carries x's dims."""
    m = model(f"""
    g (float[N,3,4] x) => (float[N,12] y) <{SHAPE_CHAIN_INITS}> {{
        s = Shape(x)
        f = Reshape(s, m1)
        d = Gather(f, i0)
        u = Unsqueeze(d, ax)
        t = Concat<axis = 0>(u, m1)
        r = Reshape(x, t)
        y = Relu(r)
    }}""")
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    check(m, {"reshape_shapes_resolved": 1}, ["Reshape", "Relu"], feeds=feeds)


def test_exporter_reshape_pattern_with_two_dynamic_dims():
    # [N,S,8] -> [N,S,2,4] through a MatMul, whose output dims follow from its inputs'.
    m = model(f"""
    g (float[N,S,6] x) => (float[N,S,2,4] y) <{SHAPE_CHAIN_INITS}, float[6,8] w = {{{", ".join(["0.5"] * 48)}}},
                                               int64[2] heads = {{2, 4}}> {{
        h = MatMul(x, w)
        s = Shape(h)
        d0 = Gather(s, i0)
        d1 = Gather(s, i1)
        u0 = Unsqueeze(d0, ax)
        u1 = Unsqueeze(d1, ax)
        t = Concat<axis = 0>(u0, u1, heads)
        y = Reshape(h, t)
    }}""")
    rng = np.random.default_rng(0)
    out = check(m, {"reshape_shapes_resolved": 1}, ["MatMul", "Reshape"], exact=False,
                feeds={"x": rng.standard_normal((1, 5, 6)).astype(np.float32)})
    assert [v.tolist() for k, v in inits(out).items() if k != "w"] == [[0, 0, 2, 4]]
    assert_same_outputs(m, out, {"x": rng.standard_normal((3, 2, 6)).astype(np.float32)})


@pytest.mark.parametrize("allowzero, resolved", [(0, True), (1, False)])
def test_paddle_reshape_pattern_with_a_literal_zero(allowzero, resolved):
    """paddle2onnx: Reshape(h, Concat([0], Cast(Slice(Cast(Shape(h), int32), 1, 2), int64), [2, 4])): the
    literal 0 copies the batch dimension in the computed target as in a constant one (allowzero=0)."""
    m = model(f"""
    g (float[N,S,8] h) => (float[N,S,2,4] y) <{SHAPE_CHAIN_INITS}, int64[1] zero = {{0}}, int64[2] heads = {{2, 4}},
                                               int64[1] one = {{1}}, int64[1] two = {{2}}> {{
        s = Shape(h)
        s32 = Cast<to = 6>(s)
        d = Slice(s32, one, two, i0v)
        d64 = Cast<to = 7>(d)
        t = Concat<axis = 0>(zero, d64, heads)
        y = Reshape<allowzero = {allowzero}>(h, t)
    }}""".replace("i0v", "zero"))
    rng = np.random.default_rng(0)
    feeds = {"h": rng.standard_normal((3, 5, 8)).astype(np.float32)}
    if not resolved:  # with allowzero=1 the literal 0 is a zero-size dimension (this model cannot run)
        result = onnxopt.optimize(m, passes=["fold"], verify="none")
        assert "reshape_shapes_resolved" not in result.passes[0].counts and "Concat" in ops(result.model)
        return
    out = check(m, {"reshape_shapes_resolved": 1}, ["Reshape"], feeds=feeds)
    assert [v.tolist() for k, v in inits(out).items()] == [[0, 0, 2, 4]]


def test_reshape_target_from_another_tensor_not_resolved():
    # z's first dim M is not provably x's N: the chain must stay.
    m = model(f"""
    g (float[N,3,4] x, float[M,2] z) => (float[?,?] y) <{SHAPE_CHAIN_INITS}> {{
        s = Shape(z)
        d = Gather(s, i0)
        u = Unsqueeze(d, ax)
        t = Concat<axis = 0>(u, m1)
        r = Reshape(x, t)
        y = Relu(r)
    }}""")
    unchanged(m, feeds={"x": np.ones((2, 3, 4), np.float32), "z": np.ones((2, 2), np.float32)})


def test_reshape_target_from_another_axis_not_resolved():
    # [x.dim1, -1] with x [N,M,4]: M is not the dimension at position 0.
    m = model(f"""
    g (float[N,M,4] x) => (float[?,?] y) <{SHAPE_CHAIN_INITS}> {{
        s = Shape(x)
        d = Gather(s, i1)
        u = Unsqueeze(d, ax)
        t = Concat<axis = 0>(u, m1)
        r = Reshape(x, t)
        y = Relu(r)
    }}""")
    unchanged(m, feeds={"x": np.ones((2, 3, 4), np.float32)})


def test_reshape_target_with_same_named_dim_of_another_input_resolved():
    # The same symbolic name on two inputs is the same dimension.
    m = model(f"""
    g (float[N,3,4] x, float[N,2] z) => (float[N,12] y) <{SHAPE_CHAIN_INITS}> {{
        s = Shape(z)
        d = Gather(s, i0)
        u = Unsqueeze(d, ax)
        t = Concat<axis = 0>(u, m1)
        r = Reshape(x, t)
        y = Relu(r)
    }}""")
    out = check(m, {"reshape_shapes_resolved": 1}, ["Reshape", "Relu"],
                feeds={"x": np.ones((2, 3, 4), np.float32), "z": np.ones((2, 2), np.float32)})
    assert [v.tolist() for v in inits(out).values()] == [[0, -1]]


def test_expand_to_own_shape_removed():
    m = model("""
    g (float[N,3] x) => (float[N,3] y) {
        s = Shape(x)
        e = Expand(x, s)
        y = Relu(e)
    }""")
    check(m, {"noop_expand_removed": 1}, ["Relu"], feeds={"x": np.ones((3, 3), np.float32)})


@pytest.mark.parametrize("text", [
    """g (float[N,3,4] x) => (float[N,12] y) <int64 i0 = {0}, int64[1] ax = {0}, int64[1] m1 = {-1}> {
        s = Shape(x)
        d = Gather(s, i0)
        u = Unsqueeze(d, ax)
        t = Concat<axis = 0>(u, m1)
        y = Reshape(x, t)
    }""",
    """g (float[2,3] x, float[6] z) => (float[2,3] y) {
        s = Shape(x)
        r = Reshape(z, s)
        y = Add(x, r)
    }""",
], ids=["dynamic", "static"])
def test_shapes_option_off_leaves_shape_arithmetic(text):
    m = model(text)
    unchanged(m, options=["fold.shapes=false"], feeds=random_feeds(m, shapes={"x": [3, 3, 4]} if "N" in text else None))


def test_shape_of_graph_output_stays():
    m = model("""
    g (float[2,3] x) => (float[2,3] y, int64[2] s) {
        s = Shape(x)
        y = Relu(x)
    }""")
    unchanged(m)


# ----------------------------------------------------------------------------------- subgraphs


def test_folding_inside_if_branches():
    m = model(f"""
    g (float[N,3,4] x, bool c) => (float[N,12] y) <float[12] a = {{{", ".join(str(i) for i in range(12))}}},
                                                   {SHAPE_CHAIN_INITS}> {{
        y = If(c) <then_branch = t () => (float[N,12] z1) <float[12] b = {{{", ".join(["2"] * 12)}}}> {{
                        p = Mul(a, b)
                        s = Shape(x)
                        d = Gather(s, i0)
                        u = Unsqueeze(d, ax)
                        t = Concat<axis = 0>(u, m1)
                        r = Reshape(x, t)
                        z1 = Add(r, p) }},
                   else_branch = e () => (float[N,12] z2) {{
                        q = Neg(a)
                        f = Flatten(x)
                        z2 = Add(f, q) }}>
    }}""")
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, 4)).astype(np.float32)
    out = check(m, {"nodes_folded": 2, "reshape_shapes_resolved": 1}, ["If"],
                feeds={"x": x1, "c": np.array(True)})
    then, other = body(out, "then_branch"), body(out, "else_branch")
    assert [n.op_type for n in then.node] == ["Reshape", "Add"]
    assert [n.op_type for n in other.node] == ["Flatten", "Add"]
    np.testing.assert_array_equal(inits(then)["p"], np.arange(12, dtype=np.float32) * 2)
    x3 = rng.standard_normal((3, 3, 4)).astype(np.float32)
    for c in (True, False):
        assert_same_outputs(m, out, {"x": x3, "c": np.array(c)})


def test_folding_inside_loop_body():
    m = model("""
    g (float[2,3] x) => (float[2,3] y) <int64 n = {3}, bool go = {1}, float[3] a = {1, 2, 3}> {
        y = Loop(n, go, x) <body = b (int64 i, bool c_in, float[2,3] v) => (bool c_out, float[2,3] v_out) {
            c_out = Identity(c_in)
            k = Neg(a)
            v_out = Add(v, k)
        }>
    }""")
    out = check(m, {"nodes_folded": 1}, ["Loop"])
    loop = body(out, "body")
    assert [n.op_type for n in loop.node] == ["Identity", "Add"]
    np.testing.assert_array_equal(inits(loop)["k"], np.array([-1, -2, -3], np.float32))


@pytest.mark.parametrize("op, opset, axes, keepdims, expected", [
    ("ReduceMean", 17, [-1], 1, ["N", "S", 1]),
    ("ReduceMean", 17, [1], 0, ["N", 8]),
    ("ReduceMean", 18, [0, 2], 1, [1, "S", 1]),
    ("ReduceSum", 13, [], 1, [1, 1, 1]),  # no axes: all of them
    ("ReduceMax", 18, None, 0, []),
])
def test_reduction_dims_are_inferred(op, opset, axes, keepdims, expected):
    """fold tracks dims through reductions (PP-OCR's LayerNorms sit behind computed Reshapes)."""
    import onnx_graphsurgeon as gs

    from onnxopt.passes.fold import _Sym, _reduce_dims
    x = gs.Variable("x", np.float32, ["N", "S", 8])
    inputs = [x]
    attrs = {"keepdims": keepdims}
    from_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    if from_input and axes is not None:
        inputs.append(gs.Constant("axes", np.array(axes, np.int64)))
    elif axes is not None:
        attrs["axes"] = axes
    node = gs.Node(op, inputs=inputs, outputs=[gs.Variable("y")], attrs=attrs)
    dims = [_Sym(("param", "N")), _Sym(("param", "S")), 8]

    def value(t):
        return ([int(v) for v in t.values.reshape(-1)], False) if isinstance(t, gs.Constant) else None

    got = _reduce_dims(node, dims, value, opset)
    assert [d.key[1] if isinstance(d, _Sym) else d for d in got] == expected


def shuffle_units(count: int) -> onnx.ModelProto:
    """torchvision's ShuffleNetV2 units as the legacy exporter writes them, with a dynamic batch:
    x.chunk(2, dim=1) as Slices at Div(Shape(x)[1], 2), a Conv + Relu branch, Concat, then the
    channel shuffle: Reshape to [n, 2, c / 2, h, w] and back to [n, c, h, w], all from Shape."""
    rng = np.random.default_rng(0)
    lines, inits_ = [], ["int64 zero = {0}", "int64 one = {1}", "int64 two = {2}", "int64 three = {3}",
                         "int64[1] ax = {0}", "int64[1] on1 = {1}", "int64[1] g2 = {2}"]
    t = "x"
    for u in range(count):
        w = ", ".join(f"{v:.3f}" for v in rng.standard_normal(16))
        inits_.append(f"float[4,4,1,1] w{u} = {{{w}}}")
        lines += [f"s{u} = Shape({t})", f"c{u} = Gather(s{u}, one)", f"h{u} = Div(c{u}, two)",
                  f"hu{u} = Unsqueeze(h{u}, ax)", f"cu{u} = Unsqueeze(c{u}, ax)",
                  f"a{u} = Slice({t}, ax, hu{u}, on1)", f"b{u} = Slice({t}, hu{u}, cu{u}, on1)",
                  f"k{u} = Conv(b{u}, w{u})", f"r{u} = Relu(k{u})", f"cat{u} = Concat<axis = 1>(a{u}, r{u})",
                  f"z{u} = Shape(cat{u})"]
        for j, i in enumerate(("zero", "one", "two", "three")):
            lines += [f"d{u}_{j} = Gather(z{u}, {i})", f"e{u}_{j} = Unsqueeze(d{u}_{j}, ax)"]
        lines += [f"q{u} = Div(d{u}_1, two)", f"qu{u} = Unsqueeze(q{u}, ax)",
                  f"t5_{u} = Concat<axis = 0>(e{u}_0, g2, qu{u}, e{u}_2, e{u}_3)",
                  f"v{u} = Reshape(cat{u}, t5_{u})", f"p{u} = Transpose<perm = [0, 2, 1, 3, 4]>(v{u})",
                  f"t4_{u} = Concat<axis = 0>(e{u}_0, e{u}_1, e{u}_2, e{u}_3)", f"o{u} = Reshape(p{u}, t4_{u})"]
        t = f"o{u}"
    lines.append(f"y = Relu({t})")
    body = "\n        ".join(lines)
    return model(f"""
    g (float[N,8,5,5] x) => (float[N,8,5,5] y) <{", ".join(inits_)}> {{
        {body}
    }}""")


def test_channel_shuffle_chain_resolved_in_one_run():
    """Each unit's shape arithmetic needs the dims of the unit before it: carried through Conv
    (batch, the weight's channels, the window's spatial sizes), Concat and an integer Div of
    shape values, in one walk, so every Reshape target is constant and every Slice bound too."""
    m = shuffle_units(2)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8, 5, 5)).astype(np.float32)}
    out, got = fold(m, feeds=feeds)
    assert got["reshape_shapes_resolved"] == 4
    assert {"Shape", "Gather", "Div", "Unsqueeze"}.isdisjoint(ops(out))
    assert ops(out).count("Reshape") == 4 and ops(out).count("Slice") == 4
    assert_same_outputs(m, out, {"x": np.random.default_rng(2).standard_normal((3, 8, 5, 5)).astype(np.float32)})
    again, got = fold(out, feeds=feeds)
    assert got == {}



def test_integer_division_of_shape_values_truncates_toward_zero():
    """ONNX's integer Div, as onnxruntime computes it: -7 / 2 is -3, not numpy's floor, -4."""
    from onnxopt.passes.fold import _ENTRYWISE

    div = _ENTRYWISE["Div"]
    assert [div(7, 2), div(-7, 2), div(7, -2), div(-7, -2), div(6, 3)] == [3, -3, -3, 3, 2]
    assert div(5, 0) is None
