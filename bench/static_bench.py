#!/usr/bin/env python3
"""Static INT8 on conv nets with rendered text: onnxopt's `--quant static` against onnxruntime's
quantize_static (QDQ, per-channel, MinMax; models below opset 13 converted to 13 first, as it
needs).

Data (bench/ocr_data.py): text lines and pages drawn from standard-library sentences,
preprocessed as PaddleOCR does; calibration and evaluation images use different sentences. Both
tools calibrate on the same calibration images (onnxopt holds back the last quarter of them, at most
64, for its own budget check); fidelity is measured on the evaluation images, which neither sees:
- ppocr_rec: per-position argmax agreement with the float model, and whole-line agreement;
- ppocr_cls: argmax agreement;
- ppocr_det: text-map agreement (pixels where probability > 0.3, PaddleOCR's threshold, that
  agree with the float model) and the IoU of the text regions;
- mobilenet_v2 (random weights, fed det-style pages at 224): top-1 agreement and cosine.
Latency: onnxruntime default options, one thread, interleaved rounds, median of per-round ratios
to the float model. Writes bench/static.md and bench/static.json.

    python bench/static_bench.py --rounds 20
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import ocr_data  # noqa: E402
import run_bench as rb  # noqa: E402
import text_data  # noqa: E402

QUANTIZE_STATIC = """import sys, glob, numpy as np, onnx
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
src, dst, folder = sys.argv[1:4]
m = onnx.load(src)
if m.opset_import[0].version < 13:
    m = version_converter.convert_version(m, 13)
    src = dst + ".op13.onnx"
    onnx.save(m, src)
files = sorted(glob.glob(folder + "/*.npz"))
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(dict(np.load(f)) for f in files)
    def get_next(self):
        return next(self.it, None)
quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
"""
# model: (file, source, data kind, calibration count, evaluation count)
MODELS = {
    "ppocr_rec": ("ch_PP-OCRv4_rec_infer.onnx", "ppocr", "rec", 256, 64),
    "ppocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "ppocr", "cls", 64, 64),
    "ppocr_det": ("ch_PP-OCRv4_det_infer.onnx", "ppocr", "det", 32, 24),
    "mobilenet_v2": ("mobilenet_v2_unfoldedbn_op17.onnx", "shared", "det224", 32, 32),
}

# stricter budgets beside the default, where the default misses what the issue asks (rec: 99% of
# the characters, every change counted; the default budget does not count changes among the
# original's close calls)
EXTRA_RUNS = {"ppocr_rec": (["--min-cosine", "0.995"], ["--min-agreement", "0.99"], ["--min-agreement", "0.995"])}


def data(kind, count, part, folder: Path, name: str):
    cal, ev = text_data.split(1500, 1500)
    sentences, seed = (cal, 1) if part == "calibration" else (ev, 2)
    if kind == "det224":
        feeds = ocr_data.make("det", sentences, count, seed, det_side=224)
        feeds = [{name: f["x"]} for f in feeds]
    else:
        feeds = ocr_data.make(kind, sentences, count, seed)
    text_data.write_folder(feeds, folder)
    return feeds


def outputs(path, feeds):
    s = rb.session(path, None)
    return [s.run(None, f)[0] for f in feeds]


def fidelity(kind, ref, got):
    if kind == "rec":
        a = [np.argmax(r, -1) for r in ref]
        b = [np.argmax(g, -1) for g in got]
        return {"agreement": float(np.mean(np.concatenate([(x == y).ravel() for x, y in zip(a, b)]))),
                "lines_equal": float(np.mean([np.array_equal(x, y) for x, y in zip(a, b)]))}
    if kind == "det":
        r = np.concatenate([x.ravel() for x in ref]) > 0.3
        g = np.concatenate([x.ravel() for x in got]) > 0.3
        return {"agreement": float(np.mean(r == g)), "iou": float((r & g).sum() / max(1, (r | g).sum()))}
    a = np.array([np.argmax(r) for r in ref])
    b = np.array([np.argmax(g) for g in got])
    cos = [float((r.ravel() @ g.ravel()) / (np.linalg.norm(r) * np.linalg.norm(g))) for r, g in zip(ref, got)]
    return {"agreement": float(np.mean(a == b)), "cosine": float(np.mean(cos))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="all")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shared-models", type=Path, default=BENCH.parent.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    ap.add_argument("--onnxopt-cmd", default="onnxopt")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the committed rows of the models not in --models (rerun one model)")
    args = ap.parse_args()
    ppocr_dir, ppocr_err = rb.fetch_ppocr(args.cache)
    work = args.cache / "static"
    rows = []
    for name, (fname, source, kind, n_cal, n_eval) in MODELS.items():
        if args.models != "all" and name not in args.models.split(","):
            continue
        src = (args.shared_models if source == "shared" else ppocr_dir) / fname
        if not src.exists() or (source == "ppocr" and ppocr_err):
            print(f"[{name}] skipped", flush=True)
            continue
        import onnx

        input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
        calib = work / name / "calibration"
        data(kind, n_cal, "calibration", calib, input_name)
        evaluation = data(kind, n_eval, "evaluation", work / name / "evaluation", input_name)
        lat_feeds = evaluation[0]
        ref = outputs(src, evaluation)
        onnxopt = args.onnxopt_cmd.split() + [str(src), "-q", "-o"]
        static = ["--passes", "fold,cleanup,fuse,quant", "--quant", "static", "--calibration-data", str(calib)]
        made = [("onnxopt fold,cleanup,fuse (float)", work / f"{name}.fused.onnx",
                 ["--passes", "fold,cleanup,fuse"]),
                ("onnxopt static", work / f"{name}.onnxopt.onnx", static)]
        made += [(f"onnxopt static, {' '.join(flags)}",
                  work / f"{name}.onnxopt{'_'.join(f.lstrip('-') for f in flags)}.onnx", static + flags)
                 for flags in EXTRA_RUNS.get(name, ())]
        made.append(("quantize_static", work / f"{name}.ort.onnx", None))
        for tool, out, flags in made:
            if flags is not None:
                cmd = onnxopt + [str(out)] + flags
            else:
                cmd = [sys.executable, "-c", QUANTIZE_STATIC, str(src), str(out), str(calib)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            row = {"model": name, "tool": tool}
            if p.returncode != 0 or not out.exists():
                row["notes"] = f"failed: {rb.tail(p.stderr or p.stdout, 200)}"
            else:
                row.update(fidelity("det" if kind.startswith("det") and name != "mobilenet_v2" else kind, ref,
                                    outputs(out, evaluation)))
                row["size"] = out.stat().st_size / src.stat().st_size
                row["latency"], row["ms_float"], row["ms"] = rb.latency(src, out, lat_feeds, args.rounds, args.warmup)
            rows.append(row)
            print(row, flush=True)
    kept_from = None
    if args.keep_others:  # the rows of models not rerun now, first, in the table's model order
        kept, kept_from = rb.kept_rows(BENCH / "static.json", args.models.split(","))
        order = list(MODELS)
        rows = sorted(kept + rows, key=lambda r: order.index(r["model"]))
    env = rb.environment(sys.argv)
    lines = ["# Static INT8 with rendered text: onnxopt --quant static against quantize_static", "",
             f"- date: {env['date']}", f"- command: `python bench/static_bench.py {' '.join(sys.argv[1:])}`",
             *rb.provenance_lines(kept_from),
             f"- machine: {env['cpu']}, nproc={env['nproc']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("onnxruntime", "onnx", "numpy")),
             "- onnxopt: `--passes fold,cleanup,fuse,quant --quant static --calibration-data DIR` (default "
             "budget 0.99: every output's cosine, and the argmax agreement of a Softmax output with the original's "
             "close calls aside, on the held-back quarter (at most 64) of the calibration samples; "
             "`--min-agreement A`: that agreement with every change counted at least A); the float row is the "
             "same run without quant (what the fusions alone give); quantize_static: QDQ, per-channel, MinMax, "
             "uint8 activations, int8 weights",
             "- samples (calibration / evaluation): " + ", ".join(
                 f"{m} {v[3]} / {v[4]}" for m, v in MODELS.items()),
             "- agreement: rec, per output position's argmax (every change counted); cls and mobilenet, argmax; "
             "det, pixels of the text map (probability > 0.3); latency: one thread, median of per-round ratios "
             "to the float model",
             "", "| model | tool | size | latency vs float | agreement | more | notes |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        more = ", ".join(f"{k} {r[k]:.4f}" for k in ("lines_equal", "iou", "cosine") if k in r)
        lines.append(f"| {r['model']} | {r['tool']} | {rb.fmt(r.get('size'), '.3f')} | "
                     f"{rb.fmt(r.get('latency'), '.3f')} | {rb.fmt(r.get('agreement'), '.4f')} | {more} | "
                     f"{r.get('notes', '')} |")
    (BENCH / "static.md").write_text("\n".join(lines) + "\n")
    (BENCH / "static.json").write_text(json.dumps({"environment": env, "kept_from": kept_from, "rows": rows},
                                                  indent=1))
    print(f"wrote {BENCH / 'static.md'}")


if __name__ == "__main__":
    main()
