#!/usr/bin/env python3
"""A model over 2 GB through onnxopt: time and peak memory against the model's size.

Generates y = x @ W0 @ W1 @ W2 with three 14336x14336 float32 weights (2.3 GiB) written straight
to an external-data file, as a model over 2 GB must be stored, then runs the onnxopt CLI on it in
its own process (with its default final verification against onnxruntime) for
`fold,cleanup,fuse` and for `fold,cleanup,fuse,quant --quant fp16`, then both again with
`--verify none` (onnxopt's own footprint, without onnxruntime's sessions), and writes bench/large.md
with wall time, peak resident memory and their ratio to the model's size.

    python bench/large.py            # about 3 minutes and 4 GB of memory here
"""
import argparse, datetime, json, os, platform, sys, tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from run_bench import run_measured  # noqa: E402

# with onnxruntime's verification (its sessions hold the model too), and without it: onnxopt's own footprint
RUNS = [("fold,cleanup,fuse", []), ("fold,cleanup,fuse,quant", ["--quant", "fp16"]),
        ("fold,cleanup,fuse", ["--verify", "none"]), ("fold,cleanup,fuse,quant", ["--quant", "fp16", "--verify", "none"])]


def build(folder: Path, n: int, count: int) -> int:
    """The model file and its weights file; returns the total size in bytes."""
    nodes, prev = [], "x"
    for i in range(count):
        out = "y" if i == count - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])])
    block = np.empty((n, n), np.float32)
    rng = np.random.default_rng(0)
    with open(folder / "w.bin", "wb") as f:
        for i in range(count):
            # rows alike (cheap to make), values differ per weight (cleanup must not merge them)
            block[:] = rng.standard_normal((1, n), dtype=np.float32) / np.sqrt(n)
            w = graph.initializer.add()
            w.name, w.data_type, w.data_location = f"w{i}", TensorProto.FLOAT, TensorProto.EXTERNAL
            w.dims.extend([n, n])
            w.external_data.add(key="location", value="w.bin")
            w.external_data.add(key="offset", value=str(i * block.nbytes))
            w.external_data.add(key="length", value=str(block.nbytes))
            block.tofile(f)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "in.onnx")
    return os.path.getsize(folder / "in.onnx") + os.path.getsize(folder / "w.bin")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=14336, help="weight side (default 14336: 3 x 784 MiB)")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--onnxopt-cmd", default="onnxopt")
    ap.add_argument("--out-md", type=Path, default=BENCH / "large.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=BENCH / ".cache" if (BENCH / ".cache").is_dir() else None) as tmp:
        tmp = Path(tmp)
        size = build(tmp, args.n, args.count)
        for passes, extra in RUNS:
            out, report = tmp / "out.onnx", tmp / "report.json"
            cmd = args.onnxopt_cmd.split() + [str(tmp / "in.onnx"), "-o", str(out), "--passes", passes,
                                              "--report", str(report), "-q"] + extra
            rc, wall, peak = run_measured(cmd, tmp / "log.txt", 3600)
            if rc != 0:
                raise SystemExit(f"onnxopt failed ({passes}): {(tmp / 'log.txt').read_text()[-500:]}")
            rep = json.loads(report.read_text())
            out_size = sum(os.path.getsize(p) for p in rep["written"])
            outputs = rep["verification"]["outputs"]
            cosine = min(o["cosine"] for o in outputs) if outputs else float("nan")
            rows.append({"passes": " ".join([passes] + extra), "size_gb": size / 1e9, "out_gb": out_size / 1e9,
                         "wall_s": wall, "peak_gb": peak * 2**20 / 1e9, "cosine": cosine})
            print(rows[-1], flush=True)
            for p in rep["written"]:
                os.remove(p)
    lines = [
        "# onnxopt on a model over 2 GB", "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{' '.join(['python bench/large.py'] + sys.argv[1:])}`",
        f"- machine: {platform.platform()}, Python {platform.python_version()}, nproc={os.cpu_count()}",
        f"- model: y = x @ W0 @ W1 @ W2, {args.count} float32 weights of {args.n}x{args.n} in one external-data "
        "file; the CLI with its default final verification against onnxruntime (whose sessions hold the "
        "model in the same process), and with --verify none",
        "",
        "| passes | model GB | output GB | wall s | peak GB | peak / model size | worst output cosine |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['passes']} | {r['size_gb']:.2f} | {r['out_gb']:.2f} | {r['wall_s']:.0f} | "
                     f"{r['peak_gb']:.2f} | {r['peak_gb'] / r['size_gb']:.2f} | "
                     f"{'not verified' if r['cosine'] != r['cosine'] else format(r['cosine'], '.6f')} |")
    args.out_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_md}")


if __name__ == "__main__":
    main()
