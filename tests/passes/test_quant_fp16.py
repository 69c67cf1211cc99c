"""quant fp16 conversion (convert_to_fp16): counts, casts, dtypes, numerics against float32, the
float32 islands (range, schema, subgraphs), keep_io_types, idempotence, and two real models."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from models.builders import ops, random_feeds, run
from onnxopt.graph import Names, export_model, import_model, opset
from onnxopt.passes.quant.fp16 import convert_to_fp16

F, F16, D = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "models")
RNG = np.random.default_rng(0)


def make(nodes, inputs, outputs, inits=(), opset_version=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset_version)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def w(*shape, dtype=np.float32):
    return (RNG.standard_normal(shape) * 0.5).astype(dtype)


def convert(model, **kwargs):
    """Convert a copy; check the result with onnx.checker, strict shape inference and onnxruntime."""
    m = import_model(onnx.ModelProto.FromString(model.SerializeToString()))
    report = convert_to_fp16(m.graph, opset(m.graph), Names(m.graph), **kwargs)
    out = export_model(m)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    return out, report


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def assert_close(model, out, feeds=None, feeds16=False):
    feeds = feeds or random_feeds(model)
    want = run(model, feeds)
    got = run(out, {k: v.astype(np.float16) if feeds16 and v.dtype == np.float32 else v for k, v in feeds.items()})
    assert list(want) == list(got)
    for name in want:
        a, b = want[name], got[name].astype(want[name].dtype)
        assert a.shape == b.shape
        assert cosine(a, b) > 0.999, name
        assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max() + 1e-3, name
    return got


def init_types(out):
    return {t.name: t.data_type for t in out.graph.initializer}


def casts(out):
    return [(n.input[0], n.output[0], n.attribute[0].i) for n in out.graph.node if n.op_type == "Cast"]


def mlp():
    return make([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
                 helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
                 helper.make_node("Add", ["o", "b2"], ["y"])],
                [vi("x", F, [4, 16])], [vi("y", F, [4, 8])],
                {"w1": w(16, 32), "b1": w(32), "w2": w(32, 8), "b2": w(8)})


def test_mlp():
    model = mlp()
    out, rep = convert(model)
    assert ops(out) == ["Cast", "MatMul", "Add", "Relu", "MatMul", "Add", "Cast"]
    assert casts(out) == [("x", "x_fp16", F16), ("y_fp16", "y", F)]
    assert len(rep.converted) == 5 and rep.kept == {} and rep.casts_inserted == 2
    assert rep.constants_converted == 4 and rep.constant_bytes_before == 2 * rep.constant_bytes_after
    assert set(init_types(out).values()) == {F16}
    assert out.graph.input[0].type.tensor_type.elem_type == F and out.graph.output[0].type.tensor_type.elem_type == F
    assert_close(model, out)


def test_conv_relu():
    model = make([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c"], ["y"])],
                 [vi("x", F, [1, 3, 8, 8])], [vi("y", F, [1, 4, 8, 8])], {"w": w(4, 3, 3, 3), "b": w(4)})
    out, rep = convert(model)
    assert ops(out) == ["Cast", "Conv", "Relu", "Cast"] and len(rep.converted) == 2 and rep.casts_inserted == 2
    assert set(init_types(out).values()) == {F16}
    assert_close(model, out)


def test_layernorm_softmax_gelu():
    model = make([helper.make_node("LayerNormalization", ["x", "s", "b"], ["n"], axis=-1),
                  helper.make_node("Softmax", ["n"], ["p"], axis=-1),
                  helper.make_node("Gelu", ["p"], ["y"])],
                 [vi("x", F, [2, 5, 16])], [vi("y", F, [2, 5, 16])], {"s": w(16) + 1, "b": w(16)}, opset_version=20)
    out, rep = convert(model)
    assert ops(out) == ["Cast", "LayerNormalization", "Softmax", "Gelu", "Cast"], rep.kept
    assert len(rep.converted) == 3 and rep.casts_inserted == 2
    assert_close(model, out)


def test_resize_scales_stay_float32():
    model = make([helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest"),
                  helper.make_node("Relu", ["r"], ["y"])],
                 [vi("x", F, [1, 2, 4, 4])], [vi("y", F, [1, 2, 8, 8])],
                 {"scales": np.array([1, 1, 2, 2], np.float32)}, opset_version=18)
    out, rep = convert(model)
    assert ops(out) == ["Cast", "Resize", "Relu", "Cast"] and len(rep.converted) == 2
    assert init_types(out) == {"scales": F} and rep.constants_converted == 0
    assert_close(model, out)


def test_constant_out_of_range_keeps_consumers_float32():
    model = make([helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Sub", ["a", "c"], ["s"]),
                  helper.make_node("Relu", ["s"], ["y"])],
                 [vi("x", F, [2, 3])], [vi("y", F, [2, 3])], {"c": np.array([7e4, 1, 2], np.float32)})
    out, rep = convert(model)
    assert ops(out) == ["Add", "Sub", "Cast", "Relu", "Cast"]
    assert rep.converted == ["Relu#2"] and set(rep.kept) == {"Add#0", "Sub#1"}
    assert all("out of float16 range" in r for r in rep.kept.values())
    assert rep.out_of_range == {"c": 7e4} and init_types(out) == {"c": F} and rep.casts_inserted == 2
    assert_close(model, out)


def test_graph_output_also_read_by_a_node():
    model = make([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Sigmoid", ["h"], ["y"])],
                 [vi("x", F, [3, 4])], [vi("h", F, [3, 4]), vi("y", F, [3, 4])])
    out, rep = convert(model)
    assert [o.name for o in out.graph.output] == ["h", "y"]
    assert ops(out) == ["Cast", "Relu", "Cast", "Sigmoid", "Cast"] and rep.casts_inserted == 3
    assert ("h_fp16", "h", F) in casts(out)
    sig = next(n for n in out.graph.node if n.op_type == "Sigmoid")
    assert list(sig.input) == ["h_fp16"]
    assert_close(model, out)


def test_graph_input_read_by_several_nodes_shares_one_cast():
    model = make([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"]),
                  helper.make_node("Tanh", ["x"], ["c"]), helper.make_node("TopK", ["x", "k"], ["t", "i"]),
                  helper.make_node("Sum", ["a", "b", "c"], ["y"])],
                 [vi("x", F, [3, 4])], [vi("y", F, [3, 4]), vi("t", F, [3, 2])], {"k": np.array([2], np.int64)})
    out, rep = convert(model)
    assert [c for c in casts(out) if c[0] == "x"] == [("x", "x_fp16", F16)]
    assert rep.casts_inserted == 2 and len(rep.converted) == 4 and rep.kept == {"TopK#3": "in the blocklist"}
    topk = next(n for n in out.graph.node if n.op_type == "TopK")
    assert topk.input[0] == "x"
    assert_close(model, out)


def test_if_node_untouched():
    then_g = helper.make_graph([helper.make_node("Add", ["r", "one"], ["t"])], "then", [], [vi("t", F, [2, 3])],
                               [numpy_helper.from_array(np.ones(3, np.float32), "one")])
    else_g = helper.make_graph([helper.make_node("Neg", ["r"], ["e"])], "else", [], [vi("e", F, [2, 3])])
    model = make([helper.make_node("Relu", ["x"], ["r"]),
                  helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                 [vi("x", F, [2, 3]), vi("cond", TensorProto.BOOL, [])], [vi("y", F, [2, 3])])
    out, rep = convert(model)
    assert rep.converted == ["Relu#0"] and rep.kept == {"If#1": "has a subgraph (body left untouched)"}
    assert ops(out) == ["Cast", "Relu", "Cast", "If"] and casts(out)[1] == ("r_fp16", "r", F)
    branches = {a.name: a.g for a in out.graph.node[3].attribute}
    assert branches["then_branch"] == then_g and branches["else_branch"] == else_g
    for cond in (True, False):
        feeds = {"x": w(2, 3), "cond": np.array(cond)}
        assert_close(model, out, feeds)


def test_keep_io_types_false():
    model = mlp()
    out, rep = convert(model, keep_io_types=False)
    assert ops(out) == ["MatMul", "Add", "Relu", "MatMul", "Add"] and rep.casts_inserted == 0
    assert out.graph.input[0].type.tensor_type.elem_type == F16
    assert out.graph.output[0].type.tensor_type.elem_type == F16
    assert run(out, {"x": w(4, 16, dtype=np.float16)})["y"].dtype == np.float16
    assert_close(model, out, feeds16=True)


def test_keep_io_types_false_with_float32_writer_of_an_output():
    model = make([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Add", ["a", "c"], ["y"])],
                 [vi("x", F, [3])], [vi("y", F, [3])], {"c": np.array([7e4, 0, 0], np.float32)})
    out, rep = convert(model, keep_io_types=False)
    assert ops(out) == ["Relu", "Cast", "Add", "Cast"] and list(rep.kept) == ["Add#1"]
    assert out.graph.output[0].name == "y" and out.graph.output[0].type.tensor_type.elem_type == F16
    assert casts(out) == [("a_fp16", "a", F), ("y_fp32", "y", F16)]


def test_float64_untouched():
    model = make([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", D, [2, 3])], [vi("y", D, [2, 2])],
                 {"w": w(3, 2, dtype=np.float64)})
    out, rep = convert(model)
    assert rep.converted == [] and rep.kept == {} and rep.casts_inserted == 0
    assert out.graph == model.graph


def test_cast_to_float_read_in_float16_is_retargeted():
    model = make([helper.make_node("Cast", ["x"], ["f"], to=F), helper.make_node("Mul", ["f", "c"], ["y"])],
                 [vi("x", TensorProto.INT64, [3])], [vi("y", F, [3])], {"c": np.array([0.5, 1, 2], np.float32)})
    out, rep = convert(model)
    assert casts(out) == [("x", "f", F16), ("y_fp16", "y", F)] and rep.casts_retargeted == 1
    assert rep.casts_inserted == 1
    assert_close(model, out, {"x": np.array([1, 2, 3], np.int64)})


@pytest.mark.parametrize("build", ["mlp", "range", "if", "io"])
def test_idempotent(build):
    if build == "mlp":
        model, kwargs = mlp(), {}
    elif build == "range":
        model, kwargs = make([helper.make_node("Mul", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
                             [vi("x", F, [3])], [vi("y", F, [3])], {"c": np.array([7e4, 1, 1], np.float32)}), {}
    elif build == "if":
        then_g = helper.make_graph([helper.make_node("Neg", ["r"], ["t"])], "then", [], [vi("t", F, [3])])
        model = make([helper.make_node("Relu", ["x"], ["r"]),
                      helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=then_g)],
                     [vi("x", F, [3]), vi("cond", TensorProto.BOOL, [])], [vi("y", F, [3])])
        kwargs = {}
    else:
        model, kwargs = mlp(), {"keep_io_types": False}
    once, _ = convert(model, **kwargs)
    twice, rep = convert(once, **kwargs)
    assert twice.graph == once.graph
    assert rep.converted == [] and rep.casts_inserted == 0 and rep.constants_converted == 0


# ----------------------------------------------------------------------------------- real models


def _real(name, feeds_of):
    path = os.path.join(SHARED, name)
    model = onnxopt.optimize(path, passes=["fold", "cleanup"], verify="none").model
    out, rep = convert(model)
    feeds = feeds_of(model)
    want, got = run(model, feeds), run(out, feeds)
    cos = {k: cosine(want[k], got[k]) for k in want}
    print(f"\n{name}: {len(rep.converted)} fp16, {len(rep.kept)} fp32 {rep.kept}, casts {rep.casts_inserted}, "
          f"constants {rep.constants_converted} ({rep.constant_bytes_before} -> {rep.constant_bytes_after} B), "
          f"underflow {rep.underflow}, out of range {rep.out_of_range}, cosine {cos}")
    return rep, cos


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared models absent")
def test_real_models():
    def minilm_feeds(model):
        sample = np.load(os.path.join(SHARED, "sample_inputs.npz"))
        return {i.name: sample[i.name] for i in model.graph.input}

    rep, cos = _real("all-MiniLM-L6-v2_dynamo_op18.onnx", minilm_feeds)
    assert min(cos.values()) > 0.999 and len(rep.converted) > 10 * len(rep.kept)
    rep, cos = _real("mobilenet_v2_unfoldedbn_op17.onnx", lambda m: random_feeds(m))
    assert min(cos.values()) > 0.999 and rep.kept == {}


def test_keep_io_types_false_input_read_in_float32():
    model = make([helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Relu", ["x"], ["y"])],
                 [vi("x", F, [3])], [vi("y", F, [3]), vi("a", F, [3])], {"c": np.array([7e4, 0, 0], np.float32)})
    out, rep = convert(model, keep_io_types=False)
    assert out.graph.input[0].type.tensor_type.elem_type == F16 and list(rep.kept) == ["Add#0"]
    assert casts(out)[0] == ("x", "x_fp32", F) and rep.casts_inserted == 2  # and a's Cast back to float16


def test_constant_node_converted_and_shared_constant_copied():
    model = make([helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(w(3), "k")),
                  helper.make_node("Mul", ["x", "k"], ["m"]), helper.make_node("TopK", ["c", "two"], ["t", "i"]),
                  helper.make_node("Add", ["m", "c"], ["y"])],
                 [vi("x", F, [3])], [vi("y", F, [3]), vi("t", F, [2])],
                 {"c": w(3), "two": np.array([2], np.int64)})
    out, rep = convert(model)
    assert "Constant" not in ops(out) and init_types(out) == {"k": F16, "c": F, "c_fp16": F16, "two": 7}
    assert rep.constants_converted == 2 and rep.constants_copied == ["c"]
    assert_close(model, out)
