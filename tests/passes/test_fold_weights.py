"""fold: Conv + BatchNormalization / per-channel Mul / Add folded into the Conv's weights (after it or before it), and
MatMul + bias Add into Gemm. Positive cases with exact counts and numerics, negatives, idempotence."""

import numpy as np
import onnx
import pytest

import onnxopt
from models.builders import from_text, ops, optimize_checked

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def conv_then(tail: str, extra_inits: str = "", out_shape: str = "float[1,4,5,5] y", bias: bool = True) -> onnx.ModelProto:
    """x -> Conv(W[4,3,3,3], b) -> c -> <tail> -> y"""
    rng = np.random.default_rng(0)
    w = ", ".join(f"{v:.4f}" for v in rng.standard_normal(4 * 3 * 3 * 3))
    b = ", ".join(f"{v:.4f}" for v in rng.standard_normal(4))
    conv = "c = Conv <pads = [1, 1, 1, 1]> (x, W, B)" if bias else "c = Conv <pads = [1, 1, 1, 1]> (x, W)"
    return from_text(f"""
        {HEADER}
        g (float[1,3,5,5] x) => ({out_shape})
        <float[4,3,3,3] W = {{{w}}}, float[4] B = {{{b}}}{extra_inits}> {{
            {conv}
            {tail}
        }}""")


BN = ", float[4] s = {1.5, 0.5, 2.0, 1.0}, float[4] t = {0.1, -0.2, 0.3, 0.0}, " \
     "float[4] m = {0.2, 0.1, -0.3, 0.5}, float[4] v = {1.0, 2.0, 0.5, 4.0}"


def test_conv_bn_folds_into_weights():
    model = conv_then("y = BatchNormalization <epsilon = 0.001> (c, s, t, m, v)", BN)
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Conv"]
    assert result.passes[0].counts == {"conv_bn_folded": 1}
    assert [o.name for o in out.graph.output] == ["y"]


def test_conv_without_bias_gets_one():
    model = conv_then("y = BatchNormalization (c, s, t, m, v)", BN, bias=False)
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Conv"] and len(out.graph.node[0].input) == 3
    assert result.passes[0].counts == {"conv_bn_folded": 1}


def test_conv_mul_then_add_per_channel_chain():
    model = conv_then("d = Mul (c, k)\n e = Add (d, a)\n y = Sub (e, a2)",
                      ", float[4,1,1] k = {2.0, -1.0, 0.5, 3.0}, float[1,4,1,1] a = {1.0, 2.0, 3.0, 4.0},"
                      " float[4,1,1] a2 = {0.5, 0.5, 0.5, 0.5}")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Conv"]
    assert result.passes[0].counts == {"conv_mul_folded": 1, "conv_add_folded": 2}


def test_scalar_mul_folds():
    model = conv_then("y = Mul (k, c)", ", float k = {0.25}")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Conv"] and result.passes[0].counts == {"conv_mul_folded": 1}


@pytest.mark.parametrize("tail, inits", [
    ("y = Mul (c, k)", ", float[5] k = {1.0, 2.0, 3.0, 4.0, 5.0}"),  # varies along width: not per channel
    ("y = Sub (k, c)", ", float[4,1,1] k = {1.0, 2.0, 3.0, 4.0}"),  # k - c is not a shift of c
    ("y = Add (c, c)", ""),  # not a constant
])
def test_not_folded(tail, inits):
    model = conv_then(tail, inits)
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ops(model)
    assert not any(k.startswith("conv_") for k in result.passes[0].counts)


def test_training_bn_with_extra_outputs_is_not_folded():
    model = conv_then("y, rm, rv = BatchNormalization <training_mode = 1> (c, s, t, m, v)", BN,
                      out_shape="float[1,4,5,5] y, float[4] rm, float[4] rv")
    result = onnxopt.optimize(model, passes=["fold"], verify="none")
    assert ops(result.model) == ["Conv", "BatchNormalization"]


def test_conv_output_used_twice_is_not_folded():
    model = conv_then("d = Mul (c, k)\n y = Add (d, c)", ", float[4,1,1] k = {2.0, 1.0, 0.5, 3.0}")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Conv", "Mul", "Add"]


def test_weight_that_is_a_graph_input_is_not_folded():
    model = from_text(f"""
        {HEADER}
        g (float[1,3,5,5] x, float[4,3,3,3] W) => (float[1,4,5,5] y) <float[4,1,1] k = {{1.0, 2.0, 3.0, 4.0}}> {{
            c = Conv <pads = [1, 1, 1, 1]> (x, W)
            y = Mul (c, k)
        }}""")
    result = onnxopt.optimize(model, passes=["fold"], verify="none")
    assert ops(result.model) == ["Conv", "Mul"]


def test_shared_weight_is_not_rescaled():
    model = from_text(f"""
        {HEADER}
        g (float[1,3,5,5] x) => (float[1,4,5,5] y, float[1,4,5,5] z)
        <float[4,3,1,1] W = {{{", ".join(["0.5"] * 12)}}}, float[4,1,1] k = {{1.0, 2.0, 3.0, 4.0}}> {{
            c = Conv (x, W)
            y = Mul (c, k)
            z = Conv (x, W)
        }}""")
    out, result = optimize_checked(model, ["fold"])
    assert sorted(ops(out)) == ["Conv", "Conv", "Mul"] and "conv_mul_folded" not in result.passes[0].counts


def test_idempotent():
    model = conv_then("y = BatchNormalization (c, s, t, m, v)", BN)
    once = onnxopt.optimize(model, passes=["fold"], verify="none").model
    twice = onnxopt.optimize(once, passes=["fold"], verify="none")
    assert twice.passes[0].counts == {} and ops(twice.model) == ops(once)


def test_matmul_bias_add_becomes_gemm():
    model = from_text(f"""
        {HEADER}
        g (float[3,4] x) => (float[3,2] y)
        <float[4,2] W = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}}, float[2] b = {{0.5, -0.5}}> {{
            h = MatMul (x, W)
            y = Add (b, h)
        }}""")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Gemm"] and result.passes[0].counts == {"matmul_add_to_gemm": 1}


@pytest.mark.parametrize("x_shape, b_shape", [("float[2,3,4] x", "float[2] b"), ("float[3,4] x", "float[3,2] b")])
def test_matmul_add_not_gemm(x_shape, b_shape):
    n = 2 if b_shape == "float[2] b" else 6
    y = "float[2,3,2] y" if "2,3,4" in x_shape else "float[3,2] y"
    model = from_text(f"""
        {HEADER}
        g ({x_shape}) => ({y})
        <float[4,2] W = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}}, {b_shape} = {{{", ".join(["0.5"] * n)}}}> {{
            h = MatMul (x, W)
            y = Add (h, b)
        }}""")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["MatMul", "Add"]


def test_conv_transpose_bn_folds_into_weights():
    rng = np.random.default_rng(0)
    w = ", ".join(f"{v:.4f}" for v in rng.standard_normal(3 * 4 * 2 * 2))
    model = from_text(f"""
        {HEADER}
        g (float[1,3,5,5] x) => (float[1,4,10,10] y) <float[3,4,2,2] W = {{{w}}}{BN}> {{
            c = ConvTranspose <strides = [2, 2]> (x, W)
            y = BatchNormalization (c, s, t, m, v)
        }}""")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["ConvTranspose"] and result.passes[0].counts == {"conv_bn_folded": 1}


def test_grouped_conv_transpose_is_not_folded():
    w = ", ".join(["0.5"] * (4 * 2 * 2 * 2))
    model = from_text(f"""
        {HEADER}
        g (float[1,4,5,5] x) => (float[1,4,10,10] y) <float[4,2,2,2] W = {{{w}}}{BN}> {{
            c = ConvTranspose <strides = [2, 2], group = 2> (x, W)
            y = BatchNormalization (c, s, t, m, v)
        }}""")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["ConvTranspose", "BatchNormalization"] and result.passes[0].counts == {}


# a Mul / Add by a constant before a Conv: folded into the Conv's input side -------------------

def then_conv(head: str, inits: str = "", pads: int = 0, group: int = 1, k: int = 1,
              inputs: str = "float[1,4,5,5] x", outputs: str = "float[1,4,5,5] y") -> onnx.ModelProto:
    """x -> <head> -> h -> Conv(W[4, 4/group, k, k], b, pads) -> y"""
    rng = np.random.default_rng(1)
    w = ", ".join(f"{v:.4f}" for v in rng.standard_normal(4 * (4 // group) * k * k))
    b = ", ".join(f"{v:.4f}" for v in rng.standard_normal(4))
    return from_text(f"""
        {HEADER}
        g ({inputs}) => ({outputs})
        <float[4,{4 // group},{k},{k}] W = {{{w}}}, float[4] B = {{{b}}}{inits}> {{
            {head}
            y = Conv <pads = [{pads}, {pads}, {pads}, {pads}], group = {group}> (h, W, B)
        }}""")


LAB = ", float[1] a = {1.75}, float[1] c = {-0.4}"  # PP-OCRv4's learnable affine block: h * a + c


@pytest.mark.parametrize("group", [1, 2, 4])
def test_affine_before_unpadded_conv_folds_into_it(group):
    model = then_conv("r = Relu (x)\n m = Mul (r, a)\n h = Add (m, c)", LAB, group=group)
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Relu", "Conv"]
    assert result.passes[0].counts == {"conv_input_add_folded": 1, "conv_input_mul_folded": 1}
    assert out.graph.node[1].input[0] == out.graph.node[0].output[0]


def test_per_input_channel_constants_into_a_grouped_conv():
    model = then_conv("m = Mul (x, s)\n h = Sub (m, t)",
                      ", float[4,1,1] s = {2.0, -1.0, 0.5, 3.0}, float[1,4,1,1] t = {0.5, 1.0, -2.0, 0.25}",
                      group=2, k=3, outputs="float[1,4,3,3] y")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Conv"] and result.passes[0].counts == {"conv_input_add_folded": 1,
                                                                "conv_input_mul_folded": 1}


def test_padded_conv_takes_the_mul_but_not_the_add():
    # zeros padded around h = x + c would have been c before the Add: not a bias
    model = then_conv("h = Add (x, c)", LAB, pads=1, k=3)
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Add", "Conv"] and "conv_input_add_folded" not in result.passes[0].counts
    model = then_conv("h = Mul (a, x)", LAB, pads=1, k=3, group=4)  # depthwise; 0 * a is 0
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Conv"] and result.passes[0].counts == {"conv_input_mul_folded": 1}


@pytest.mark.parametrize("head, inits, outputs", [
    ("h = Mul (x, s)", ", float[5] s = {1.0, 2.0, 3.0, 4.0, 5.0}", ""),  # varies along width
    ("h = Sub (c, x)", LAB, ""),  # c - x: not x shifted
    ("h = Mul (x, x)", "", ""),  # not a constant
    ("h = Mul (x, a)", LAB, "float[1,4,5,5] y, float[1,4,5,5] h"),  # h is a graph output too
    ("h = Mul (x, a)\n z = Relu (h)", LAB, "float[1,4,5,5] y, float[1,4,5,5] z"),  # h read twice
])
def test_affine_not_folded_into_conv_input(head, inits, outputs):
    model = then_conv(head, inits, outputs=outputs or "float[1,4,5,5] y")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ops(model)
    assert not any(k.startswith("conv_input") for k in result.passes[0].counts)


def test_affine_that_broadcasts_the_input_is_not_folded():
    # x [1,4,5,1] * s [1,1,1,5] is [1,4,5,5]: the Conv would see a different input shape
    model = then_conv("h = Mul (x, s)", ", float[1,1,1,5] s = {1.0, 2.0, 3.0, 4.0, 5.0}", inputs="float[1,4,5,1] x")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ops(model)


def test_conv_input_fold_is_idempotent():
    model = then_conv("r = Relu (x)\n m = Mul (r, a)\n h = Add (m, c)", LAB)
    once = onnxopt.optimize(model, passes=["fold"], verify="none").model
    twice = onnxopt.optimize(once, passes=["fold"], verify="none")
    assert twice.passes[0].counts == {} and ops(twice.model) == ops(once)


def test_dynamo_absent_conv_bias_folds_and_lets_batchnorm_in():
    """torch's dynamo exporter without its optimizer: a conv without bias gets
    Expand(CastLike(0.0, input), [C]); the CastLike is a constant of the input's type, so the bias
    folds and the BatchNormalization after the Conv goes into it."""
    w = ", ".join(f"{v:.4f}" for v in np.random.default_rng(0).standard_normal(4 * 3 * 3 * 3))
    model = from_text(f"""
        {HEADER}
        g (float[1,3,5,5] x) => (float[1,4,5,5] y)
        <float[4,3,3,3] W = {{{w}}}, float zero = {{0.0}}, int64[1] n = {{4}}{BN}> {{
            z = CastLike(zero, x)
            b = Expand(z, n)
            c = Conv <pads = [1, 1, 1, 1]> (x, W, b)
            y = BatchNormalization <epsilon = 0.001> (c, s, t, m, v)
        }}""")
    out, result = optimize_checked(model, ["fold"])
    assert ops(out) == ["Conv"]
    assert result.passes[0].counts == {"cast_like_folded": 1, "nodes_folded": 1, "conv_bn_folded": 1}
    again = onnxopt.optimize(out, passes=["fold"], verify="none")
    assert again.passes[0].counts == {}


def test_cast_like_takes_the_type_of_its_second_input():
    model = from_text(f"""
        {HEADER}
        g (float16[3] x) => (float16[3] y) <double[3] c = {{0.1, 1.5, -2.25}}> {{
            k = CastLike(c, x)
            y = Add(x, k)
        }}""")
    out, result = optimize_checked(model, ["fold"], feeds={"x": np.array([1, 2, 3], np.float16)})
    assert ops(out) == ["Add"] and result.passes[0].counts == {"cast_like_folded": 1}
    (k,) = [t for t in out.graph.initializer if t.name == "k"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(k), np.array([0.1, 1.5, -2.25]).astype(np.float16))


def test_cast_like_of_a_graph_output_or_of_an_activation_stays():
    model = from_text(f"""
        {HEADER}
        g (float[3] x, int64[3] i) => (float[3] y, float[3] z) <float[3] c = {{1, 2, 3}}> {{
            y = CastLike(c, x)
            z = CastLike(i, x)
        }}""")
    out, result = optimize_checked(model, ["fold"], feeds={"x": np.ones(3, np.float32), "i": np.arange(3)})
    assert ops(out) == ["CastLike", "CastLike"] and result.passes[0].counts == {}
