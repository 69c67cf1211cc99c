#!/usr/bin/env python3
"""Why fuse writes the residual Add before a LayerNormalization as Sum (skip_add_as_sum).

onnxruntime fuses Add + LayerNormalization into its com.microsoft SkipLayerNormalization by
itself, wherever it can prove the two summands' shapes. This measures, in one run:
- the kernels alone: Add + LayerNormalization as onnxruntime fuses it (SkipLayerNormalization),
  the same graph with its fusions at the basic level (the two kernels), and Sum +
  LayerNormalization with every fusion on (which it leaves apart), at a few shapes;
- MiniLM (both exports): `--passes fold,cleanup,fuse --target ort`, with and without
  `--opt fuse.disable=skip_add_as_sum`, against the float model.
Latency: onnxruntime default options, one thread, interleaved rounds, median of per-round
ratios. Writes bench/skip_layer_norm.md and bench/skip_layer_norm.json.

    python bench/skip_layer_norm.py --rounds 40
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run_bench as rb  # noqa: E402

SHAPES = ([1, 16, 384], [1, 128, 384], [8, 128, 768])


def add_layer_norm(shape, op):
    nodes = [helper.make_node(op, ["a", "b"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(np.ones(shape[-1], np.float32), "gamma"),
                               numpy_helper.from_array(np.zeros(shape[-1], np.float32), "beta")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def session(model, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, feeds, rounds: int) -> dict:
    """Median seconds per session, over rounds that run every session once in alternating order."""
    for s in sessions.values():
        s.run(None, feeds)
    times = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            start = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - start)
    return times


def minilm_rows(args, work: Path, flags: list[str], variants: dict[str, list[str]]) -> list[dict]:
    """For each MiniLM export: the float model and `--passes fold,cleanup,fuse` with `flags` plus
    each variant's own, timed in interleaved rounds at the latency input; a row each with the
    median time, the median ratio to the float model and the largest output difference from it."""
    work.mkdir(parents=True, exist_ok=True)
    feeds = rb.latency_feeds(dict(np.load(args.shared_models / "sample_inputs.npz")))
    rows = []
    for export, opset in (("legacy", 17), ("dynamo", 18)):
        src = args.shared_models / f"all-MiniLM-L6-v2_{export}_op{opset}.onnx"
        made = {"float model": str(src)}
        for i, (label, extra) in enumerate(variants.items()):
            out = work / f"{export}.{i}.onnx"
            subprocess.run(args.onnxopt_cmd.split() + [str(src), "-o", str(out), "-q", "--passes", "fold,cleanup,fuse"]
                           + flags + extra, check=True)
            made[label] = str(out)
        sessions = {k: session(p) for k, p in made.items()}
        wanted = {i.name for i in sessions["float model"].get_inputs()}
        f = {k: v for k, v in feeds.items() if k in wanted}
        times = interleaved(sessions, f, args.rounds)
        base, want = times["float model"], sessions["float model"].run(None, f)
        for k, t in times.items():
            got = sessions[k].run(None, f)
            rows.append({"model": f"MiniLM {export}", "form": k, "ms": statistics.median(t) * 1e3,
                         "vs_float": statistics.median(a / b for a, b in zip(t, base)),
                         "max_abs": max(float(np.abs(a - b).max()) for a, b in zip(got, want))})
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--shared-models", type=Path, default=BENCH.parent.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    ap.add_argument("--onnxopt-cmd", default="onnxopt")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    kernels = []
    for shape in SHAPES:
        feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in "ab"}
        sessions = {"SkipLayerNormalization (onnxruntime's fusion)": session(add_layer_norm(shape, "Add")),
                    "Add + LayerNormalization": session(add_layer_norm(shape, "Add"),
                                                        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                    "Sum + LayerNormalization": session(add_layer_norm(shape, "Sum"))}
        times = interleaved(sessions, feeds, args.rounds * 5)
        for k, t in times.items():
            kernels.append({"shape": shape, "form": k, "us": statistics.median(t) * 1e6})
            print(kernels[-1], flush=True)
    models = minilm_rows(args, args.cache / "skip_layer_norm", ["--target", "ort"],
                         {"fuse, Sum": [], "fuse, Add (fuse.disable=skip_add_as_sum)":
                          ["--opt", "fuse.disable=skip_add_as_sum"]})
    env = rb.environment(sys.argv)
    lines = ["# SkipLayerNormalization against Add + LayerNormalization in onnxruntime", "",
             f"- date: {env['date']}", f"- command: `python bench/skip_layer_norm.py {' '.join(sys.argv[1:])}`",
             f"- machine: {env['cpu']}, nproc={env['nproc']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("onnxruntime", "onnx", "numpy")),
             "- one thread, interleaved rounds, medians; the kernels: the same two-node graph, once with "
             "onnxruntime's fusions on (it writes SkipLayerNormalization), once at the basic level (Add and "
             "LayerNormalization run apart), once spelled Sum + LayerNormalization with every fusion on",
             "", "| shape | form | time us |", "|---|---|---:|"]
    lines += [f"| {r['shape']} | {r['form']} | {r['us']:.1f} |" for r in kernels]
    lines += ["", f"MiniLM at {rb.MINILM_LATENCY_SEQ} tokens (`--passes fold,cleanup,fuse --target ort`):", "",
              "| model | form | time ms | latency vs float |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['form']} | {r['ms']:.2f} | {r['vs_float']:.3f} |" for r in models]
    (BENCH / "skip_layer_norm.md").write_text("\n".join(lines) + "\n")
    (BENCH / "skip_layer_norm.json").write_text(json.dumps({"environment": env, "kernels": kernels,
                                                            "models": models}, indent=1))
    print(f"wrote {BENCH / 'skip_layer_norm.md'}")


if __name__ == "__main__":
    main()
