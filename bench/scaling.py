#!/usr/bin/env python3
"""Optimization time against graph size: does onnxopt scale linearly?

Generates chains of a transformer-like block (dense layer with bias, erf GELU, LayerNorm spelled
out, a no-op Reshape, an Identity, a duplicated constant: 20 nodes at opset 20, every pass
has work in it; the blocks all read the input and are summed)
repeated until the graph has about 10k, 50k and 200k nodes, runs the onnxopt CLI on each in its
own process (fold,cleanup,fuse, with its default final verification against onnxruntime, and
with --verify none), and writes bench/scaling.md with wall time, peak memory, per-pass times and
microseconds per node. Linear scaling shows as a flat us/node column.

    python bench/scaling.py                 # 10k, 50k, 200k
    python bench/scaling.py --sizes 10000   # one size
"""
import argparse, datetime, json, platform, sys, tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from run_bench import run_measured  # noqa: E402

WIDTH = 8


def block(i: int, x: str, nodes: list, inits: list, rng) -> str:
    """One block reading x [B, WIDTH]; returns its output name."""
    p = f"b{i}_"

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), p + name))
        return p + name

    def node(op, inputs, **attrs):
        out = p + f"{op.lower()}{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    h = node("Add", [node("MatMul", [x, const("w", rng.standard_normal((WIDTH, WIDTH)) * 0.3)]),
                     const("b", rng.standard_normal(WIDTH) * 0.1)])
    # erf GELU
    e = node("Erf", [node("Div", [h, const("sqrt2", 1.4142135)])])
    g = node("Mul", [node("Mul", [h, node("Add", [e, const("one", 1.0)])]), const("half", 0.5)])
    # LayerNorm spelled out (opset 18+: the axes are an input)
    axes = p + "axes"
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
    m = node("ReduceMean", [g, axes])
    d = node("Sub", [g, m])
    v = node("ReduceMean", [node("Pow", [d, const("two", 2.0)]), axes])
    n = node("Div", [d, node("Sqrt", [node("Add", [v, const("eps", 1e-5)])])])
    ln = node("Add", [node("Mul", [n, const("gamma", rng.uniform(0.5, 1.5, WIDTH))]),
                      const("beta", rng.standard_normal(WIDTH) * 0.1)])
    # a no-op Reshape, an Identity, a constant duplicated in every block, a residual
    shape = p + "shape"
    inits.append(numpy_helper.from_array(np.array([-1, WIDTH], np.int64), shape))
    r = node("Identity", [node("Reshape", [ln, shape])])
    return node("Mul", [r, const("dup", np.full(WIDTH, 0.5))])


def build(target_nodes: int, path: Path) -> int:
    """Blocks that all read the graph input, their results summed by a chain of Adds (a chain of
    500 blocks, each reading the last, would amplify float rounding, fused or not, past any
    output tolerance)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    acc, i = None, 0
    while len(nodes) < target_nodes:
        y = block(i, "x", nodes, inits, rng)
        if acc is not None:
            nodes.append(helper.make_node("Add", [acc, y], [f"sum{i}"]))
            y = f"sum{i}"
        acc = y
        i += 1
    graph = helper.make_graph(nodes, "scaling", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", WIDTH])],
                              [helper.make_tensor_value_info(acc, TensorProto.FLOAT, ["B", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, path)
    return len(nodes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--onnxopt-cmd", default="onnxopt")
    ap.add_argument("--out-md", type=Path, default=BENCH / "scaling.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            src = Path(tmp) / f"chain{size}.onnx"
            nodes = build(size, src)
            for verify in ("final", "none"):
                out, report = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
                cmd = args.onnxopt_cmd.split() + [str(src), "-o", str(out), "--passes", "fold,cleanup,fuse",
                                                  "--verify", verify, "--report", str(report), "-q"]
                rc, wall, peak = run_measured(cmd, Path(tmp) / "log.txt", 3600)
                if rc != 0:
                    raise SystemExit(f"onnxopt failed on {size} nodes: {(Path(tmp) / 'log.txt').read_text()[-500:]}")
                rep = json.loads(report.read_text())
                passes = {p["name"]: p["seconds"] for p in rep["passes"]}
                row = {"nodes": nodes, "verify": verify, "nodes_after": rep["after"]["nodes"], "wall_s": wall,
                       "peak_mb": peak, "us_per_node": wall / nodes * 1e6, **passes}
                print(row, flush=True)
                rows.append(row)
    lines = [
        "# onnxopt scaling: optimization time against graph size", "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{' '.join(['python bench/scaling.py'] + sys.argv[1:])}`",
        f"- machine: {platform.platform()}, Python {platform.python_version()}",
        "- model: chains of a 20-node block (dense + bias, erf GELU, LayerNorm spelled out, no-op Reshape, "
        "Identity, duplicated constant; each reads the input, the results are summed), width 8, opset 20; passes fold,cleanup,fuse; wall time of the whole "
        "CLI process (load, passes, export, write; with `final` also onnxruntime verification of both models)",
        "",
        "| nodes | verify | nodes after | wall s | us per node | fold s | cleanup s | fuse s | peak MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['nodes']:,} | {r['verify']} | {r['nodes_after']:,} | {r['wall_s']:.1f} | "
                     f"{r['us_per_node']:.0f} | {r.get('fold', 0):.2f} | {r.get('cleanup', 0):.2f} | "
                     f"{r.get('fuse', 0):.2f} | {r['peak_mb']:.0f} |")
    args.out_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out_md}")


if __name__ == "__main__":
    main()
