#!/usr/bin/env python3
"""Unstructured and 2:4 pruning on MiniLM (both exports) with real text: `--passes
fold,cleanup,fuse,prune` at 50% unstructured (calibrated: each layer's mask searched and its
weights refitted on calibration sentences, with per-layer levels from measured sensitivity and
with one sparsity for all layers; and by magnitude without them), at the largest mean sparsity
inside --min-cosine 0.99, and 2:4 in every layer the budget allows. `--extra-calibration N`
adds N calibration sentences (text_data.extra) with the evaluation sentences unchanged.

Calibration: docstring sentences (bench/text_data.py, MiniLM's tokenizer); onnxopt holds back the
last quarter of them, at most 64, for its own budget check. Fidelity is measured on separate
evaluation sentences none of the runs sees: the sentence embedding's cosine against the float
model (mean and worst) and nearest-neighbour agreement among them; whether the run's end-to-end
distillation was kept (`prune.distill`), with the epoch kept and onnxopt's own held-back score
(the worst output's mean cosine) before and after it. Size: the file compressed with zlib (level 6)
against the float model's, since zeros in dense tensors only shrink a compressed file. No
latency: onnxruntime's dense kernels run a zeroed weight no faster. Writes bench/prune.md and
bench/prune.json.

    python bench/prune_bench.py --calibration 1024 --models minilm_legacy
"""
import argparse
import json
import sys
import time
import zlib
from pathlib import Path


BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import int8_bench as ib  # noqa: E402
import run_bench as rb  # noqa: E402
import text_data  # noqa: E402

import onnxopt  # noqa: E402

RUNS = {  # name -> optimize keywords
    "unstructured 50%, calibrated, per-layer levels": {"prune": "unstructured", "sparsity": 0.5, "calibrated": True},
    "unstructured 50%, calibrated, uniform, stage by stage": {
        "prune": "unstructured", "sparsity": 0.5, "calibrated": True, "options": {"prune": {"adaptive": False}}},
    "unstructured 50%, calibrated, uniform, all layers on the original inputs": {
        "prune": "unstructured", "sparsity": 0.5, "calibrated": True,
        "options": {"prune": {"adaptive": False, "sequential": False}}},
    "unstructured 50%, magnitude": {"prune": "unstructured", "sparsity": 0.5, "calibrated": False},
    "unstructured, largest inside cosine 0.99": {"prune": "unstructured", "calibrated": True},
    "unstructured, largest inside cosine 0.99, all layers on the original inputs": {
        "prune": "unstructured", "calibrated": True, "options": {"prune": {"sequential": False}}},
    "2:4 where cosine 0.99 allows": {"prune": "2:4", "calibrated": True},
}


def compressed(path: Path) -> int:
    return len(zlib.compress(path.read_bytes(), 6))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--evaluation", type=int, default=128)
    ap.add_argument("--extra-calibration", type=int, default=0,
                    help="more calibration sentences (text_data.extra), the evaluation set unchanged")
    ap.add_argument("--shared-models", type=Path, default=BENCH.parent.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    ap.add_argument("--models", default="minilm_legacy,minilm_dynamo", help="comma-separated")
    ap.add_argument("--runs", default="", help="only the runs whose label contains one of these (|-separated)")
    ap.add_argument("--table", default="prune", help="writes bench/TABLE.md and bench/TABLE.json")
    args = ap.parse_args()
    runs = {k: v for k, v in RUNS.items() if not args.runs or any(part in k for part in args.runs.split("|"))}
    calib_text, eval_text = text_data.split(args.calibration, args.evaluation)
    calib_text += text_data.extra(args.calibration, args.evaluation, args.extra_calibration)
    calibration, evaluation = text_data.encode(calib_text), text_data.encode(eval_text)
    work = args.cache / "prune"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        src = args.shared_models / rb.MODELS[name][1]
        if not src.exists():
            print(f"[{name}] skipped: {src} missing", flush=True)
            continue
        import onnx

        names = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
        cal = [{k: v for k, v in f.items() if k in names} for f in calibration]
        ev = [{k: v for k, v in f.items() if k in names} for f in evaluation]
        ref = ib.outputs(src, ev)
        for label, kw in runs.items():
            out = work / f"{name}.{len(rows)}.onnx"
            kw = dict(kw)
            calibrated = kw.pop("calibrated")
            start = time.perf_counter()
            result = onnxopt.optimize(str(src), str(out), passes=["fold", "cleanup", "fuse", "prune"],
                                      calibration_data=cal if calibrated else None,
                                      inputs=None if calibrated else cal[0], min_cosine=0.99 if calibrated else 0.5,
                                      write_over_budget=True, **kw)
            d = result.details["prune"]
            row = {"model": name, "run": label, "seconds": round(time.perf_counter() - start, 1),
                   "sparsity_of_linear_weights": d["zeros"] / d["linear_weights"],
                   "layers": f"{len(d['layers'])} of {len(d['layers']) + len(d['kept_dense'])}",
                   "compressed_size": compressed(out) / compressed(src), "distilled": d.get("distilled") or False}
            row.update(ib.fidelity(ref, ib.outputs(out, ev)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = rb.environment(sys.argv)
    lines = ["# Unstructured and 2:4 pruning on MiniLM with real text", "",
             f"Command: `{env['command']}`  ", f"Machine: {env['cpu']}, {env['nproc']} cores", "",
             f"{len(calib_text)} calibration sentences (the last quarter, at most 64, held back for the budget check"
             + (f"; {args.extra_calibration} of them from text_data.extra" if args.extra_calibration else "") + "), "
             f"{args.evaluation} separate evaluation sentences. Sparsity: zeros among the pruned layers' "
             "weights and the dense ones. Size: zlib-compressed file against the float model's.", "",
             "| model | run | sparsity | layers pruned | embedding cosine mean / worst | nearest-neighbour agreement "
             "| compressed size | distilled: epoch kept, held-back score before -> after | time s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["distilled"]
        distilled = f"{k['epochs']}, {k['score_before']:.4f} -> {k['score']:.4f}" if k else "no"
        lines.append(f"| {r['model']} | {r['run']} | {r['sparsity_of_linear_weights']:.3f} | {r['layers']} | "
                     f"{r['emb_mean']:.4f} / {r['emb_min']:.4f} | {r['nn_agree']:.3f} | {r['compressed_size']:.3f} | "
                     f"{distilled} | {r['seconds']} |")
    lines.append("")
    (BENCH / f"{args.table}.md").write_text("\n".join(lines))
    (BENCH / f"{args.table}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
