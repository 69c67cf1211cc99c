#!/usr/bin/env python3
"""float16 models: onnxopt's `--quant fp16` and `--quant mixed` against onnxconverter-common's
convert_float_to_float16.

For every bench model (the ones run_bench.py uses, fetched the same way) it makes a float16 model
with each tool, then records: whether onnxruntime loads and runs it, file size against the float
model, the worst output cosine against the float model on the bench inputs (MiniLM: the real
sample sentences), whether any NaN or Inf appeared, and the latency ratio to the float model
(onnxruntime default options, one thread, interleaved rounds, median of per-round ratios; CPU
float16 is emulated, so this is not a speed target). Writes bench/quant.md and bench/quant.json.

    python bench/quant_bench.py --rounds 10
"""
import argparse, json, subprocess, sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run_bench as rb  # noqa: E402

CONVERTER = """import sys, onnx
from onnxconverter_common import float16
m = onnx.load(sys.argv[1])
onnx.save(float16.convert_float_to_float16(m, keep_io_types=True), sys.argv[2])
"""
TOOLS = ["onnxopt-fp16", "onnxopt-mixed", "onnxconverter-fp16"]


def make(tool, src, out, inputs, args):
    if tool.startswith("onnxopt-"):
        cmd = args.onnxopt_cmd.split() + [str(src), "-o", str(out), "--passes", "fold,cleanup,fuse,quant",
                                          "--quant", tool.split("-")[1], "--target", "ort", "--inputs", str(inputs),
                                          "-q"]
    else:
        reason = rb.ensure_installed("onnxconverter_common", not args.no_install)
        if reason:
            return reason
        cmd = [sys.executable, "-c", CONVERTER, str(src), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return None if p.returncode == 0 and out.exists() else f"failed: {rb.tail(p.stderr or p.stdout, 200)}"


def fidelity(ref, path, feeds):
    names, vals = rb.reference_outputs(path, feeds)
    by_name = dict(zip(names, vals))
    worst, bad = 1.0, False
    for n, r in zip(*ref):
        c = by_name[n].astype(np.float64)
        bad = bad or not np.all(np.isfinite(c))
        r = r.astype(np.float64).ravel()
        c = c.ravel()
        denom = np.linalg.norm(r) * np.linalg.norm(c)
        worst = min(worst, float(r @ c / denom) if denom else float(np.array_equal(r, c)))
    return worst, bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="all")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shared-models", type=Path, default=BENCH.parent.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    ap.add_argument("--onnxopt-cmd", default="onnxopt")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    out_dir = args.cache / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in rb.MODELS if args.models == "all" or any(w in n for w in args.models.split(","))]
    ppocr_dir, ppocr_err = rb.fetch_ppocr(args.cache) if any(rb.MODELS[n][0] == "ppocr" for n in names) else (None, None)
    rows = []
    for name in names:
        source, fname, shape = rb.MODELS[name]
        src = (args.shared_models if source == "shared" else ppocr_dir) / fname if not (
            source == "ppocr" and ppocr_err) else None
        if src is None or not src.exists():
            print(f"[{name}] skipped", flush=True)
            continue
        feeds = rb.make_feeds(src, shape, args.shared_models / "sample_inputs.npz")
        lat_feeds = rb.latency_feeds(feeds) if shape is None else feeds
        inputs = out_dir / f"{name}.inputs.npz"
        np.savez(inputs, **feeds)
        ref = rb.reference_outputs(src, feeds)
        for tool in TOOLS:
            out = out_dir / f"{name}.{tool}.onnx"
            out.unlink(missing_ok=True)
            row = {"model": name, "tool": tool}
            reason = make(tool, src, out, inputs, args)
            if reason is None:
                try:
                    row["cosine"], row["nan_or_inf"] = fidelity(ref, out, feeds)
                    row["size_ratio"] = rb.model_stats(out)["size_mb"] / rb.model_stats(src)["size_mb"]
                    row["latency_ratio"], _, _ = rb.latency(src, out, lat_feeds, args.rounds, args.warmup)
                    row["loads"] = "yes"
                except Exception as e:  # noqa: BLE001 - onnxruntime refusing the model is the finding
                    row["loads"], row["notes"] = "no", rb.tail(str(e), 160)
            else:
                row["loads"], row["notes"] = "no", reason
            print(row, flush=True)
            rows.append(row)
    (BENCH / "quant.json").write_text(json.dumps(rows, indent=1))
    env = rb.environment(sys.argv)
    try:
        env["versions"]["onnxconverter-common"] = rb.importlib.metadata.version("onnxconverter-common")
    except rb.importlib.metadata.PackageNotFoundError:
        env["versions"]["onnxconverter-common"] = "not installed"
    lines = ["# float16: onnxopt --quant fp16 and mixed against onnxconverter-common", "",
             f"- date: {env['date']}",
             f"- command: `{' '.join(['python bench/quant_bench.py'] + sys.argv[1:])}`",
             "- " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k not in ("onnxsim", "onnxslim")),
             f"- machine: nproc={env['nproc']}, CPU: {env['cpu']}",
             "- onnxopt-fp16 / -mixed: `--passes fold,cleanup,fuse,quant --quant fp16|mixed --target ort` "
             "(mixed: float16 where the measured error keeps cosine >= 0.999); onnxconverter-fp16: "
             "`convert_float_to_float16(model, keep_io_types=True)`; cosine = worst output against the float "
             "model on the bench inputs (MiniLM: the real sample sentences); latency ratio against the float "
             "model, onnxruntime default options, 1 thread (CPU float16 is emulated: not a speed target)", "",
             "| model | tool | loads and runs | size ratio | worst cosine | NaN/Inf | latency ratio | notes |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tool']} | {r['loads']} | {rb.fmt(r.get('size_ratio'), '.3f')} | "
                     f"{rb.fmt(r.get('cosine'), '.6f')} | {r.get('nan_or_inf', '')} | "
                     f"{rb.fmt(r.get('latency_ratio'), '.3f')} | {r.get('notes', '')} |")
    (BENCH / "quant.md").write_text("\n".join(lines) + "\n")
    print("wrote bench/quant.md")


if __name__ == "__main__":
    main()
