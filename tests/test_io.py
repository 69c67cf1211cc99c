"""Load and save: what a round trip through onnxopt keeps, IR and opset versions, external data in
and out, atomic writes (io.PendingOutput) and the automatic external-data decision."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import onnxopt
import onnxopt.io as io
from models.builders import from_text, ops, run
from onnxopt.errors import ModelError, OnnxoptError, UsageError
from onnxopt.verify import RuntimeUnavailable

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def optimize_file(model: onnx.ModelProto, folder, passes=("fold", "cleanup"), **kwargs):
    """Save, optimize file to file, load the result: (optimized model, Result)."""
    src, dst = folder / "in.onnx", folder / "out.onnx"
    onnx.save(model, src)
    result = onnxopt.optimize(src, dst, passes=list(passes), **kwargs)
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds, exact=False):
    want, got = run(a, feeds), run(b, feeds)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        if exact:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def x23(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------- model fields


FULL_TEXT = """
<ir_version: 10, opset_import: ["" : 21, "local" : 1], producer_name: "tester", producer_version: "9.9",
 model_version: 42, domain: "ai.test.models", doc_string: "the model's doc">
main_graph (float[2,3] x) => (float[2,3] y)
<float[2,3] t>
{
  c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
  t = Add(x, c)
  u = Identity(t)
  y = local.Scale2(u)
}
<domain: "local", opset_import: ["" : 21]>
Scale2 (a) => (b) {
  two = Constant<value_float = 2.0>()
  b = Mul(a, two)
}
"""


@pytest.fixture
def full_model():
    m = from_text(FULL_TEXT)
    oh.set_model_props(m, {"author": "me", "licence": "Apache-2.0"})
    m.graph.doc_string = "the graph's doc"
    m.graph.metadata_props.add(key="graph_key", value="graph_value")
    return m


def test_round_trip_keeps_model_level_fields(full_model, tmp_path):
    out, result = optimize_file(full_model, tmp_path)
    assert out.ir_version == 10
    assert (out.producer_name, out.producer_version) == ("tester", "9.9")
    assert out.model_version == 42
    assert out.domain == "ai.test.models"
    assert out.doc_string == "the model's doc"
    assert [(p.key, p.value) for p in out.metadata_props] == [("author", "me"), ("licence", "Apache-2.0")]
    assert out.graph.name == "main_graph"
    assert out.graph.doc_string == "the graph's doc"
    assert [(p.key, p.value) for p in out.graph.metadata_props] == [("graph_key", "graph_value")]
    assert sorted((o.domain, o.version) for o in out.opset_import) == [("", 21), ("local", 1)]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert out.graph.output[0] == full_model.graph.output[0]
    assert out.graph.input[0] == full_model.graph.input[0]
    assert result.verification["skipped"] is None


def test_round_trip_keeps_value_info_the_input_had_and_adds_none(full_model, tmp_path):
    out, _ = optimize_file(full_model, tmp_path)
    assert ops(out) == ["Add", "Scale2"]  # u = Identity(t) removed, so t is still an intermediate
    assert [vi.name for vi in out.graph.value_info] == ["t"]
    assert out.graph.value_info[0] == full_model.graph.value_info[0]


def test_model_local_function_is_kept_and_called(full_model, tmp_path):
    out, _ = optimize_file(full_model, tmp_path)
    assert [(f.domain, f.name) for f in out.functions] == [("local", "Scale2")]
    assert out.functions[0] == full_model.functions[0]  # bodies are left untouched, Constant included
    (call,) = [n for n in out.graph.node if n.op_type == "Scale2"]
    assert call.domain == "local"
    assert_same_outputs(full_model, out, {"x": x23()}, exact=True)


def test_custom_domain_opset_import_is_kept_when_its_op_is_removed(tmp_path):
    # A custom domain with no op left is still imported: the output keeps the input's opset imports.
    m = from_text('<ir_version: 8, opset_import: ["" : 17, "com.example" : 3]>\n'
                  "g (float[2,3] x) => (float[2,3] y) { y = Identity(x) }")
    out, _ = optimize_file(m, tmp_path, passes=["cleanup"])
    assert sorted((o.domain, o.version) for o in out.opset_import) == [("", 17), ("com.example", 3)]


def test_constant_node_that_is_a_graph_output_stays_a_node(tmp_path):
    m = from_text(HEADER + """
g (float[2,3] x) => (float[2,3] y, float[3] k) {
  k = Constant<value = float[3] {1.0, 2.0, 3.0}>()
  y = Add(x, k)
}""")
    out, result = optimize_file(m, tmp_path)
    assert ops(out) == ["Constant", "Add"]
    assert [o.name for o in out.graph.output] == ["y", "k"]
    assert numpy_helper.to_array(out.graph.node[0].attribute[0].t).tolist() == [1.0, 2.0, 3.0]
    assert_same_outputs(m, out, {"x": x23()}, exact=True)


# ----------------------------------------------------------------------------------- subgraphs


IF_TEXT = HEADER + """
g (bool c, float[3] x) => (float[3] y) {
  k = Constant<value = float[3] {1.0, 2.0, 3.0}>()
  y = If(c) <then_branch = then_g () => (float[3] a) {
      i = Identity(k)
      a = Add(x, i)
    }, else_branch = else_g () => (float[3] b) {
      kk = Mul(k, k)
      b = Mul(x, kk)
    }>
}"""

LOOP_TEXT = HEADER + """
g (float[3] x) => (float[3] y, float[4,3] ys) {
  trip = Constant<value = int64 {4}>()
  cond = Constant<value = bool {1}>()
  y, ys = Loop(trip, cond, x) <body = body (int64 i, bool cin, float[3] acc) => (bool cout, float[3] acc2,
                                                                                float[3] so) {
     cout = Identity(cin)
     one = Constant<value = float[3] {1.0, 1.0, 1.0}>()
     two = Add(one, one)
     acc2 = Add(acc, two)
     so = Identity(acc2)
  }>
}"""

SCAN_TEXT = HEADER + """
g (float[3] init, float[4,3] xs) => (float[3] fin, float[4,3] outs) {
  fin, outs = Scan(init, xs) <num_scan_inputs = 1, body = sbody (float[3] s, float[3] xi) => (float[3] s2,
                                                                                              float[3] o) {
     half = Constant<value = float[3] {0.5, 0.5, 0.5}>()
     hh = Identity(half)
     t = Mul(xi, hh)
     s2 = Add(s, t)
     o = Identity(s2)
  }>
}"""


def _body(m, attr):
    (g,) = [a.g for a in m.graph.node[-1].attribute if a.name == attr]
    return [n.op_type for n in g.node]


def test_if_subgraphs_round_trip(tmp_path):
    m = from_text(IF_TEXT)
    out, _ = optimize_file(m, tmp_path)
    assert ops(out) == ["If"]
    assert _body(out, "then_branch") == ["Add"] and _body(out, "else_branch") == ["Mul"]
    x = np.array([0.5, -1.0, 2.0], np.float32)
    for c in (True, False):
        assert_same_outputs(m, out, {"c": np.array(c), "x": x})


def test_loop_subgraph_round_trip(tmp_path):
    m = from_text(LOOP_TEXT)
    out, _ = optimize_file(m, tmp_path)
    assert ops(out) == ["Loop"]
    assert _body(out, "body") == ["Identity", "Add", "Identity"]  # body outputs keep their names
    assert_same_outputs(m, out, {"x": np.array([0.5, -1.0, 2.0], np.float32)}, exact=True)


def test_scan_subgraph_round_trip(tmp_path):
    m = from_text(SCAN_TEXT)
    out, _ = optimize_file(m, tmp_path)
    assert ops(out) == ["Scan"]
    assert _body(out, "body") == ["Mul", "Add", "Identity"]
    feeds = {"init": np.zeros(3, np.float32), "xs": np.arange(12, dtype=np.float32).reshape(4, 3)}
    assert_same_outputs(m, out, feeds, exact=True)


# ----------------------------------------------------------------------------------- IR and opset


def _versioned(ir: int, opset: int) -> onnx.ModelProto:
    """y = Relu(x * (w * c) + b) with an Identity: ops that exist from opset 7 on. IR 3 lists the
    initializers among the graph inputs, as it requires."""
    w = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "w")
    b = numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float32), "b")
    c = numpy_helper.from_array(np.array([2.0, 2.0, 2.0], np.float32), "cv")
    nodes = [oh.make_node("Constant", [], ["c"], value=c), oh.make_node("Mul", ["w", "c"], ["wc"]),
             oh.make_node("Mul", ["x", "wc"], ["m"]), oh.make_node("Add", ["m", "b"], ["a"]),
             oh.make_node("Identity", ["a"], ["i"]), oh.make_node("Relu", ["i"], ["y"])]
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    if ir < 4:
        inputs += [oh.make_tensor_value_info(t.name, TensorProto.FLOAT, [3]) for t in (w, b)]
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w, b])
    return oh.make_model(graph, ir_version=ir, opset_imports=[oh.make_opsetid("", opset)])


@pytest.mark.parametrize("ir,opset", [(3, 7), (4, 9), (5, 10), (6, 11), (7, 13), (8, 17), (9, 19), (10, 21),
                                      (11, 23)])
def test_ir_and_opset_versions(tmp_path, ir, opset):
    m = _versioned(ir, opset)
    onnx.checker.check_model(m, full_check=True)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    # load/save and the checker must work whatever onnxruntime supports
    loaded = io.load_model(str(src))
    assert loaded == m
    io.save_model(loaded, str(tmp_path / "copy.onnx"))
    assert onnx.load(tmp_path / "copy.onnx") == m
    try:
        run(m, {"x": x23()})
    except RuntimeUnavailable as e:  # pragma: no cover - depends on the installed onnxruntime
        result = onnxopt.optimize(src, dst, verify="none")
        out = onnx.load(dst)
        onnx.checker.check_model(out, full_check=True)
        pytest.skip(f"onnxruntime cannot run IR {ir} / opset {opset}: {e}")
    result = onnxopt.optimize(src, dst)
    assert result.verification["skipped"] is None and result.verification["outputs"][0]["ok"]
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == ir
    assert [(o.domain, o.version) for o in out.opset_import] == [("", opset)]
    assert ops(out) == ["Mul", "Add", "Relu"]
    if ir < 4:  # every initializer is still a graph input, the folded w*c included
        assert sorted(i.name for i in out.graph.input[1:]) == sorted(t.name for t in out.graph.initializer)
        assert out.graph.input[0].name == "x"
    else:
        assert [i.name for i in out.graph.input] == ["x"]
    assert_same_outputs(m, out, {"x": x23()})


# ----------------------------------------------------------------------------------- external data


def _weighted(n=1024) -> onnx.ModelProto:
    """y = x @ w + b with w of n*n floats: big enough for external data, small enough to be fast."""
    m = from_text(HEADER + f"g (float[2,{n}] x) => (float[2,{n}] y) {{ m = MatMul(x, w)\n y = Add(m, b) }}",
                  check=False)
    rng = np.random.default_rng(0)
    m.graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w"),
                                numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")])
    onnx.checker.check_model(m)
    return m


def same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Equal graphs and weights (a tensor read back from external data is stored differently)."""
    def weights(m):
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

    wa, wb = weights(a), weights(b)
    ga, gb = onnx.GraphProto(), onnx.GraphProto()
    ga.CopyFrom(a.graph), gb.CopyFrom(b.graph)
    del ga.initializer[:], gb.initializer[:]
    return (ga == gb and a.opset_import == b.opset_import and a.ir_version == b.ir_version and wa.keys() == wb.keys()
            and all(wa[k].dtype == wb[k].dtype and np.array_equal(wa[k], wb[k]) for k in wa))


def _tensors(model: onnx.ModelProto):
    """Initializers and tensor attributes everywhere: graph, subgraphs, function bodies."""
    def in_nodes(nodes):
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from g.initializer
                    yield from in_nodes(g.node)

    yield from model.graph.initializer
    yield from in_nodes(model.graph.node)
    for f in model.functions:
        yield from in_nodes(f.node)


def _locations(model: onnx.ModelProto) -> set[str]:
    return {e.value for t in _tensors(model) for e in t.external_data if e.key == "location"}


def test_external_data_input(tmp_path, sha256, leftovers):
    m = _weighted(64)
    src = tmp_path / "in.onnx"
    onnx.save(_weighted(64), src, save_as_external_data=True, location="in.weights", size_threshold=0)
    digests = (sha256(src), sha256(tmp_path / "in.weights"))
    assert _locations(onnx.load(src, load_external_data=False)) == {"in.weights"}
    result = onnxopt.optimize(src, tmp_path / "out.onnx", passes=["fold", "cleanup"])
    assert result.written == [str(tmp_path / "out.onnx")]  # small: one file
    assert result.before["size"] == os.path.getsize(src) + os.path.getsize(tmp_path / "in.weights")
    out = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert _locations(out) == set()
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    assert_same_outputs(m, out, {"x": x}, exact=True)
    assert (sha256(src), sha256(tmp_path / "in.weights")) == digests
    assert leftovers(tmp_path) == []


def test_external_data_output_from_the_cli(cli, tmp_path, sha256, leftovers):
    m = _weighted(64)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    digest = sha256(src)
    ran = cli(src, "-o", dst, "--external-data", "-q")
    assert (ran.code, ran.err) == (0, "")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx", "out.onnx.data"]
    out = onnx.load(dst, load_external_data=False)
    assert _locations(out) == {"out.onnx.data"}
    # tensors of 1 KB and more go out (io.EXTERNAL_THRESHOLD): w, not the 256 bytes of b
    assert {t.name for t in out.graph.initializer if t.data_location == TensorProto.EXTERNAL} == {"w"}
    assert os.path.getsize(tmp_path / "out.onnx.data") == 64 * 64 * 4
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    assert_same_outputs(m, onnx.load(dst), {"x": x}, exact=True)
    from onnxopt.verify import run_model

    np.testing.assert_array_equal(run_model(str(dst), {"x": x})["y"], run(m, {"x": x})["y"])  # ORT from the file
    assert sha256(src) == digest
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("in_cwd", [False, True])
def test_external_data_output_relocates_constants_in_subgraphs_and_functions(tmp_path, leftovers, in_cwd,
                                                                             monkeypatch):
    """Constant values in If branches (graph outputs of the branch: they stay Constant nodes) and in
    function bodies go to the data file too; all of them must point at the final data file name.
    in_cwd: the output named relative to the working directory (where onnx's own conversion
    refuses the data file it finds there)."""
    big = numpy_helper.from_array(np.arange(600, dtype=np.float32), "big")
    ones = numpy_helper.from_array(np.ones(600, np.float32), "ones")
    then_g = oh.make_graph([oh.make_node("Constant", [], ["t"], value=big)], "then", [],
                           [oh.make_tensor_value_info("t", TensorProto.FLOAT, [600])])
    else_g = oh.make_graph([oh.make_node("Constant", [], ["e"], value=ones)], "else", [],
                           [oh.make_tensor_value_info("e", TensorProto.FLOAT, [600])])
    fn = oh.make_function("local", "AddBig", ["a"], ["b"],
                          [oh.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
                              np.full(600, 3, np.float32), "k")), oh.make_node("Add", ["a", "k"], ["b"])],
                          [oh.make_opsetid("", 17)])
    graph = oh.make_graph([oh.make_node("If", ["c"], ["z"], then_branch=then_g, else_branch=else_g),
                           oh.make_node("AddBig", ["z"], ["y"], domain="local")], "g",
                          [oh.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [600])])
    m = oh.make_model(graph, ir_version=8, functions=[fn],
                      opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("local", 1)])
    onnx.checker.check_model(m, full_check=True)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    if in_cwd:
        monkeypatch.chdir(tmp_path)
    result = onnxopt.optimize(src, "out.onnx" if in_cwd else dst, external_data=True)
    assert [os.path.abspath(p) for p in result.written] == [str(dst), str(tmp_path / "out.onnx.data")]
    out = onnx.load(dst, load_external_data=False)
    external = [t for t in _tensors(out) if t.data_location == TensorProto.EXTERNAL]
    assert len(external) == 3
    assert _locations(out) == {"out.onnx.data"}
    for c in (True, False):
        assert_same_outputs(m, onnx.load(dst), {"c": np.array(c)}, exact=True)
    assert leftovers(tmp_path) == []


def test_pending_output_with_external_data(tmp_path, leftovers):
    m = _weighted(64)
    dst = tmp_path / "out.onnx"
    pending = io.PendingOutput(m, str(dst), external_data=True)
    assert not dst.exists() and not (tmp_path / "out.onnx.data").exists()
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(pending.tmp_model),
                                                   os.path.basename(pending.tmp_data)])
    assert os.path.basename(pending.tmp_model).startswith(".out.onnx.") and pending.tmp_model.endswith(".tmp")
    assert pending.tmp_data == pending.tmp_model + ".data"
    # before the commit the temporary model points at the temporary data: it loads and runs
    tmp = onnx.load(pending.tmp_model, load_external_data=False)
    assert _locations(tmp) == {os.path.basename(pending.tmp_data)}
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    from onnxopt.verify import run_model

    np.testing.assert_array_equal(run_model(pending.tmp_model, {"x": x})["y"], run(_weighted(64), {"x": x})["y"])
    written = pending.commit()
    assert written == [str(dst), str(tmp_path / "out.onnx.data")]
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    assert _locations(onnx.load(dst, load_external_data=False)) == {"out.onnx.data"}
    np.testing.assert_array_equal(run_model(str(dst), {"x": x})["y"], run(_weighted(64), {"x": x})["y"])


@pytest.mark.parametrize("external_data", [False, True])
def test_pending_output_discard_leaves_nothing(tmp_path, external_data):
    (tmp_path / "out.onnx").write_bytes(b"previous output")
    pending = io.PendingOutput(_weighted(64), str(tmp_path / "out.onnx"), external_data=external_data)
    assert len(os.listdir(tmp_path)) == (3 if external_data else 2)
    pending.discard()
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert (tmp_path / "out.onnx").read_bytes() == b"previous output"


def test_pending_output_replaces_an_existing_output(tmp_path):
    (tmp_path / "out.onnx").write_bytes(b"previous output")
    io.PendingOutput(_weighted(8), str(tmp_path / "out.onnx")).commit()
    assert same_model(onnx.load(tmp_path / "out.onnx"), _weighted(8))
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_automatic_external_data_decision(tmp_path, monkeypatch):
    small, big = _weighted(8), _weighted(64)  # 8*8 floats = 256 B of weights; 64*64 floats = 16 KB
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 4096)
    assert io._fits_protobuf(small) and not io._fits_protobuf(big)
    assert io.save_model(small, str(tmp_path / "small.onnx")) == [str(tmp_path / "small.onnx")]
    assert io.save_model(big, str(tmp_path / "big.onnx")) == [str(tmp_path / "big.onnx"),
                                                              str(tmp_path / "big.onnx.data")]
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data", "small.onnx"]
    assert same_model(onnx.load(tmp_path / "big.onnx"), _weighted(64))
    assert same_model(onnx.load(tmp_path / "small.onnx"), small)


def test_forced_external_data(tmp_path):
    assert io.save_model(_weighted(32), str(tmp_path / "a.onnx"), external_data=True) == [
        str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx.data")]
    assert os.path.getsize(tmp_path / "a.onnx.data") == 32 * 32 * 4
    assert same_model(onnx.load(tmp_path / "a.onnx"), _weighted(32))
    # no tensor of 1 KB or more: nothing to move, no data file, and no crash
    assert io.save_model(_weighted(8), str(tmp_path / "b.onnx"), external_data=True) == [str(tmp_path / "b.onnx")]
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "a.onnx.data", "b.onnx"]
    assert same_model(onnx.load(tmp_path / "b.onnx"), _weighted(8))


def test_automatic_external_data_through_optimize(tmp_path, monkeypatch, leftovers):
    """Above the (lowered) protobuf limit optimize writes external data by itself, and verification
    reaches onnxruntime through a file with external data too."""
    m = _weighted(64)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 4096)
    result = onnxopt.optimize(src, dst)
    assert result.written == [str(dst), str(tmp_path / "out.onnx.data")]
    assert result.verification["outputs"][0]["ok"] and result.verification["outputs"][0]["max_abs"] == 0.0
    assert result.after["size"] == os.path.getsize(dst) + os.path.getsize(tmp_path / "out.onnx.data")
    assert _locations(onnx.load(dst, load_external_data=False)) == {"out.onnx.data"}
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    assert_same_outputs(m, onnx.load(dst), {"x": x}, exact=True)
    assert leftovers(tmp_path) == []


def _external_weights_model(folder, n: int, count: int) -> onnx.ModelProto:
    """y = x @ w0 @ w1 ... with `count` n*n float weights, each filled with a different value (so
    cleanup does not merge them), written straight to w.bin (never held in a proto), as a model
    over 2 GB must be stored."""
    names = [f"w{i}" for i in range(count)]
    lines, prev = [], "x"
    for i, w in enumerate(names):
        out = "y" if i == count - 1 else f"h{i}"
        lines.append(f"{out} = MatMul({prev}, {w})")
        prev = out
    body = "\n".join(lines)
    m = from_text(HEADER + f"g (float[1,{n}] x) => (float[1,{n}] y) {{ {body} }}", check=False)
    block = np.empty((n, n), np.float32)
    with open(folder / "w.bin", "wb") as f:
        for i, name in enumerate(names):
            block.fill((i + 1) / n)
            w = m.graph.initializer.add()
            w.name, w.data_type, w.data_location = name, TensorProto.FLOAT, TensorProto.EXTERNAL
            w.dims.extend([n, n])
            w.external_data.add(key="location", value="w.bin")
            w.external_data.add(key="offset", value=str(i * block.nbytes))
            w.external_data.add(key="length", value=str(block.nbytes))
            block.tofile(f)
    onnx.save(m, folder / "in.onnx")
    return m


@pytest.mark.slow
def test_model_over_two_gigabytes(tmp_path, leftovers):
    """Three 784 MiB weights (2.3 GiB) in external data in, external data out without being asked:
    the protobuf limit never applies. About a minute and 8 GB of memory."""
    n, count = 14 * 1024, 3
    _external_weights_model(tmp_path, n, count)
    result = onnxopt.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", passes=["cleanup"])
    assert result.written == [str(tmp_path / "out.onnx"), str(tmp_path / "out.onnx.data")]
    assert os.path.getsize(tmp_path / "out.onnx.data") == count * n * n * 4
    assert result.verification["outputs"][0]["ok"] and result.verification["outputs"][0]["max_abs"] == 0.0
    assert result.before["size"] == os.path.getsize(tmp_path / "in.onnx") + count * n * n * 4
    assert _locations(onnx.load(tmp_path / "out.onnx", load_external_data=False)) == {"out.onnx.data"}
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_single_tensor_over_two_gigabytes(tmp_path):
    _external_weights_model(tmp_path, 24 * 1024, 1)  # one 2.25 GiB weight
    result = onnxopt.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", passes=["cleanup"])
    assert result.written == [str(tmp_path / "out.onnx"), str(tmp_path / "out.onnx.data")]


# ----------------------------------------------------------------------------------- paths and errors


def test_check_output_path(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(b"x")
    io.check_output_path(str(src), str(tmp_path / "new.onnx"))  # fine: nothing raised
    io.check_output_path(None, str(tmp_path / "new.onnx"))
    with pytest.raises(UsageError, match="output path is the input path"):
        io.check_output_path(str(src), str(tmp_path / "sub" / ".." / "in.onnx"))
    with pytest.raises(UsageError, match="output path is a folder"):
        io.check_output_path(str(src), str(tmp_path))
    with pytest.raises(OnnxoptError, match="folder does not exist"):
        io.check_output_path(str(src), str(tmp_path / "sub" / "out.onnx"))
    with pytest.raises(OnnxoptError, match="not a folder"):
        io.check_output_path(str(src), str(src / "out.onnx"))


def test_load_model_errors_are_model_errors(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="input file is empty"):
        io.load_model(str(tmp_path / "empty.onnx"))
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        io.load_model(str(tmp_path / "junk.onnx"))
    with pytest.raises(UsageError, match="input file not found"):
        io.load_model(str(tmp_path / "nope.onnx"))


def test_check_model_message_is_one_line_with_the_whole_reason():
    m = from_text(HEADER + "g (float[2] x) => (float[2] y) { y = Add(x, nothere) }", check=False)
    with pytest.raises(ModelError) as e:
        io.check_model(m)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("model fails onnx.checker: Nodes in a graph must be topologically sorted")
    assert str(e.value).endswith("is not output of any previous nodes.")


def test_write_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.DataSink, "_put", full_disk)
    with pytest.raises(OnnxoptError, match=r"cannot write output .*out\.onnx: No space left on device"):
        io.save_model(_weighted(64), str(tmp_path / "out.onnx"), external_data=True)
    assert os.listdir(tmp_path) == []


def test_single_file_output_streams_large_tensors_after_the_model(tmp_path):
    """Tensors of 1 KiB or more are appended after the serialized model as extra graph records
    (protobuf merges them into the one graph): the file loads, passes the checker and holds every
    initializer with its values, in a deterministic order."""
    big = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 100
    m = from_text(HEADER + """g (float[2,64] x) => (float[2,8] y) <float[8] b = {1, 2, 3, 4, 5, 6, 7, 8}> {
        h = MatMul(x, w)
        y = Add(h, b)
    }""", check=False)
    m.graph.initializer.append(onnx.numpy_helper.from_array(big, "w"))
    onnx.save(m, tmp_path / "in.onnx")
    onnxopt.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", passes=["cleanup"])
    onnxopt.optimize(tmp_path / "in.onnx", tmp_path / "again.onnx", passes=["cleanup"])
    assert (tmp_path / "out.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()
    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    assert [t.name for t in out.graph.initializer] == ["b", "w"]  # the streamed one last
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out.graph.initializer[1]), big)
    assert [i.name for i in out.graph.input] == ["x"]
    assert sorted(os.listdir(tmp_path)) == ["again.onnx", "in.onnx", "out.onnx"]


def test_external_weights_are_read_only_when_looked_at(tmp_path):
    """optimize() keeps a model's external weights in their file: import marks them with the
    model's folder, graph.values reads them from there, and the streamed output copies them."""
    from onnxopt.graph import import_model, values

    _external_weights_model(tmp_path, 64, 2)
    proto, _ = io.load_model_sized(str(tmp_path / "in.onnx"), keep_external=True)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in proto.graph.initializer)
    m = import_model(proto, base_dir=str(tmp_path))
    w1 = m.graph.tensors()["w1"]
    np.testing.assert_array_equal(values(w1), np.full((64, 64), 2 / 64, np.float32))
    result = onnxopt.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", passes=["cleanup"], external_data=True)
    assert result.verification["outputs"][0]["max_abs"] == 0.0
    out = onnx.load(tmp_path / "out.onnx")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out.graph.initializer[1]), values(w1))


def test_node_metadata_props_survive_the_passes():
    """gs drops a node's metadata_props; import/export keep them (onnxruntime's layer_ann, exporters'
    source locations), in the main graph and in subgraphs."""
    then_g = oh.make_graph([oh.make_node("Relu", ["x"], ["o"], name="inner")], "then", [],
                           [oh.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    else_g = oh.make_graph([oh.make_node("Neg", ["x"], ["o2"])], "else", [],
                           [oh.make_tensor_value_info("o2", TensorProto.FLOAT, [2])])
    nodes = [oh.make_node("Relu", ["x"], ["r"], name="relu"), oh.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
             oh.make_node("Greater", ["s", "zero"], ["c"]),
             oh.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          [oh.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model.graph.node[0].metadata_props.add(key="source", value="layer.py:12")
    model.graph.node[3].attribute[0].g.node[0].metadata_props.add(key="layer_ann", value="branch")
    out = onnxopt.optimize(model, passes=["fold", "cleanup", "fuse"]).model
    relu = next(n for n in out.graph.node if n.name == "relu")
    assert {e.key: e.value for e in relu.metadata_props} == {"source": "layer.py:12"}
    inner = next(n for n in out.graph.node if n.op_type == "If").attribute[0].g.node[0]
    assert {e.key: e.value for e in inner.metadata_props} == {"layer_ann": "branch"}
