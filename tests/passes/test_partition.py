"""partition: device specs, the cost model, the partitioner (min-cut, pins, islands), the annotations
onnxruntime reads, and split execution."""

import dataclasses
import itertools
import json
import os
import warnings

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import onnxopt
from models.builders import run
from onnxopt.errors import UsageError
from onnxopt.graph import import_model
from onnxopt.passes.partition import load_devices, specs
from onnxopt.passes.partition.cost import NodeCost, node_costs, tensor_infos
from onnxopt.passes.partition.plan import Problem, assign_devices, make_plan, parse_pins, plan_cost, runs
from onnxopt.passes.partition.split import PartitionedSession, write_split
from onnxopt.verify import reference_options

F = onnx.TensorProto.FLOAT


def weight(name, shape, seed):
    return oh.make_tensor(name, F, shape, np.random.default_rng(seed).standard_normal(shape).astype(np.float32).ravel())


def chain(ops=("MatMul", "Softmax", "MatMul", "Relu"), width=256, rows=128) -> onnx.ModelProto:
    """x -> op -> op ... -> y; MatMul reads a [width, width] weight."""
    nodes, inits, prev = [], [], "x"
    for i, op in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        if op == "MatMul":
            inits.append(weight(f"w{i}", [width, width], i))
            nodes.append(oh.make_node("MatMul", [prev, f"w{i}"], [out], name=f"n{i}_{op}"))
        else:
            nodes.append(oh.make_node(op, [prev], [out], name=f"n{i}_{op}"))
        prev = out
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", F, [rows, width])],
                          [oh.make_tensor_value_info("y", F, [rows, width])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def accel(ops, **extra) -> dict:
    """A user spec: a fast device that runs only `ops`."""
    return {"name": "npu", "designator": "npu", "provider": "NpuExecutionProvider", "ops": list(ops),
            "throughput": {"default": 1e13, "matmul": 1e14}, "bandwidth": 1e12, "launch": 1e-6,
            "link": {"bandwidth": 1e10, "latency": 1e-6}, **extra}


def spec_file(tmp_path, data, name="npu.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def annotations(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    out = []
    for node in model.graph.node:
        meta = {e.key: e.value for e in node.metadata_props}
        out.append((node.name, meta.get("onnxopt.device"), meta.get("layer_ann")))
    return out


def feeds(seed=0, shape=(128, 256)):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


# ------------------------------------------------------------------------------------ specs


def test_builtin_cpu_spec_is_the_runtime_kernel_registry():
    cpu = specs.builtin("cpu")
    assert cpu.host and cpu.provider == "CPUExecutionProvider"
    assert "kernel registry" in cpu.source
    assert cpu.refusal("Conv", 11, {"float32"}) is None
    assert cpu.refusal("Conv", 11, {"int8"}) == "cpu has no Conv for int8"
    assert cpu.refusal("NoSuchOp", 11, set()) == "cpu has no NoSuchOp"


def test_builtin_cuda_and_tensorrt_specs_from_the_documented_lists():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime registers CUDA kernels: the spec comes from them")
    cuda = specs.builtin("cuda")
    assert "OperatorKernels.md" in cuda.source and not cuda.host
    assert cuda.refusal("com.microsoft.Attention", 1, {"float16"}) is None
    assert cuda.refusal("Conv", 11, {"float16"}) is None
    trt = specs.builtin("tensorrt")
    assert trt.max_opset is not None
    assert "opsets up to" in trt.refusal("Conv", trt.max_opset + 1, {"float32"})


def test_user_spec_json_and_yaml_agree(tmp_path):
    data = accel(["MatMul", "Relu"], types=["float32", "float16"], max_opset=17)
    a = specs.load(spec_file(tmp_path, data))
    yaml_text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in data.items())
    (tmp_path / "npu.yaml").write_text(yaml_text)
    b = specs.load(str(tmp_path / "npu.yaml"))
    assert dataclasses.replace(b, source=a.source) == a
    assert a.refusal("MatMul", 13, {"float32"}) is None
    assert a.refusal("MatMul", 13, {"int8"}) == "npu has no MatMul for int8"
    assert a.refusal("Softmax", 13, {"float32"}) == "npu has no Softmax"
    assert a.link == specs.Link(1e10, 1e-6)


def test_user_spec_based_on_a_builtin_less_some_ops(tmp_path):
    s = specs.load(spec_file(tmp_path, {"name": "gpu", "provider": "CUDAExecutionProvider", "based_on": "cuda",
                                        "exclude_ops": ["Softmax"]}))
    assert "Softmax" not in s.ops and "MatMul" in s.ops
    assert s.throughput == specs.builtin("cuda").throughput


@pytest.mark.parametrize("content, name, message", [
    ('{"name": "npu", "provider": "P", "ops": ["Convv"]}', "a.json", "unknown operator 'Convv' (did you mean 'Conv'?)"),
    ('{"name": "npu", "provider": "P", "ops": ["Conv"], "speed": 1}', "a.json", "unknown key 'speed'"),
    ('{"name": "npu", "provider": "P"', "a.json", "is not valid JSON"),
    ("name: npu\nops: [Conv\n", "a.yaml", "is not valid YAML"),
    ('{"provider": "P", "ops": ["Conv"]}', "a.json", "'name' is required"),
    ('{"name": "n p", "provider": "P", "ops": ["Conv"]}', "a.json", "bad name 'n p'"),
    ('{"name": "npu", "provider": "P", "ops": {"Conv": {"types": ["flaot32"]}}}', "a.json",
     "unknown type 'flaot32' in ops.Conv.types (did you mean 'float32'?)"),
    ('{"name": "npu", "provider": "P", "ops": ["Conv"], "bandwidth": -1}', "a.json", "bandwidth must be a positive"),
    ('{"name": "npu", "provider": "P", "ops": ["Conv"], "throughput": {"gemm": 1}}', "a.json",
     "throughput class 'gemm' unknown"),
    ('{"name": "npu", "provider": "P"}', "a.json", "give 'ops'"),
    ('[1, 2]', "a.json", "expected a mapping"),
])
def test_bad_spec_files(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=None) as e:
        specs.load(str(tmp_path / name))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_device_names():
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        load_devices("tpu,cpu")
    with pytest.raises(UsageError, match="names 'cpu' twice"):
        load_devices("cpu,cpu")
    with pytest.raises(UsageError, match="device spec file not found"):
        load_devices("missing.json")
    assert [d.name for d in load_devices("cuda")] == ["cuda", "cpu"]  # the host is always there


# ------------------------------------------------------------------------------- cost model


def test_cost_model_counts_operations_and_bytes():
    x = oh.make_tensor_value_info("x", F, [1, 3, 16, 16])
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("Flatten", ["r"], ["f"]),
             oh.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    graph = oh.make_graph(nodes, "g", [x], [oh.make_tensor_value_info("y", F, [1, 10])],
                          [weight("w", [8, 3, 3, 3], 0), weight("g", [10, 8 * 16 * 16], 1)])
    m = import_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    infos = tensor_infos(m, {"x": np.zeros((1, 3, 16, 16), np.float32)})
    conv, relu, flatten, gemm = node_costs(m.graph, infos)
    assert conv.ops == 2 * (8 * 16 * 16) * (3 * 3 * 3) and conv.kind == "conv"
    assert conv.nbytes == 4 * (3 * 16 * 16 + 8 * 27 + 8 * 16 * 16)
    assert relu.ops == 8 * 16 * 16 and relu.kind == "default"
    assert gemm.ops == 2 * 10 * 2048 and gemm.kind == "matmul"
    assert all(c.known for c in (conv, relu, flatten, gemm))
    cpu = specs.builtin("cpu")
    assert gemm.seconds(cpu) == pytest.approx(cpu.launch + max(gemm.ops / 1e11, gemm.nbytes / 2e10))


def test_cost_model_takes_an_unknown_shape_from_the_largest_input():
    m = import_model(chain(("MatMul", "Relu")))
    infos = tensor_infos(m, None)
    del infos["t0"]
    for t in m.graph.tensors().values():
        if t.name == "t0":
            t.shape = None
    matmul, relu = node_costs(m.graph, infos)
    assert matmul.ops == 2 * 128 * 256 * 256 and matmul.known  # t0 takes x's shape, not the weight's
    assert relu.ops == 128 * 256


# ------------------------------------------------------------------------------ partitioner


def problem(model, devices, pins=(), feed_shape=(128, 256), costs=None):
    m = import_model(model)
    infos = tensor_infos(m, {"x": np.zeros(feed_shape, np.float32)})
    costs = costs or node_costs(m.graph, infos)
    return Problem(m.graph, devices, costs, infos, parse_pins(pins), {"": 17})


def random_dag(seed: int, n: int = 8) -> onnx.ModelProto:
    """Relu/Add nodes reading random earlier tensors; every tensor [4, 4]."""
    rng = np.random.default_rng(seed)
    names, nodes = ["x"], []
    for i in range(n):
        if i > 0 and rng.random() < 0.5:
            a, b = rng.choice(len(names), 2)
            nodes.append(oh.make_node("Add", [names[a], names[b]], [f"t{i}"], name=f"n{i}"))
        else:
            nodes.append(oh.make_node("Relu", [names[rng.integers(len(names))]], [f"t{i}"], name=f"n{i}"))
        names.append(f"t{i}")
    graph = oh.make_graph(nodes, "dag", [oh.make_tensor_value_info("x", F, [4, 4])],
                          [oh.make_tensor_value_info(names[-1], F, [4, 4])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.mark.parametrize("seed", range(12))
def test_min_cut_finds_the_cheapest_assignment(seed):
    """With one accelerator and the host, the cut is the exact minimum: compared with every one of
    the 2^n assignments, on random DAGs with random node costs and transfer costs."""
    rng = np.random.default_rng(100 + seed)
    model = random_dag(seed)
    costs = [NodeCost(float(rng.uniform(0, 4e7)), float(rng.uniform(0, 4e6)), "default", True) for _ in range(8)]
    link = {"bandwidth": 1e10, "latency": float(rng.uniform(0, 3e-3))}
    devices = [specs.from_dict(accel(["Relu", "Add"], link=link)), specs.builtin("cpu")]
    p = problem(model, devices, feed_shape=(4, 4), costs=costs)
    got = sum(p.total(assign_devices(p))[:2])
    best = min(sum(p.total(list(a))[:2]) for a in itertools.product([0, 1], repeat=8))
    assert got == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_an_unsupported_op_runs_on_the_host_with_its_neighbours_deciding_by_cost():
    devices = [specs.from_dict(accel(["MatMul", "Relu"])), specs.builtin("cpu")]
    p = problem(chain(), devices)
    plan = make_plan(p, min_size=1)
    names = [n.name for n in p.nodes]
    assert names == ["n0_MatMul", "n1_Softmax", "n2_MatMul", "n3_Relu"]
    assert plan.assignment == [0, 1, 0, 0]  # Softmax: only the host has it
    assert [(q.device, len(q.nodes)) for q in plan.partitions] == [("npu", 1), ("cpu", 1), ("npu", 2)]
    assert plan.refusals == {1: {"npu": "npu has no Softmax"}}
    assert plan.transfer_bytes == 4 * 128 * 256 * 4  # x in, t0 out, t1 in, y out


def test_slow_transfers_keep_everything_on_the_host():
    devices = [specs.from_dict(accel(["MatMul", "Relu"], link={"bandwidth": 1e6, "latency": 1e-2})),
               specs.builtin("cpu")]
    plan = make_plan(problem(chain(), devices), min_size=1)
    assert plan.assignment == [1, 1, 1, 1] and len(plan.partitions) == 1 and plan.transfer_bytes == 0


def test_a_small_island_moves_to_its_neighbours_device_when_cheap():
    # cheap elementwise nodes between MatMuls: on their own they would go to the faster device
    model = chain(("MatMul", "Relu", "Softmax", "Relu", "MatMul"))
    devices = [specs.from_dict(accel(["MatMul", "Relu"], throughput={"default": 1e9, "matmul": 1e14})),
               specs.builtin("cpu")]
    p = problem(model, devices)
    assert make_plan(p, min_size=1).assignment[1] == make_plan(p, min_size=1).assignment[3]
    merged = make_plan(p, min_size=4)
    assert [q.device for q in merged.partitions] == ["npu", "cpu", "npu"]
    assert merged.assignment == [0, 1, 1, 1, 0]
    assert plan_cost(p, merged.assignment)[0] <= 1.05 * plan_cost(p, assign_devices(p))[0]


def test_an_island_no_neighbour_can_run_is_reported():
    devices = [specs.from_dict(accel(["MatMul", "Relu"])), specs.builtin("cpu")]
    plan = make_plan(problem(chain(), devices), min_size=4)
    assert [q.device for q in plan.partitions] == ["npu", "cpu", "npu"]
    assert plan.stuck == {0: "moving it would cost too much", 1: "no neighbouring device runs all of its nodes",
                          2: "moving it would cost too much"}  # the MatMuls are far cheaper on the npu


def test_pins_by_op_type_node_name_and_pattern():
    devices = [specs.from_dict(accel(["MatMul", "Relu"])), specs.builtin("cpu")]
    # the Relu alone on the npu would not pay for the transfers
    assert make_plan(problem(chain(), devices, pins=["MatMul=cpu"]), 1).assignment == [1, 1, 1, 1]
    assert make_plan(problem(chain(), devices, pins=["n3_Relu=cpu"]), 1).assignment == [0, 1, 0, 1]
    assert make_plan(problem(chain(), devices, pins=["n0_*=cpu"]), 1).assignment == [1, 1, 0, 0]
    # a later pin wins for the nodes both name
    assert make_plan(problem(chain(), devices, pins=["MatMul=cpu", "n2_MatMul=npu"]), 1).assignment == [1, 1, 0, 0]


@pytest.mark.parametrize("pin, message", [
    ("Softmax=npu", "--pin puts node 'n1_Softmax' (Softmax) on npu, which cannot run it: npu has no Softmax"),
    ("Softmax=tpu", "'tpu' is not among the devices (npu, cpu)"),
    ("Conv=cpu", "no node has that op type or name, nor matches that pattern"),
    ("Softmax", "bad --pin 'Softmax'"),
])
def test_bad_pins(pin, message):
    devices = [specs.from_dict(accel(["MatMul", "Relu"])), specs.builtin("cpu")]
    with pytest.raises(UsageError) as e:
        problem(chain(), devices, pins=[pin])
    assert message in str(e.value)


def test_runs_keep_one_device_while_they_can():
    """Two independent branches alternate devices in graph order; the runs group them."""
    x = oh.make_tensor_value_info("x", F, [128, 256])
    nodes = [oh.make_node("MatMul", ["x", "w0"], ["a"], name="a"), oh.make_node("Softmax", ["x"], ["b"], name="b"),
             oh.make_node("Relu", ["a"], ["c"], name="c"), oh.make_node("Softmax", ["b"], ["d"], name="d"),
             oh.make_node("Add", ["c", "d"], ["y"], name="y")]
    graph = oh.make_graph(nodes, "g", [x], [oh.make_tensor_value_info("y", F, [128, 256])],
                          [weight("w0", [256, 256], 0)])
    devices = [specs.from_dict(accel(["MatMul", "Relu", "Add"])), specs.builtin("cpu")]
    p = problem(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), devices)
    assert runs(p, [0, 1, 0, 1, 0]) == [[0, 2], [1, 3], [4]]


# ------------------------------------------------------------------ the pass: annotations, ORT


def test_annotations_settings_and_model_metadata(tmp_path):
    spec = spec_file(tmp_path, accel(["MatMul", "Relu"]))
    result = onnxopt.optimize(chain(), passes=["partition"], devices=[spec, "cpu"], inputs=feeds())
    out = result.model
    assert result.passes[0].counts == {"nodes_annotated": 4}
    assert annotations(out) == [("n0_MatMul", "npu", "onnxopt/npu/p0"), ("n1_Softmax", "cpu", "onnxopt/cpu/p1"),
                                ("n2_MatMul", "npu", "onnxopt/npu/p2"), ("n3_Relu", "npu", "onnxopt/npu/p2")]
    details = result.details["partition"]
    settings = "npu(onnxopt/npu/); cpu(onnxopt/cpu/)"
    assert details["session_config"] == {"session.layer_assignment_settings": settings}
    assert details["nodes_per_device"] == {"npu": 3, "cpu": 1}
    assert details["ort_fallback"] == {"partitions": 3, "boundary_bytes": 4 * 128 * 256 * 4}
    assert details["unsupported"] == {"npu": {"Softmax": 1}}
    assert [(q["device"], q["inputs"], q["outputs"]) for q in details["partitions"]] == [
        ("npu", ["x"], ["t0"]), ("cpu", ["t0"], ["t1"]), ("npu", ["t1"], ["y"])]
    meta = {e.key: e.value for e in out.metadata_props}
    assert meta["onnxopt.partition.settings"] == settings
    assert json.loads(meta["onnxopt.partition.devices"]) == {
        "cpu": {"designator": "cpu", "provider": "CPUExecutionProvider"},
        "npu": {"designator": "npu", "provider": "NpuExecutionProvider"}}
    assert result.verification["outputs"][0]["max_abs"] == 0.0  # exact: nothing but annotations changed


def test_onnxruntime_accepts_the_annotations_and_places_the_planned_cpu_nodes(tmp_path):
    """Here only the CPU provider exists: every node the plan put on the cpu is on it, and the
    accelerator's nodes fall through to it (onnxruntime skips a rule for a device it lacks)."""
    spec = spec_file(tmp_path, accel(["MatMul", "Relu"]))
    out_path = str(tmp_path / "out.onnx")
    result = onnxopt.optimize(chain(), out_path, passes=["partition"], devices=[spec, "cpu"], inputs=feeds())
    opts = reference_options()
    opts.add_session_config_entry("session.layer_assignment_settings",
                                  result.details["partition"]["session_config"]["session.layer_assignment_settings"])
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(out_path, opts, providers=["CPUExecutionProvider"])
    placed = {n.name: g.ep_name for g in session.get_provider_graph_assignment_info() for n in g.get_nodes()}
    assert placed == {name: "CPUExecutionProvider" for name, _, _ in annotations(result_model(out_path))}
    np.testing.assert_array_equal(session.run(None, feeds())[0], run(chain(), feeds())["y"])


def result_model(path):
    return onnx.load(path)


def test_a_bad_settings_string_would_be_refused_so_ours_is_checked_by_loading(tmp_path):
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.layer_assignment_settings", "cpu(")
    path = str(tmp_path / "m.onnx")
    onnx.save(chain(), path)
    with pytest.raises(Exception, match="layering config"):
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def test_rerun_is_idempotent_and_replaces_foreign_layer_annotations(tmp_path):
    model = chain()
    entry = model.graph.node[0].metadata_props.add()
    entry.key, entry.value = "layer_ann", "encoder"
    spec = spec_file(tmp_path, accel(["MatMul", "Relu"]))
    once = onnxopt.optimize(model, passes=["partition"], devices=[spec, "cpu"], inputs=feeds())
    assert any("had layer_ann 'encoder': replaced" in line for line in once.explain)
    again = onnxopt.optimize(once.model, passes=["partition"], devices=[spec, "cpu"], inputs=feeds())
    assert again.passes[0].counts == {}
    assert again.model.SerializeToString() == once.model.SerializeToString()


def test_options_need_the_partition_pass():
    with pytest.raises(UsageError, match="--pin needs the partition pass"):
        onnxopt.optimize(chain(), passes=["fold"], pins=["Relu=cpu"])
    with pytest.raises(UsageError, match="--devices needs the partition pass"):
        onnxopt.optimize(chain(), passes=["fold"], devices="cuda")


# ------------------------------------------------------------------------------------ split


def if_model() -> onnx.ModelProto:
    """A Softmax on the host between accelerator work, an If whose branches read an outer tensor,
    and a graph output another partition also reads."""
    then_g = oh.make_graph([oh.make_node("Relu", ["a"], ["o"])], "then", [], [oh.make_tensor_value_info("o", F, None)])
    else_g = oh.make_graph([oh.make_node("Neg", ["a"], ["o2"])], "else", [], [oh.make_tensor_value_info("o2", F, None)])
    nodes = [oh.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
             oh.make_node("Softmax", ["a"], ["s"], name="soft"),
             oh.make_node("ReduceSum", ["s"], ["r"], keepdims=0, name="sum"),
             oh.make_node("Greater", ["r", "zero"], ["c"], name="gt"),
             oh.make_node("If", ["c"], ["b"], then_branch=then_g, else_branch=else_g, name="if"),
             oh.make_node("MatMul", ["b", "w1"], ["y"], name="mm1"),
             oh.make_node("Add", ["y", "s"], ["z"], name="add")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", F, [128, 256])],
                          [oh.make_tensor_value_info("y", F, [128, 256]),
                           oh.make_tensor_value_info("z", F, [128, 256])],
                          [weight("w0", [256, 256], 0), weight("w1", [256, 256], 1),
                           oh.make_tensor("zero", F, [], [0.0])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_split_runs_like_the_whole_model(tmp_path):
    spec = spec_file(tmp_path, accel(["MatMul", "Relu", "Neg", "If", "Add"]))
    out = str(tmp_path / "out.onnx")
    split = tmp_path / "parts"
    result = onnxopt.optimize(if_model(), out, passes=["partition"], devices=[spec, "cpu"], inputs=feeds(),
                              split=str(split), options={"partition": {"min_size": 1}})
    assert result.details["partition"]["split"] == {"folder": str(split), "partitions": 4, "max_abs_diff": 0.0}
    manifest = json.loads((split / "manifest.json").read_text())
    # the last Add goes to the cpu: y must reach the host anyway, and s is there
    assert [(p["device"], p["file"], p["inputs"], p["outputs"]) for p in manifest["partitions"]] == [
        ("npu", "p0_npu.onnx", ["x"], ["a"]),
        ("cpu", "p1_cpu.onnx", ["a"], ["s", "c"]),
        ("npu", "p2_npu.onnx", ["c", "a"], ["y"]),  # the If reads `a` from the outer scope
        ("cpu", "p3_cpu.onnx", ["y", "s"], ["z"])]
    assert sorted(os.listdir(split)) == ["manifest.json", "p0_npu.onnx", "p1_cpu.onnx", "p2_npu.onnx", "p3_cpu.onnx"]
    for p in manifest["partitions"]:
        onnx.checker.check_model(onnx.load(str(split / p["file"])), full_check=True)
    with pytest.warns(RuntimeWarning, match="NpuExecutionProvider is not available here: partitions 0, 2 run"):
        session = PartitionedSession(str(split))
    assert session.providers == ["CPUExecutionProvider"] * 4
    for seed in range(3):
        want = run(onnx.load(out), feeds(seed))
        got = session.run(None, feeds(seed))
        # onnxruntime's default options (prepacked kernels) against the reference's; values reach ~100
        np.testing.assert_allclose(got[0], want["y"], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(got[1], want["z"], rtol=1e-4, atol=1e-3)
    exact = PartitionedSession(str(split), {"npu": "CPUExecutionProvider"}, reference_options())
    want = run(onnx.load(out), feeds(7))
    assert all(np.array_equal(g, want[n]) for g, n in zip(exact.run(None, feeds(7)), ["y", "z"]))
    assert [x.shape for x in exact.run(["z"], feeds(7))] == [(128, 256)]


def test_a_lossy_split_is_held_to_the_argmax_agreement_too(tmp_path):
    from onnxopt.errors import VerificationError
    from onnxopt.passes.partition.split import compare_split

    spec = spec_file(tmp_path, accel(["MatMul", "Relu", "Neg", "If", "Add"]))
    split = tmp_path / "parts"
    onnxopt.optimize(if_model(), str(tmp_path / "out.onnx"), passes=["partition"], devices=[spec, "cpu"],
                     inputs=feeds(), split=str(split), options={"partition": {"min_size": 1}})
    session = PartitionedSession(str(split), {"npu": "CPUExecutionProvider"}, reference_options())
    got = dict(zip(["y", "z"], session.run(None, feeds())))
    expected = {k: v.copy() for k, v in got.items()}
    z = expected["z"]
    rows = np.arange(0, 128, 8)  # 16 of 128 rows: their largest value traded with their smallest
    top, low = z[rows].argmax(-1), z[rows].argmin(-1)
    z[rows, top], z[rows, low] = z[rows, low], z[rows, top]
    assert compare_split(str(split), [feeds()], [expected], 0.9)["cosine"] >= 0.9  # the cosine alone passes
    with pytest.raises(VerificationError, match=r"the error budget: 'z' cosine 0\.98\d+, argmax agreement 0\.8750"):
        compare_split(str(split), [feeds()], [expected], 0.9, {"z": (-1, False, False)})
    assert not split.exists()


def test_split_folder_rules(tmp_path):
    spec = spec_file(tmp_path, accel(["MatMul", "Relu"]))
    out = str(tmp_path / "out.onnx")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty and holds no earlier split"):
        onnxopt.optimize(chain(), out, passes=["partition"], devices=[spec, "cpu"], split=str(foreign))
    assert not os.path.exists(out) and (foreign / "notes.txt").read_text() == "mine"
    split = tmp_path / "parts"
    onnxopt.optimize(chain(), out, passes=["partition"], devices=[spec, "cpu"], split=str(split))
    first = sorted(os.listdir(split))
    os.remove(out)
    onnxopt.optimize(chain(), out, passes=["partition"], devices=["cpu"], split=str(split))  # replaces it
    assert first == ["manifest.json", "p0_npu.onnx", "p1_cpu.onnx", "p2_npu.onnx"]
    assert sorted(os.listdir(split)) == ["manifest.json", "p0_cpu.onnx"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".onnxopt-split")]


def test_write_split_needs_annotations(tmp_path):
    path = str(tmp_path / "m.onnx")
    onnx.save(chain(), path)
    with pytest.raises(onnxopt.ModelError, match="run the partition pass first"):
        write_split(path, str(tmp_path / "parts"))
    assert not os.path.exists(tmp_path / "parts")


def test_partitioned_session_errors(tmp_path):
    with pytest.raises(UsageError, match="not a split folder"):
        PartitionedSession(str(tmp_path))
    spec = spec_file(tmp_path, accel(["MatMul", "Relu"]))
    split = str(tmp_path / "parts")
    onnxopt.optimize(chain(), str(tmp_path / "o.onnx"), passes=["partition"], devices=[spec, "cpu"], split=split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = PartitionedSession(split)
    with pytest.raises(UsageError, match="no values for input"):
        session.run(None, {})
    with pytest.raises(UsageError, match="unknown output"):
        session.run(["t0"], feeds())
    assert onnxopt.PartitionedSession is PartitionedSession


def test_three_devices_plan_no_worse_than_the_fallback_and_splits_correctly(tmp_path):
    """Alpha-expansion over an npu that runs only Relu, a gpu that lacks Softmax, and the cpu."""
    npu = spec_file(tmp_path, accel(["Relu"], throughput={"default": 1e14}))
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"name": "gpu", "provider": "CUDAExecutionProvider", "based_on": "cuda",
                               "exclude_ops": ["Softmax"]}))
    model = chain(("MatMul", "Relu", "Softmax", "MatMul", "Relu", "MatMul", "Softmax", "Relu"))
    devices = load_devices([npu, str(gpu), "cpu"])
    p = problem(model, devices)
    plan = make_plan(p, min_size=1)
    assert plan_cost(p, plan.assignment)[0] <= plan_cost(p, [min(ok) for ok in p.allowed])[0]
    assert plan_cost(p, plan.assignment)[0] <= plan_cost(p, [p.host] * len(p.nodes))[0]
    assert all(plan.assignment[i] == 2 for i, n in enumerate(p.nodes) if n.op == "Softmax")
    split = tmp_path / "parts"
    onnxopt.optimize(model, str(tmp_path / "o.onnx"), passes=["partition"], devices=[npu, str(gpu), "cpu"],
                     inputs=feeds(), split=str(split), options={"partition": {"min_size": 1}})
    manifest = json.loads((split / "manifest.json").read_text())
    assert {q["device"] for q in manifest["partitions"]} <= {"npu", "gpu", "cpu"}
    assert sum(q["nodes"] for q in manifest["partitions"]) == 8


# -------------------------------------------------------------------------- per-partition precision


def test_precision_fp16_on_the_accelerator_and_int8_on_the_cpu(tmp_path):
    """float16 for the npu's nodes, dynamic int8 for the cpu's MatMul; each float16 Cast on the side
    of its boundary that makes the crossing tensor float16."""
    spec = spec_file(tmp_path, accel(["MatMul", "Relu", "Cast"], types=["float32", "float16"]))
    split = tmp_path / "parts"
    result = onnxopt.optimize(chain(), str(tmp_path / "o.onnx"), passes=["partition"], devices=[spec, "cpu"],
                              pins=["n2_MatMul=cpu"], inputs=feeds(), split=str(split),
                              options={"partition": {"precision": "npu=fp16,cpu=int8"}})
    counts = result.passes[0].counts
    # the plan: n0 on the npu; Softmax, the pinned n2 and (not worth a transfer alone) Relu on the cpu
    assert counts["nodes_to_fp16"] == 1 and counts["matmul_int8"] == 1
    out = onnx.load(str(tmp_path / "o.onnx"))
    placed = [(n.op_type, {e.key: e.value for e in n.metadata_props}["onnxopt.device"]) for n in out.graph.node]
    assert placed == [
        ("Cast", "cpu"),  # x to float16 before it leaves the host
        ("MatMul", "npu"),
        ("Cast", "cpu"),  # t0 back to float32 after it arrives
        ("Softmax", "cpu"),
        ("DynamicQuantizeLinear", "cpu"), ("MatMulInteger", "cpu"), ("Mul", "cpu"), ("Cast", "cpu"), ("Mul", "cpu"),
        ("Relu", "cpu"),
    ]
    details = result.details["partition"]
    assert details["precision"] == {"npu": "fp16", "cpu": "int8"}
    assert [(q["device"], q["nodes"]) for q in details["partitions"]] == [("cpu", 1), ("npu", 1), ("cpu", 8)]
    (metrics,) = result.verification["outputs"]
    assert metrics["ok"] and 0.99 <= metrics["cosine"] < 1.0  # lossy, inside the default budget
    assert set(details["split"]) == {"folder", "partitions", "cosine"} and details["split"]["cosine"] >= 0.99


def test_precision_obeys_the_budget():
    """The quant pass's measured fallback: under a budget int8 cannot meet, both MatMuls stay float."""
    result = onnxopt.optimize(chain(), passes=["partition"], devices=["cpu"], inputs=feeds(), min_cosine=0.999999,
                              options={"partition": {"precision": "cpu=int8"}})
    assert result.passes[0].counts == {"kept_float_for_budget": 2, "nodes_annotated": 4}
    assert "quant: kept in float for the budget (cosine >= 0.999999): n0_MatMul, n2_MatMul" in result.explain
    assert result.verification["outputs"][0]["max_abs"] == 0.0
    loose = onnxopt.optimize(chain(), passes=["partition"], devices=["cpu"], inputs=feeds(), min_cosine=0.99,
                             options={"partition": {"precision": "cpu=int8"}})
    assert loose.passes[0].counts["matmul_int8"] == 2


@pytest.mark.parametrize("value, message", [
    ("cpu=int4", "bad partition.precision item 'cpu=int4'"),
    ("gpu=fp16", "partition.precision names 'gpu', which is not among the devices (cuda, cpu)"),
    ("fp16", "bad partition.precision item 'fp16'"),
])
def test_bad_precision(value, message):
    with pytest.raises(UsageError) as e:
        onnxopt.optimize(chain(), passes=["partition"], options={"partition": {"precision": value}})
    assert message in str(e.value)
