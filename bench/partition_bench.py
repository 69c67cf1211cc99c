#!/usr/bin/env python3
"""Partitioning on the six bench models: the plan onnxopt writes, compared with onnxruntime's
node-by-node fallback for the same capabilities, and its split execution checked against the
whole model.

Two device sets: `cuda,cpu` (onnxruntime's documented CUDA operator list) and
`specs/gpu_lacking.json,cpu` (that list less Softmax, Erf, HardSigmoid, Resize and
GlobalAveragePool, so every model has operators the accelerator lacks). Per model, after
`fold,cleanup,fuse`:
- partitions and bytes crossing devices in onnxopt's plan, and in the fallback onnxruntime makes
  (every node on the first device that runs it; its runs counted the same way), with the
  estimated times of both and of everything on the cpu (the cost model's figures, not measured);
- split: the partitions written with --split and run by PartitionedSession (all on the CPU
  provider here): bit-identical to the annotated model with the reference session options, and
  the largest difference with onnxruntime's default options;
- onnxruntime: the annotated model loaded with the reported session.layer_assignment_settings
  and session.record_ep_graph_assignment_info; get_provider_graph_assignment_info must show every
  node on the CPU provider (the only one here; rules for absent devices are skipped).
Writes bench/partition.md and bench/partition.json.

    python bench/partition_bench.py
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run_bench as rb  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.verify import reference_options  # noqa: E402

SCENARIOS = {"cuda,cpu": ["cuda", "cpu"], "gpu_lacking,cpu": [str(BENCH / "specs" / "gpu_lacking.json"), "cpu"]}


def ort_placement(path: Path, settings: str) -> dict:
    opts = reference_options()
    opts.add_session_config_entry("session.layer_assignment_settings", settings)
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    placed = {n.name: g.ep_name for g in session.get_provider_graph_assignment_info() for n in g.get_nodes()}
    planned = {n.name: {e.key: e.value for e in n.metadata_props}.get("onnxopt.device")
               for n in onnx.load(str(path), load_external_data=False).graph.node}
    on_cpu = sum(placed.get(name) == "CPUExecutionProvider" for name in planned)
    return {"nodes": len(planned), "on_cpu_provider": on_cpu,
            "planned_cpu_on_cpu": all(placed.get(n) == "CPUExecutionProvider"
                                      for n, d in planned.items() if d == "cpu")}


def split_difference(model: Path, split: Path, feeds: dict) -> float:
    """Largest difference between the split and the model, both with onnxruntime's defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = onnxopt.PartitionedSession(str(split))
    whole = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, feeds)))
    got = dict(zip(session.get_outputs(), session.run(None, feeds)))
    return max(float(np.max(np.abs(np.asarray(want[k], np.float64) - np.asarray(got[k], np.float64))))
               for k in want)


def island_chain(blocks: int, path: Path, width: int = 256, rows: int = 4096) -> int:
    """Blocks of MatMul, Relu, Softmax and a residual Add: with the Softmax only on the cpu, the
    node-by-node fallback makes two partitions per block."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for b in range(blocks):
        w = (rng.standard_normal((width, width)) * 0.05).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"w{b}"))
        nodes += [onnx.helper.make_node("MatMul", [prev, f"w{b}"], [f"m{b}"]),
                  onnx.helper.make_node("Relu", [f"m{b}"], [f"r{b}"]),
                  onnx.helper.make_node("Softmax", [f"r{b}"], [f"s{b}"]),
                  onnx.helper.make_node("Add", [f"s{b}", prev], [f"a{b}"])]
        prev = f"a{b}"
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(nodes, "chain", [vi("x", onnx.TensorProto.FLOAT, [rows, width])],
                                   [vi(prev, onnx.TensorProto.FLOAT, [rows, width])], inits)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    return len(nodes)


def scaling(work: Path) -> list[dict]:
    """The partition pass's time on chains of 1k to 16k nodes (verification off)."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for blocks in (250, 1000, 4000):
        path = work / f"chain{blocks}.onnx"
        n = island_chain(blocks, path)
        result = onnxopt.optimize(str(path), None, passes=["partition"], verify="none",
                                  devices=SCENARIOS["gpu_lacking,cpu"])
        d = result.details["partition"]
        seconds = result.passes[0].seconds
        rows.append({"nodes": n, "seconds": round(seconds, 3), "us_per_node": round(seconds / n * 1e6, 1),
                     "partitions": len(d["partitions"]), "fallback_partitions": d["ort_fallback"]["partitions"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="all")
    ap.add_argument("--shared-models", type=Path, default=BENCH.parent.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    args = ap.parse_args()
    ppocr_dir, ppocr_err = rb.fetch_ppocr(args.cache)
    work = args.cache / "partition"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for scenario, devices in SCENARIOS.items():
        for name, (source, fname, shape) in rb.MODELS.items():
            if args.models != "all" and name not in args.models.split(","):
                continue
            src = (args.shared_models if source == "shared" else ppocr_dir) / fname
            if not src.exists() or (source == "ppocr" and ppocr_err):
                print(f"[{name}] skipped: {src} missing", flush=True)
                continue
            feeds = rb.make_feeds(src, shape, args.shared_models / "sample_inputs.npz")
            tag = scenario.split(",")[0]
            out, split = work / f"{name}.{tag}.onnx", work / f"{name}.{tag}.split"
            start = time.perf_counter()
            result = onnxopt.optimize(str(src), str(out), passes=["fold", "cleanup", "fuse", "partition"],
                                      inputs=feeds, devices=devices, split=str(split))
            seconds = time.perf_counter() - start
            part = next(r for r in result.passes if r.name == "partition")
            d = result.details["partition"]
            settings = d["session_config"]["session.layer_assignment_settings"]
            row = {
                "scenario": scenario, "model": name, "nodes": result.after["nodes"],
                "unsupported": {dev: sum(c.values()) for dev, c in d["unsupported"].items() if dev != "cpu"},
                "partitions": len(d["partitions"]), "per_device": d["nodes_per_device"],
                "boundary_bytes": d["boundary_bytes"], "fallback": d["ort_fallback"],
                "estimated_ms": d["estimated_ms"], "split_identical": d["split"]["max_abs_diff"] == 0.0,
                "split_max_diff_default_options": split_difference(out, split, feeds),
                "ort": ort_placement(out, settings), "settings": settings,
                "partition_seconds": round(part.seconds, 3), "total_seconds": round(seconds, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    grow = scaling(work)
    env = rb.environment(sys.argv)
    lines = ["# Partitioning: onnxopt's plan against onnxruntime's node-by-node fallback", "",
             f"Command: `{env['command']}`  ",
             f"Machine: {env['cpu']}, {env['nproc']} cores; onnxruntime {ort.__version__}", "",
             "Estimated times are the cost model's (built-in throughput figures for a data-center GPU over PCIe "
             "and a server CPU), not measurements. Split: the partitions run one after another by "
             "PartitionedSession, all on the CPU provider here.", ""]
    for scenario in SCENARIOS:
        lines += [f"## devices `{scenario}`", "",
                  "| model | nodes | nodes the accelerator lacks | partitions (onnxopt / fallback) "
                  "| bytes across devices (onnxopt / fallback) | est. ms onnxopt / fallback / all cpu "
                  "| split bit-identical | split max diff, default options | onnxruntime placement | pass s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["scenario"] == scenario):
            est = r["estimated_ms"]
            lacking = sum(r["unsupported"].values())
            lines.append(
                f"| {r['model']} | {r['nodes']} | {lacking} | {r['partitions']} / {r['fallback']['partitions']} | "
                f"{r['boundary_bytes']:,} / {r['fallback']['boundary_bytes']:,} | {est['plan']:.3f} / "
                f"{est['onnxruntime_fallback']:.3f} / {est.get('all_on_cpu', float('nan')):.3f} | "
                f"{'yes' if r['split_identical'] else 'NO'} | {r['split_max_diff_default_options']:.2g} | "
                f"{r['ort']['on_cpu_provider']}/{r['ort']['nodes']} on CPU"
                f"{'' if r['ort']['planned_cpu_on_cpu'] else ' (planned cpu node elsewhere!)'} | "
                f"{r['partition_seconds']} |")
        lines.append("")
    lines += ["## Scaling", "",
              "The pass alone (verification off) on chains of MatMul, Relu, Softmax and a residual Add "
              "(x: 4096 x 256), with the `gpu_lacking` spec: the MatMuls pay for the GPU, the Softmax runs only "
              "on the cpu, so every block needs about two partitions. Flat microseconds per node mean linear "
              "scaling.", "",
              "| nodes | pass s | us per node | partitions (onnxopt / fallback) |", "|---|---|---|---|"]
    lines += [f"| {r['nodes']} | {r['seconds']} | {r['us_per_node']} | {r['partitions']} / {r['fallback_partitions']} |"
              for r in grow]
    lines.append("")
    (BENCH / "partition.md").write_text("\n".join(lines))
    (BENCH / "partition.json").write_text(json.dumps({"environment": env, "rows": rows, "scaling": grow},
                                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
