"""The `onnxopt` command: every bad input and every documented option.

Most runs go through onnxopt.cli.main in-process (what the `onnxopt` script calls); a few go through
a real subprocess to check what only a process shows: the exit status, stderr in a pipe, the
installed script. Every failing run must end with exit code 2 (usage) or 1 (failure), exactly one
`onnxopt: error: ...` line on stderr naming the problem, no traceback unless -v, no output file, no
temporary file, and the input untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest

import onnxopt
from models.builders import SAMPLE_MODEL, SAMPLE_SHAPE, from_text, run
from onnxopt.graph import values
from onnxopt.passes.cleanup import CleanupPass
from onnxopt.passes.fold import FoldPass
from onnxopt.pipeline import registry

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def feeds_x(seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)}


def assert_same_outputs(original: onnx.ModelProto, optimized_path, feeds, exact=False):
    want, got = run(original, feeds), run(onnx.load(optimized_path), feeds)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        if exact:
            np.testing.assert_array_equal(got[name], want[name])
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- success


def test_success_writes_a_verified_model_and_a_summary(cli, simple_model, simple_path, tmp_path, sha256, leftovers):
    digest = sha256(simple_path)
    out = tmp_path / "out.onnx"
    ran = cli(simple_path, "-o", out, "--passes", "cleanup")
    assert ran.code == 0, ran.err
    assert ran.out == ""
    lines = ran.err.splitlines()
    assert lines[0] == f"onnxopt: wrote {out}"
    name, seconds, *changes = lines[1].split()
    assert (name, changes) == ("cleanup", ["constant_nodes_to_initializers=1,", "identity_removed=1"])
    assert seconds.endswith("s") and float(seconds[:-1]) >= 0
    assert lines[2].split()[:9] == ["nodes", "4", "->", "2", "params", "3", "->", "3", "size"]
    assert lines[3] == "  verify final: 1 output(s) match the original (max abs err 0.00e+00, min cosine 1.000000)"
    assert len(lines) == 4
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Add", "Relu"]
    assert_same_outputs(simple_model, out, feeds_x(), exact=True)
    assert sha256(simple_path) == digest
    assert leftovers(tmp_path) == []
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_subprocess_success_is_quiet_about_progress_in_a_pipe(cli_subprocess, simple_model, simple_path, tmp_path,
                                                                sha256, leftovers):
    digest = sha256(simple_path)
    out = tmp_path / "out.onnx"
    ran = cli_subprocess(simple_path, "-o", out)
    assert ran.code == 0, ran.err
    assert ran.out == ""
    assert "\r" not in ran.err and "\033" not in ran.err
    assert ran.err.splitlines()[0] == f"onnxopt: wrote {out}"
    assert_same_outputs(simple_model, out, feeds_x(), exact=True)
    assert sha256(simple_path) == digest
    assert leftovers(tmp_path) == []


def test_progress_line_is_shown_and_cleared_on_a_terminal(cli, simple_path, tmp_path, monkeypatch):
    # The counterpart of the pipe test: on a tty the status line overwrites itself with \r.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    ran = cli(simple_path, "-o", tmp_path / "out.onnx")
    assert ran.code == 0
    assert "\r\033[Konnxopt: loading..." in ran.err
    assert "\r\033[Konnxopt: [2/2] cleanup..." in ran.err
    assert ran.err.split("\r\033[K")[-1].startswith("onnxopt: wrote ")  # cleared before the summary


def test_quiet_prints_nothing_on_success(cli, simple_path, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # not even the progress line
    ran = cli(simple_path, "-o", tmp_path / "out.onnx", "-q")
    assert (ran.code, ran.out, ran.err) == (0, "", "")
    assert (tmp_path / "out.onnx").is_file()


def test_verbose_prints_per_output_metrics(cli, simple_path, tmp_path):
    ran = cli(simple_path, "-o", tmp_path / "out.onnx", "-v")
    assert ran.code == 0
    assert "      y: max_abs 0.000e+00  max_rel 0.000e+00  cosine 1.00000000" in ran.err.splitlines()
    plain = cli(simple_path, "-o", tmp_path / "out2.onnx")
    assert "max_abs" not in plain.err


def test_verbose_each_prints_metrics_per_pass(cli, simple_path, tmp_path):
    ran = cli(simple_path, "-o", tmp_path / "out.onnx", "-v", "--verify", "each")
    assert ran.code == 0
    lines = ran.err.splitlines()
    metric = "      y: max_abs 0.000e+00  max_rel 0.000e+00  cosine 1.00000000"
    # after fold's row, after cleanup's row, and for the final comparison: none in final/each mode
    assert lines[1].split()[0] == "fold" and lines[2] == metric
    assert lines[3].split()[0] == "cleanup" and lines[4] == metric


def test_list_passes(cli):
    ran = cli("--list-passes")
    assert ran.code == 0 and ran.err == ""
    lines = ran.out.splitlines()
    expected = []
    for name, p in registry().items():
        after = f" (after {', '.join(p.after)})" if p.after else ""
        expected.append(f"{name:<10} {p.summary}{after} [{p.tolerance}]")
        expected += [f"{'':<10}   --opt {name}.{f.name}={f.default}" for f in dataclasses.fields(p.Options)]
    assert lines == expected
    assert lines[0].startswith("fold       ")
    assert "             --opt fold.size_limit=4096" in lines
    assert any(line.startswith("cleanup    ") and line.endswith("(after fold) [fp32]") for line in lines)


def test_list_passes_through_the_installed_script(cli_subprocess):
    script = os.path.join(os.path.dirname(sys.executable), "onnxopt")
    if not os.path.exists(script):
        pytest.skip("the onnxopt script is not installed beside this interpreter")
    ran = cli_subprocess("--list-passes", command=[script])
    assert ran.code == 0 and ran.err == ""
    assert ran.out.splitlines()[0].startswith("fold ")


def test_version_and_help(cli):
    ran = cli("--version")
    assert ran.code == 0 and ran.out == f"onnxopt, version {onnxopt.__version__}\n"
    ran = cli("--help")
    assert ran.code == 0 and ran.out.startswith("Usage: onnxopt [OPTIONS] INPUT\n")


# ----------------------------------------------------------------------------------- report


def test_report_contents(cli, simple_path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    ran = cli(simple_path, "-o", out, "--passes", "fold,cleanup", "--report", report, "-q")
    assert (ran.code, ran.err) == (0, "")
    r = json.loads(report.read_text())
    assert set(r) == {"passes", "order_note", "verification", "before", "after", "seconds", "output", "written",
                      "explain", "details"}
    assert r["details"] == {}  # what a pass reports beyond counts (the partition plan)
    assert [p["name"] for p in r["passes"]] == ["fold", "cleanup"]
    assert r["passes"][0]["counts"] == {"constant_nodes_to_initializers": 1}
    assert r["passes"][1]["counts"] == {"identity_removed": 1}
    assert [p["nodes_after"] for p in r["passes"]] == [3, 2]
    for p in r["passes"]:
        assert isinstance(p["seconds"], float) and 0 <= p["seconds"] < r["seconds"]
        assert p["verification"] is None and p["verification_skipped"] is None  # --verify final
    assert r["order_note"] is None
    assert r["verification"] == {"mode": "final", "skipped": None, "over_budget": [], "outputs": [
        {"name": "y", "max_abs": 0.0, "max_rel": 0.0, "cosine": pytest.approx(1.0), "ok": True, "note": "",
         "worst_cosine": None, "samples": 1, "agreement": None, "positions": 0,
         "plain_agreement": None}]}
    assert r["before"] == {"nodes": 4, "params": 3, "size": os.path.getsize(simple_path)}
    assert r["after"] == {"nodes": 2, "params": 3, "size": os.path.getsize(out)}
    assert r["output"] == str(out) and r["written"] == [str(out)]
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_report_with_verify_each_has_per_pass_metrics_and_order_note(cli, simple_path, tmp_path):
    report = tmp_path / "report.json"
    ran = cli(simple_path, "-o", tmp_path / "out.onnx", "--passes", "cleanup,fold", "--verify", "each",
              "--report", report)
    assert ran.code == 0
    assert ran.err.splitlines()[1] == "passes reordered to respect their dependencies: fold,cleanup"
    r = json.loads(report.read_text())
    assert r["order_note"] == "passes reordered to respect their dependencies: fold,cleanup"
    assert [p["name"] for p in r["passes"]] == ["fold", "cleanup"]
    for p in r["passes"]:
        assert [(m["name"], m["ok"], m["max_abs"]) for m in p["verification"]] == [("y", True, 0.0)]
    assert r["verification"]["mode"] == "each"
    assert [m["name"] for m in r["verification"]["outputs"]] == ["y"]


def test_verify_none(cli, simple_path, tmp_path):
    report = tmp_path / "report.json"
    ran = cli(simple_path, "-o", tmp_path / "out.onnx", "--verify", "none", "--report", report)
    assert ran.code == 0
    assert ran.err.splitlines()[-1] == "  verify none: skipped (--verify none)"
    assert "warning" not in ran.err
    r = json.loads(report.read_text())
    assert r["verification"] == {"mode": "none", "skipped": "--verify none", "outputs": [], "over_budget": []}
    assert all(p["verification"] is None for p in r["passes"])


def test_sample_model_end_to_end(cli_subprocess, tmp_path, sha256):
    """The real PP-OCR classifier in a subprocess: written, checked, same outputs as onnxruntime."""
    out, report = tmp_path / "cls.opt.onnx", tmp_path / "report.json"
    digest = sha256(SAMPLE_MODEL)
    ran = cli_subprocess(SAMPLE_MODEL, "-o", out, "--input-shape", SAMPLE_SHAPE, "--report", report, "-v")
    assert ran.code == 0, ran.err
    assert "\r" not in ran.err
    r = json.loads(report.read_text())
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    assert r["before"]["nodes"] == 566
    assert r["after"]["nodes"] == len(optimized.graph.node) < 566
    assert r["before"]["size"] == os.path.getsize(SAMPLE_MODEL)
    assert r["after"]["size"] == os.path.getsize(out)
    assert [o["ok"] for o in r["verification"]["outputs"]] == [True]
    x = np.random.default_rng(1).standard_normal((1, 3, 48, 192)).astype(np.float32)
    assert_same_outputs(onnx.load(SAMPLE_MODEL), out, {"x": x})
    assert sha256(SAMPLE_MODEL) == digest


# ----------------------------------------------------------------------------------- bad input


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _tensor_proto_bytes():
    return onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "t").SerializeToString()


def _graph_proto_bytes():
    return onnx.parser.parse_graph("g (float[2] x) => (float[2] y) { y = Identity(x) }").SerializeToString()


def _checker_failure(path):
    model = from_text(HEADER + "g (float[2] x) => (float[2] y) { y = Add(x, nothere) }", check=False)
    onnx.save(model, path)
    return path


def _missing_external_data(path):
    model = from_text(HEADER + "g (float[300] x) => (float[300] y) { y = Add(x, w) }", check=False)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(300, np.float32), "w"))
    onnx.save(model, path, save_as_external_data=True, location="in.data", size_threshold=0)
    os.remove(path.parent / "in.data")
    return path


def _one_shot(simple):
    # A proto whose graph is empty but present: no nodes, no opset -> not a model we can use.
    m = onnx.ModelProto(ir_version=8)
    m.graph.name = "g"
    return m.SerializeToString()


# (id, make the input file from (folder, good model bytes) -> path, exit code, message fragments)
BAD_INPUTS = [
    ("missing", lambda d, good: d / "nope.onnx", 2, ["input file not found: ", "nope.onnx"]),
    ("folder", lambda d, good: (d / "folder.onnx").mkdir() or d / "folder.onnx", 2, ["input is a folder"]),
    ("empty", lambda d, good: _write(d / "empty.onnx", b""), 1, ["input file is empty: ", "empty.onnx"]),
    ("truncated", lambda d, good: _write(d / "t.onnx", good[: len(good) // 2]), 1,
     ["not a readable ONNX model: ", "t.onnx: Error parsing message"]),
    ("random_bytes", lambda d, good: _write(d / "r.onnx", np.random.default_rng(0).bytes(256)), 1,
     ["not a readable ONNX model: ", "Wire format was corrupt"]),
    ("text_file", lambda d, good: _write(d / "notes.onnx", b"this is not a model\n"), 1,
     ["not a readable ONNX model: "]),
    ("tensor_proto", lambda d, good: _write(d / "tensor.onnx", _tensor_proto_bytes()), 1,
     ["not a readable ONNX model: "]),
    ("graph_proto", lambda d, good: _write(d / "graph.onnx", _graph_proto_bytes()), 1,
     ["not an ONNX model (no graph or opset): ", "graph.onnx"]),
    ("no_opset", lambda d, good: _write(d / "bare.onnx", _one_shot(good)), 1, ["model fails onnx.checker: "]),
    ("fails_checker", lambda d, good: _checker_failure(d / "bad.onnx"), 1,
     ["model fails onnx.checker: ", "bad.onnx: ", "'nothere'", "is not output of any previous nodes"]),
    ("external_data_missing", lambda d, good: _missing_external_data(d / "in.onnx"), 1,
     ["cannot load external data of ", "in.onnx"]),
]


@pytest.mark.parametrize("make,code,fragments", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_file(cli, assert_error, tmp_path, simple_model, leftovers, make, code, fragments):
    src = tmp_path / "src"
    src.mkdir()
    path = make(src, simple_model.SerializeToString())
    before = sorted(os.listdir(src))
    out = tmp_path / "out.onnx"
    assert_error(cli(path, "-o", out), code, *fragments)
    assert not out.exists()
    assert os.listdir(tmp_path) == ["src"]
    assert sorted(os.listdir(src)) == before and leftovers(src) == []


def test_bad_input_with_verbose_shows_the_traceback(cli, tmp_path):
    path = _write(tmp_path / "t.onnx", b"\x08\x08\x12")
    ran = cli(path, "-o", tmp_path / "out.onnx", "-v")
    assert ran.code == 1
    assert "Traceback (most recent call last)" in ran.err
    assert "ModelError" in ran.err
    assert ran.err.splitlines()[-1].startswith("onnxopt: error: not a readable ONNX model: ")


def test_bad_input_in_a_subprocess(cli_subprocess, assert_error, tmp_path, simple_model):
    path = _write(tmp_path / "t.onnx", simple_model.SerializeToString()[:40])
    assert_error(cli_subprocess(path, "-o", tmp_path / "out.onnx"), 1, "not a readable ONNX model")
    ran = cli_subprocess(path, "-o", tmp_path / "out.onnx", "--verbose")
    assert ran.code == 1 and "Traceback" in ran.err
    assert os.listdir(tmp_path) == ["t.onnx"]


def test_usage_error_in_a_subprocess(cli_subprocess, assert_error, simple_path, tmp_path):
    assert_error(cli_subprocess(simple_path, "-o", tmp_path / "out.onnx", "--passes", "fold,nope"), 2,
                 "unknown pass 'nope'; available: fold, cleanup")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


# (id, extra arguments, exit code, message fragments); the input is the good simple model.
BAD_OPTIONS = [
    ("unknown_pass", ["--passes", "fold,nope"], 2, ["unknown pass 'nope'; available: fold, cleanup"]),
    ("no_pass", ["--passes", " , "], 2, ["no passes given; see --list-passes"]),
    ("duplicate_pass", ["--passes", "fold,cleanup,fold"], 2, ["a pass is listed twice: fold,cleanup,fold"]),
    ("opt_not_int", ["--opt", "fold.size_limit=abc"], 2, ["bad value 'abc' for option fold.size_limit: expected int"]),
    ("opt_not_bool", ["--opt", "cleanup.cse=maybe"], 2, ["bad value 'maybe' for option cleanup.cse: expected bool"]),
    ("opt_unknown", ["--opt", "fold.nope=1"], 2, ["pass 'fold' has no option 'nope' (options: size_limit"]),
    ("opt_unknown_pass", ["--opt", "nope.x=1"], 2, ["--opt 'nope.x=1': unknown pass 'nope'"]),
    ("opt_unselected", ["--passes", "fold", "--opt", "cleanup.cse=0"], 2,
     ["--opt 'cleanup.cse=0': pass 'cleanup' is not selected in --passes"]),
    ("opt_malformed", ["--opt", "fold"], 2, ["bad --opt 'fold': expected PASS.OPTION=VALUE"]),
    ("opt_no_field", ["--opt", "fold.=3"], 2, ["bad --opt 'fold.=3': expected PASS.OPTION=VALUE"]),
    ("verify", ["--verify", "sometimes"], 2, ["bad --verify 'sometimes': expected one of none, final, each"]),
    ("shape_syntax", ["--input-shape", "x=abc"], 2, ["bad --input-shape 'x=abc': expected NAME=DxDx..."]),
    ("shape_no_name", ["--input-shape", "2x3"], 2, ["bad --input-shape '2x3'"]),
    ("shape_unknown_input", ["--input-shape", "q=2x3"], 2, ["model has no input named 'q'; its inputs are: x"]),
    ("shape_rank", ["--input-shape", "x=2x3x4"], 2, ["--input-shape x: rank 3 but the input has rank 2"]),
    ("shape_fixed_dim", ["--input-shape", "x=5x3"], 2, ["--input-shape x: dimension 5 but the model fixes it to 2"]),
    ("target", ["--target", "gpu"], 2, ["bad --target 'gpu': expected onnx or ort"]),
    ("max_opset_range", ["--max-opset", "0"], 2, ["bad --max-opset 0: this onnx knows opsets 1 to"]),
    ("max_opset_not_int", ["--max-opset", "new"], 2, ["'new' is not a valid integer"]),
    ("unknown_flag", ["--frobnicate"], 2, ["No such option '--frobnicate'"]),
    ("verify_missing_value", ["--verify"], 2, ["Option '--verify' requires an argument"]),
]


@pytest.mark.parametrize("extra,code,fragments", [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS])
def test_bad_option(cli, assert_error, simple_path, tmp_path, sha256, extra, code, fragments):
    digest = sha256(simple_path)
    assert_error(cli(simple_path, "-o", tmp_path / "out.onnx", *extra), code, *fragments)
    assert os.listdir(tmp_path) == ["in.onnx"]
    assert sha256(simple_path) == digest


def test_missing_output_and_input(cli, assert_error, simple_path, tmp_path):
    assert_error(cli(simple_path), 2, "missing -o OUTPUT path")
    assert_error(cli("-o", tmp_path / "out.onnx"), 2, "missing INPUT model path")
    assert_error(cli(), 2, "missing INPUT model path")
    assert os.listdir(tmp_path) == ["in.onnx"]


def _same_as_input(kind, d):
    src = d / "in.onnx"
    if kind == "same":
        return src
    if kind == "dot":
        return f"{d}/./in.onnx"
    if kind == "dotdot":
        return f"{d}/../{d.name}/in.onnx"
    if kind == "relative":
        return os.path.relpath(src)
    if kind == "symlink":
        os.symlink(src, d / "link.onnx")
        return d / "link.onnx"
    if kind == "hardlink":
        os.link(src, d / "hard.onnx")
        return d / "hard.onnx"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["same", "dot", "dotdot", "relative", "symlink", "hardlink"])
def test_output_equal_to_input_is_refused(cli, assert_error, simple_path, tmp_path, sha256, kind):
    digest = sha256(simple_path)
    out = _same_as_input(kind, tmp_path)
    assert_error(cli(simple_path, "-o", out), 2, "output path is the input path; the input is never overwritten")
    assert sha256(simple_path) == digest
    assert sorted(os.listdir(tmp_path)) == sorted(["in.onnx"] + ([os.path.basename(out)] if kind.endswith("link")
                                                                 else []))


def test_input_given_through_a_symlink_and_output_is_its_target(cli, assert_error, simple_path, tmp_path, sha256):
    digest = sha256(simple_path)
    os.symlink(simple_path, tmp_path / "link.onnx")
    assert_error(cli(tmp_path / "link.onnx", "-o", simple_path), 2, "output path is the input path")
    assert sha256(simple_path) == digest


# (id, output path under the test folder, exit code, fragments)
def _unwritable(kind, d):
    if kind == "folder_missing":
        return d / "missing" / "out.onnx"
    if kind == "under_a_file":  # as root os.access says yes to everything; a file is never a folder
        return d / "in.onnx" / "out.onnx"
    if kind == "is_a_folder":
        (d / "outdir").mkdir()
        return d / "outdir"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,code,fragment", [
    ("folder_missing", 1, "cannot write output: folder does not exist: "),
    ("under_a_file", 1, "cannot write output: not a folder: "),
    ("is_a_folder", 2, "output path is a folder: "),
])
def test_unwritable_output_path(cli, assert_error, simple_path, tmp_path, leftovers, kind, code, fragment):
    out = _unwritable(kind, tmp_path)
    assert_error(cli(simple_path, "-o", out), code, fragment)
    assert not (tmp_path / "missing").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["in.onnx"] + (["outdir"] if kind == "is_a_folder" else []))
    if kind == "is_a_folder":
        assert os.listdir(out) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the monkeypatched test")
def test_read_only_output_folder(cli, assert_error, simple_path, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_error(cli(simple_path, "-o", ro / "out.onnx"), 1, "cannot write output: folder is not writable")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("stage", ["create", "rename"])
def test_write_failure_is_one_line_and_leaves_nothing(cli, assert_error, simple_path, tmp_path, leftovers,
                                                      monkeypatch, stage):
    """A folder that refuses the write (read-only, full disk: what root cannot get from chmod)."""
    import onnxopt.io as io

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    if stage == "create":
        monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    else:
        monkeypatch.setattr(io.os, "replace", refuse)
    out = tmp_path / "out.onnx"
    assert_error(cli(simple_path, "-o", out), 1, f"cannot write output {out}: Permission denied")
    assert os.listdir(tmp_path) == ["in.onnx"]


@pytest.mark.parametrize("kind,code,fragment", [
    ("input", 2, "--report path is the input path: "),
    ("output", 2, "--report path is the output path: "),
    ("folder", 2, "--report path is a folder: "),
    ("missing_folder", 1, "cannot write --report: folder does not exist: "),
    ("under_a_file", 1, "cannot write --report: not a folder: "),
])
def test_bad_report_path(cli, assert_error, simple_path, tmp_path, sha256, kind, code, fragment):
    digest = sha256(simple_path)
    out = tmp_path / "out.onnx"
    report = {"input": simple_path, "output": tmp_path / "." / "out.onnx", "folder": tmp_path,
              "missing_folder": tmp_path / "nope" / "r.json", "under_a_file": simple_path / "r.json"}[kind]
    assert_error(cli(simple_path, "-o", out, "--report", report), code, fragment)
    assert os.listdir(tmp_path) == ["in.onnx"]
    assert sha256(simple_path) == digest


def test_report_write_failure_after_the_model_is_one_line(cli, assert_error, simple_path, tmp_path, monkeypatch):
    import onnxopt.report as report_mod

    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("r.json.tmp"):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(report_mod, "open", failing_open, raising=False)
    assert_error(cli(simple_path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json"), 1,
                 f"cannot write --report {tmp_path / 'r.json'}: No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


# ----------------------------------------------------------------------------------- --inputs


RESHAPE_TEXT = HEADER + "g (float[2,6] x, int64[2] s) => (float[a,b] y) { y = Reshape(x, s) }"


def test_int_input_driving_a_shape_is_refused_without_inputs(cli, assert_error, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(from_text(RESHAPE_TEXT), path)
    assert_error(cli(path, "-o", tmp_path / "out.onnx"), 2,
                 "input 's' drives a shape or an index (Reshape); give real values with --inputs FILE.npz")
    assert os.listdir(tmp_path) == ["in.onnx"]


def test_inputs_npz_supplies_the_values(cli, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(from_text(RESHAPE_TEXT), path)
    npz = tmp_path / "feeds.npz"
    np.savez(npz, s=np.array([3, 4], dtype=np.int64))  # x is generated; [1, 1] would not fit 12 values
    report = tmp_path / "r.json"
    ran = cli(path, "-o", tmp_path / "out.onnx", "--inputs", npz, "--report", report)
    assert ran.code == 0, ran.err
    assert json.loads(report.read_text())["verification"]["outputs"][0]["ok"] is True


def test_inputs_npz_values_reach_onnxruntime(cli, assert_error, tmp_path):
    # s = [5, 5] cannot reshape 12 values: the run fails on the user's values, which proves they are used
    path = tmp_path / "in.onnx"
    onnx.save(from_text(RESHAPE_TEXT), path)
    npz = tmp_path / "feeds.npz"
    np.savez(npz, s=np.array([5, 5], dtype=np.int64))
    assert_error(cli(path, "-o", tmp_path / "out.onnx", "--inputs", npz), 2,
                 "cannot verify: the original model does not run on ", "--verify none")


@pytest.mark.parametrize("kind,fragments", [
    ("missing", ["--inputs file not found: "]),
    ("garbage", ["is not a readable .npz file"]),
    ("wrong_name", ["model has no input named 'q'; its inputs are: x"]),
    ("wrong_dtype", ["--inputs x: type float64 but the model expects float32"]),
    ("wrong_shape", ["--inputs x: shape [4, 3] but the model fixes axis 0 to 2"]),
    ("wrong_rank", ["--inputs x: shape [6] but the input has rank 2"]),
])
def test_bad_inputs_npz(cli, assert_error, simple_path, tmp_path, kind, fragments):
    npz = tmp_path / "feeds.npz"
    if kind == "garbage":
        npz.write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "wrong_name":
        np.savez(npz, q=np.ones((2, 3), np.float32))
    elif kind == "wrong_dtype":
        np.savez(npz, x=np.ones((2, 3)))
    elif kind == "wrong_shape":
        np.savez(npz, x=np.ones((4, 3), np.float32))
    elif kind == "wrong_rank":
        np.savez(npz, x=np.ones(6, np.float32))
    assert_error(cli(simple_path, "-o", tmp_path / "out.onnx", "--inputs", npz), 2, *fragments)
    assert not (tmp_path / "out.onnx").exists()


def test_input_shape_for_dynamic_dims(cli, assert_error, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(from_text(HEADER + "g (float[N,C] x) => (float[N,C] y) { y = Relu(x) }"), path)
    ran = cli(path, "-o", tmp_path / "out.onnx", "--input-shape", "x=3x5", "-q")
    assert (ran.code, ran.err) == (0, "")
    assert_error(cli(path, "-o", tmp_path / "out2.onnx", "--input-shape", "x=3"), 2,
                 "--input-shape x: rank 1 but the input has rank 2")


def test_gather_index_input_gets_values_in_range(cli, tmp_path):
    table = ", ".join(str(float(i)) for i in range(20))
    path = tmp_path / "in.onnx"
    onnx.save(from_text(HEADER + "g (int64[16] idx) => (float[16,4] y) <float[5,4] t = {%s}> { y = Gather(t, idx) }"
                        % table), path)
    report = tmp_path / "r.json"
    ran = cli(path, "-o", tmp_path / "out.onnx", "--report", report)
    assert ran.code == 0, ran.err  # ones would run too; test_verify checks the values are spread over 0..4
    assert json.loads(report.read_text())["verification"]["skipped"] is None


# ----------------------------------------------------------------------------------- verification


SUB_TEXT = HEADER + """
g (float[2,3] x, float[2,3] w) => (float[2,3] y) {
  i = Identity(x)
  d = Sub(i, w)
  y = Relu(d)
}"""


def _swap_sub_inputs(monkeypatch):
    """Make cleanup also swap the inputs of every Sub: a bug that changes output y."""
    real = CleanupPass.run

    def broken(self, model, ctx):
        counts = real(self, model, ctx)
        for node in model.graph.nodes:
            if node.op == "Sub":
                node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]
        return counts

    monkeypatch.setattr(CleanupPass, "run", broken)


def _perturb_fold_constants(monkeypatch):
    """Make fold also add 1 to every constant input of an Add."""
    real = FoldPass.run

    def broken(self, model, ctx):
        counts = real(self, model, ctx)
        for node in model.graph.nodes:
            for t in node.inputs:
                if node.op == "Add" and isinstance(t, gs.Constant):
                    t.values = values(t) + np.float32(1)
        return counts

    monkeypatch.setattr(FoldPass, "run", broken)


@pytest.mark.parametrize("mode", ["final", "each"])
def test_verification_failure_names_the_pass_and_writes_nothing(cli, assert_error, tmp_path, monkeypatch,
                                                                 sha256, mode):
    path = tmp_path / "in.onnx"
    onnx.save(from_text(SUB_TEXT), path)
    digest = sha256(path)
    _swap_sub_inputs(monkeypatch)
    out = tmp_path / "out.onnx"
    line = assert_error(cli(path, "-o", out, "--passes", "fold,cleanup", "--verify", mode, "--report",
                            tmp_path / "r.json"), 1,
                        "pass 'cleanup' changed output 'y': max abs err ", "; nothing was written")
    assert "fold" not in line
    assert os.listdir(tmp_path) == ["in.onnx"]  # no model, no report, no temporary file
    assert sha256(path) == digest


def test_verification_failure_of_an_earlier_pass_is_localized_with_verify_final(cli, assert_error, simple_path,
                                                                                tmp_path, monkeypatch):
    _perturb_fold_constants(monkeypatch)
    assert_error(cli(simple_path, "-o", tmp_path / "out.onnx", "--passes", "fold,cleanup"), 1,
                 "pass 'fold' changed output 'y'")
    assert os.listdir(tmp_path) == ["in.onnx"]


def test_verification_failure_goes_unnoticed_with_verify_none(cli, tmp_path, monkeypatch):
    # The counterpart: the broken pass really changes the model, and --verify none does not look.
    path = tmp_path / "in.onnx"
    onnx.save(from_text(SUB_TEXT), path)
    _swap_sub_inputs(monkeypatch)
    ran = cli(path, "-o", tmp_path / "out.onnx", "--verify", "none", "-q")
    assert ran.code == 0
    feeds = {"x": np.full((2, 3), 2, np.float32), "w": np.ones((2, 3), np.float32)}
    np.testing.assert_array_equal(run(onnx.load(tmp_path / "out.onnx"), feeds)["y"], np.zeros((2, 3), np.float32))


def _custom_op_model():
    return from_text('<ir_version: 8, opset_import: ["" : 17, "my.domain" : 1]>\n'
                     "g (float[2] x) => (float[2] y) { z = Identity(x)\n y = my.domain.Foo(z) }")


def test_custom_domain_op_skips_verification_with_the_reason(cli, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(_custom_op_model(), path)
    report = tmp_path / "r.json"
    ran = cli(path, "-o", tmp_path / "out.onnx", "--report", report)
    assert ran.code == 0, ran.err
    warning = ran.err.splitlines()[-1]
    assert warning.startswith("onnxopt: warning: verification skipped: onnxruntime cannot load the model: ")
    assert "my.domain:Foo" in warning and "is not a registered function/op" in warning
    assert "ONNXRuntimeError" not in warning
    r = json.loads(report.read_text())
    assert r["verification"]["mode"] == "final" and r["verification"]["outputs"] == []
    assert "my.domain:Foo" in r["verification"]["skipped"]
    out = onnx.load(tmp_path / "out.onnx")
    assert [(n.domain, n.op_type) for n in out.graph.node] == [("my.domain", "Foo")]
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("my.domain", 1)}


def test_custom_domain_op_with_verify_each_records_the_skip_per_pass(cli, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(_custom_op_model(), path)
    report = tmp_path / "r.json"
    assert cli(path, "-o", tmp_path / "out.onnx", "--verify", "each", "--report", report, "-q").code == 0
    r = json.loads(report.read_text())
    for p in r["passes"]:
        assert p["verification"] is None and "my.domain:Foo" in p["verification_skipped"]


def test_opset_newer_than_onnxruntime_skips_verification(cli, tmp_path):
    import onnxruntime

    newest = onnx.defs.onnx_opset_version()
    opset = newest + 1  # one past every released opset: onnxruntime refuses it
    model = oh.make_model(
        oh.make_graph([oh.make_node("Identity", ["x"], ["z"]), oh.make_node("Relu", ["z"], ["y"])], "g",
                      [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                      [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]),
        ir_version=onnx.IR_VERSION, opset_imports=[oh.make_opsetid("", opset)])
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    ran = cli(path, "-o", tmp_path / "out.onnx")
    assert ran.code == 0, ran.err
    warning = ran.err.splitlines()[-1]
    assert warning.startswith("onnxopt: warning: verification skipped: onnxruntime cannot load the model: "), (
        onnxruntime.__version__, warning)
    assert f"Opset {opset} is under development" in warning
    assert ".h:" not in warning  # no C++ source location
    assert [n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node] == ["Relu"]


@pytest.mark.filterwarnings("error")  # a numpy warning would be a second stderr line
def test_infinite_and_nan_outputs_verify_cleanly(cli, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(from_text(HEADER + """g (float[2,3] x) => (float[2,3] y) {
      z = Constant<value = float[3] {0.0, 0.0, 0.0}>()
      i = Identity(x)
      y = Div(i, z)
    }"""), path)
    ran = cli(path, "-o", tmp_path / "out.onnx", "-q", "--report", tmp_path / "r.json")
    assert (ran.code, ran.err) == (0, "")
    (metrics,) = json.loads((tmp_path / "r.json").read_text())["verification"]["outputs"]
    assert metrics["ok"] is True and metrics["note"] == ""


def test_external_data_flag_on_a_model_without_big_tensors(cli, simple_model, simple_path, tmp_path):
    ran = cli(simple_path, "-o", tmp_path / "out.onnx", "--external-data", "-q")
    assert (ran.code, ran.err) == (0, "")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]  # nothing big enough to move out
    assert_same_outputs(simple_model, tmp_path / "out.onnx", feeds_x(), exact=True)


def test_verification_failure_with_external_data_leaves_no_data_file(cli, assert_error, tmp_path, monkeypatch):
    model = from_text(HEADER + "g (float[2,3] x, float[2,3] w) => (float[2,3] y, float[2,300] z) "
                      "{ i = Identity(x)\n d = Sub(i, w)\n y = Relu(d)\n z = Mul(big, big) }", check=False)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((2, 300), np.float32), "big"))
    onnx.checker.check_model(model)
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    _swap_sub_inputs(monkeypatch)
    assert_error(cli(path, "-o", tmp_path / "out.onnx", "--external-data", "--passes", "cleanup"), 1,
                 "pass 'cleanup' changed output 'y'")
    assert os.listdir(tmp_path) == ["in.onnx"]


def test_a_crashing_pass_is_one_line_internal_error(cli, assert_error, simple_path, tmp_path, monkeypatch):
    def crash(self, model, ctx):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(CleanupPass, "run", crash)
    assert_error(cli(simple_path, "-o", tmp_path / "out.onnx"), 1, "internal error: ValueError: boom second line")
    assert os.listdir(tmp_path) == ["in.onnx"]
    ran = cli(simple_path, "-o", tmp_path / "out.onnx", "-v")
    assert ran.code == 1 and "Traceback" in ran.err and 'raise ValueError("boom' in ran.err


def test_interrupt_during_verification_leaves_nothing(cli, assert_error, simple_path, tmp_path, monkeypatch):
    """Ctrl-C after the temporary output is written: it is removed, exit code 130."""
    import onnxopt.verify as verify_mod

    real, calls = verify_mod.run_samples, []

    def interrupted(path, samples):
        calls.append(path)
        if len(calls) == 2:  # the final check, which reads the temporary output file
            assert os.path.basename(path).startswith(".out.onnx.") and os.path.exists(path)
            raise KeyboardInterrupt
        return real(path, samples)

    monkeypatch.setattr(verify_mod, "run_samples", interrupted)
    assert_error(cli(simple_path, "-o", tmp_path / "out.onnx"), 130, "interrupted")
    assert len(calls) == 2
    assert os.listdir(tmp_path) == ["in.onnx"]


# --------------------------------------------------------------------------------- partition


def _spec(tmp_path, ops) -> str:
    path = tmp_path / "npu.json"
    path.write_text(json.dumps({"name": "npu", "provider": "NpuExecutionProvider", "ops": ops,
                                "throughput": {"default": 1e15}, "launch": 0,
                                "link": {"bandwidth": 1e15, "latency": 0}}))
    return str(path)


def _run_split(capsys, *args):
    from onnxopt.cli import run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_partition_with_devices_pins_split_and_onnxopt_run(cli, capsys, simple_model, simple_path, tmp_path):
    out, split, report = tmp_path / "out.onnx", tmp_path / "parts", tmp_path / "report.json"
    ran = cli(simple_path, "-o", out, "--passes", "cleanup,partition", "--devices", f"{_spec(tmp_path, ['Add'])},cpu",
              "--pin", "Relu=cpu", "--split", split, "--report", report)
    assert ran.code == 0, ran.err
    # the spec names no designator: onnxruntime's catch-all for a device that is not the cpu
    assert "partition: session.layer_assignment_settings = accelerator(onnxopt/npu/); cpu(onnxopt/cpu/)" in ran.err
    details = json.loads(report.read_text())["details"]["partition"]
    assert [(p["device"], p["ops"]) for p in details["partitions"]] == [("npu", {"Add": 1}), ("cpu", {"Relu": 1})]
    assert details["split"] == {"folder": str(split), "partitions": 2, "max_abs_diff": 0.0}
    np.savez(tmp_path / "x.npz", **feeds_x(3))
    code, stdout, err = _run_split(capsys, split, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert code == 0 and stdout == ""
    assert "NpuExecutionProvider is not available here: partition 0 runs on CPUExecutionProvider" in err
    assert "partition 1: cpu on CPUExecutionProvider, 1 nodes" in err
    got = np.load(tmp_path / "y.npz")
    np.testing.assert_array_equal(got["y"], run(simple_model, feeds_x(3))["y"])
    code, _, err = _run_split(capsys, split, "--inputs", tmp_path / "x.npz", "--provider", "npu=CPUExecutionProvider",
                              "-q")
    assert code == 0 and err == ""


def test_onnxopt_run_script_is_installed(cli_subprocess):
    script = os.path.join(os.path.dirname(sys.executable), "onnxopt-run")
    if not os.path.exists(script):
        pytest.skip("the onnxopt-run script is not installed beside this interpreter")
    ran = cli_subprocess("--help", command=[script])
    assert ran.code == 0 and "Run the split in DIR" in ran.out


@pytest.mark.parametrize("args, fragment", [
    (["--passes", "partition", "--devices", "nowhere.json"], "device spec file not found: nowhere.json"),
    (["--passes", "partition", "--devices", "tpu"], "unknown device 'tpu'"),
    (["--passes", "cleanup", "--pin", "Relu=cpu"], "--pin needs the partition pass in --passes"),
    (["--passes", "partition", "--pin", "Conv=cpu"], "--pin Conv=cpu: no node has that op type or name"),
    (["--passes", "partition", "--pin", "Relu"], "bad --pin 'Relu'"),
])
def test_partition_usage_errors(cli, assert_error, simple_path, tmp_path, args, fragment):
    out = tmp_path / "out.onnx"
    assert_error(cli(simple_path, "-o", out, *args), 2, fragment)
    assert not out.exists()


def test_split_into_a_foreign_folder_is_refused(cli, assert_error, simple_path, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("keep")
    out = tmp_path / "out.onnx"
    assert_error(cli(simple_path, "-o", out, "--passes", "partition", "--split", tmp_path / "mine"), 2,
                 "--split folder is not empty and holds no earlier split")
    assert not out.exists() and (tmp_path / "mine" / "a.txt").read_text() == "keep"


def test_onnxopt_run_errors(capsys, tmp_path):
    code, out, err = _run_split(capsys, tmp_path, "--inputs", tmp_path / "x.npz")
    assert code == 2 and out == "" and err.startswith("onnxopt-run: error: ") and len(err.splitlines()) == 1
    code, _, err = _run_split(capsys, tmp_path)
    assert code == 2 and "missing --inputs FILE.npz" in err
