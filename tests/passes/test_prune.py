"""prune: unstructured and 2:4 pruning (the searched mask, SparseGPT, the refit) with exact zero
counts, the 2:4 pattern on every pruned weight, reconstruction against none, the budget, and the
usage errors."""

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxopt
from models.builders import run
from onnxopt.errors import UsageError
from onnxopt.passes.prune import sparse
from onnxopt.passes.quant.calib import damped

F = onnx.TensorProto.FLOAT


def weight(name, shape, seed):
    return oh.make_tensor(name, F, shape, np.random.default_rng(seed).standard_normal(shape).astype(np.float32).ravel())


def mlp(gemm=False) -> onnx.ModelProto:
    """x [N, 64] -> MatMul 64x128 -> Relu -> MatMul 128x32 (or Gemm with transB) -> y."""
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), oh.make_node("Relu", ["h"], ["r"], name="relu")]
    if gemm:
        nodes.append(oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="fc2"))
        inits = [weight("w1", [64, 128], 0), weight("w2", [32, 128], 1), weight("b2", [32], 2)]
    else:
        nodes.append(oh.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"))
        inits = [weight("w1", [64, 128], 0), weight("w2", [128, 32], 1)]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", F, ["N", 64])],
                          [oh.make_tensor_value_info("y", F, ["N", 32])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def samples(count=16, seed=3):
    """Correlated inputs: what real activations look like, and what a refit can use."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((64, 64)).astype(np.float32) * 0.3 + np.eye(64, dtype=np.float32)
    return [{"x": (rng.standard_normal((32, 64)).astype(np.float32) @ mix)} for _ in range(count)]


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# ---------------------------------------------------------------------------------- masks and refit


def correlated(k=64, n=48, rows=512, seed=0):
    """Inputs with correlated channels of very different scales, as real activations have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) @ (rng.standard_normal((k, k)) * 0.5 + np.eye(k))
    x *= np.exp(rng.normal(0.0, 1.0, k))
    return x, rng.standard_normal((k, n)).astype(np.float32)


def test_unstructured_zeroes_the_fraction_of_every_output():
    x, w = correlated()
    for h in (None, x.T @ x):
        pruned, mask = sparse.prune(w, h, 0.5)
        assert np.all(np.sum(pruned == 0, axis=0) == 32) and np.array_equal(mask, pruned == 0)


def test_2_4_holds_the_pattern_along_the_reduction_axis():
    x, w = correlated(k=70)  # a last group of 2
    for h in (None, x.T @ x):
        pruned, _ = sparse.prune(w, h, n_m=(2, 4))
        assert sparse.holds_n_m(pruned)
        assert np.sum(pruned == 0) == 48 * (17 * 2 + 1)
    assert not sparse.holds_n_m(w)


def test_reconstruction_lowers_the_output_error():
    """SparseGPT's refit against the same mask applied without it, and against magnitude pruning."""
    x, w = correlated()
    refit, mask = sparse.prune(w, x.T @ x, 0.5)
    masked = np.where(mask, 0, w)
    by_magnitude, _ = sparse.magnitude(w, 0.5)

    def err(v):
        return np.linalg.norm(x @ w - x @ v)

    assert err(refit) < 0.9 * err(masked)  # measured 0.85
    assert err(refit) < 0.5 * err(by_magnitude)  # measured 0.22: the inputs' scales matter
    refit24, mask24 = sparse.prune(w, x.T @ x, n_m=(2, 4))
    assert err(refit24) < 0.9 * err(np.where(mask24, 0, w))  # measured 0.76


@pytest.mark.parametrize("sparsity, n_m", [(0.5, None), (0.3, None), (0.7, None), (0.5, (2, 4))])
def test_refit_solves_each_outputs_least_squares_on_its_mask(sparsity, n_m):
    """The kept weights satisfy the damped normal equations on their own inputs (the exact
    least-squares fit of the dense layer), whether solved through the removed inputs (fewer than
    half removed) or the kept ones, so they beat SparseGPT's greedy compensation on the same
    mask; an input that never varies gets no weight."""
    x, w = correlated()
    x[:, 5] = 0.0
    h = x.T @ x
    greedy, mask = sparse.prune(w, h, sparsity, n_m, solve=False)
    solved = sparse.refit(w, h, mask)
    assert np.array_equal(solved == 0, mask | (np.arange(64) == 5)[:, None])
    hh, dead = damped(h, 64)
    assert list(np.flatnonzero(dead)) == [5]
    for j in range(w.shape[1]):
        kept = ~mask[:, j]
        lhs = hh[np.ix_(kept, kept)] @ solved[kept, j]
        rhs = (hh @ np.where(dead, 0, w[:, j]))[kept]
        assert np.linalg.norm(lhs - rhs) < 1e-5 * np.linalg.norm(rhs)

    def err(v):
        return np.linalg.norm(x @ w - x @ v)

    assert err(solved) < 0.92 * err(greedy)  # measured 0.83 at 50%, 0.75 at 30%, 0.90 at 70%, 0.85 for 2:4


@pytest.mark.parametrize("sparsity, n_m", [(0.5, None), (0.3, None), (0.7, None), (0.5, (2, 4))])
def test_the_searched_mask_refits_closer_than_sparsegpts(sparsity, n_m):
    """With H, prune takes ADMM's mask (search) and refits on it: the same count in every output
    (or the n:m pattern), the dead input among the removed, and a lower output error than
    SparseGPT's mask refitted the same way."""
    x, w = correlated(k=70)  # 2:4: a last group of 2
    x[:, 5] = 0.0
    h = x.T @ x
    pruned, mask = sparse.prune(w, h, sparsity, n_m)
    assert np.array_equal(mask, sparse.search(w, h, sparsity, n_m))
    assert np.array_equal(pruned, sparse.refit(w, h, mask)) and np.array_equal(pruned == 0, mask)
    assert mask[5].all()
    if n_m is None:
        assert np.all(mask.sum(axis=0) == round(70 * sparsity))
    else:
        assert sparse.holds_n_m(pruned) and np.all(mask.sum(axis=0) == 17 * 2 + 1)
    _, greedy_mask = sparse.prune(w, h, sparsity, n_m, solve=False)
    assert not np.array_equal(mask, greedy_mask)

    def err(v):
        return np.linalg.norm(x @ w - x @ v)

    # measured 0.70 at 50%, 0.75 at 30%, 0.76 at 70%, 0.82 for 2:4
    assert err(pruned) < 0.9 * err(sparse.refit(w, h, greedy_mask))


def test_without_the_refit_sparsegpts_mask_and_compensation():
    """Above SOLVE_FLOPS (no exact refit affordable) the mask is SparseGPT's and so are the kept weights."""
    x, w = correlated()
    h = x.T @ x
    expected = sparse.prune(w, h, 0.5, solve=False)
    saved = sparse.SOLVE_FLOPS
    sparse.SOLVE_FLOPS = 0
    try:
        got = sparse.prune(w, h, 0.5)
    finally:
        sparse.SOLVE_FLOPS = saved
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


# ---------------------------------------------------------------------------------- the pass


@pytest.mark.parametrize("gemm", [False, True])
def test_unstructured_at_a_target_sparsity(gemm):
    """One sparsity for all layers (adaptive off): exact counts per output; by default the per-layer
    levels, which here measure better than one level for all."""
    data = samples()
    result = onnxopt.optimize(mlp(gemm), passes=["prune"], prune="unstructured", sparsity=0.5,
                              calibration_data=data, min_cosine=0.9, options={"prune": {"adaptive": False}})
    assert result.passes[0].counts == {"layers_pruned": 2, "weights_zeroed": 4096 + 2048}
    w = weights(result.model)
    assert np.all(np.sum(w["w1"] == 0, axis=0) == 32)
    assert np.all(np.sum((w["w2"].T if gemm else w["w2"]) == 0, axis=0) == 64)  # along K for Gemm's transB
    details = result.details["prune"]
    assert details["refitted"] and [layer["sparsity"] for layer in details["layers"]] == [0.5, 0.5]
    (metrics,) = result.verification["outputs"]
    assert metrics["ok"] and metrics["samples"] == 4 and 0.9 <= metrics["cosine"] < 1
    got = run(result.model, data[-1])["y"]
    want = run(mlp(gemm), data[-1])["y"]
    assert 0.9 < float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want)) < 1
    adaptive = onnxopt.optimize(mlp(gemm), passes=["prune"], prune="unstructured", sparsity=0.5,
                                calibration_data=data, min_cosine=0.9).details["prune"]
    levels = [layer["sparsity"] for layer in adaptive["layers"]]
    assert adaptive["adaptive"] and levels[0] > 0.5 > levels[1]  # fc2 reaches the output directly
    zeros = {layer["node"]: layer["zeros"] for layer in adaptive["layers"]}
    assert zeros == {"fc1": 128 * round(64 * levels[0]), "fc2": 32 * round(128 * levels[1])}
    assert abs(adaptive["zeros"] / adaptive["linear_weights"] - 0.5) < 0.01  # each output's count rounded
    assert adaptive["measured_cosine"] > details["measured_cosine"]


def test_2_4_on_every_layer_the_budget_allows():
    result = onnxopt.optimize(mlp(), passes=["prune"], prune="2:4", calibration_data=samples(), min_cosine=0.9)
    assert result.passes[0].counts == {"layers_pruned": 2, "weights_zeroed": 4096 + 2048}
    w = weights(result.model)
    assert sparse.holds_n_m(w["w1"]) and sparse.holds_n_m(w["w2"])
    strict = onnxopt.optimize(mlp(), passes=["prune"], prune="2:4", calibration_data=samples(), min_cosine=0.9999)
    assert strict.passes[0].counts == {"layers_kept_dense": 2}  # no layer alone keeps that
    assert any("kept dense for the budget" in line for line in strict.explain)


def test_the_budget_chooses_the_sparsity():
    loose = onnxopt.optimize(mlp(), passes=["prune"], prune="unstructured", calibration_data=samples(),
                             min_cosine=0.95)
    tight = onnxopt.optimize(mlp(), passes=["prune"], prune="unstructured", calibration_data=samples(),
                             min_cosine=0.995)
    s_loose, s_tight = loose.details["prune"]["sparsity"], tight.details["prune"]["sparsity"]
    assert 0 < s_tight < s_loose < 0.95
    assert loose.verification["outputs"][0]["cosine"] >= 0.95
    assert tight.verification["outputs"][0]["cosine"] >= 0.995


def test_without_calibration_data_by_magnitude():
    result = onnxopt.optimize(mlp(), passes=["prune"], prune="unstructured", sparsity=0.25, min_cosine=0.5)
    assert result.passes[0].counts == {"layers_pruned": 2, "weights_zeroed": 2048 + 1024}
    assert not result.details["prune"]["refitted"]
    assert any("no --calibration-data: weights go by magnitude" in line for line in result.explain)
    w1 = onnx.numpy_helper.to_array(mlp().graph.initializer[0])
    kept = weights(result.model)["w1"] != 0
    for col in range(w1.shape[1]):  # per output: every kept weight at least as large as every dropped one
        assert np.abs(w1[kept[:, col], col]).min() >= np.abs(w1[~kept[:, col], col]).max()


def test_second_run_changes_nothing():
    once = onnxopt.optimize(mlp(), passes=["prune"], prune="unstructured", sparsity=0.5, calibration_data=samples(),
                            min_cosine=0.9)
    again = onnxopt.optimize(once.model, passes=["prune"], prune="unstructured", sparsity=0.5,
                             calibration_data=samples(), min_cosine=0.9)
    assert again.passes[0].counts == {}
    assert weights(again.model)["w1"].tobytes() == weights(once.model)["w1"].tobytes()


def test_a_shared_or_small_weight_is_left_alone():
    model = mlp()
    model.graph.node.append(oh.make_node("MatMul", ["x", "w1"], ["z"], name="again"))
    model.graph.output.append(oh.make_tensor_value_info("z", F, ["N", 128]))
    result = onnxopt.optimize(model, passes=["prune"], prune="unstructured", sparsity=0.5,
                              calibration_data=samples(), min_cosine=0.5)
    assert result.passes[0].counts == {"layers_pruned": 1, "weights_zeroed": 2048}
    assert any("fc1: its weight is shared with another node" in line for line in result.explain)
    assert np.count_nonzero(weights(result.model)["w1"] == 0) == 0


def test_prune_then_quant():
    """prune runs before quant whatever the order given; the int8 weights keep the zeros."""
    result = onnxopt.optimize(mlp(), passes=["quant", "prune"], prune="unstructured", sparsity=0.5, quant="dynamic",
                              calibration_data=samples(), min_cosine=0.9, options={"prune": {"adaptive": False}})
    assert [r.name for r in result.passes] == ["prune", "quant"]
    assert result.order_note == "passes reordered to respect their dependencies: prune,quant"
    assert result.passes[1].counts["matmul_int8"] == 2
    int8 = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer
            if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 2 and all(0.5 <= np.mean(w == 0) < 0.51 for w in int8)  # and a few rounded to 0


@pytest.mark.parametrize("kwargs, message", [
    ({"prune": "channels"}, "bad --prune channels: expected one of structured, unstructured, 2:4"),
    ({"prune": "2:4", "sparsity": 0.5}, "--sparsity does not apply to --prune 2:4"),
    ({"prune": "unstructured", "sparsity": 1.0}, "bad --sparsity 1.0"),
    ({}, "the prune pass needs --prune METHOD"),
])
def test_usage_errors(kwargs, message):
    with pytest.raises(UsageError) as e:
        onnxopt.optimize(mlp(), passes=["prune"], **kwargs)
    assert message in str(e.value)
    with pytest.raises(UsageError, match="--prune unstructured needs the prune pass"):
        onnxopt.optimize(mlp(), passes=["fold"], prune="unstructured")


def test_allocation_gives_the_cheap_layer_more():
    from onnxopt.passes.prune import LEVELS, allocation

    cheap = np.array(LEVELS) * 0.1
    dear = np.array(LEVELS) ** 2
    levels = allocation(np.stack([cheap, dear]), np.array([100.0, 100.0]), 0.5)
    assert levels[0] > 0.5 > levels[1] and (levels[0] + levels[1]) / 2 >= 0.5


def two_branches() -> onnx.ModelProto:
    """y = x @ wa + 0.01 * (x @ wb): wb barely reaches the output."""
    nodes = [oh.make_node("MatMul", ["x", "wa"], ["a"], name="strong"),
             oh.make_node("MatMul", ["x", "wb"], ["b"], name="weak"),
             oh.make_node("Mul", ["b", "small"], ["bs"]), oh.make_node("Add", ["a", "bs"], ["y"])]
    graph = oh.make_graph(nodes, "two", [oh.make_tensor_value_info("x", F, ["N", 64])],
                          [oh.make_tensor_value_info("y", F, ["N", 64])],
                          [weight("wa", [64, 64], 0), weight("wb", [64, 64], 1),
                           oh.make_tensor("small", F, [], [0.01])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_adaptive_sparsity_prunes_the_layer_that_matters_less():
    kw = {"passes": ["prune"], "prune": "unstructured", "sparsity": 0.5, "calibration_data": samples(),
          "min_cosine": 0.5}
    adaptive = onnxopt.optimize(two_branches(), **kw)
    uniform = onnxopt.optimize(two_branches(), options={"prune": {"adaptive": False}}, **kw)
    d = adaptive.details["prune"]
    assert d["adaptive"] and not uniform.details["prune"]["adaptive"]
    by_node = {layer["node"]: layer["sparsity"] for layer in d["layers"]}
    loss = {layer["node"]: layer["estimated_loss"] for layer in d["layers"]}
    assert loss["weak"] < loss["strong"]  # the error each contributes, estimated
    assert by_node["weak"] > 0.5 > by_node["strong"] and (by_node["weak"] + by_node["strong"]) / 2 >= 0.5
    assert d["measured_cosine"] > uniform.details["prune"]["measured_cosine"]
    assert adaptive.passes[0].counts["weights_zeroed"] >= 4096


# ---------------------------------------------------------------------------------- sequential, teacher-guided


def test_stages_follow_the_layers_upstream():
    from onnxopt.graph import import_model
    from onnxopt.passes.prune import find_sites
    from onnxopt.passes.prune.teacher import stages

    for model, want in ((mlp(), [["fc1"], ["fc2"]]), (two_branches(), [["strong", "weak"]])):
        graph = import_model(model).graph
        sites, _ = find_sites(graph)
        assert [[s.label for s in group] for group in stages(graph, sites)] == want


def test_teacher_weight_fits_the_original_outputs_on_the_new_inputs():
    from onnxopt.passes.prune.teacher import teacher_weight

    xd, w = correlated()
    rng = np.random.default_rng(1)
    xs = xd @ (np.eye(64) + 0.1 * rng.standard_normal((64, 64)))  # what pruned layers upstream hand on
    xs += 0.3 * xd.std(axis=0) * rng.standard_normal(xd.shape)  # and what no linear map undoes
    got = teacher_weight(w, xs.T @ xs, xs.T @ xd).astype(np.float64)
    best = np.linalg.lstsq(xs, xd @ w, rcond=None)[0]
    err, least, before = (np.linalg.norm(xs @ v - xd @ w) for v in (got, best, w))
    assert least < err < 1.25 * least and err < 0.15 * before  # 1959, 1627, 14792
    assert np.linalg.norm(got - w) < np.linalg.norm(best - w)  # the damping pulls toward W
    np.testing.assert_allclose(teacher_weight(w, xd.T @ xd, xd.T @ xd), w, rtol=1e-4, atol=1e-5)  # same inputs: W
    # added to a residual that drifted by r: the fit takes up what of r the inputs can explain
    r = xs @ rng.standard_normal((64, 48)) * 0.05 + rng.standard_normal((len(xs), 48))
    got = teacher_weight(w, xs.T @ xs, xs.T @ xd, xs.T @ r).astype(np.float64)
    best = np.linalg.lstsq(xs, xd @ w + r, rcond=None)[0]
    plain = teacher_weight(w, xs.T @ xs, xs.T @ xd)
    err, least, plain = (np.linalg.norm(xs @ v - xd @ w - r) for v in (got, best, plain))
    assert least < err < 1.25 * least and err < 0.9 * plain, (err, least, plain)


def test_sequential_pruning_refits_to_the_original_model():
    kw = {"passes": ["prune"], "prune": "unstructured", "sparsity": 0.6, "calibration_data": samples(32),
          "min_cosine": 0.5}
    staged = onnxopt.optimize(mlp(), options={"prune": {"adaptive": False}}, **kw)
    apart = onnxopt.optimize(mlp(), options={"prune": {"adaptive": False, "sequential": False}}, **kw)
    d = staged.details["prune"]
    assert d["sequential"] and not apart.details["prune"]["sequential"]
    assert d["measured_cosine"] > apart.details["prune"]["measured_cosine"]
    w, w0 = weights(staged.model), weights(apart.model)
    np.testing.assert_array_equal(w["w1"] == 0, w0["w1"] == 0)  # the first layer sees the original inputs
    np.testing.assert_allclose(w["w1"], w0["w1"], rtol=1e-4, atol=1e-5)
    assert np.all(np.sum(w["w2"] == 0, axis=0) == round(128 * 0.6))
    assert any("pruned stage by stage against the original model" in line for line in staged.explain)
    again = onnxopt.optimize(staged.model, options={"prune": {"adaptive": False}}, **kw)  # its own teacher
    assert again.passes[0].counts == {}


def skip_chain() -> onnx.ModelProto:
    """fc1 -> Relu -> fc2, + x (a skip), Reshape to fc1's output shape (an int64 tensor computed
    early and read late) -> fc3."""
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), oh.make_node("Shape", ["h"], ["s"]),
             oh.make_node("Relu", ["h"], ["r"]), oh.make_node("MatMul", ["r", "w2"], ["y2"], name="fc2"),
             oh.make_node("Add", ["y2", "x"], ["z"]), oh.make_node("Reshape", ["z", "s"], ["z2"]),
             oh.make_node("MatMul", ["z2", "w3"], ["y"], name="fc3")]
    inits = [weight("w1", [64, 64], 0), weight("w2", [64, 64], 1), weight("w3", [64, 32], 2)]
    graph = oh.make_graph(nodes, "skip", [oh.make_tensor_value_info("x", F, ["N", 64])],
                          [oh.make_tensor_value_info("y", F, ["N", 32])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


# 20000 bytes: two of the 8 KB values fit (the second step's first sample's h and r; at the last
# step, once they are no longer read, the first sample's z2); past the limit values go to a spill
# file, one per step
@pytest.mark.parametrize("limit", [1 << 30, 0, 20000])
def test_forward_steps_give_the_whole_runs_values_as_weights_change(limit):
    import onnx_graphsurgeon as gs

    from onnxopt.graph import import_model
    from onnxopt.passes.quant.calib import Forward, tapped

    model = import_model(skip_chain())
    nodes = {n.name: n for n in model.graph.nodes}
    data = samples(4)
    fw, beside = Forward(data, limit), Forward(data, limit)
    # the third step asks for h again: kept since Shape, not run yet, reads it, and read by none
    # of the step's own nodes
    for names, then_change in ((["x"], "fc1"), (["r"], "fc2"), (["y2", "h"], None), (["z2", "h"], None)):
        # in pairs, as teacher.py runs them: zip never resumes the second after its last sample
        got = list(zip(fw.step(model, names), beside.step(model, names)))
        with tapped(model, names) as run:
            for feeds, pair in zip(data, got):
                want = run(feeds)
                for values in pair:
                    assert set(values) == set(names)
                    assert all(np.array_equal(values[n], want[n]) for n in names)
        assert not fw.open and not beside.open
        if then_change:  # as teacher.py prunes a stage once its inputs are in
            w = nodes[then_change].inputs[1]
            nodes[then_change].inputs[1] = gs.Constant(w.name, np.where(np.abs(w.values) < 0.5, 0, w.values))
    # only what fc3, not run yet, reads is still kept
    assert all(f.kept is not None and all(set(kept) == {"z2"} for kept in f.kept) for f in (fw, beside))
    on_disk = [sum(not isinstance(kept["z2"], np.ndarray) for kept in f.kept) for f in (fw, beside)]
    assert on_disk == {1 << 30: [0, 0], 0: [4, 4], 20000: [3, 3]}[limit]
    for f in (fw, beside):  # the spill files of values no node reads any more are gone
        files = sorted(p.name for p in Path(f.disk.name).iterdir()) if f.disk else []
        assert files == {1 << 30: [], 0: ["2.bin"], 20000: ["2.bin"]}[limit]
        spill = Path(f.disk.name) if f.disk else None
        f.close()  # as leaving teacher.py's `with` block does
        assert f.disk is None and (spill is None or not spill.exists())


def test_spilled_values_stay_readable_while_files_come_and_go():
    # h is read until the last step; r's file goes after the third, and the fourth step's new
    # file must not take the name of y2's, which it reads (it once did, and read back nothing)
    from onnxopt.graph import import_model
    from onnxopt.passes.quant.calib import Forward, tapped

    model, data = import_model(skip_chain()), samples(4)
    steps = (["h"], ["r"], ["y2"], ["z2"])
    with Forward(data, 0) as fw:
        got = [list(fw.step(model, names)) for names in steps]
    with tapped(model, ["h", "r", "y2", "z2"]) as run:
        want = [run(feeds) for feeds in data]
    for names, values in zip(steps, got):
        assert all(np.array_equal(v[n], w[n]) for v, w in zip(values, want) for n in names)


def test_a_forward_step_left_early_makes_later_steps_start_from_the_inputs():
    from onnxopt.graph import import_model
    from onnxopt.passes.quant.calib import Forward, tapped

    model, data = import_model(skip_chain()), samples(4)
    fw = Forward(data, 0)  # every value spilled
    list(fw.step(model, ["r"]))
    spill = Path(fw.disk.name)
    assert [p.name for p in spill.iterdir()] == ["0.bin"]
    for _, _ in zip(range(2), fw.step(model, ["y2"])):  # two samples of four, then left
        pass
    got = list(fw.step(model, ["z2"]))
    assert fw.kept is None and fw.disk is None and not spill.exists()  # kept values and spill files dropped
    with tapped(model, ["z2"]) as run:
        assert all(np.array_equal(g["z2"], run(feeds)["z2"]) for g, feeds in zip(got, data))


def test_inside_a_budget_stage_by_stage_pruning_prunes_further():
    kw = {"passes": ["prune"], "prune": "unstructured", "min_cosine": 0.95, "calibration_data": samples(32)}
    on = onnxopt.optimize(mlp(), options={"prune": {"adaptive": False}}, **kw)
    off = onnxopt.optimize(mlp(), options={"prune": {"adaptive": False, "sequential": False}}, **kw)
    a, b = on.details["prune"], off.details["prune"]
    assert a["sequential"] and not b["sequential"]
    assert a["sparsity"] > b["sparsity"] and a["zeros"] > b["zeros"]  # 0.550 against 0.505
    assert a["measured_cosine"] >= 0.95 and b["measured_cosine"] >= 0.95
    assert any("stage by stage, the largest sparsity inside the budget" in line for line in on.explain)
    w = weights(on.model)
    assert a["zeros"] == sum(int(np.sum(x == 0)) for x in w.values())
