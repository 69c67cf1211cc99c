"""The pass pipeline (ordering, the pass list, options, records) and the Python API
onnxopt.optimize: files and ModelProtos in, the same errors as the CLI raised as exceptions."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import onnx
import pytest

import onnxopt
import onnxopt.passes
from models.builders import from_text, ops, run
from onnxopt import pipeline
from onnxopt.errors import ModelError, OnnxoptError, UsageError
from onnxopt.graph import import_model
from onnxopt.pipeline import Context, Pass, order_passes, parse_options, parse_pass_list, registry, run_passes

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


# ----------------------------------------------------------------------------------- pass list and order


def test_registry_has_the_passes_in_canonical_order():
    names = list(registry())
    assert names[:2] == ["fold", "cleanup"]
    assert [n for n in pipeline.CANONICAL if n in names] == names  # registered in canonical order
    for name, p in registry().items():
        assert p.name == name and p.summary and p.tolerance in ("exact", "fp32", "lossy")
        assert dataclasses.is_dataclass(p.Options)
        assert all(dep in pipeline.CANONICAL for dep in p.after)


def test_parse_pass_list():
    assert parse_pass_list("fold,cleanup") == ["fold", "cleanup"]
    assert parse_pass_list(" cleanup , fold ,") == ["cleanup", "fold"]
    assert parse_pass_list(["fold"]) == ["fold"]
    with pytest.raises(UsageError, match="a pass is listed twice: fold,cleanup,fold"):
        parse_pass_list("fold,cleanup,fold")
    with pytest.raises(UsageError, match="unknown pass 'nope'; available: fold, cleanup"):
        parse_pass_list(["fold", "nope"])
    with pytest.raises(UsageError, match="no passes given"):
        parse_pass_list("")
    with pytest.raises(UsageError, match="no passes given"):
        parse_pass_list([])


def test_order_passes():
    assert order_passes(["cleanup", "fold"]) == ["fold", "cleanup"]
    assert order_passes(["fold", "cleanup"]) == ["fold", "cleanup"]
    assert order_passes(["cleanup"]) == ["cleanup"]
    # the canonical order of the families: fold -> cleanup -> fuse -> prune -> quant -> partition
    assert order_passes(["partition", "quant", "prune", "fuse", "cleanup", "fold"]) == list(pipeline.CANONICAL)


def _fake(name, after=()):
    return type(f"Fake{name}", (Pass,), {"name": name, "summary": name, "after": tuple(after),
                                          "run": lambda self, model, ctx: {}})


def test_order_passes_keeps_the_users_order_among_free_passes_and_refuses_cycles(monkeypatch):
    monkeypatch.setattr(onnxopt.passes, "PASSES", [_fake("a"), _fake("b", ["a"]), _fake("c"), _fake("d", ["e"]),
                                                   _fake("e", ["d"])])
    assert order_passes(["c", "b", "a"]) == ["c", "a", "b"]
    assert order_passes(["b", "c", "a"]) == ["c", "a", "b"]
    assert order_passes(["b"]) == ["b"]  # a dependency that is not selected is not added
    with pytest.raises(UsageError, match="passes depend on each other in a cycle: d, e"):
        order_passes(["a", "d", "e"])


def test_result_order_note():
    m = from_text(HEADER + "g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }")
    result = onnxopt.optimize(m, passes=["cleanup", "fold"])
    assert result.order_note == "passes reordered to respect their dependencies: fold,cleanup"
    assert [r.name for r in result.passes] == ["fold", "cleanup"]
    assert onnxopt.optimize(m, passes=["fold", "cleanup"]).order_note is None
    assert onnxopt.optimize(m, passes="cleanup,fold").order_note is not None


# ----------------------------------------------------------------------------------- options


def test_parse_options_types():
    opts = parse_options(["fold.size_limit=1024", "cleanup.cse=false", "cleanup.dedup=0", "cleanup.noops=yes"],
                         ["fold", "cleanup"])
    assert opts["fold"].size_limit == 1024 and type(opts["fold"].size_limit) is int
    assert (opts["cleanup"].cse, opts["cleanup"].dedup, opts["cleanup"].noops) == (False, False, True)
    defaults = parse_options([], ["fold", "cleanup"])
    assert defaults["fold"] == registry()["fold"].Options()
    assert defaults["cleanup"] == registry()["cleanup"].Options()


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("Yes", True), ("ON", True),
                                            ("0", False), ("False", False), ("no", False), ("off", False)])
def test_bool_option_spellings(value, expected):
    assert parse_options([f"cleanup.cse={value}"], ["cleanup"])["cleanup"].cse is expected


@pytest.mark.parametrize("item,message", [
    ("fold.size_limit=abc", "bad value 'abc' for option fold.size_limit: expected int"),
    ("fold.size_limit=1.5", "bad value '1.5' for option fold.size_limit: expected int"),
    ("cleanup.cse=2", "bad value '2' for option cleanup.cse: expected bool"),
    ("fold.nope=1", "pass 'fold' has no option 'nope'"),
    ("nope.x=1", "--opt 'nope.x=1': unknown pass 'nope'"),
    ("fold", "bad --opt 'fold': expected PASS.OPTION=VALUE"),
    ("size_limit=3", "bad --opt 'size_limit=3': expected PASS.OPTION=VALUE"),
])
def test_bad_options(item, message):
    with pytest.raises(UsageError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_options([item], ["fold", "cleanup"])


def test_option_for_an_unselected_pass():
    with pytest.raises(UsageError, match="pass 'cleanup' is not selected in --passes"):
        parse_options(["cleanup.cse=0"], ["fold"])


def test_options_reach_the_pass():
    """cleanup.noops=false keeps the Identity that the default removes."""
    m = from_text(HEADER + "g (float[2,3] x) => (float[2,3] y) { i = Identity(x)\n y = Relu(i) }")
    assert ops(onnxopt.optimize(m, passes=["cleanup"]).model) == ["Relu"]
    assert ops(onnxopt.optimize(m, passes=["cleanup"], options=["cleanup.noops=false"]).model) == ["Identity", "Relu"]
    assert ops(onnxopt.optimize(m, passes=["cleanup"], options={"cleanup": {"noops": False}}).model) == [
        "Identity", "Relu"]


# ----------------------------------------------------------------------------------- run_passes


def test_run_passes_records_counts_times_and_calls_after_each():
    m = import_model(from_text(HEADER + """g (float[2,3] x) => (float[2,3] y) {
      c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
      i = Identity(x)
      y = Add(i, c)
    }"""))
    seen, progress = [], []
    records = run_passes(m, ["fold", "cleanup"], parse_options([], ["fold", "cleanup"]), Context(),
                         after_each=lambda p, r: seen.append((p.name, r.name)),
                         progress=lambda i, n, name: progress.append((i, n, name)))
    assert [(r.name, r.counts, r.nodes_after) for r in records] == [
        ("fold", {"constant_nodes_to_initializers": 1}, 2), ("cleanup", {"identity_removed": 1}, 1)]
    assert all(r.seconds >= 0 and r.verification is None for r in records)
    assert seen == [("fold", "fold"), ("cleanup", "cleanup")]
    assert progress == [(0, 2, "fold"), (1, 2, "cleanup")]


def test_zero_counts_are_dropped_from_records(monkeypatch):
    @dataclass
    class Opts:
        pass

    class Counting(Pass):
        name, summary, Options = "cleanup", "counts", Opts

        def run(self, model, ctx):
            return {"things_removed": 0, "others": 3}

    monkeypatch.setattr(onnxopt.passes, "PASSES", [Counting])
    m = import_model(from_text(HEADER + "g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }"))
    (record,) = run_passes(m, ["cleanup"], {"cleanup": Opts()}, Context())
    assert record.counts == {"others": 3}


# ----------------------------------------------------------------------------------- the Python API


SIMPLE_TEXT = HEADER + """
g (float[2,3] x) => (float[2,3] y) {
  c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
  i = Identity(x)
  a = Add(i, c)
  y = Relu(a)
}"""


def test_optimize_path_to_path(tmp_path):
    m = from_text(SIMPLE_TEXT)
    onnx.save(m, tmp_path / "in.onnx")
    result = onnxopt.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", passes=["fold", "cleanup"])
    assert result.model is None
    assert result.output == str(tmp_path / "out.onnx") and result.written == [str(tmp_path / "out.onnx")]
    out = onnx.load(tmp_path / "out.onnx")
    assert ops(out) == ["Add", "Relu"]
    assert result.before == {"nodes": 4, "params": 3, "size": os.path.getsize(tmp_path / "in.onnx")}
    assert result.after == {"nodes": 2, "params": 3, "size": os.path.getsize(tmp_path / "out.onnx")}
    assert [(r.name, r.counts) for r in result.passes] == [("fold", {"constant_nodes_to_initializers": 1}),
                                                           ("cleanup", {"identity_removed": 1})]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})["y"], run(m, {"x": x})["y"])
    d = result.as_dict()
    assert d["before"] == result.before and d["passes"][0]["name"] == "fold"


def test_optimize_string_paths_and_default_passes(tmp_path):
    onnx.save(from_text(SIMPLE_TEXT), tmp_path / "in.onnx")
    result = onnxopt.optimize(str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"))
    assert [r.name for r in result.passes] == ["fold", "cleanup"]
    assert result.verification["mode"] == "final" and result.verification["outputs"][0]["ok"]


def test_optimize_model_proto_returns_the_model_and_leaves_the_input_alone():
    m = from_text(SIMPLE_TEXT)
    before = m.SerializeToString()
    result = onnxopt.optimize(m, passes=["fold", "cleanup"])
    assert isinstance(result.model, onnx.ModelProto) and result.model is not m
    assert ops(result.model) == ["Add", "Relu"]
    assert result.output is None and result.written == []
    assert result.before["size"] == len(before) and result.after["size"] == result.model.ByteSize()
    assert m.SerializeToString() == before  # the caller's proto is not modified
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, {"x": x})["y"], run(m, {"x": x})["y"])


def test_optimize_model_proto_to_a_file(tmp_path):
    result = onnxopt.optimize(from_text(SIMPLE_TEXT), tmp_path / "out.onnx", passes=["cleanup"])
    assert result.model is None and ops(onnx.load(tmp_path / "out.onnx")) == ["Add", "Relu"]
    assert result.after["size"] == os.path.getsize(tmp_path / "out.onnx")


def test_optimize_inputs_and_shapes_as_python_objects(tmp_path):
    m = from_text(HEADER + "g (float[N,6] x, int64[2] s) => (float[a,b] y) { y = Reshape(x, s) }")
    with pytest.raises(UsageError, match="input 's' drives a shape"):
        onnxopt.optimize(m)
    result = onnxopt.optimize(m, inputs={"s": np.array([3, 4])}, input_shapes={"x": [2, 6]})
    assert result.verification["outputs"][0]["ok"]
    assert "inputs: no values for x in the given inputs: generated" in result.explain  # said, not silent
    both = onnxopt.optimize(m, inputs={"s": np.array([3, 4]), "x": np.ones((2, 6), np.float32)})
    assert not [line for line in both.explain if line.startswith("inputs:")]
    np.savez(tmp_path / "f.npz", s=np.array([4, 3]))
    result = onnxopt.optimize(m, inputs=str(tmp_path / "f.npz"), input_shapes=["x=2x6"])
    assert result.verification["outputs"][0]["ok"]


def test_optimize_raises_the_cli_errors(tmp_path):
    good = tmp_path / "in.onnx"
    onnx.save(from_text(SIMPLE_TEXT), good)
    (tmp_path / "bad.onnx").write_bytes(b"\x00\xff" * 20)
    bad_checker = from_text(HEADER + "g (float[2] x) => (float[2] y) { y = Add(x, nothere) }", check=False)
    out = tmp_path / "out.onnx"
    cases = [
        (lambda: onnxopt.optimize(tmp_path / "nope.onnx", out), UsageError, "input file not found"),
        (lambda: onnxopt.optimize(tmp_path / "bad.onnx", out), ModelError, "not a readable ONNX model"),
        (lambda: onnxopt.optimize(bad_checker), ModelError, "model fails onnx.checker"),
        (lambda: onnxopt.optimize(good, good), UsageError, "output path is the input path"),
        (lambda: onnxopt.optimize(good, out, passes=["nope"]), UsageError, "unknown pass 'nope'"),
        (lambda: onnxopt.optimize(good, out, passes=["fold", "fold"]), UsageError, "a pass is listed twice"),
        (lambda: onnxopt.optimize(good, out, verify="always"), UsageError, "bad --verify 'always'"),
        (lambda: onnxopt.optimize(good, out, options={"fold": {"size_limit": "x"}}), UsageError, "expected int"),
        (lambda: onnxopt.optimize(good, out, input_shapes=["x=1xq"]), UsageError, "bad --input-shape"),
        (lambda: onnxopt.optimize(good, tmp_path / "no" / "out.onnx"), OnnxoptError, "folder does not exist"),
        (lambda: onnxopt.optimize(b"bytes"), UsageError, "model must be a path or an onnx.ModelProto, not bytes"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message) as e:
            call()
        assert type(e.value) is kind, message
        assert e.value.exit_code == (2 if kind is UsageError else 1)
    assert sorted(os.listdir(tmp_path)) == ["bad.onnx", "in.onnx"]


def test_progress_callback(tmp_path):
    said = []
    onnxopt.optimize(from_text(SIMPLE_TEXT), passes=["fold", "cleanup"], verify="each", progress=said.append)
    assert said == ["loading", "running the original model", "[1/2] fold", "verifying fold", "[2/2] cleanup",
                    "verifying cleanup", "exporting", "verifying the result"]


@pytest.mark.parametrize("passes, target, max_opset", [
    (["fold", "cleanup"], "onnx", None),
    (["fold", "cleanup", "fuse"], "ort", None),
    (["fold", "cleanup", "fuse"], "onnx", 23),  # the opset raised, HardSwish fused
    (["fold", "cleanup", "fuse", "quant"], "ort", 23),
])
def test_sample_model_deterministic_and_idempotent(passes, target, max_opset, tmp_path):
    """The shipped PP-OCR classifier (paddle2onnx, opset 12): two runs write byte-identical files,
    and running the lossless passes again over the output changes nothing."""
    from models.builders import SAMPLE_MODEL, SAMPLE_SHAPE

    quant = "fp16" if "quant" in passes else None
    kw = {"passes": passes, "target": target, "max_opset": max_opset, "quant": quant,
          "input_shapes": [SAMPLE_SHAPE]}
    first = onnxopt.optimize(SAMPLE_MODEL, tmp_path / "a.onnx", **kw)
    onnxopt.optimize(SAMPLE_MODEL, tmp_path / "b.onnx", **kw, verify="none")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert all(o["ok"] for o in first.verification["outputs"])
    lossless = [p for p in passes if p != "quant"]
    again = onnxopt.optimize(tmp_path / "a.onnx", tmp_path / "c.onnx", passes=lossless, target=target,
                             max_opset=max_opset, verify="none")
    assert [r.counts for r in again.passes] == [{}] * len(lossless)


@pytest.mark.parametrize("given, calibrated, evaluated", [(False, 6, 2), (True, 8, 1)])
def test_calibration_samples_are_held_back_only_without_given_inputs(monkeypatch, tmp_path, given, calibrated,
                                                                     evaluated):
    @dataclass
    class Opts:
        pass

    seen = {}

    class Recording(Pass):
        name, summary, Options = "cleanup", "records what it is given", Opts

        def run(self, model, ctx):
            seen.update(calibration=ctx.calibration_data, evaluation=ctx.evaluation)
            return {}

    monkeypatch.setattr(onnxopt.passes, "PASSES", [Recording])
    onnx.save(from_text(SIMPLE_TEXT), tmp_path / "in.onnx")
    samples = [{"x": np.full((2, 3), i, np.float32)} for i in range(8)]
    x = {"x": np.full((2, 3), -1, np.float32)}
    onnxopt.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", passes=["cleanup"], calibration_data=samples,
                     inputs=x if given else None)
    assert [float(s["x"][0, 0]) for s in seen["calibration"]] == list(range(calibrated))
    assert len(seen["evaluation"]) == evaluated
    if given:
        np.testing.assert_array_equal(seen["evaluation"][0]["x"], x["x"])
