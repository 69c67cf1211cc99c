#!/usr/bin/env python3
"""Structured pruning: onnxopt `--prune structured` against onnxsim's apply_structured_pruning,
on MiniLM (both exports, real text) and the PP-OCRv4 recognizer (rendered text lines).

MiniLM: `--passes fold,cleanup,fuse,prune --prune structured --min-cosine C` for a sweep of
budgets, calibrated on docstring sentences (bench/text_data.py; onnxopt holds back the last quarter,
at most 64, for its budget check), prune + `--quant dynamic` with --min-cosine 0.96 (beside dynamic INT8 alone,
and onnxruntime's quantize_dynamic on the 0.95-pruned model, the issue's reference), the same
with `--max-opset 23` (fuse writes the standard Attention of opset 23, which onnxruntime runs
faster than its MultiHeadAttention or the unfused score path when there is a mask, and hides the
padded keys: masked_keys). onnxsim's apply_structured_pruning runs on onnxopt's fused graph at
opset 20 (its Gelu op is the pattern onnxsim's chain matcher needs: on the exported erf GELU it
changes nothing). Fidelity: the sentence embedding's cosine against the float model on separate
evaluation sentences.

PP-OCRv4 recognizer: `--sparsity S` for a sweep, calibrated on rendered lines, against onnxsim
at the same S; fidelity: argmax agreement per output position on separate rendered lines.

All models are built first; latency is measured after, one model at a time against the float
model (interleaved runs, median of per-round ratios, one thread; MiniLM at 128 tokens).
Writes bench/structured.md and bench/structured.json (--table NAME: bench/NAME.md and .json;
--runs: only the runs whose label contains one of its |-separated parts).

    python bench/structured_bench.py
    python bench/structured_bench.py --models minilm_legacy,minilm_dynamo --keep-others
    python bench/structured_bench.py --models minilm_legacy,minilm_dynamo --runs 'max-opset 23|target ort' \
        --table structured_attention
"""
import argparse
import json
import sys
import time
from pathlib import Path

import onnx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import int8_bench as ib  # noqa: E402
import ocr_data  # noqa: E402
import run_bench as rb  # noqa: E402
import static_bench  # noqa: E402
import text_data  # noqa: E402

import onnxopt  # noqa: E402

MINILM_BUDGETS = (0.99, 0.98, 0.95, 0.90)
ONNXSIM_MINILM = (0.1, 0.25, 0.5)
REC_SPARSITY = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
FUSED = ["fold", "cleanup", "fuse"]


def onnxopt_run(src, out, passes, calibration, **kw):
    start = time.perf_counter()
    try:
        r = onnxopt.optimize(str(src), str(out), passes=FUSED + passes, calibration_data=calibration,
                             write_over_budget=True, **kw)
    except Exception as e:  # noqa: BLE001 - a failed run is a row of the table
        return {"notes": f"failed: {type(e).__name__}: {e}"[:300]}
    d = r.details.get("prune", {})
    counts = {k: v for p in r.passes for k, v in p.counts.items() if p.name == "prune"}
    macs = d.get("macs_removed_per_sample", 0) / max(d.get("prunable_macs_per_sample", 1), 1)
    return {"seconds": round(time.perf_counter() - start, 1), "removed": counts,
            "pruned_fraction": d.get("sparsity"), "macs_removed": round(macs, 4)}


def quantize_dynamic(src, out):
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    start = time.perf_counter()
    try:
        qd(str(src), str(out), weight_type=QuantType.QInt8)
    except Exception as e:  # noqa: BLE001
        return {"notes": f"failed: {type(e).__name__}: {e}"[:300]}
    return {"seconds": round(time.perf_counter() - start, 1)}


def onnxsim_run(src, out, sparsity):
    import onnxsim

    start = time.perf_counter()
    try:
        onnx.save(onnxsim.apply_structured_pruning(str(src), sparsity), str(out))
    except Exception as e:  # noqa: BLE001
        return {"notes": f"failed: {type(e).__name__}: {e}"[:300]}
    return {"seconds": round(time.perf_counter() - start, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", type=int, default=2048)
    ap.add_argument("--evaluation", type=int, default=512)
    ap.add_argument("--rec-calibration", type=int, default=256)
    ap.add_argument("--rec-evaluation", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="minilm_legacy,minilm_dynamo,ppocr_rec")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the committed rows of the models not in --models (rerun one model)")
    ap.add_argument("--runs", default="", help="only the runs whose label contains one of these (|-separated)")
    ap.add_argument("--table", default="structured", help="writes bench/TABLE.md and bench/TABLE.json")
    ap.add_argument("--shared-models", type=Path, default=BENCH.parent.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    args = ap.parse_args()
    work = args.cache / "structured"
    work.mkdir(parents=True, exist_ok=True)
    rows, latency_jobs = [], []
    wanted = args.models.split(",")

    def chosen(label):
        return not args.runs or any(part in label for part in args.runs.split("|"))

    calib_text, eval_text = text_data.split(args.calibration, args.evaluation)
    calibration, evaluation = text_data.encode(calib_text), text_data.encode(eval_text)
    for name in ("minilm_legacy", "minilm_dynamo"):
        src = args.shared_models / rb.MODELS[name][1]
        if name not in wanted or not src.exists():
            continue
        names = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
        cal = [{k: v for k, v in f.items() if k in names} for f in calibration]
        ev = [{k: v for k, v in f.items() if k in names} for f in evaluation]
        ref = ib.outputs(src, ev)
        lat = {k: v for k, v in rb.latency_feeds(ev[0]).items() if k in names}
        runs = [(f"onnxopt structured, --min-cosine {c}", ["prune"], {"prune": "structured", "min_cosine": c})
                for c in MINILM_BUDGETS]
        runs.append(("onnxopt structured + dynamic INT8, --min-cosine 0.96", ["prune", "quant"],
                     {"prune": "structured", "quant": "dynamic", "min_cosine": 0.96}))
        runs.append(("onnxopt dynamic INT8 alone, --min-cosine 0.96", ["quant"],
                     {"quant": "dynamic", "min_cosine": 0.96}))
        # --target ort: fuse writes com.microsoft Attention (prune cuts its packed QKV and num_heads),
        # which dynamic INT8 turns into DynamicQuantizeMatMul + MultiHeadAttention
        runs.append(("onnxopt structured + dynamic INT8, --min-cosine 0.96, --target ort", ["prune", "quant"],
                     {"prune": "structured", "quant": "dynamic", "min_cosine": 0.96, "target": "ort"}))
        runs.append(("onnxopt dynamic INT8 alone, --min-cosine 0.96, --target ort", ["quant"],
                     {"quant": "dynamic", "min_cosine": 0.96, "target": "ort"}))
        # --max-opset 23: the standard Attention, which onnxruntime runs faster with a mask
        runs.append(("onnxopt structured + dynamic INT8, --min-cosine 0.96, --max-opset 23", ["prune", "quant"],
                     {"prune": "structured", "quant": "dynamic", "min_cosine": 0.96, "max_opset": 23}))
        runs.append(("onnxopt dynamic INT8 alone, --min-cosine 0.96, --max-opset 23", ["quant"],
                     {"quant": "dynamic", "min_cosine": 0.96, "max_opset": 23}))
        runs.append(("quantize_dynamic on the --min-cosine 0.95 model", None, "quantize_dynamic"))
        fused20, built = work / f"{name}.fused20.onnx", False
        for k, (label, passes, kw) in enumerate(runs + [(f"onnxsim apply_structured_pruning {s}", None, s)
                                                        for s in ONNXSIM_MINILM]):
            if not chosen(label):
                continue
            if passes is None and kw != "quantize_dynamic" and not built:  # onnxsim's input, once
                onnxopt.optimize(str(src), str(fused20), passes=FUSED, max_opset=20, verify="none")
                built = True
            out = work / f"{name}.{k}.onnx"
            row = {"model": name, "run": label}
            if kw == "quantize_dynamic":  # the reference: quantize_dynamic on a pruned model
                row.update(quantize_dynamic(work / f"{name}.{MINILM_BUDGETS.index(0.95)}.onnx", out))
            elif passes is not None:
                row.update(onnxopt_run(src, out, passes, cal, **kw))
            else:
                row.update(onnxsim_run(fused20, out, kw))
            if "notes" not in row:
                fid = ib.fidelity(ref, ib.outputs(out, ev))
                row.update(cosine_mean=round(fid["emb_mean"], 4), cosine_worst=round(fid["emb_min"], 4),
                           token_cosine=round(fid["tok_mean"], 4),
                           size=round(out.stat().st_size / src.stat().st_size, 3))
                latency_jobs.append((len(rows), src, out, lat))
            rows.append(row)
            print(row, flush=True)

    ppocr_dir, err = rb.fetch_ppocr(args.cache)
    src = ppocr_dir / "ch_PP-OCRv4_rec_infer.onnx"
    if "ppocr_rec" in wanted and not err and src.exists():
        cal_s, ev_s = text_data.split(1500, 1500)
        cal = ocr_data.make("rec", cal_s, args.rec_calibration, 1)
        ev = ocr_data.make("rec", ev_s, args.rec_evaluation, 2)
        ref = static_bench.outputs(src, ev)
        fused = work / "ppocr_rec.fused.onnx"
        onnxopt.optimize(str(src), str(fused), passes=FUSED, verify="none")
        for s in REC_SPARSITY:
            for tool in ("onnxopt", "onnxsim"):
                out = work / f"ppocr_rec.{tool}.{s}.onnx"
                row = {"model": "ppocr_rec", "run": f"{tool} structured {s}"}
                if not chosen(row["run"]):
                    continue
                row.update(onnxopt_run(src, out, ["prune"], cal, prune="structured", sparsity=s)
                           if tool == "onnxopt" else onnxsim_run(fused, out, s))
                if "notes" not in row:
                    fid = static_bench.fidelity("rec", ref, static_bench.outputs(out, ev))
                    row.update(agreement=round(fid["agreement"], 4),
                               size=round(out.stat().st_size / src.stat().st_size, 3))
                    latency_jobs.append((len(rows), src, out, ev[0]))
                rows.append(row)
                print(row, flush=True)

    for i, src, out, feeds in latency_jobs:  # all timing after all building: one thing at a time
        rows[i]["latency"] = round(rb.latency(src, out, feeds, args.rounds, args.warmup)[0], 3)
        print(rows[i]["run"], rows[i]["latency"], flush=True)
    kept_from = None
    if args.keep_others:  # the rows of models not rerun now
        kept, kept_from = rb.kept_rows(BENCH / f"{args.table}.json", wanted)
        rows = kept + rows
    write(rows, args, kept_from)


def write(rows, args, kept_from=None):
    env = rb.environment(sys.argv)
    lines = ["# Structured pruning: onnxopt --prune structured against onnxsim's apply_structured_pruning", "",
             f"- date: {env['date']}", f"- command: `{env['command']}`"]
    lines += rb.provenance_lines(kept_from)
    lines += [
             f"- machine: {env['cpu']}, nproc={env['nproc']}; Python {env['python']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             f"- MiniLM: {args.calibration} calibration sentences (onnxopt holds back the last quarter, at most 64, "
             f"for its budget check), {args.evaluation} separate evaluation sentences; fidelity = sentence "
             "embedding cosine against the float model on those; token cosine: last_hidden_state's mean cosine "
             "(the output the --min-cosine budget binds: the budget holds for every output, and the per-token "
             "states lose more than their pooled sentence embedding); latency at 128 tokens",
             f"- PP-OCRv4 rec: {args.rec_calibration} rendered calibration lines, {args.rec_evaluation} separate "
             "evaluation lines; fidelity = argmax agreement per output position",
             "- latency: onnxruntime default options, one thread, median of per-round ratios to the float model "
             "(interleaved); size: file size ratio to the float model",
             "- onnxsim: apply_structured_pruning on onnxopt's fused graph (MiniLM at opset 20, where its Gelu "
             "op lets onnxsim's FFN chain match); pruned fraction: of the prunable layers' weights (onnxopt)", "",
             "| model | run | latency | size | fidelity (mean / worst) | token cosine | removed | pruned fraction "
             "| time s | notes |",
             "|---|---|---:|---:|---|---:|---|---:|---:|---|"]
    for r in rows:
        fid = (f"cosine {r['cosine_mean']:.4f} / {r['cosine_worst']:.4f}" if "cosine_mean" in r
               else f"agreement {r['agreement']:.4f}" if "agreement" in r else "")
        removed = ", ".join(f"{v} {k.replace('_removed', '')}" for k, v in (r.get("removed") or {}).items()
                            if k.endswith("_removed") and k != "groups_removed")
        lines.append(f"| {r['model']} | {r['run']} | {r.get('latency', '')} | {r.get('size', '')} | {fid} | "
                     f"{r.get('token_cosine', '')} | {removed} | {r.get('pruned_fraction') or ''} | "
                     f"{r.get('seconds', '')} | {r.get('notes', '')} |")
    (BENCH / f"{args.table}.md").write_text("\n".join(lines) + "\n")
    (BENCH / f"{args.table}.json").write_text(json.dumps({"environment": env, "kept_from": kept_from, "rows": rows},
                                                      indent=1) + "\n")


if __name__ == "__main__":
    main()
