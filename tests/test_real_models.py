"""End-to-end runs on the real models in ../shared/models (slow; skipped where they are absent).

Each run verifies the result against onnxruntime on the shared sample inputs (real tokenized
sentences with padding) and pins the exact counts, so a change in what the passes find shows."""

import os

import pytest

import onnxopt

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models")
MINILM = {"legacy": "all-MiniLM-L6-v2_legacy_op17.onnx", "dynamo": "all-MiniLM-L6-v2_dynamo_op18.onnx"}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/models is not on this machine")]


def run(name, tmp_path, passes, **kwargs):
    return onnxopt.optimize(os.path.join(SHARED, name), tmp_path / "out.onnx", passes=passes,
                            inputs=os.path.join(SHARED, "sample_inputs.npz") if "MiniLM" in name else None, **kwargs)


@pytest.mark.parametrize("export, nodes", [("legacy", 256), ("dynamo", 247)])
def test_minilm_fold_cleanup(export, nodes, tmp_path):
    result = run(MINILM[export], tmp_path, ["fold", "cleanup"])
    assert result.after["nodes"] == nodes
    assert all(o["ok"] and o["max_abs"] == 0.0 for o in result.verification["outputs"])


@pytest.mark.parametrize("export", ["legacy", "dynamo"])
def test_minilm_fuse_ort(export, tmp_path):
    result = run(MINILM[export], tmp_path, ["fold", "cleanup", "fuse"], target="ort")
    assert result.passes[2].counts == {"attention": 6, "gelu": 6, "bias_gelu": 6}
    opt_in = run(MINILM[export], tmp_path, ["fold", "cleanup", "fuse"], target="ort",
                 options=["fuse.skip_layer_norm=true"])
    assert opt_in.passes[2].counts == {"attention": 6, "skip_layer_norm": 12, "skip_layer_norm_bias": 12,
                                       "gelu": 6, "bias_gelu": 6}
    assert all(o["ok"] and o["max_abs"] < 1e-4 for o in opt_in.verification["outputs"])
    assert all(o["ok"] and o["max_abs"] < 1e-4 for o in result.verification["outputs"])


def test_mobilenet_fold_cleanup(tmp_path):
    result = onnxopt.optimize(os.path.join(SHARED, "mobilenet_v2_unfoldedbn_op17.onnx"), tmp_path / "out.onnx")
    assert result.after["nodes"] == 100 and result.passes[0].counts["conv_bn_folded"] == 52
    assert all(o["ok"] for o in result.verification["outputs"])


MODELS = [MINILM["legacy"], MINILM["dynamo"], "mobilenet_v2_unfoldedbn_op17.onnx"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("passes, target", [(["fold", "cleanup"], "onnx"), (["fold", "cleanup", "fuse"], "ort")])
def test_deterministic_and_idempotent(name, passes, target, tmp_path):
    """Two runs on the same input give byte-identical files; a second run over the output changes nothing."""
    src = os.path.join(SHARED, name)
    first = onnxopt.optimize(src, tmp_path / "a.onnx", passes=passes, target=target, verify="none")
    onnxopt.optimize(src, tmp_path / "b.onnx", passes=passes, target=target, verify="none")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    again = onnxopt.optimize(tmp_path / "a.onnx", tmp_path / "c.onnx", passes=passes, target=target, verify="none")
    assert [r.counts for r in again.passes] == [{}] * len(passes)
    assert again.after["nodes"] == first.after["nodes"]
