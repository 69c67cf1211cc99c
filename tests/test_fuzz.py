"""Fuzzing: invalid files through the CLI, random small valid graphs through every lossless pass.

Invalid input (truncated, bit-flipped, random bytes, empty, structurally mutated protobufs, and
named invalid models: dangling inputs, cycles, duplicate names, wrong types...) must end with exit
code 1 or 2, exactly one `onnxopt: error: ...` line on stderr, no traceback, no output or temporary
file, and the input untouched. A mutated file that the checker accepts and onnxruntime runs is not
invalid: it must then be written with its outputs unchanged (`check_mutant` judges each case).

Valid input: random graphs built with onnx.helper (elementwise chains and DAGs, MatMul, Conv with
BatchNormalization / Mul / Add, data-movement ops, Cast round trips, GELU and LayerNorm written
out, constants as initializers or Constant nodes, duplicated subexpressions, If and Loop) go
through each lossless pass of the registry alone, the default set, and all of them together (also
with --target ort). The result must pass onnx.checker's full check, compute the same outputs on
onnxruntime (rtol 1e-4 / atol 1e-5, identical dtype and shape), keep the graph input and output
names, leave the input proto alone, change nothing on a second run (idempotence), and serialize
byte-identically when optimized twice (determinism).

Bugs it found in the passes and the exporter have regression tests at the end of the file.

The default run is bounded and deterministic (hypothesis with derandomize=True, no example
database); `pytest -m slow tests/test_fuzz.py` runs many more examples and seeds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

import onnxopt
from models.builders import run
from onnxopt.pipeline import registry

INT64_MAX = 2**63 - 1


# ----------------------------------------------------------------------------------- helpers


def lossless_pass_sets() -> list[list[str]]:
    """Each lossless pass of the registry alone, the CLI's default set, and all of them together
    (future passes join)."""
    names = [n for n, p in registry().items() if p.tolerance != "lossy"]
    sets = [[n] for n in names] + [["fold", "cleanup"], names]
    return [s for i, s in enumerate(sets) if s not in sets[:i]]


PASS_SETS = lossless_pass_sets()
PASS_IDS = [",".join(s) for s in PASS_SETS]
# Every set with --target onnx, and all passes together with --target ort (com.microsoft ops allowed).
PASS_CASES = [(s, "onnx") for s in PASS_SETS] + [(PASS_SETS[-1], "ort")]
CASE_IDS = [f"{','.join(s)}-{target}" for s, target in PASS_CASES]


def assert_same_outputs(original: onnx.ModelProto, optimized: onnx.ModelProto, feeds: dict) -> None:
    want, got = run(original, feeds), run(optimized, feeds)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


# ----------------------------------------------------------------------------------- invalid files

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# A valid model with a bit of everything for mutations to hit: initializers, a Constant node,
# attributes, an If with two branches, a model-level string field.
GOOD_TEXT = """<ir_version: 8, opset_import: ["" : 17], producer_name: "fuzz", doc_string: "a model to break">
g (float[2,3] x, bool b) => (float[2,3] y, float[3,2] z) <float[3] w = {0.5, -1.0, 2.0}, int64[2] s = {3, 2}> {
  c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
  i = Identity(x)
  a = Add(i, c)
  m = Mul(a, w)
  y = Relu(m)
  t = Transpose<perm = [1, 0]>(m)
  r = Reshape(m, s)
  z = If(b) <then_branch = th () => (float[3,2] tz) { tz = Sigmoid(t) },
             else_branch = el () => (float[3,2] ez) { ez = Sub(t, r) }>
}"""


@pytest.fixture(scope="module")
def good_bytes() -> bytes:
    model = onnx.parser.parse_model(GOOD_TEXT)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@dataclass
class Mutant:
    """A file under test in its own folder (src/in.onnx), with its output folder (out/)."""

    path: object
    out_dir: object
    data: bytes  # what the input file holds, to check it is left unchanged

    @property
    def out(self):
        return self.out_dir / "out.onnx"


def make_mutant(folder, data: bytes) -> Mutant:
    (folder / "src").mkdir(parents=True)
    (folder / "out").mkdir()
    path = folder / "src" / "in.onnx"
    path.write_bytes(data)
    return Mutant(path, folder / "out", data)


def assert_clean_failure(ran, mutant: Mutant, leftovers, codes=(1, 2)) -> str:
    """Exit 1 or 2, exactly one `onnxopt: error:` line, no traceback, nothing written, input unchanged."""
    assert ran.code in codes, ran.err
    assert ran.out == ""
    assert "Traceback" not in ran.err
    lines = ran.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error: "), ran.err
    assert os.listdir(mutant.out_dir) == [] and leftovers(mutant.out_dir) == []
    assert os.listdir(mutant.path.parent) == ["in.onnx"]
    assert mutant.path.read_bytes() == mutant.data
    return lines[0]


def generated_feeds(model: onnx.ModelProto) -> dict:
    """The inputs the CLI generates for this model (onnxopt.verify.make_inputs)."""
    from onnxopt.graph import import_model
    from onnxopt.verify import make_inputs

    return make_inputs(import_model(model).graph)


def _utf8_strings(message) -> bool:
    """Whether every string field holds UTF-8 text, as protobuf requires (Python's parser does not
    check it for proto2 and hands such a field over as bytes)."""
    for fd, value in message.ListFields():
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        values = list(value) if repeated else [value]
        if fd.type == fd.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            return False
        if fd.type == fd.TYPE_MESSAGE and not all(_utf8_strings(v) for v in values):
            return False
    return True


def runs_on_onnxruntime(path) -> dict | None:
    """The feeds, when the file is a valid protobuf (its strings UTF-8) that passes onnx.checker and
    onnxruntime runs on the inputs the CLI would generate; else None."""
    from onnxopt.verify import run_model

    try:
        model = onnx.load(str(path))
        assert _utf8_strings(model)
        onnx.checker.check_model(str(path))
        feeds = generated_feeds(model)
        run_model(str(path), feeds)
    except Exception:  # noqa: BLE001 - any failure means: not a model that runs
        return None
    return feeds


def check_mutant(cli, mutant: Mutant, leftovers) -> str:
    """Run the CLI on a mutated file and judge the outcome precisely:
    - a clean failure is right only for a file that is not a model onnxruntime runs;
    - success must leave a checked output (and no temporary file) with the outputs of the input
      when onnxruntime runs it, or else a printed `verification skipped` warning.
    Returns "error", "written" or "unverified"."""
    ran = cli(mutant.path, "-o", mutant.out)
    feeds = runs_on_onnxruntime(mutant.path)
    if ran.code != 0:
        assert_clean_failure(ran, mutant, leftovers)
        assert feeds is None, f"refused a model that onnxruntime runs: {ran.err}"
        return "error"
    assert "Traceback" not in ran.err and ran.out == ""
    assert os.listdir(mutant.out_dir) == ["out.onnx"] and leftovers(mutant.out_dir) == []
    assert mutant.path.read_bytes() == mutant.data
    onnx.checker.check_model(str(mutant.out))
    if feeds is None:
        assert "onnxopt: warning: verification skipped: onnxruntime cannot load the model" in ran.err, ran.err
        return "unverified"
    assert_same_outputs(onnx.load(str(mutant.path)), onnx.load(str(mutant.out)), feeds)
    return "written"


def test_good_model_is_written(cli, tmp_path, leftovers, good_bytes):
    # The baseline every mutation starts from.
    assert check_mutant(cli, make_mutant(tmp_path, good_bytes), leftovers) == "written"


def test_truncated_files(cli, tmp_path, leftovers, good_bytes):
    """Every cut point of the first 64 bytes, then every 7th: each a clean failure."""
    n = len(good_bytes)
    cuts = sorted(set(range(1, min(n, 64))) | set(range(64, n, 7)) | {n - 2, n - 1})
    outcomes = {cut: check_mutant(cli, make_mutant(tmp_path / f"cut{cut}", good_bytes[:cut]), leftovers)
                for cut in cuts}
    assert set(outcomes.values()) == {"error"}, {c: o for c, o in outcomes.items() if o != "error"}
    assert len(outcomes) > 100


def _flip(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = bytearray(data)
    for _ in range(rng.integers(1, 4)):
        pos = rng.integers(0, len(buf))
        buf[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


def _bit_flip_outcomes(cli, tmp_path, leftovers, good_bytes, seeds) -> dict:
    return {seed: check_mutant(cli, make_mutant(tmp_path / f"seed{seed}", _flip(good_bytes, seed)), leftovers)
            for seed in seeds}


def test_bit_flipped_files(cli, tmp_path, leftovers, good_bytes):
    """1 to 3 flipped bits, 150 seeds: each a clean failure, or (a flip in a value, a name, the
    doc string) a model that is written with its outputs unchanged."""
    outcomes = _bit_flip_outcomes(cli, tmp_path, leftovers, good_bytes, range(150))
    assert outcomes  # judged one by one in check_mutant
    kinds = set(outcomes.values())
    assert "error" in kinds and "written" in kinds, outcomes  # the seeds cover both


@pytest.mark.slow
def test_bit_flipped_files_long(cli, tmp_path, leftovers, good_bytes):
    _bit_flip_outcomes(cli, tmp_path, leftovers, good_bytes, range(150, 3000))


OP_TYPES = ["Relu", "Neg", "Add", "Mul", "Sub", "Identity", "Transpose", "Reshape", "Sigmoid", "MatMul", "Concat",
            "If", "Cast", "Squeeze", "Gather", "Shape"]


def _mutate_fields(data: bytes, seed: int) -> bytes:
    """One structural mutation of the parsed model: the protobuf stays valid, the model may not."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto.FromString(data)
    g = m.graph
    nodes = list(g.node) + [n for node in g.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
                            for n in a.g.node]
    node = nodes[int(rng.integers(len(nodes)))]
    names = sorted({t for n in nodes for t in [*n.input, *n.output]} | {i.name for i in g.input})
    values = list(g.input) + list(g.output)
    kind = int(rng.integers(12))
    if kind == 0:  # a node removed
        del g.node[int(rng.integers(len(g.node)))]
    elif kind == 1:  # two nodes swapped: out of topological order
        i, j = rng.integers(len(g.node), size=2)
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[int(i)])
        b.CopyFrom(g.node[int(j)])
        g.node[int(i)].CopyFrom(b)
        g.node[int(j)].CopyFrom(a)
    elif kind == 2 and node.input:  # an input rewired to another tensor, or to a name nothing defines
        node.input[int(rng.integers(len(node.input)))] = str(rng.choice(names + ["ghost", ""]))
    elif kind == 3:  # another operator
        node.op_type = str(rng.choice(OP_TYPES))
    elif kind == 4:  # another element type
        target = values[int(rng.integers(len(values)))]
        target.type.tensor_type.elem_type = int(rng.integers(0, 17))
    elif kind == 5:  # another dimension
        dims = [d for v in values for d in v.type.tensor_type.shape.dim] + [None]
        dim = dims[int(rng.integers(len(dims)))]
        if dim is None:
            t = g.initializer[int(rng.integers(len(g.initializer)))]
            t.dims[int(rng.integers(len(t.dims)))] = int(rng.integers(0, 7))
        else:
            dim.dim_value = int(rng.integers(0, 7))
    elif kind == 6 and node.attribute:  # an attribute changed or removed
        attr = node.attribute[int(rng.integers(len(node.attribute)))]
        if attr.type == onnx.AttributeProto.INTS and rng.integers(2):
            attr.ints[int(rng.integers(len(attr.ints)))] = int(rng.integers(-3, 4))
        else:
            node.attribute.remove(attr)
    elif kind == 7:  # a node duplicated: its outputs defined twice
        g.node.append(onnx.NodeProto.FromString(node.SerializeToString()))
    elif kind == 8:  # another default-domain opset
        m.opset_import[0].version = int(rng.integers(0, 32))
    elif kind == 9 and g.initializer:  # an initializer removed
        del g.initializer[int(rng.integers(len(g.initializer)))]
    elif kind == 10:  # another IR version
        m.ir_version = int(rng.integers(0, 14))
    else:  # a node output renamed
        node.output[0] = str(rng.choice(names + ["fresh"]))
    return m.SerializeToString()


def _field_mutation_outcomes(cli, tmp_path, leftovers, good_bytes, seeds) -> dict:
    return {seed: check_mutant(cli, make_mutant(tmp_path / f"seed{seed}", _mutate_fields(good_bytes, seed)),
                               leftovers) for seed in seeds}


def test_field_mutations(cli, tmp_path, leftovers, good_bytes):
    """150 structural mutations (valid protobufs): each a clean failure, or a model that onnxruntime
    runs (or cannot load, with the warning) written with its outputs unchanged."""
    outcomes = _field_mutation_outcomes(cli, tmp_path, leftovers, good_bytes, range(150))
    kinds = set(outcomes.values())
    assert "error" in kinds and "written" in kinds, outcomes


@pytest.mark.slow
def test_field_mutations_long(cli, tmp_path, leftovers, good_bytes):
    _field_mutation_outcomes(cli, tmp_path, leftovers, good_bytes, range(150, 3000))


def _random_files():
    rng = np.random.default_rng(0)
    files = {f"random{i}": rng.bytes(int(rng.integers(1, 4096))) for i in range(30)}
    files["zeros"] = bytes(1000)
    files["ones"] = b"\xff" * 1000
    files["one_byte"] = b"\x08"
    files["newline"] = b"\n"
    files["ascii"] = b"ir_version: 8\ngraph { node { op_type: 'Relu' } }\n"  # protobuf text format
    files["zip"] = b"PK\x03\x04" + rng.bytes(200)
    return files


@pytest.mark.parametrize("name", list(_random_files()))
def test_random_bytes(cli, tmp_path, leftovers, name):
    mutant = make_mutant(tmp_path, _random_files()[name])
    line = assert_clean_failure(cli(mutant.path, "-o", mutant.out), mutant, leftovers, codes=(1,))
    assert line.startswith(("onnxopt: error: not a readable ONNX model: ", "onnxopt: error: not an ONNX model ",
                            "onnxopt: error: model fails onnx.checker: ")), line


def test_empty_file(cli, tmp_path, leftovers, assert_error):
    mutant = make_mutant(tmp_path, b"")
    ran = cli(mutant.path, "-o", mutant.out)
    assert_error(ran, 1, f"input file is empty: {mutant.path}")
    assert_clean_failure(ran, mutant, leftovers)


def test_invalid_files_in_subprocesses(cli_subprocess, tmp_path, leftovers, good_bytes):
    """The same judgement through a real process: exit status, stderr in a pipe."""
    for name, data in [("truncated", good_bytes[: len(good_bytes) // 3]), ("flipped", _flip(good_bytes, 3)),
                       ("random", np.random.default_rng(1).bytes(300))]:
        mutant = make_mutant(tmp_path / name, data)
        ran = cli_subprocess(mutant.path, "-o", mutant.out)
        assert_clean_failure(ran, mutant, leftovers, codes=(1,))
        assert ran.err.startswith("onnxopt: error: "), ran.err


# Valid protobufs that are invalid models: (id, model, exit code, fragments of the error line).
X = oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
Y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])


def _model(nodes, outputs=(Y,), inits=(), opset=17, ir=8, inputs=(X,)) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", list(inputs), list(outputs), initializer=list(inits))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)] if opset else [], ir_version=ir)


def _short_raw_data() -> onnx.TensorProto:
    t = onnx.numpy_helper.from_array(np.ones(3, np.float32), "w")
    t.raw_data = t.raw_data[:10]
    return t


def _short_float_data() -> onnx.TensorProto:
    t = oh.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    t.dims[:] = [4]
    return t


W3 = onnx.numpy_helper.from_array(np.ones(3, np.float32), "w")
CHECKER = "model fails onnx.checker: "
INFERENCE = "model fails type and shape inference: "
INVALID_MODELS = [
    ("dangling_input", _model([oh.make_node("Add", ["x", "nope"], ["y"])]), 1,
     [CHECKER, "input 'nope' of node", "is not output of any previous nodes"]),
    ("cycle", _model([oh.make_node("Add", ["x", "b"], ["a"]), oh.make_node("Relu", ["a"], ["b"]),
                      oh.make_node("Identity", ["b"], ["y"])]), 1, [CHECKER, "input 'b' of node"]),
    ("self_loop", _model([oh.make_node("Add", ["x", "y"], ["y"])]), 1, [CHECKER, "input 'y' of node"]),
    ("duplicate_node_output", _model([oh.make_node("Relu", ["x"], ["y"]), oh.make_node("Neg", ["x"], ["y"])]), 1,
     [CHECKER, "single static assignment", "'y' has been used as output names multiple times"]),
    ("node_output_is_graph_input", _model([oh.make_node("Relu", ["x"], ["x"]), oh.make_node("Neg", ["x"], ["y"])]),
     1, [CHECKER, "'x' has been used as output names multiple times"]),
    ("duplicate_initializer", _model([oh.make_node("Add", ["x", "w"], ["y"])], inits=[W3, W3]), 1,
     [CHECKER, "w initializer name is not unique"]),
    ("add_float_int64", _model([oh.make_node("Add", ["x", "w"], ["y"])],
                               inits=[oh.make_tensor("w", TensorProto.INT64, [3], [1, 2, 3])]), 1,
     [INFERENCE, "(op_type:Add): B has inconsistent type tensor(int64)"]),
    ("output_declared_int64", _model([oh.make_node("Relu", ["x"], ["y"])],
                                     outputs=[oh.make_tensor_value_info("y", TensorProto.INT64, [2, 3])]), 1,
     [INFERENCE, "Inferred elem type differs from existing elem type"]),
    ("transpose_perm_out_of_range", _model([oh.make_node("Transpose", ["x"], ["y"], perm=[0, 5])],
                                           outputs=[oh.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])]), 1,
     [INFERENCE, "Invalid attribute perm"]),
    ("matmul_shapes", _model([oh.make_node("MatMul", ["x", "w"], ["y"])], inits=[
        onnx.numpy_helper.from_array(np.ones((4, 2), np.float32), "w")],
        outputs=[oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])]), 1,
     [INFERENCE, "Incompatible dimensions for matrix multiplication"]),
    ("concat_without_axis", _model([oh.make_node("Concat", ["x", "x"], ["y"])],
                                   outputs=[oh.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])]), 1,
     [CHECKER, "Required attribute 'axis' is missing"]),
    ("no_opset_import", _model([oh.make_node("Relu", ["x"], ["y"])], opset=None), 1,
     [CHECKER, "must specify opset_import for ONNX"]),
    ("no_ir_version", _model([oh.make_node("Relu", ["x"], ["y"])], ir=0), 1,
     [CHECKER, "does not have an ir_version set properly"]),
    ("future_ir_version", _model([oh.make_node("Relu", ["x"], ["y"])], ir=99), 1,
     [CHECKER, "Your model ir_version 99 is higher than the checker's"]),
    ("unknown_op", _model([oh.make_node("Frobnicate", ["x"], ["y"])]), 1,
     [CHECKER, "No Op registered for Frobnicate with domain_version of 17"]),
    ("output_nothing_produces", _model([oh.make_node("Relu", ["x"], ["a"])]), 1,
     [CHECKER, "Graph output 'y' is not an output of any node in graph"]),
    ("no_graph_outputs", _model([oh.make_node("Relu", ["x"], ["y"])], outputs=[]), 1,
     ["model has no graph outputs: "]),
    ("initializer_float_data_short", _model([oh.make_node("Add", ["x", "w"], ["y"])], inits=[_short_float_data()]),
     1, [CHECKER, "float_data size (3) is too small for the declared shape (4 float values required)"]),
    ("initializer_raw_data_short", _model([oh.make_node("Add", ["x", "w"], ["y"])], inits=[_short_raw_data()]), 1,
     [CHECKER, "raw_data size (10 bytes) is too small for the declared shape and type (12 bytes required)"]),
    ("empty_output_name", _model([oh.make_node("Relu", ["x"], [""])],
                                 outputs=[oh.make_tensor_value_info("", TensorProto.FLOAT, [2, 3])]), 1,
     [CHECKER, "Field 'name' of 'value_info' is required to be non-empty"]),
    ("reshape_to_wrong_size", _model([oh.make_node("Reshape", ["x", "s"], ["y"])], inits=[
        oh.make_tensor("s", TensorProto.INT64, [2], [5, 5])],
        outputs=[oh.make_tensor_value_info("y", TensorProto.FLOAT, [5, 5])]), 2,  # inference lets it through
     ["cannot verify: the original model does not run on the generated inputs", "cannot be reshaped"]),
    ("if_branch_reads_undefined", _model([oh.make_node("If", ["b"], ["y"], then_branch=oh.make_graph(
        [oh.make_node("Relu", ["ghost"], ["t"])], "t", [], [oh.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])]),
        else_branch=oh.make_graph([oh.make_node("Neg", ["x"], ["e"])], "e", [],
                                  [oh.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])]))],
        inputs=[X, oh.make_tensor_value_info("b", TensorProto.BOOL, [])]), 1, [CHECKER, "'ghost'"]),
]


@pytest.mark.parametrize("model,code,fragments", [c[1:] for c in INVALID_MODELS], ids=[c[0] for c in INVALID_MODELS])
def test_invalid_model(cli, assert_error, tmp_path, leftovers, model, code, fragments):
    mutant = make_mutant(tmp_path, model.SerializeToString())
    ran = cli(mutant.path, "-o", mutant.out)
    assert_error(ran, code, *fragments)
    assert_clean_failure(ran, mutant, leftovers)
    assert runs_on_onnxruntime(mutant.path) is None  # really invalid: onnxruntime refuses it too


@pytest.mark.parametrize("model,code,fragments", [c[1:] for c in INVALID_MODELS], ids=[c[0] for c in INVALID_MODELS])
def test_invalid_model_through_the_api(model, code, fragments):
    """optimize(ModelProto) refuses the same models with the same message and exit code."""
    with pytest.raises(onnxopt.OnnxoptError) as e:
        onnxopt.optimize(model, passes=["fold", "cleanup"])
    assert e.value.exit_code == code
    text = " ".join(str(e.value).split())
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_stale_declared_output_shape_is_not_invalid(cli, tmp_path, leftovers):
    """The checker accepts a declared output shape that inference contradicts, and onnxruntime runs
    the model: it is valid, and written with its outputs unchanged."""
    model = _model([oh.make_node("Relu", ["x"], ["y"])], outputs=[oh.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                             [5, 7])])
    assert check_mutant(cli, make_mutant(tmp_path, model.SerializeToString()), leftovers) == "written"


def test_operator_onnxruntime_lacks_is_written_unverified(cli, tmp_path, leftovers):
    """A valid model in a custom domain: onnxruntime cannot load it, so it is written with the
    reason verification was skipped (the documented exit 0)."""
    model = _model([oh.make_node("Bar", ["x"], ["y"], domain="com.example")])
    model.opset_import.append(oh.make_opsetid("com.example", 1))
    assert check_mutant(cli, make_mutant(tmp_path, model.SerializeToString()), leftovers) == "unverified"


def test_opset_nobody_knows_is_written_unverified(cli, tmp_path, leftovers):
    """Opset 99 (a bit flip away from 17 or so): the checker accepts it, onnxruntime refuses it. As
    test_cli's test_opset_newer_than_onnxruntime_skips_verification documents, it is written with
    the verification skipped and the reason printed, not refused."""
    model = _model([oh.make_node("Relu", ["x"], ["y"])], opset=99)
    assert check_mutant(cli, make_mutant(tmp_path, model.SerializeToString()), leftovers) == "unverified"


def test_duplicate_node_names(cli, tmp_path, leftovers):
    """The checker accepts two nodes with the same name, onnxruntime refuses them: onnxopt must either
    refuse the model or write one with unique node names that onnxruntime runs."""
    model = _model([oh.make_node("Relu", ["x"], ["a"], name="n"), oh.make_node("Neg", ["a"], ["y"], name="n")])
    mutant = make_mutant(tmp_path, model.SerializeToString())
    ran = cli(mutant.path, "-o", mutant.out)
    if ran.code != 0:
        assert_clean_failure(ran, mutant, leftovers)
        return
    assert runs_on_onnxruntime(mutant.out) is not None, ran.err


# ----------------------------------------------------------------------------------- random valid graphs


@dataclass
class _Graph:
    """A graph under construction: nodes, initializers and the float tensors available as operands
    (name -> shape). Every tensor the generator makes is float32 with a known static shape."""

    draw: object
    rng: np.random.Generator
    opset: int
    prefix: str = ""
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    pool: dict = field(default_factory=dict)
    const_shapes: dict = field(default_factory=dict)
    count: int = 0
    uses_cond: bool = False  # an If reads the bool graph input `cond`
    consumed: set = field(default_factory=set)  # tensors some node reads
    # Outputs of a float -> float or float -> double -> float Cast: onnxruntime removes such casts
    # even with its optimizations off (RemoveDuplicateCastTransformer) and then loses a subgraph's
    # implicit input ("Missing Input"), so no If branch or Loop body reads these.
    lossless_casts: set = field(default_factory=set)
    value_info: list = field(default_factory=list)  # declared shapes of intermediate tensors

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{self.prefix}{base}{self.count}"

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, reads=(), **attrs) -> list[str]:
        """Append a node; `reads`: the outer tensors its subgraphs read."""
        outputs = outputs or [self.fresh(op.lower())]
        name = self.fresh("n") if self.draw(st.booleans()) else ""
        self.nodes.append(oh.make_node(op, inputs, outputs, name=name, **attrs))
        self.consumed.update([*inputs, *reads])
        return outputs

    def const(self, value: np.ndarray, base: str = "c") -> str:
        """A constant: an initializer or a Constant node, as drawn."""
        name = self.fresh(base)
        tensor = onnx.numpy_helper.from_array(np.asarray(value), name)
        if self.draw(st.booleans()):
            self.initializers.append(tensor)
        else:
            self.nodes.append(oh.make_node("Constant", [], [name], value=tensor))
        self.const_shapes[name] = tuple(tensor.dims)
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "k")

    def floats(self, shape) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32)

    def operand(self, outer: bool = False) -> tuple[str, tuple]:
        """A tensor to read; `outer`: one a subgraph reads from the outer scope."""
        names = sorted(t for t in self.pool if not (outer and t in self.lossless_casts))
        name = self.draw(st.sampled_from(names))
        return name, self.pool[name]

    def add(self, name: str, shape) -> str:
        self.pool[name] = tuple(int(d) for d in shape)
        return name


# Loop outputs (whose shapes onnx inference leaves unknown) get a declared shape or not
DECLARE_LOOP_OUTPUT_SHAPES = False

UNARY = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Identity"]
BINARY = ["Add", "Mul", "Sub"]


def _broadcast_const_shape(g: _Graph, shape: tuple) -> tuple:
    """A constant shape that broadcasts against `shape`: a suffix of it, some dims set to 1, and
    sometimes extra leading ones (the result then has a higher rank than the operand)."""
    k = g.draw(st.integers(0, len(shape)))
    suffix = [d if g.draw(st.booleans()) else 1 for d in shape[len(shape) - k:]]
    lead = [1] * g.draw(st.sampled_from([0, 0, 0, 1]))
    return tuple(lead + suffix)


def op_unary(g: _Graph) -> None:
    x, shape = g.operand()
    op = g.draw(st.sampled_from(UNARY))
    g.add(g.node(op, [x])[0], shape)


def op_exp(g: _Graph) -> None:
    x, shape = g.operand()
    clipped = g.node("Clip", [x, g.const(np.float32(-3.0)), g.const(np.float32(3.0))])[0]
    g.add(g.node("Exp", [clipped])[0], shape)


def op_binary(g: _Graph) -> None:
    x, shape = g.operand()
    op = g.draw(st.sampled_from(BINARY))
    same = [n for n, s in g.pool.items() if s == shape]
    kind = g.draw(st.sampled_from(["tensor", "const", "const", "neutral", "folded"]))
    if kind == "tensor":
        other, other_shape = g.draw(st.sampled_from(sorted(same))), shape
    else:
        other_shape = _broadcast_const_shape(g, shape)
        if kind == "neutral":  # x + 0, x * 1, x - 0: no-ops cleanup may remove
            value = np.full(other_shape, 1.0 if op == "Mul" else 0.0, np.float32)
            other = g.const(value)
        elif kind == "folded":  # a constant subexpression for fold
            a, b = g.const(g.floats(other_shape)), g.const(g.floats(other_shape))
            other = g.node(g.draw(st.sampled_from(BINARY)), [a, b])[0]
        else:
            other = g.const(g.floats(other_shape))
    inputs = [x, other] if g.draw(st.booleans()) else [other, x]
    out_shape = np.broadcast_shapes(shape, other_shape)
    g.add(g.node(op, inputs)[0], out_shape)


def op_matmul(g: _Graph) -> None:
    x, shape = g.operand()
    if not shape:
        return
    m = g.draw(st.integers(1, 4))
    w = g.const(g.floats((shape[-1], m)), "w")
    out = g.node("MatMul", [x, w])[0]
    g.add(out, np.matmul(np.zeros(shape), np.zeros((shape[-1], m))).shape)
    if g.draw(st.booleans()):  # MatMul + bias Add: fold turns it into Gemm when it can
        g.add(g.node("Add", [out, g.const(g.floats((m,)), "b")])[0], g.pool[out])


def op_conv(g: _Graph) -> None:
    rank4 = [n for n, s in g.pool.items() if len(s) == 4]
    if not rank4:
        return
    x = g.draw(st.sampled_from(sorted(rank4)))
    n, c, h, w = g.pool[x]
    m = g.draw(st.integers(1, 3))
    k = g.draw(st.sampled_from([1, 3]))
    inputs = [x, g.const(g.floats((m, c, k, k)) * 0.5, "w")]
    if g.draw(st.booleans()):
        inputs.append(g.const(g.floats((m,)), "b"))
    out = g.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4)[0]
    after = g.draw(st.sampled_from(["none", "bn", "mul", "add"]))
    if after == "bn":  # Conv + BatchNormalization: folded into the weights
        scale, bias, mean = (g.const(g.floats((m,)), "bn") for _ in range(3))
        var = g.const(np.abs(g.floats((m,))) + 0.5, "bn")
        out = g.node("BatchNormalization", [out, scale, bias, mean, var], epsilon=1e-5)[0]
    elif after in ("mul", "add"):  # per-channel Mul / Add: folded into the weights
        out = g.node(after.capitalize(), [out, g.const(g.floats((m, 1, 1)), "s")])[0]
    g.add(out, (n, m, h, w))


def op_reshape(g: _Graph) -> None:
    x, shape = g.operand()
    size = int(np.prod(shape))
    kind = g.draw(st.sampled_from(["flat", "minus_one", "merge", "same", "zero", "shape_of"]))
    if kind == "shape_of":  # Reshape to Shape(x) of a tensor of the same shape: exporter shape arithmetic
        same = [n for n, s in g.pool.items() if s == shape]
        target = g.node("Shape", [g.draw(st.sampled_from(sorted(same)))])[0]
        g.add(g.node("Reshape", [x, target])[0], shape)
        return
    if kind == "flat":
        new, spec = (size,), [size]
    elif kind == "minus_one":
        new, spec = (size,), [-1]
    elif kind == "merge" and len(shape) >= 2:
        new = shape[:-2] + (shape[-2] * shape[-1],)
        spec = list(new)
    elif kind == "zero" and shape:
        new, spec = shape, [0] * len(shape)
    else:
        new, spec = shape, list(shape)
    g.add(g.node("Reshape", [x, g.ints(spec)])[0], new)


def op_transpose(g: _Graph) -> None:
    x, shape = g.operand()
    if not shape:
        return
    perm = g.draw(st.permutations(range(len(shape))))
    g.add(g.node("Transpose", [x], perm=list(perm))[0], tuple(shape[p] for p in perm))


def op_unsqueeze(g: _Graph) -> None:
    x, shape = g.operand()
    if len(shape) >= 5:
        return
    axis = g.draw(st.integers(-len(shape) - 1, len(shape)))
    out = g.node("Unsqueeze", [x, g.ints([axis])])[0]
    new = list(shape)
    new.insert(axis % (len(shape) + 1), 1)
    g.add(out, new)
    if g.draw(st.booleans()):  # and back
        g.add(g.node("Squeeze", [out, g.ints([axis])])[0], shape)


def op_squeeze(g: _Graph) -> None:
    x, shape = g.operand()
    ones = [i for i, d in enumerate(shape) if d == 1]
    if not ones:
        return
    if g.draw(st.booleans()):
        g.add(g.node("Squeeze", [x])[0], [d for d in shape if d != 1])
    else:
        axis = g.draw(st.sampled_from(ones))
        g.add(g.node("Squeeze", [x, g.ints([axis])])[0], [d for i, d in enumerate(shape) if i != axis])


def op_concat(g: _Graph) -> None:
    x, shape = g.operand()
    if not shape:
        return
    axis = g.draw(st.integers(-len(shape), len(shape) - 1))
    same = sorted(n for n, s in g.pool.items() if s == shape)
    parts = [x]
    for _ in range(g.draw(st.integers(1, 2))):
        if g.draw(st.booleans()):
            parts.append(g.draw(st.sampled_from(same)))
        else:
            extent = g.draw(st.integers(1, 3))
            part = list(shape)
            part[axis] = extent
            parts.append(g.const(g.floats(part)))
    new = list(shape)
    new[axis] = sum({**g.pool, **g.const_shapes}[p][axis] for p in parts)
    g.add(g.node("Concat", parts, axis=axis)[0], new)


def op_slice(g: _Graph) -> None:
    x, shape = g.operand()
    if not shape:
        return
    axis = g.draw(st.integers(0, len(shape) - 1))
    dim = shape[axis]
    kind = g.draw(st.sampled_from(["full", "part", "reverse", "step"]))
    if kind == "full":
        start, end, step = 0, INT64_MAX, 1
    elif kind == "reverse":
        start, end, step = -1, -INT64_MAX, -1
    else:
        start = g.draw(st.integers(0, dim - 1))
        end = g.draw(st.integers(start + 1, dim))
        step = 2 if kind == "step" else 1
    inputs = [x, g.ints([start]), g.ints([end])]
    if g.draw(st.booleans()) or step != 1:
        inputs += [g.ints([axis if g.draw(st.booleans()) else axis - len(shape)]), g.ints([step])]
    elif axis != 0:
        inputs.append(g.ints([axis]))
    index = [slice(None)] * len(shape)
    index[axis] = slice(start, None if end in (INT64_MAX, -INT64_MAX) else end, step)
    g.add(g.node("Slice", inputs)[0], np.empty(shape)[tuple(index)].shape)


def op_cast(g: _Graph) -> None:
    x, shape = g.operand()
    kind = g.draw(st.sampled_from(["noop", "double", "half", "int"]))
    if kind == "noop":
        out = g.node("Cast", [x], to=TensorProto.FLOAT)[0]
    else:
        to = {"double": TensorProto.DOUBLE, "half": TensorProto.FLOAT16, "int": TensorProto.INT64}[kind]
        out = g.node("Cast", [g.node("Cast", [x], to=to)[0]], to=TensorProto.FLOAT)[0]
    g.add(out, shape)
    if kind in ("noop", "double"):
        g.lossless_casts.add(out)


def op_duplicate(g: _Graph) -> None:
    """Copy an existing node with fresh output names: a common subexpression for cleanup's CSE."""
    candidates = [n for n in g.nodes if n.output and all(o in g.pool for o in n.output)
                  and not any(a.type == onnx.AttributeProto.GRAPH for a in n.attribute)]
    if not candidates:
        return
    node = g.draw(st.sampled_from(candidates))
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = g.fresh("n") if node.name else ""
    del copy.output[:]
    for o in node.output:
        copy.output.append(g.add(g.fresh("dup"), g.pool[o]))
        if o in g.lossless_casts:
            g.lossless_casts.add(copy.output[-1])
    g.consumed.update(copy.input)
    g.nodes.append(copy)


def _branch(g: _Graph, x: str, shape: tuple, label: str) -> onnx.GraphProto:
    """A small If branch reading `x` from the outer scope; sometimes with a constant of its own or
    a duplicated subexpression."""
    sub = _Graph(g.draw, g.rng, g.opset, prefix=f"{g.fresh(label)}_")
    sub.pool = {x: shape}
    kind = g.draw(st.sampled_from(["unary", "const", "dup"]))
    if kind == "unary":
        out = sub.node(g.draw(st.sampled_from(UNARY)), [x])[0]
    elif kind == "const":
        out = sub.node(g.draw(st.sampled_from(BINARY)), [x, sub.const(g.floats(shape[-1:]))])[0]
    else:
        a, b = sub.node("Tanh", [x])[0], sub.node("Tanh", [x])[0]
        out = sub.node("Add", [a, b])[0]
    return oh.make_graph(sub.nodes, f"{label}_graph", [],
                         [oh.make_tensor_value_info(out, TensorProto.FLOAT, list(shape))], sub.initializers)


def op_if(g: _Graph) -> None:
    x, shape = g.operand(outer=True)  # a constant too: then both branches read it (written once, in the parent)
    if g.draw(st.booleans()):
        cond = "cond"  # a graph input
        g.uses_cond = True
    else:
        cond = g.const(np.array(g.draw(st.booleans())))
    then_g, else_g = _branch(g, x, shape, "then"), _branch(g, x, shape, "else")
    g.add(g.node("If", [cond], reads=[x], then_branch=then_g, else_branch=else_g)[0], shape)


def op_loop(g: _Graph) -> None:
    """Loop with a constant trip count and one loop-carried tensor: v = v * 0.5 + x; sometimes also
    a scan output."""
    x, shape = g.operand(outer=True)
    p = g.fresh("body") + "_"
    i, c_in, v_in = p + "i", p + "cond_in", p + "v_in"
    sub = _Graph(g.draw, g.rng, g.opset, prefix=p)
    c_out = sub.node("Identity", [c_in])[0]
    half = sub.const(np.float32(0.5))  # equal in every Loop body: cleanup merges them across bodies
    v_out = sub.node("Add", [sub.node("Mul", [v_in, half])[0], x])[0]
    outputs = [oh.make_tensor_value_info(c_out, TensorProto.BOOL, []),
               oh.make_tensor_value_info(v_out, TensorProto.FLOAT, list(shape))]
    scan = g.draw(st.booleans())
    if scan:
        s_out = sub.node("Relu", [v_out])[0]
        outputs.append(oh.make_tensor_value_info(s_out, TensorProto.FLOAT, list(shape)))
    body = oh.make_graph(sub.nodes, "body", [
        oh.make_tensor_value_info(i, TensorProto.INT64, []),
        oh.make_tensor_value_info(c_in, TensorProto.BOOL, []),
        oh.make_tensor_value_info(v_in, TensorProto.FLOAT, list(shape))], outputs, sub.initializers)
    trips = g.draw(st.integers(1, 3))
    init = g.const(g.floats(shape)) if g.draw(st.booleans()) else x
    outs = [g.fresh("loop_v")] + ([g.fresh("loop_scan")] if scan else [])
    g.node("Loop", [g.ints(trips), "", init], outs, reads=[x], body=body)
    g.add(outs[0], shape)
    if scan:
        g.add(outs[1], (trips,) + shape)
    if DECLARE_LOOP_OUTPUT_SHAPES or g.draw(st.booleans()):
        g.value_info += [oh.make_tensor_value_info(o, TensorProto.FLOAT, list(g.pool[o])) for o in outs]


def op_gelu(g: _Graph) -> None:
    """x * 0.5 * (1 + erf(x / sqrt 2)) in the associations exporters write (fuse: Gelu)."""
    x, shape = g.operand()
    if g.draw(st.booleans()):
        arg = g.node("Div", [x, g.const(np.float32(math.sqrt(2.0)))])[0]
    else:
        arg = g.node("Mul", [x, g.const(np.float32(1 / math.sqrt(2.0)))])[0]
    one_plus = g.node("Add", [g.node("Erf", [arg])[0], g.const(np.float32(1.0))])[0]
    half = g.const(np.float32(0.5))
    form = g.draw(st.integers(0, 2))
    if form == 0:
        out = g.node("Mul", [g.node("Mul", [x, one_plus])[0], half])[0]
    elif form == 1:
        out = g.node("Mul", [x, g.node("Mul", [one_plus, half])[0]])[0]
    else:
        out = g.node("Mul", [g.node("Mul", [x, half])[0], one_plus])[0]
    g.add(out, shape)


def op_layer_norm(g: _Graph) -> None:
    """Layer normalization written out (fuse: LayerNormalization); sometimes over another axis than
    the last, which must not be fused."""
    x, shape = g.operand()
    if not shape:
        return
    axis = -1 if g.draw(st.integers(0, 3)) else g.draw(st.integers(0, len(shape) - 1))

    def mean(t: str) -> str:
        if g.opset >= 18:
            return g.node("ReduceMean", [t, g.ints([axis])])[0]
        return g.node("ReduceMean", [t], axes=[axis])[0]

    d = g.node("Sub", [x, mean(x)])[0]
    square = g.node("Pow", [d, g.const(np.float32(2.0))])[0] if g.draw(st.booleans()) else g.node("Mul", [d, d])[0]
    std = g.node("Sqrt", [g.node("Add", [mean(square), g.const(np.float32(1e-5))])[0]])[0]
    y = g.node("Mul", [g.node("Div", [d, std])[0], g.const(g.floats(shape[-1:]))])[0]
    g.add(g.node("Add", [y, g.const(g.floats(shape[-1:]))])[0], shape)


OPS = [op_unary, op_unary, op_exp, op_binary, op_binary, op_binary, op_matmul, op_conv, op_conv, op_reshape,
       op_transpose, op_unsqueeze, op_squeeze, op_concat, op_slice, op_cast, op_duplicate, op_duplicate, op_if,
       op_loop, op_gelu, op_layer_norm]


@dataclass
class Case:
    model: onnx.ModelProto
    feeds: dict


@st.composite
def valid_models(draw, max_ops: int = 10) -> Case:
    """A random small valid model (checked with onnx.checker's full check) and feeds for it."""
    opset = draw(st.sampled_from([13, 17, 21]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = _Graph(draw, rng, opset)
    rank = draw(st.sampled_from([1, 2, 3, 4, 4]))
    x_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    g.add("x", x_shape)
    if draw(st.booleans()):  # a tensor computed from constants only: fold folds it all
        a, b = g.const(g.floats(x_shape[-1:])), g.const(g.floats(x_shape[-1:]))
        g.add(g.node(draw(st.sampled_from(BINARY)), [a, b])[0], x_shape[-1:])
    for _ in range(draw(st.integers(3, max_ops))):
        draw(st.sampled_from(OPS))(g)
    # Outputs: the tensors nothing reads, less a few (dead code for cleanup), plus a few read ones.
    leaves = [t for t in g.pool if t not in g.consumed and t != "x"]
    dropped = set(draw(st.lists(st.sampled_from(leaves), max_size=2, unique=True))) if len(leaves) > 1 else set()
    extra = draw(st.lists(st.sampled_from(sorted(g.pool)), max_size=2))
    outputs = list(dict.fromkeys([t for t in leaves if t not in dropped] + extra))
    if outputs in ([], ["x"]):
        outputs = [g.node("Identity", ["x"])[0]]
        g.pool[outputs[0]] = x_shape
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    if g.uses_cond:
        inputs.append(oh.make_tensor_value_info("cond", TensorProto.BOOL, []))
        feeds["cond"] = np.array(draw(st.booleans()))
    graph = oh.make_graph(g.nodes, "fuzz", inputs,
                          [oh.make_tensor_value_info(o, TensorProto.FLOAT, list(g.pool[o])) for o in outputs],
                          g.initializers, value_info=[v for v in g.value_info if v.name not in outputs])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8)
    onnx.checker.check_model(model, full_check=True)
    return Case(model, feeds)


def check_lossless(case: Case, passes: list[str], target: str = "onnx") -> None:
    """Optimize with `passes` and assert every property of a lossless pass set (see the module doc)."""
    model, feeds = case.model, case.feeds
    original = model.SerializeToString()
    result = onnxopt.optimize(model, passes=passes, verify="none", target=target)
    out = result.model
    assert model.SerializeToString() == original, "optimize changed its input ModelProto"
    onnx.checker.check_model(out, full_check=True)
    assert io_names(out) == io_names(model)
    assert_same_outputs(model, out, feeds)
    again = onnxopt.optimize(out, passes=passes, verify="none", target=target)
    assert [r.counts for r in again.passes] == [{}] * len(passes), "a second run changed the model"
    twice = onnxopt.optimize(model, passes=passes, verify="none", target=target)
    assert twice.model.SerializeToString() == out.SerializeToString(), "two runs gave different files"


FUZZ_SETTINGS = {"derandomize": True, "database": None, "deadline": None,
                 "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@pytest.mark.parametrize("passes,target", PASS_CASES, ids=CASE_IDS)
@settings(max_examples=50, **FUZZ_SETTINGS)
@given(case=valid_models())
def test_random_valid_graph(case, passes, target):
    check_lossless(case, passes, target)


@pytest.mark.slow
@pytest.mark.parametrize("passes,target", PASS_CASES, ids=CASE_IDS)
@settings(max_examples=1000, **FUZZ_SETTINGS)
@given(case=valid_models(max_ops=14))
def test_random_valid_graph_long(case, passes, target):
    check_lossless(case, passes, target)


# ----------------------------------------------------------------------------------- found by fuzzing

# Fixed in compiler/io.py: each of these crashed with an internal error or was written unverified.


def test_unknown_field_in_a_subgraph_output_type(cli, tmp_path, leftovers, good_bytes):
    """A TypeProto holding only a field this onnx does not know (bit-flip seed 87): the checker and
    onnxruntime ignore it; it once reached the graph IR as a type without a value and the export
    crashed (UnboundLocalError in onnx-graphsurgeon)."""
    model = onnx.ModelProto.FromString(good_bytes)
    (then_branch,) = [a.g for a in model.graph.node[-1].attribute if a.name == "then_branch"]
    then_branch.output[0].type.Clear()
    then_branch.output[0].type.MergeFromString(b"\x98\x06\x01")  # field 99, varint 1
    assert check_mutant(cli, make_mutant(tmp_path, model.SerializeToString()), leftovers) == "written"


def test_name_that_is_not_utf8(cli, assert_error, tmp_path, leftovers, good_bytes):
    """A damaged subgraph name (bit-flip seed 251): protobuf parses it and hands Python bytes, which
    crashed the export with a UnicodeDecodeError; now refused as unreadable."""
    data = good_bytes.replace(b"\x12\x02th", b"\x12\x02\xf4h")  # the then branch's name, length kept
    assert data != good_bytes
    mutant = make_mutant(tmp_path, data)
    ran = cli(mutant.path, "-o", mutant.out)
    assert_error(ran, 1, "not a readable ONNX model: ", "onnx.GraphProto.name is not UTF-8 text")
    assert_clean_failure(ran, mutant, leftovers)


def test_stale_declared_shape_in_a_branch_is_not_invalid(cli, tmp_path, leftovers):
    """A branch output declared with the wrong rank (bit-flip seed 154): onnxruntime runs it, so the
    type check must not hold declared subgraph shapes against the model either."""
    text = HEADER + """g (float[2,3] x, bool b) => (float[2,3] y) {
      y = If(b) <then_branch = t () => (float[7] ty) { ty = Relu(x) },
                 else_branch = e () => (float[2,3] ey) { ey = Neg(x) }>
    }"""
    model = onnx.parser.parse_model(text)
    assert check_mutant(cli, make_mutant(tmp_path, model.SerializeToString()), leftovers) == "written"


# Regressions: bugs the fuzzing found in compiler/graph.py (export, import), minimal repros.

SHARED_BY_BRANCHES = HEADER + """g (float[2] x, bool b) => (float[2] y) <float[2] c = {1.0, 2.0}> {
  y = If(b) <then_branch = t () => (float[2] ty) { ty = Add(x, c) },
             else_branch = e () => (float[2] ey) { ey = Sub(x, c) }>
}"""


def _initializer_names(graph: onnx.GraphProto) -> list[str]:
    names = [t.name for t in graph.initializer]
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names += _initializer_names(a.g)
    return names


@pytest.mark.parametrize("passes", PASS_SETS, ids=PASS_IDS)
def test_constant_read_by_two_branches_is_written_once(passes):
    model = onnx.parser.parse_model(SHARED_BY_BRANCHES)
    out = onnxopt.optimize(model, passes=passes, verify="none").model
    assert _initializer_names(out.graph) == ["c"]


def test_equal_constants_in_two_bodies_merge_once():
    model = onnx.parser.parse_model(HEADER + """g (float[2] x, bool b) => (float[2] y) {
      y = If(b) <then_branch = t () => (float[2] ty) <float[2] one_t = {1.0, 1.0}> { ty = Add(x, one_t) },
                 else_branch = e () => (float[2] ey) <float[2] one_e = {1.0, 1.0}> { ey = Sub(x, one_e) }>
    }""")
    first = onnxopt.optimize(model, passes=["cleanup"], verify="none")
    assert first.passes[0].counts == {"duplicate_initializers_merged": 1}
    again = onnxopt.optimize(first.model, passes=["cleanup"], verify="none")
    assert again.passes[0].counts == {}


GELU_TEXT = HEADER + """g (float[4] x) => (float[4] y) <float s = {1.4142135}, float one = {1.0}, float half = {0.5}> {
  d = Div(x, s)
  e = Erf(d)
  p = Add(e, one)
  m = Mul(x, p)
  y = Mul(m, half)
}"""


def test_optimize_leaves_the_input_opsets_alone():
    model = onnx.parser.parse_model(GELU_TEXT)
    before = model.SerializeToString()
    result = onnxopt.optimize(model, passes=["fuse"], verify="none", target="ort")
    assert result.passes[0].counts == {"gelu": 1}
    assert [(o.domain, o.version) for o in result.model.opset_import] == [("", 17), ("com.microsoft", 1)]
    assert model.SerializeToString() == before


def test_noop_reshape_found_on_the_first_run():
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 13]>' + """
    g (float[2] x) => (float[2] t, float[2] y) <int64 n = {1}, int64[1] s = {2}, float h = {0.5}> {
      v = Loop(n, "", x) <body = b (int64 i, bool c, float[2] vi) => (bool co, float[2] vo) {
        co = Identity(c)
        vo = Mul(vi, h)
      }>
      r = Reshape(v, s)
      t = Identity(v)
      y = Relu(r)
    }""")
    first = onnxopt.optimize(model, passes=["cleanup"], verify="none")
    again = onnxopt.optimize(first.model, passes=["cleanup"], verify="none")
    assert again.passes[0].counts == {}
    assert first.passes[0].counts == {"identity_removed": 1, "noop_reshape_removed": 1}


def test_a_dead_if_no_longer_reads_the_outer_tensors():
    """Long fuzzing (fuse, and fold,cleanup,fuse): an unused If whose branches read an
    intermediate made the rules see it as used elsewhere, so only a second run fused; removing a
    dead node now disconnects its bodies too."""
    branch = lambda name: oh.make_graph([oh.make_node("Relu", ["u"], [f"{name}_r"])], name, [],  # noqa: E731
                                        [oh.make_tensor_value_info(f"{name}_r", TensorProto.FLOAT, [1, 1])])
    graph = oh.make_graph(
        [oh.make_node("Unsqueeze", ["x", "k"], ["u"]), oh.make_node("Squeeze", ["u", "k"], ["s"]),
         oh.make_node("If", ["c"], ["i"], then_branch=branch("then"), else_branch=branch("else")),
         oh.make_node("Relu", ["s"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1]), oh.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [onnx.numpy_helper.from_array(np.array([0], np.int64), "k")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)
    once = onnxopt.optimize(model, passes=["fuse"], verify="none")
    assert once.passes[0].counts == {"squeeze_chain": 1, "dead_nodes_removed": 3}
    assert onnxopt.optimize(once.model, passes=["fuse"], verify="none").passes[0].counts == {}


@pytest.mark.parametrize("same", [True, False])
def test_a_conv_read_by_two_identical_batchnorms_folds_in_one_run(same):
    """Long fuzzing (fold,cleanup,fuse): cleanup's CSE merged the duplicate BatchNormalizations
    after fold had refused a Conv with two readers, so only a second run folded. Identical
    foldable readers are now merged by fold; different ones still block it."""
    rng = np.random.default_rng(0)
    consts = [onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")]
    consts += [onnx.numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, n) for n in ("s", "b", "m", "v")]
    consts.append(onnx.numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "s2"))
    graph = oh.make_graph(
        [oh.make_node("Conv", ["x", "w"], ["c"]),
         oh.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n1"]),
         oh.make_node("BatchNormalization", ["c", "s" if same else "s2", "b", "m", "v"], ["n2"]),
         oh.make_node("Relu", ["n1"], ["y1"]), oh.make_node("Relu", ["n2"], ["y2"])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [oh.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 4, 4]) for n in ("y1", "y2")], consts)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)
    feeds = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    once = onnxopt.optimize(model, passes=["fold", "cleanup"], inputs=feeds)
    assert once.passes[0].counts.get("conv_bn_folded", 0) == (1 if same else 0)
    assert onnxopt.optimize(once.model, passes=["fold", "cleanup"], verify="none").passes[0].counts == {}
    assert all(o["ok"] for o in once.verification["outputs"])
