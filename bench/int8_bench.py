#!/usr/bin/env python3
"""INT8 and INT4 on MiniLM with real text: onnxopt's `--quant dynamic` against onnxruntime's
quantize_dynamic, `--quant static` against quantize_static (QDQ, per-channel, MinMax, on the same
calibration sentences), and `--quant int4` against onnxruntime's MatMulNBitsQuantizer (block 32,
RTN; it needs the onnx-ir package, installed with the bench requirements).

Text: sentences from the standard library's docstrings (bench/text_data.py), tokenized with the
model's tokenizer: 256 calibration sentences given to onnxopt as a folder (`--calibration-data`;
onnxopt holds back its last quarter, at most 64, for its own budget check), and 128 other sentences for the
evaluation here, which no tool sees.

Per model and tool: file size against the float model; fidelity on the evaluation sentences
against the float model (mean and worst cosine of the sentence embeddings, mean cosine of the
token states, and nearest-neighbour agreement: for each sentence, the most similar other
evaluation sentence is the same one as with the float model's embeddings); latency at 128 tokens
(onnxruntime default options, one thread, interleaved rounds, median of per-round ratios) against
the float model, and against the baseline of the same kind directly (quantize_dynamic,
quantize_static, MatMulNBitsQuantizer). Writes bench/int8.md and bench/int8.json.

    python bench/int8_bench.py --rounds 30
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run_bench as rb  # noqa: E402
import text_data  # noqa: E402
from static_bench import QUANTIZE_STATIC  # noqa: E402  (the same quantize_static run on both benches)

ORT_DYNAMIC = """import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8, per_channel=sys.argv[3] == "1",
                 reduce_range=sys.argv[3] == "1")
"""
ORT_INT4 = """import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
q = MatMulNBitsQuantizer(onnx.load(sys.argv[1]), block_size=32, is_symmetric=False)
q.process()
onnx.save(q.model.model, sys.argv[2])
"""
MODELS = {"MiniLM legacy": "all-MiniLM-L6-v2_legacy_op17.onnx", "MiniLM dynamo": "all-MiniLM-L6-v2_dynamo_op18.onnx"}
TOOLS = {
    "onnxopt dynamic (ort)": ["--passes", "fold,cleanup,fuse,quant", "--quant", "dynamic", "--target", "ort"],
    "onnxopt dynamic (onnx)": ["--passes", "fold,cleanup,fuse,quant", "--quant", "dynamic"],
    "quantize_dynamic": "0",
    "quantize_dynamic per-channel, reduce_range": "1",
    "onnxopt static (onnx)": ["--passes", "fold,cleanup,fuse,quant", "--quant", "static"],
    "quantize_static": "static",
    "onnxopt int4 gptq (ort)": ["--passes", "fold,cleanup,fuse,quant", "--quant", "int4", "--target", "ort"],
    "onnxopt int4 rtn (ort)": ["--passes", "fold,cleanup,fuse,quant", "--quant", "int4", "--target", "ort",
                               "--opt", "quant.method=rtn"],
    "MatMulNBitsQuantizer": "int4",
}
BASELINE = {tool: "MatMulNBitsQuantizer" if "int4" in tool or tool == "MatMulNBitsQuantizer" else
            "quantize_static" if "static" in tool else "quantize_dynamic" for tool in TOOLS}


def make(tool, src, out, calib, args):
    spec = TOOLS[tool]
    if isinstance(spec, list):
        cmd = args.onnxopt_cmd.split() + [str(src), "-o", str(out), "--calibration-data", str(calib), "-q"] + spec
    elif spec == "int4":
        cmd = [sys.executable, "-c", ORT_INT4, str(src), str(out)]
    elif spec == "static":
        cmd = [sys.executable, "-c", QUANTIZE_STATIC, str(src), str(out), str(calib)]
    else:
        cmd = [sys.executable, "-c", ORT_DYNAMIC, str(src), str(out), spec]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        raise SystemExit(f"{tool} failed on {src.name}: {rb.tail(p.stderr or p.stdout)}")


def outputs(path, feeds):
    s = rb.session(path, None)
    names = [o.name for o in s.get_outputs()]
    runs = [dict(zip(names, s.run(None, f))) for f in feeds]
    return runs


def cos(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def fidelity(ref, got):
    emb = [cos(r["sentence_embedding"], g["sentence_embedding"]) for r, g in zip(ref, got)]
    tok = [cos(r["last_hidden_state"], g["last_hidden_state"]) for r, g in zip(ref, got)]
    err = max(float(np.abs(r["sentence_embedding"] - g["sentence_embedding"]).max()) for r, g in zip(ref, got))

    def neighbours(runs):
        e = np.concatenate([r["sentence_embedding"] for r in runs]).astype(np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -2)
        return sim.argmax(1)

    agree = float(np.mean(neighbours(ref) == neighbours(got)))
    return {"emb_mean": float(np.mean(emb)), "emb_min": float(np.min(emb)), "tok_mean": float(np.mean(tok)),
            "emb_max_err": err, "nn_agree": agree}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--shared-models", type=Path, default=BENCH.parent.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    ap.add_argument("--onnxopt-cmd", default="onnxopt")
    args = ap.parse_args()
    work = args.cache / "int8"
    cal_sentences, eval_sentences = text_data.split(256, 128)
    calib = work / "calibration"
    if not calib.exists():
        text_data.write_folder(text_data.encode(cal_sentences), calib)
    evaluation = text_data.encode(eval_sentences)
    rows = []
    for label, fname in MODELS.items():
        src = args.shared_models / fname
        if not src.exists():
            print(f"[{label}] skipped: {src} not found", flush=True)
            continue
        ref = outputs(src, evaluation)
        lat_feeds = rb.latency_feeds(evaluation[0])
        made = {}
        for tool in TOOLS:
            out = work / f"{src.stem}.{tool.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}.onnx"
            make(tool, src, out, calib, args)
            made[tool] = out
        for tool, out in made.items():
            row = {"model": label, "tool": tool, "size": out.stat().st_size / src.stat().st_size}
            row.update(fidelity(ref, outputs(out, evaluation)))
            row["latency"], row["ms_float"], row["ms"] = rb.latency(src, out, lat_feeds, args.rounds, args.warmup)
            if tool != BASELINE[tool]:
                row["vs_ort"] = rb.latency(made[BASELINE[tool]], out, lat_feeds, args.rounds, args.warmup)[0]
            rows.append(row)
            print(row, flush=True)
    env = rb.environment(sys.argv)
    lines = ["# INT8 and INT4 on MiniLM with real text", "",
             f"- date: {env['date']}", f"- command: `python bench/int8_bench.py {' '.join(sys.argv[1:])}`",
             f"- machine: {env['cpu']}, nproc={env['nproc']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("onnxruntime", "onnx", "numpy")),
             f"- text: Python {sys.version.split()[0]} standard-library docstrings; 256 calibration sentences "
             "(onnxopt holds back 64 of them for its budget), 128 separate evaluation sentences",
             "- latency: 128 tokens, onnxruntime default options, one thread, median of per-round ratios "
             f"over {args.rounds} interleaved rounds", "",
             "'vs baseline': the latency ratio to quantize_dynamic (dynamic rows), quantize_static (static "
             "rows) or MatMulNBitsQuantizer (int4 rows), interleaved in the same run", "",
             "| model | tool | size | latency vs float | vs baseline | sentence cosine mean | worst | "
             "token cosine mean | max abs err | nearest-neighbour agreement |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = f"{r['vs_ort']:.3f}" if "vs_ort" in r else "1"
        lines.append(f"| {r['model']} | {r['tool']} | {r['size']:.3f}x | {r['latency']:.3f} | {vs} | "
                     f"{r['emb_mean']:.4f} | {r['emb_min']:.4f} | {r['tok_mean']:.4f} | {r['emb_max_err']:.3f} | "
                     f"{r['nn_agree'] * 100:.1f}% |")
    (BENCH / "int8.md").write_text("\n".join(lines) + "\n")
    (BENCH / "int8.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    print(f"wrote {BENCH / 'int8.md'}")


if __name__ == "__main__":
    main()
