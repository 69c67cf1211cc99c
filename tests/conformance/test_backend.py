"""Differential conformance over the ONNX backend test suite (see harness.py).

The default run takes a fixed sample (every SAMPLE_EVERY-th case of each source); `-m slow` runs
every case. Either way no configuration may fail on a case whose original onnxruntime runs and
matches, and every skipped case carries a reason. The harness's own verdicts are tested first on
small models with a deliberately broken optimizer.
"""

from __future__ import annotations

import json
import types

import numpy as np
import onnx
import pytest

import onnxopt
from models.builders import from_text
from onnxopt.pipeline import registry
from tests.conformance import harness

SAMPLE_EVERY = 5

ADD = from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, float[2] y) => (float[2] z) { z = Add(x, y) }""")
SUB = from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, float[2] y) => (float[2] z) { z = Sub(x, y) }""")
X, Y = np.array([1.0, 2.0], np.float32), np.array([0.5, 0.25], np.float32)


def case(model=ADD, inputs=(X, Y), outputs=(X + Y,), rtol=1e-3, atol=1e-7) -> harness.Case:
    return harness.Case("test", "add", rtol, atol, lambda: (model, [(list(inputs), list(outputs))]))


def returning(model):
    """A stand-in for onnxopt.optimize that returns `model`."""
    return lambda *args, **kwargs: types.SimpleNamespace(model=model)


FOLD = harness.Config("fold", ("fold",))


# ----------------------------------------------------------------------------------- the harness


def test_configs_cover_every_lossless_pass():
    names = [c.name for c in harness.configs()]
    if "fuse" in registry():
        assert names == ["fold", "cleanup", "fuse:onnx", "fuse:ort", "partition", "all:onnx", "all:ort",
                         "all:onnx:max-opset-24", "all:ort:max-opset-24"]
    else:
        assert names == ["fold", "cleanup", "all"]
        assert harness.configs()[-1] == harness.Config("all", ("fold", "cleanup"), "onnx")


def test_select_configs_rejects_unknown_names():
    assert [c.name for c in harness.select_configs("cleanup,fold")] == ["cleanup", "fold"]
    with pytest.raises(ValueError, match="unknown config"):
        harness.select_configs("fold,nope")


def test_real_optimizer_passes_and_unchanged_result_is_recognized():
    (record,) = harness.run_case(case(), [FOLD])
    assert record == harness.Record("test/add", "fold", "passed", "", "unchanged")


def test_changed_outputs_fail():
    (record,) = harness.run_case(case(), [FOLD], optimize=returning(SUB))
    assert (record.status, record.reason) == ("failed", harness.FAIL_MISMATCH)
    assert record.detail == "output 'z': 2 of 2 values outside rtol 0.001 / atol 1e-07 (max abs err 1)"


def test_reordered_inputs_fail():
    # Add commutes: the outputs still match, but callers feed inputs by position too.
    swapped = from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2] y, float[2] x) => (float[2] z) { z = Add(x, y) }""")
    (record,) = harness.run_case(case(), [FOLD], optimize=returning(swapped))
    assert record == harness.Record("test/add", "fold", "failed", harness.FAIL_INTERFACE,
                                    "inputs ['y', 'x'], outputs ['z'] instead of ['x', 'y'], ['z']")


def test_invalid_result_fails_the_checker():
    broken = onnx.ModelProto()
    broken.CopyFrom(ADD)
    broken.graph.node[0].input[1] = "missing"
    (record,) = harness.run_case(case(), [FOLD], optimize=returning(broken))
    assert (record.status, record.reason) == ("failed", harness.FAIL_CHECKER)
    assert record.detail.startswith("full_check: ")


def test_exception_from_optimize_fails():
    def boom(*args, **kwargs):
        raise KeyError("x")

    (record,) = harness.run_case(case(), [FOLD], optimize=boom)
    assert (record.status, record.reason) == ("failed", harness.FAIL_OPTIMIZE)
    assert record.detail.startswith("KeyError: 'x' (at test_backend.py:")


def test_refusal_from_optimize_fails():
    def refuse(*args, **kwargs):
        raise onnxopt.ModelError("model fails onnx.checker: no")

    (record,) = harness.run_case(case(), [FOLD], optimize=refuse)
    assert record == harness.Record("test/add", "fold", "failed", harness.FAIL_REFUSED,
                                    "ModelError: model fails onnx.checker: no")


def test_same_result_bytes_reuse_the_verdict():
    records = harness.run_case(case(), [FOLD, harness.Config("cleanup", ("cleanup",))], optimize=returning(SUB))
    assert [(r.config, r.status, r.reason) for r in records] == [
        ("fold", "failed", harness.FAIL_MISMATCH), ("cleanup", "failed", harness.FAIL_MISMATCH)]
    assert records[0].detail == records[1].detail


def test_original_that_mismatches_is_skipped():
    (record,) = harness.run_case(case(outputs=(X - Y,)), [FOLD])
    assert (record.config, record.status, record.reason) == (None, "skipped", harness.SKIP_ORT_MISMATCH)


def test_original_onnxruntime_cannot_load_is_skipped():
    custom = from_text("""<ir_version: 8, opset_import: ["" : 17, "my.domain" : 1]>
g (float[2] x, float[2] y) => (float[2] z) { z = my.domain.Frobnicate(x, y) }""")
    (record,) = harness.run_case(case(model=custom), [FOLD])
    assert (record.status, record.reason) == ("skipped", harness.SKIP_ORT_LOAD)


def test_arity_and_non_tensor_values_are_skipped():
    (record,) = harness.run_case(case(inputs=(X,)), [FOLD])
    assert (record.status, record.reason) == ("skipped", harness.SKIP_ARITY)
    (record,) = harness.run_case(case(inputs=(X, None)), [FOLD])
    assert (record.status, record.reason, record.detail) == ("skipped", harness.SKIP_NON_TENSOR,
                                                             "a value of type NoneType")


@pytest.mark.parametrize("expected, got, message", [
    (np.float32([1, 2]), np.float32([1, 2.001]), None),
    (np.float32([1, 2]), np.float32([1, 2.01]), "1 of 2 values outside rtol 0.001 / atol 1e-07 (max abs err 0.01)"),
    (np.float32([1, 2]), np.float64([1, 2]), "dtype float64 instead of float32"),
    (np.float32([1, 2]), np.float32([[1, 2]]), "shape [1, 2] instead of [2]"),
    (np.float32([np.nan, 1]), np.float32([np.nan, 1]), None),
    (np.float32([np.nan, 1]), np.float32([0, 1]), "NaN positions differ"),
    (np.float32([np.inf, 1]), np.float32([-np.inf, 1]), "Inf positions differ"),
    (np.int64([3, 4]), np.int64([3, 5]), "1 of 2 values differ"),
    (np.array(["a", "b"], dtype=object), np.array(["a", "b"], dtype=object), None),
    (np.array(["a", "b"], dtype=object), np.array(["a", "c"], dtype=object), "strings differ"),
    ([np.int64([1])], [np.int64([1]), np.int64([2])], "a sequence of 2 instead of 1"),
    ([np.int64([1])], [np.int64([2])], "item 0: 1 of 1 values differ"),
    (np.int64([1]), [np.int64([1])], "a list instead of a tensor"),
])
def test_mismatch(expected, got, message):
    assert harness.mismatch(expected, got, 1e-3, 1e-7) == message


# ----------------------------------------------------------------------------------- the suite


@pytest.fixture(scope="module")
def cases():
    return harness.collect_cases()


def test_collects_every_source(cases):
    counts = {s: sum(c.source == s for c in cases) for s in harness.SOURCES}
    assert all(n > 0 for n in counts.values()), counts
    assert counts["node"] > 1000, counts


def assert_clean(records: list[harness.Record], cases: list[harness.Case], selected: list[harness.Config]) -> None:
    """No failure; each case has either one skip, with a known reason and a detail, or a pass for
    every configuration, in order."""
    failed = [f"{r.case} [{r.config}] {r.reason}: {r.detail}" for r in records if r.status == "failed"]
    assert failed == [], "\n".join(failed)
    by_case: dict[str, list[harness.Record]] = {}
    for r in records:
        by_case.setdefault(r.case, []).append(r)
    assert list(by_case) == [c.id for c in cases]
    for recs in by_case.values():
        if recs[0].status == "skipped":
            assert len(recs) == 1 and recs[0].reason in harness.SKIP_REASONS and recs[0].detail, recs
        else:
            assert [(r.config, r.status) for r in recs] == [(c.name, "passed") for c in selected], recs


@pytest.mark.parametrize("source", harness.SOURCES)
def test_sample(cases, source):
    """Every SAMPLE_EVERY-th case of the source through every configuration; some must run."""
    mine = harness.sample([c for c in cases if c.source == source], SAMPLE_EVERY)
    selected = harness.configs()
    records = harness.sweep(mine, selected)
    assert_clean(records, mine, selected)
    assert any(r.status == "passed" for r in records), f"no {source} case in the sample ran"


@pytest.mark.slow
def test_full_sweep(cases):
    selected = harness.configs()
    records = harness.sweep(cases, selected)
    assert_clean(records, cases, selected)
    assert sum(r.status == "passed" for r in records) > 1000


# ----------------------------------------------------------------------------------- the summary


def test_run_writes_the_summary(tmp_path):
    from tests.conformance import run

    out = tmp_path / "summary.md"
    assert run.main(["--sources", "simple", "--every", "8", "--configs", "fold,cleanup", "--out", str(out)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    t = summary["totals"]
    assert t["cases_collected"] == 3 and t["cases_skipped"] + t["cases_run"] == 3
    assert t["runs"] == t["passed"] == 2 * t["cases_run"] > 0 and t["failed"] == 0
    assert list(summary["configs"]) == ["fold", "cleanup"]
    assert sum(len(v) for v in summary["skipped"].values()) == t["cases_skipped"]
    text = out.read_text()
    assert "| **failed** | **0** |" in text and "`python -m tests.conformance.run --sources simple" in text
