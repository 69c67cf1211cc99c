#!/usr/bin/env python3
"""Every pass and mode of the `onnxopt` CLI over the model zoo (bench/zoo/build_zoo.py: 17 small
torch exports of transformers and torchvision architectures with random weights): a robustness
sweep, not a speed or accuracy benchmark. Per model and configuration it records whether the run
succeeds, and for a written model its size against the input's and the worst output cosine
against the input model in onnxruntime (default options) on the model's own sample; per model
the fusions each target finds. Writes bench/zoo.md and bench/zoo.json.

    python bench/zoo_sweep.py [--models DIR] [--configs fuse,static,...]

Random weights say nothing about accuracy (structured pruning of a random net loses more than of
a trained one; the over-budget unstructured runs are written with --write-over-budget), but a run
that fails, a model onnxruntime cannot load, or NaN in an output is a bug whatever the weights.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run_bench as rb  # noqa: E402

CALIB = "{calib}"
FUSE = ["--passes", "fold,cleanup,fuse"]
QUANT = ["--passes", "fold,cleanup,fuse,quant", "--quant"]
PRUNE = ["--passes", "fold,cleanup,fuse,prune", "--prune"]
CONFIGS = {
    "default": [],
    "fuse": FUSE,
    "fuse ort": FUSE + ["--target", "ort"],
    "fuse opset 23": FUSE + ["--max-opset", "23"],
    "fp16": QUANT + ["fp16"],
    "mixed": QUANT + ["mixed", "--calibration-data", CALIB],
    "dynamic": QUANT + ["dynamic"],
    "dynamic ort": QUANT + ["dynamic", "--target", "ort"],
    "static": QUANT + ["static", "--calibration-data", CALIB],
    "int8": QUANT + ["int8", "--calibration-data", CALIB],
    "int4 ort": QUANT + ["int4", "--target", "ort"],
    "structured 0.95": PRUNE + ["structured", "--min-cosine", "0.95", "--calibration-data", CALIB],
    "unstructured 50%": PRUNE + ["unstructured", "--sparsity", "0.5", "--calibration-data", CALIB,
                                 "--write-over-budget"],
    "2:4": PRUNE + ["2:4", "--calibration-data", CALIB],
    "partition": ["--passes", "fold,cleanup,fuse,partition", "--split", "{out}.split"],
}
FUSION_CONFIGS = ("fuse ort", "fuse opset 23")


def outputs(path: str, sample: dict) -> list:
    s = rb.session(path, None)
    return s.run(None, {k: v for k, v in sample.items() if k in {i.name for i in s.get_inputs()}})


def cosines(ref: list, out: str, sample: dict) -> tuple[float | None, bool]:
    """(worst output cosine of `out` against the input model's outputs `ref`, whether an output
    has NaN or Inf)."""
    worst, bad = None, False
    for x, y in zip(ref, outputs(out, sample)):
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        bad |= not np.all(np.isfinite(y))
        if x.size and np.linalg.norm(x) > 0 and np.linalg.norm(y) > 0:
            c = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
            worst = c if worst is None else min(worst, c)
    return worst, bad


def fuse_counts(report: Path) -> dict:
    data = json.loads(report.read_text())
    return {k: v for p in data.get("passes", []) if p.get("name") == "fuse" for k, v in p.get("counts", {}).items()
            if not k.startswith("opset_raised")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=BENCH / ".cache" / "zoo")
    ap.add_argument("--configs", default="", help="comma-separated names (default: all)")
    ap.add_argument("--work", type=Path, default=BENCH / ".cache" / "zoo_out")
    ap.add_argument("--onnxopt-cmd", default="onnxopt")
    args = ap.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if not args.configs or k in args.configs.split(",")}
    models = sorted(p for p in args.models.glob("*.onnx"))
    if not models:
        raise SystemExit(f"no models in {args.models}: build them with bench/zoo/build_zoo.py (see bench/README.md)")
    args.work.mkdir(parents=True, exist_ok=True)
    rows, fusions = [], {}
    for path in models:
        name = path.stem
        sample = dict(np.load(path.with_suffix(".npz")))
        ref = outputs(str(path), sample)
        calib = str(path.with_name(name + "_calib.npz"))
        for config, flags in configs.items():
            out = args.work / f"{name}.{config.replace(' ', '_').replace(':', '').replace('%', '')}.onnx"
            report = out.with_suffix(".json")
            for stale in (out, report):
                stale.unlink(missing_ok=True)
            cmd = (args.onnxopt_cmd.split() + [str(path), "-o", str(out), "-q", "--report", str(report)]
                   + [f.format(calib=calib, out=out) for f in flags])
            start = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            row = {"model": name, "config": config, "rc": p.returncode,
                   "seconds": round(time.perf_counter() - start, 1), "stderr": rb.tail(p.stderr, 300)}
            if p.returncode == 0 and out.exists():
                row["size"] = round(out.stat().st_size / path.stat().st_size, 3)
                try:
                    row["cosine"], row["nonfinite"] = cosines(ref, str(out), sample)
                except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                    row["load_error"] = rb.tail(str(e), 300)
                if config in FUSION_CONFIGS and report.exists():
                    fusions.setdefault(name, {})[config] = fuse_counts(report)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(rows, fusions, configs, args)


def cell(r: dict) -> str:
    if r["rc"] != 0:
        return "**fails**"
    if "load_error" in r:
        return "**does not load**"
    if r.get("nonfinite"):
        return "**NaN/Inf**"
    over = " (over budget)" if "over the error budget" in r.get("stderr", "") else ""
    cos = "" if r.get("cosine") is None else f"{r['cosine']:.4f}"
    return f"{cos} / {r['size']:.2f}x{over}"


def write(rows, fusions, configs, args):
    env = rb.environment(sys.argv)
    by = {(r["model"], r["config"]): r for r in rows}
    models = sorted({r["model"] for r in rows})
    failed = [r for r in rows if r["rc"] != 0 or "load_error" in r or r.get("nonfinite")]
    lines = ["# Robustness sweep: every pass and mode over the model zoo", "",
             f"- date: {env['date']}", f"- command: `{env['command']}`",
             f"- machine: {env['cpu']}, nproc={env['nproc']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("onnxruntime", "onnx", "numpy")),
             f"- models: `python bench/zoo/build_zoo.py all` ({len(models)} small torch exports with random weights, "
             "legacy and dynamo exporters); calibration: 16 random samples per model (4 held back)",
             "- cell: the worst output's cosine against the input model in onnxruntime on the model's sample / "
             "file size against the input's; random weights: the cosines say nothing about trained models, and "
             "the lossy runs keep their budget (0.95 for structured) on the 4 held-back calibration samples, not "
             "on this one",
             f"- {len(rows)} runs, {len(failed)} failed", "",
             "| model | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(cell(by[m, c]) if (m, c) in by else "" for c in configs) + " |")
    if failed:
        lines += ["", "## Failures", ""] + [f"- {r['model']} {r['config']}: {r.get('load_error') or r['stderr']}"
                                            for r in failed]
    if fusions:
        lines += ["", "## Fusions found", "", "| model | " + " | ".join(FUSION_CONFIGS) + " |",
                  "|---|" + "---|" * len(FUSION_CONFIGS)]
        for m in sorted(fusions):
            lines.append(f"| {m} | " + " | ".join(
                ", ".join(f"{k} {v}" for k, v in sorted(fusions[m].get(c, {}).items())) for c in FUSION_CONFIGS)
                + " |")
    (BENCH / "zoo.md").write_text("\n".join(lines) + "\n")
    (BENCH / "zoo.json").write_text(json.dumps({"environment": env, "rows": rows, "fusions": fusions}, indent=1))
    print(f"wrote {BENCH / 'zoo.md'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
