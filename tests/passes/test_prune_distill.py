"""prune: end-to-end distillation with the masks fixed (distill.py): every op's gradient against
finite differences of onnxruntime's outputs, the trained constants, and the pass keeping the
zeros and measuring better than without."""

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxopt
from models.builders import run
from onnxopt.graph import import_model
from onnxopt.passes.prune import distill, sparse
from onnxopt.passes.quant.calib import tapped

F = onnx.TensorProto.FLOAT


def const(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def rand(shape, seed, positive=False):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def single(op, inputs: dict, attrs=None, opset=17, extra_nodes=()):
    """A model computing y = op(inputs...) (then extra_nodes), every input a constant."""
    nodes = [oh.make_node(op, list(inputs), ["y" if not extra_nodes else "t"], **(attrs or {}))] + list(extra_nodes)
    graph = oh.make_graph(nodes, "g", [], [oh.make_tensor_value_info("y", F, None)],
                          [const(k, v) for k, v in inputs.items()])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)


A, B = rand((2, 3, 4), 0), rand((4,), 1)
CASES = {
    "Add broadcast": (single("Add", {"a": A, "b": B}), ["a", "b"]),
    "Sub": (single("Sub", {"a": A, "b": rand((3, 1), 2)}), ["a", "b"]),
    "Mul": (single("Mul", {"a": A, "b": B}), ["a", "b"]),
    "Div": (single("Div", {"a": A, "b": rand((4,), 3, positive=True)}), ["a", "b"]),
    "Sum": (single("Sum", {"a": A, "b": B, "c": rand((3, 4), 4)}), ["a", "b", "c"]),
    "Neg": (single("Neg", {"a": A}), ["a"]),
    "MatMul 3-D x 2-D": (single("MatMul", {"a": A, "w": rand((4, 5), 5)}), ["a", "w"]),
    "MatMul batched": (single("MatMul", {"a": rand((2, 3, 4, 5), 6), "b": rand((2, 3, 5, 4), 7)}), ["a", "b"]),
    "Gemm transB": (single("Gemm", {"a": rand((3, 4), 8), "w": rand((5, 4), 9), "c": rand((5,), 10)},
                           {"transB": 1, "alpha": 0.7, "beta": 1.3}), ["a", "w", "c"]),
    "Gemm transA": (single("Gemm", {"a": rand((4, 3), 11), "w": rand((4, 5), 12)}, {"transA": 1}), ["a", "w"]),
    "Transpose": (single("Transpose", {"a": A}, {"perm": [2, 0, 1]}), ["a"]),
    "Reshape": (single("Reshape", {"a": A, "s": np.array([6, 4], np.int64)}), ["a"]),
    "Flatten": (single("Flatten", {"a": A}, {"axis": 2}), ["a"]),
    "Unsqueeze": (single("Unsqueeze", {"a": A, "ax": np.array([1], np.int64)}), ["a"]),
    "Squeeze": (single("Squeeze", {"a": rand((2, 1, 4), 13), "ax": np.array([1], np.int64)}), ["a"]),
    "Expand": (single("Expand", {"a": rand((3, 1), 14), "s": np.array([2, 3, 4], np.int64)}), ["a"]),
    "Concat": (single("Concat", {"a": A, "b": rand((2, 2, 4), 15)}, {"axis": 1}), ["a", "b"]),
    "Where": (single("Where", {"c": rand((3, 4), 16) > 0, "a": A, "b": B}), ["a", "b"]),
    "LayerNormalization": (single("LayerNormalization", {"x": A * 3 + 1, "s": rand((4,), 17), "b": rand((4,), 18)},
                                  {"epsilon": 1e-5}), ["x", "s", "b"]),
    "LayerNormalization axis 1": (single("LayerNormalization", {"x": A, "s": rand((3, 4), 19)}, {"axis": 1}),
                                  ["x", "s"]),
    "Softmax": (single("Softmax", {"a": A}, {"axis": 1}), ["a"]),
    "Softmax opset 11": (single("Softmax", {"a": A}, {"axis": 1}, opset=11), ["a"]),
    "Erf": (single("Erf", {"a": A}), ["a"]),
    "Gelu": (single("Gelu", {"a": A * 3}, opset=20), ["a"]),
    "Gelu tanh": (single("Gelu", {"a": A * 3}, {"approximate": "tanh"}, opset=20), ["a"]),
    "Slice": (single("Slice", {"a": A, "s": np.array([1, -1], np.int64), "e": np.array([3, -4], np.int64),
                               "ax": np.array([1, 2], np.int64), "st": np.array([1, -2], np.int64)}), ["a"]),
    "Slice opset 9": (single("Slice", {"a": A}, {"starts": [0, 1], "ends": [1, 100], "axes": [0, 2]}, opset=9),
                      ["a"]),
    "Gather": (single("Gather", {"a": A, "i": np.array([[0, -1], [2, 0]], np.int64)}, {"axis": 1}), ["a"]),
    "Tanh": (single("Tanh", {"a": A}), ["a"]),
    "Sigmoid": (single("Sigmoid", {"a": A}), ["a"]),
    "Relu": (single("Relu", {"a": A}), ["a"]),
    "Sqrt": (single("Sqrt", {"a": rand((3, 4), 20, positive=True)}), ["a"]),
    "Exp": (single("Exp", {"a": A}), ["a"]),
    "Pow": (single("Pow", {"a": rand((3, 4), 21, positive=True), "p": np.float32(2.5)}), ["a"]),
    "ReduceSum": (single("ReduceSum", {"a": A, "ax": np.array([1], np.int64)}, {"keepdims": 0}), ["a"]),
    "ReduceMean": (single("ReduceMean", {"a": A}, {"axes": [0, 2]}), ["a"]),
    "ReduceL2": (single("ReduceL2", {"a": A}, {"axes": [-1], "keepdims": 0}), ["a"]),
    "Clip": (single("Clip", {"a": A, "lo": np.float32(-0.5), "hi": np.float32(0.7)}), ["a"]),
    "Cast float": (single("Cast", {"a": A}, {"to": F}), ["a"]),
    "a chain": (single("MatMul", {"a": A, "w": rand((4, 4), 22)}, extra_nodes=[
        oh.make_node("Erf", ["t"], ["e"]), oh.make_node("Mul", ["e", "t"], ["m"]),
        oh.make_node("Softmax", ["m"], ["y"])]), ["a", "w"]),
}


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_finite_differences(case):
    """For L = sum(y * r): the reverse pass's dL/dp along a random direction against the central
    difference of onnxruntime's L, for every trained input p."""
    proto, trained = CASES[case]
    model = import_model(proto)
    plan = distill.Plan(model.graph, set(trained))
    tensors = model.graph.tensors()
    params = {n: np.asarray(tensors[n].values).copy() for n in trained}
    with tapped(distill.with_inputs(model, params), plan.fetch) as forward:
        vals = forward(params)
        r = rand(vals["y"].shape, 99)
        vals.update(params)
        grads = plan.backward(vals, {"y": r})
        for name in trained:
            v = rand(params[name].shape, 7)
            eps = 1e-2

            def loss(step):
                moved = dict(params, **{name: params[name] + step * v})
                return float(np.sum(forward(moved)["y"].astype(np.float64) * r))

            numeric = (loss(eps) - loss(-eps)) / (2 * eps)
            analytic = float(np.sum(distill._fit(grads[name], v.shape) * v))
            assert analytic == pytest.approx(numeric, rel=2e-3, abs=2e-3), name


def test_what_the_reverse_pass_cannot_follow_stops_it():
    with pytest.raises(distill.Unsupported, match="Cos"):
        distill.Plan(import_model(single("Cos", {"a": A})).graph, {"a"})
    mean = single("LayerNormalization", {"x": A, "s": B}, extra_nodes=[oh.make_node("Neg", ["m"], ["y"])])
    mean.graph.node[0].output[:] = ["t", "m"]  # y reads LayerNormalization's mean output
    with pytest.raises(distill.Unsupported, match="only its first output"):
        distill.Plan(import_model(mean).graph, {"x"})
    double = single("Cast", {"a": A}, {"to": onnx.TensorProto.DOUBLE},
                    extra_nodes=[oh.make_node("Cast", ["t"], ["y"], to=F)])
    with pytest.raises(distill.Unsupported, match="of type"):
        distill.Plan(import_model(double).graph, {"a"})
    ints = single("Cast", {"a": A}, {"to": onnx.TensorProto.INT64},
                  extra_nodes=[oh.make_node("Cast", ["t"], ["y"], to=F)])
    assert distill.Plan(import_model(ints).graph, {"a"}).nodes == []  # no gradient through integers


def test_deferred_weight_gradients_are_the_same():
    """A batch's weight gradient from the rows gathered equals the sum of each sample's own."""
    proto, _ = CASES["MatMul 3-D x 2-D"]
    model = import_model(proto)
    plan = distill.Plan(model.graph, {"a", "w"})
    params = {"a": A, "w": rand((4, 5), 5)}
    direct, pending = np.zeros((4, 5), np.float32), {"w": []}
    for seed in (1, 2, 3):
        r = rand((2, 3, 5), seed)
        direct += plan.backward(dict(params), {"y": r})["w"]
        assert "w" not in plan.backward(dict(params), {"y": r}, pending)
    np.testing.assert_allclose(distill.weight_gradients(pending)["w"], direct, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- the pass


def block(d=32, heads=2, ffn=128, seed=0) -> onnx.ModelProto:
    """x [1, T, d] -> one post-norm transformer block (attention, residual, LayerNormalization, an
    erf-GELU FFN, residual, LayerNormalization) -> y, as exporters write it."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, shape, scale=None):
        inits.append(const(name, (rng.standard_normal(shape) * (scale or shape[0] ** -0.5)).astype(np.float32)))
        return name

    def n(op, ins, out, **attrs):
        nodes.append(oh.make_node(op, ins, [out], name=out, **attrs))
        return out

    def linear(x, name, k, m):
        return n("Add", [n("MatMul", [x, w(name + ".w", [k, m])], name + ".mm"), w(name + ".b", [m], 0.1)], name)

    x = n("LayerNormalization", ["x", w("ln0.s", [d], 1.0), w("ln0.b", [d], 0.1)], "ln0")
    inits += [const("split", np.array([1, -1, heads, d // heads], np.int64)),
              const("merge", np.array([1, -1, d], np.int64)), const("scale", np.float32((d // heads) ** -0.5)),
              const("half", np.float32(0.5)), const("one", np.float32(1.0)), const("root2", np.float32(2 ** 0.5))]
    q, k, v = (n("Transpose", [n("Reshape", [linear(x, p, d, d), "split"], p + ".r")], p + ".t", perm=perm)
               for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])))
    att = n("Softmax", [n("Mul", [n("MatMul", [q, k], "qk"), "scale"], "qks")], "att", axis=-1)
    ctx = n("Reshape", [n("Transpose", [n("MatMul", [att, v], "av")], "avt", perm=[0, 2, 1, 3]), "merge"], "ctx")
    x = n("LayerNormalization", [n("Add", [linear(ctx, "o", d, d), x], "res1"), w("ln1.s", [d], 1.0),
                                 w("ln1.b", [d], 0.1)], "ln1")
    h = linear(x, "up", d, ffn)
    gelu = n("Mul", [n("Mul", [h, n("Add", [n("Erf", [n("Div", [h, "root2"], "hd")], "he"), "one"], "h1")], "hg"),
                     "half"], "gelu")
    n("LayerNormalization", [n("Add", [linear(gelu, "down", ffn, d), x], "res2"), w("ln2.s", [d], 1.0),
                             w("ln2.b", [d], 0.1)], "y")
    graph = oh.make_graph(nodes, "block", [oh.make_tensor_value_info("x", F, [1, "T", d])],
                          [oh.make_tensor_value_info("y", F, [1, "T", d])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def tokens(count, seed, d=32, length=8):
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(100).standard_normal((d, d)).astype(np.float32) * 0.4 + np.eye(d, dtype=np.float32)
    return [{"x": rng.standard_normal((1, length, d)).astype(np.float32) @ mix} for _ in range(count)]


def cosine(model, data):
    got = np.concatenate([run(model, f)["y"].ravel() for f in data])
    want = np.concatenate([run(block(), f)["y"].ravel() for f in data])
    return float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))


def prune(epochs, data, method="unstructured"):
    """At 80% (or 2:4), with a rate that moves the weights in this few steps (MiniLM's default
    suits thousands of samples)."""
    sparsity = 0.8 if method == "unstructured" else None
    return onnxopt.optimize(block(), passes=["prune"], prune=method, sparsity=sparsity, calibration_data=data,
                            min_cosine=0.5, options={"prune": {"distill": epochs, "distill_rate": 3e-3,
                                                               "adaptive": False}})


def initializers(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_distillation_keeps_the_zeros_and_lowers_the_error():
    """The same masks as without it, other weights, biases and norms trained, and a smaller error
    on the held-back samples and on fresh ones."""
    data = tokens(distill.MIN_SAMPLES + 64, 1)  # the last 64 held back
    plain, distilled = prune(0, data), prune(4, data)
    wp, wd = initializers(plain.model), initializers(distilled.model)
    for name in ("q.w", "k.w", "v.w", "o.w", "up.w", "down.w"):
        np.testing.assert_array_equal(wp[name] == 0, wd[name] == 0)
        assert not np.array_equal(wp[name], wd[name])
        assert np.all(np.sum(wd[name] == 0, axis=0) == round(wd[name].shape[0] * 0.8))  # each output's
    for name in ("q.b", "o.b", "up.b", "down.b", "ln1.s", "ln1.b", "ln2.s", "ln2.b"):
        assert not np.array_equal(wp[name], wd[name])
    np.testing.assert_array_equal(wp["ln0.s"], wd["ln0.s"])  # upstream of every pruned layer
    assert not plain.details["prune"]["distilled"] and distilled.details["prune"]["distilled"]
    assert distilled.details["prune"]["measured_cosine"] > plain.details["prune"]["measured_cosine"]
    report = distilled.details["prune"]["distilled"]  # 6 weights, 6 biases, 2 LayerNormalizations' scale and bias
    values = 4 * 32 * 32 + 2 * 32 * 128 + 9 * 32 + 128
    assert (report["samples"], report["tensors"], report["values"]) == (256, 16, values)
    assert report["score_before"] == plain.details["prune"]["measured_cosine"]
    assert report["score"] == distilled.details["prune"]["measured_cosine"]
    assert distilled.passes[0].counts == plain.passes[0].counts
    fresh = tokens(32, 2)
    assert 1 - cosine(distilled.model, fresh) < 0.9 * (1 - cosine(plain.model, fresh))
    epochs = [line for line in distilled.explain if "distillation epoch" in line]
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in epochs]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert any("distilled (" in line for line in distilled.explain)


def test_distilled_2_4_holds_the_pattern():
    data = tokens(distill.MIN_SAMPLES + 64, 1)
    result = prune(4, data, "2:4")
    assert result.details["prune"]["distilled"]
    w = initializers(result.model)
    for name in ("q.w", "k.w", "v.w", "o.w", "up.w", "down.w"):
        assert sparse.holds_n_m(w[name])


def test_distillation_needs_enough_samples():
    result = prune(4, tokens(distill.MIN_SAMPLES + 63, 1))
    assert not result.details["prune"]["distilled"]
    assert any(f"needs at least {distill.MIN_SAMPLES} calibration samples" in line for line in result.explain)


def test_a_second_run_trains_nothing():
    data = tokens(distill.MIN_SAMPLES + 64, 1)
    first = prune(4, data)
    again = onnxopt.optimize(first.model, passes=["prune"], prune="unstructured", sparsity=0.8, calibration_data=data,
                             min_cosine=0.5, options={"prune": {"distill": 4, "adaptive": False}})
    assert again.passes[0].counts == {}
    assert not again.details["prune"]["distilled"]
    for name, value in initializers(first.model).items():
        np.testing.assert_array_equal(initializers(again.model)[name], value)
