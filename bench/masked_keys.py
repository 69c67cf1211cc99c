#!/usr/bin/env python3
"""Why fuse hides masked keys (masked_keys, passes/fuse/masked_keys.py).

onnxruntime's softmax runs exp of a very negative number (a padding mask's float32 lowest value,
or -10000) through a slow path. This measures, in one run:
- the standard Attention (opset 23) kernel alone, 12 heads of 32 at 128 tokens, the last quarter
  of the keys padding: no mask, a mask of zeros, the padding at float32's lowest value and at
  -10000, and as masked_keys writes it (the padded keys' rows of K zeroed, their mask at -40);
- MiniLM (both exports): `--passes fold,cleanup,fuse` at the model's opset (the unfused score
  path) and with `--max-opset 23` (the standard Attention), each with and without
  `--opt fuse.disable=masked_keys`, against the float model, and the largest output difference
  from it on the latency input.
Latency: onnxruntime default options, one thread, interleaved rounds, median of per-round
ratios. Writes bench/masked_keys.md and bench/masked_keys.json.

    python bench/masked_keys.py --rounds 40
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run_bench as rb  # noqa: E402
from skip_layer_norm import minilm_rows, session  # noqa: E402

HEADS, SIZE, SEQ = 12, 32, 128


def attention(mask: bool):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, SEQ, HEADS * SIZE]) for n in "qkv"]
    if mask:
        ins.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 1, SEQ, SEQ]))
    node = helper.make_node("Attention", [i.name for i in ins], ["y"], q_num_heads=HEADS, kv_num_heads=HEADS)
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model.SerializeToString()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--shared-models", type=Path, default=BENCH.parent.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache")
    ap.add_argument("--onnxopt-cmd", default="onnxopt")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    qkv = {n: rng.standard_normal((1, SEQ, HEADS * SIZE)).astype(np.float32) for n in "qkv"}
    padding = np.arange(SEQ) >= 3 * SEQ // 4

    def mask(value):
        return {"m": np.broadcast_to(np.where(padding, value, 0), (1, 1, SEQ, SEQ)).astype(np.float32)}

    hidden_k = np.where(padding[None, :, None], 0, qkv["k"]).astype(np.float32)
    cases = {"no mask": (False, qkv), "mask of zeros": (True, qkv | mask(0.0)),
             "padding at float32's lowest": (True, qkv | mask(np.finfo(np.float32).min)),
             "padding at -10000": (True, qkv | mask(-10000.0)),
             "masked_keys: padded keys' K rows 0, mask -40": (True, qkv | {"k": hidden_k} | mask(-40.0))}
    kernels = []
    sessions = {k: session(attention(m)) for k, (m, _) in cases.items()}
    times = {k: [] for k in cases}
    for r in range(args.rounds * 5):  # each case with its own feeds, interleaved
        for k in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            start = time.perf_counter()
            sessions[k].run(None, cases[k][1])
            times[k].append(time.perf_counter() - start)
    for k, t in times.items():
        kernels.append({"form": k, "us": statistics.median(t) * 1e6})
        print(kernels[-1], flush=True)
    off = ["--opt", "fuse.disable=masked_keys"]
    models = minilm_rows(args, args.cache / "masked_keys", [],
                         {"fuse (unfused scores)": [], "fuse (unfused scores), fuse.disable=masked_keys": off})
    models += [r for r in minilm_rows(args, args.cache / "masked_keys_23", ["--max-opset", "23"],
                                      {"fuse --max-opset 23": [], "fuse --max-opset 23, fuse.disable=masked_keys": off})
               if r["form"] != "float model"]
    models.sort(key=lambda r: r["model"])  # each export's rows together, in the order measured
    env = rb.environment(sys.argv)
    lines = ["# masked_keys: a padding mask's hidden keys at a logit of -40 instead of float32's lowest", "",
             f"- date: {env['date']}", f"- command: `python bench/masked_keys.py {' '.join(sys.argv[1:])}`",
             f"- machine: {env['cpu']}, nproc={env['nproc']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("onnxruntime", "onnx", "numpy")),
             f"- one thread, interleaved rounds, medians; the kernel: the standard Attention (opset 23), {HEADS} "
             f"heads of {SIZE}, {SEQ} tokens, the last quarter of the keys padding",
             "", "| form | time us |", "|---|---:|"]
    lines += [f"| {r['form']} | {r['us']:.1f} |" for r in kernels]
    lines += ["", f"MiniLM at {rb.MINILM_LATENCY_SEQ} tokens, the last quarter padding (`--passes "
              "fold,cleanup,fuse`, at the model's opset and with `--max-opset 23`; each group of rows timed "
              "against the float model in its own interleaved rounds):", "",
              "| model | form | time ms | latency vs float | max abs difference from float |",
              "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['form']} | {r['ms']:.2f} | {r['vs_float']:.3f} | {r['max_abs']:.2e} |"
              for r in models]
    (BENCH / "masked_keys.md").write_text("\n".join(lines) + "\n")
    (BENCH / "masked_keys.json").write_text(json.dumps({"environment": env, "kernels": kernels,
                                                        "models": models}, indent=1))
    print(f"wrote {BENCH / 'masked_keys.md'}")


if __name__ == "__main__":
    main()
