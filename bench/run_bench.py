#!/usr/bin/env python3
"""Benchmark onnxopt against other ONNX graph optimizers on real models.

For every model x tool it runs the tool once, in its own subprocess, measuring
wall time and peak RSS of the tool process (os.wait4 rusage, taken by a tiny
launcher process, see run_measured; on Linux it is the max RSS of the tool
process or of any descendant it waited for).  It then
measures the tool's output model:

  nodes         node count, counting nodes inside subgraphs (If/Loop/Scan) too
  non-Constant  the same without Constant nodes: tools differ in whether they
                turn Constant nodes into initializers (onnxsim keeps many), so
                this is the fairer count of compute nodes
  size MB       .onnx file size plus any external-data files it references
  params        tensor elements in initializers plus Constant-node tensors
                (PP-OCR models keep all weights in Constant nodes, so counting
                initializers alone would show 0 before and millions after)
  checker       onnx.checker.check_model on the output file
  outputs match onnxruntime outputs of original vs output, both sessions at
                ORT_DISABLE_ALL and 1 thread, np.allclose(rtol=1e-4, atol=1e-5)
  latency ratio onnxruntime default session options, except intra/inter-op
                threads = 1; both sessions created once, warmed up, then run
                interleaved (original, candidate, ...) for --rounds rounds;
                ratio = median of the per-round ratios candidate/original
                (< 1 means the optimized model is faster)

Tools: onnxopt (this project's CLI, `--onnxopt-cmd`: fold,cleanup; and fold,cleanup,fuse for
--target onnx and ort, each also with --max-opset 23: the "23" rows), ort-transformers (onnxruntime.transformers.optimizer, bert, on the MiniLM
models), ort-extended (onnxruntime
offline optimization at ORT_ENABLE_EXTENDED, saved via optimized_model_filepath),
onnxsim and onnxslim (their CLIs via `python -m`).  Missing baselines are
pip-installed from bench/requirements.txt unless --no-install; a tool that
cannot be installed or run gets empty columns and the reason in `notes`.

Models: the MiniLM / MobileNetV2 files in --shared-models (skipped with a
reason if absent) and the PP-OCR det/rec/cls models, which the bench fetches
itself from the rapidocr-onnxruntime==1.4.4 wheel via `pip download`.

Writes bench/results.md (Markdown table) and bench/results.json (raw data).
Example:  python bench/run_bench.py --models ppocr_cls,mobilenet_v2 --rounds 10
"""
import argparse, datetime, importlib.metadata, importlib.util, json, os, platform
import shlex, shutil, statistics, subprocess, sys, time, zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PPOCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
# name -> (source, file name, float input shape or None for the MiniLM npz inputs)
MODELS = {
    "minilm_legacy": ("shared", "all-MiniLM-L6-v2_legacy_op17.onnx", None),
    "minilm_dynamo": ("shared", "all-MiniLM-L6-v2_dynamo_op18.onnx", None),
    "mobilenet_v2": ("shared", "mobilenet_v2_unfoldedbn_op17.onnx", (1, 3, 224, 224)),
    "ppocr_det": ("ppocr", "ch_PP-OCRv4_det_infer.onnx", (1, 3, 640, 640)),
    "ppocr_rec": ("ppocr", "ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
    "ppocr_cls": ("ppocr", "ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192)),
}
TOOLS = ["onnxopt", "onnxopt-fuse-onnx", "onnxopt-fuse-onnx23", "onnxopt-fuse-ort", "onnxopt-fuse-ort23",
         "ort-extended", "ort-transformers", "onnxsim", "onnxslim"]
# onnxopt's rows: the passes and target each one runs (onnx23: the opset may be raised to 23)
ONNXOPT_RUNS = {"onnxopt": ("fold,cleanup", "onnx", []), "onnxopt-fuse-onnx": ("fold,cleanup,fuse", "onnx", []),
                "onnxopt-fuse-onnx23": ("fold,cleanup,fuse", "onnx", ["--max-opset", "23"]),
                "onnxopt-fuse-ort": ("fold,cleanup,fuse", "ort", []),
                "onnxopt-fuse-ort23": ("fold,cleanup,fuse", "ort", ["--max-opset", "23"])}
# onnxruntime's transformer optimizer (model type bert), for the transformer models only. opt_level=0:
# its fusions are its own Python rewrites; level 1+ also needs torch, which is not installed here.
ORT_TRANSFORMERS = """import sys, onnxruntime.transformers.optimizer as o
m = o.optimize_model(sys.argv[1], model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
m.save_model_to_file(sys.argv[2])
"""
MINILM_LATENCY_SEQ = 128  # the latency of the MiniLM models is measured at this sequence length
ORT_OPTIMIZE = """import sys, onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
so.optimized_model_filepath = sys.argv[2]
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
"""
RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------- models ---
def fetch_ppocr(cache):
    """Extract the PP-OCR .onnx files from the rapidocr wheel into cache/ppocr."""
    dest = cache / "ppocr"
    names = [f for src, f, _ in MODELS.values() if src == "ppocr"]
    if all((dest / n).exists() for n in names):
        return dest, None
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PPOCR_WHEEL, "-d", str(wheels)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    if not found:
        return dest, f"pip download {PPOCR_WHEEL} failed: {tail(p.stdout + p.stderr)}"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as z:
        for member in z.namelist():
            if member.startswith("rapidocr_onnxruntime/models/") and member.endswith(".onnx"):
                (dest / Path(member).name).write_bytes(z.read(member))
    return dest, None


def make_feeds(path, shape, npz_path):
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if shape is None:
        data = np.load(npz_path)
        return {n: data[n] for n in names}
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(shape).astype(np.float32) for n in names}


def latency_feeds(sample):
    """MiniLM latency inputs: one sequence of MINILM_LATENCY_SEQ tokens, the real sample tokens
    repeated, with the last quarter padding (attention_mask 0)."""
    n = MINILM_LATENCY_SEQ
    ids = np.resize(sample["input_ids"].reshape(-1), (1, n)).astype(np.int64)
    mask = np.ones((1, n), np.int64)
    mask[:, 3 * n // 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((1, n), np.int64)}


# ----------------------------------------------------------------- tools ---
def tail(text, n=300):
    text = " ".join(text.strip().split())
    return text[-n:] if text else "(no output)"


def ensure_installed(tool, allow_install, cache={}):
    """Return None if the baseline's module is importable, else a reason string."""
    if tool in cache:
        return cache[tool]
    reason = None
    if importlib.util.find_spec(tool) is None:
        reqs = [l.strip() for l in (BENCH / "requirements.txt").read_text().splitlines()]
        spec = next((l for l in reqs if l.split("=")[0].split("<")[0].split(">")[0] == tool), tool)
        if not allow_install:
            reason = f"{tool} not installed (pip install '{spec}')"
        else:
            print(f"  installing {spec} ...", flush=True)
            p = subprocess.run([sys.executable, "-m", "pip", "install", spec],
                               capture_output=True, text=True)
            importlib.invalidate_caches()
            if p.returncode != 0 or importlib.util.find_spec(tool) is None:
                errors = [l for l in (p.stdout + p.stderr).splitlines() if "ERROR" in l]
                reason = f"pip install '{spec}' failed: {tail(errors[-1] if errors else p.stdout + p.stderr)}"
    cache[tool] = reason
    return reason


def tool_command(tool, src, out, args, inputs):
    """Return (argv, None) or (None, skip reason). onnxopt runs as users run it: with its default
    verification against onnxruntime (on the bench's own inputs), which its time includes."""
    if tool in ONNXOPT_RUNS:
        base = shlex.split(args.onnxopt_cmd)
        if not base or shutil.which(base[0]) is None:
            return None, f"command {args.onnxopt_cmd!r} not found (pip install -e . first?)"
        passes, target, extra = ONNXOPT_RUNS[tool]
        return base + [str(src), "-o", str(out), "--passes", passes, "--target", target, "--inputs", str(inputs)] + extra, None
    if tool == "ort-transformers":
        if "minilm" not in src.name.lower():
            return None, "not a transformer model"
        return [sys.executable, "-c", ORT_TRANSFORMERS, str(src), str(out)], None
    if tool == "ort-extended":
        return [sys.executable, "-c", ORT_OPTIMIZE, str(src), str(out)], None
    reason = ensure_installed(tool, not args.no_install)
    if reason:
        return None, reason
    return [sys.executable, "-m", tool, str(src), str(out)], None


# A small launcher process runs the tool and reports its rusage.  Measuring the
# tool as a direct child of this (large) process would be wrong on Linux: the
# child's ru_maxrss starts at the parent's RSS high-water mark copied at
# fork/exec.  The launcher is a bare Python (~10 MB), so its contribution is
# below any real tool's peak.  Same idea as GNU `/usr/bin/time -v`, no dependency.
LAUNCHER = """import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
wall = time.perf_counter() - t
p.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": p.returncode, "wall_s": wall, "maxrss_kib": usage.ru_maxrss}, f)
"""


def run_measured(cmd, log_path, timeout):
    """Run cmd; return (exit code, wall seconds, peak RSS MB of the tool process)."""
    stats_path = Path(str(log_path) + ".rusage.json")
    stats_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(stats_path)] + cmd,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return f"timeout after {timeout:.0f}s", None, None
    if not stats_path.exists():
        return f"launcher failed (exit {proc.returncode})", None, None
    st = json.loads(stats_path.read_text())
    return st["rc"], st["wall_s"], st["maxrss_kib"] / 1024.0  # ru_maxrss is KiB on Linux


# --------------------------------------------------------------- metrics ---
def iter_graphs(graph):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_graphs(g)


def model_stats(path):
    m = onnx.load(str(path), load_external_data=False)
    nodes = const_nodes = init_elems = const_elems = 0
    tensors = []
    for g in iter_graphs(m.graph):
        nodes += len(g.node)
        const_nodes += sum(n.op_type == "Constant" for n in g.node)
        tensors += list(g.initializer)
        init_elems += sum(int(np.prod(t.dims)) for t in g.initializer)
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR:
                    const_elems += int(np.prod(a.t.dims))
                    tensors.append(a.t)
                elif n.op_type == "Constant" and a.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
                    const_elems += len(a.floats) + len(a.ints)
                elif n.op_type == "Constant" and a.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT):
                    const_elems += 1
    files = {e.value for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    size = os.path.getsize(path) + sum(os.path.getsize(Path(path).parent / f) for f in files)
    try:
        onnx.checker.check_model(str(path))
        checker = "ok"
    except Exception as e:  # noqa: BLE001 - any checker failure is a result
        checker = "FAIL: " + " ".join(str(e).split())[:200]
    return {"nodes": nodes, "nonconst_nodes": nodes - const_nodes, "size_mb": size / 1e6, "params": init_elems + const_elems,
            "params_initializers": init_elems, "params_constants": const_elems,
            "external_files": sorted(files), "checker": checker}


def session(path, level, threads=True):
    so = ort.SessionOptions()
    if level is not None:
        so.graph_optimization_level = level
    if threads:
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def reference_outputs(path, feeds):
    s = session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return [o.name for o in s.get_outputs()], s.run(None, feeds)


def compare(ref, path, feeds):
    ref_names, ref_vals = ref
    names, vals = reference_outputs(path, feeds)
    if len(vals) != len(ref_vals):
        return False, f"{len(vals)} outputs vs {len(ref_vals)}"
    by_name = dict(zip(names, vals))
    worst, ok = 0.0, True
    for i, (n, r) in enumerate(zip(ref_names, ref_vals)):
        c = by_name.get(n, vals[i])
        if c.shape != r.shape:
            return False, f"output {n}: shape {c.shape} vs {r.shape}"
        if r.size:
            worst = max(worst, float(np.max(np.abs(c.astype(np.float64) - r.astype(np.float64)))))
        ok = ok and bool(np.allclose(c, r, rtol=RTOL, atol=ATOL))
    return ok, f"maxdiff {worst:.1e}"


def session_ms(path, repeats=5):
    """Median time to create an onnxruntime session (default options, 1 thread), in ms."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session(path, None)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def latency(orig_path, cand_path, feeds, rounds, warmup, cand_level=None):
    """Median of per-round (candidate / original) times, interleaved runs; the order within a
    round alternates so neither session always runs second (warm caches)."""
    s0, s1 = session(orig_path, None), session(cand_path, cand_level)
    for _ in range(warmup):
        s0.run(None, feeds)
        s1.run(None, feeds)
    t_orig, t_cand = [], []
    for i in range(rounds):
        pair = ((s0, t_orig), (s1, t_cand))
        for s, acc in (pair if i % 2 == 0 else pair[::-1]):
            t = time.perf_counter()
            s.run(None, feeds)
            acc.append(time.perf_counter() - t)
    ratio = statistics.median(c / o for c, o in zip(t_cand, t_orig))
    return ratio, statistics.median(t_orig) * 1e3, statistics.median(t_cand) * 1e3


# ---------------------------------------------------------------- report ---
def environment(argv):
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                    if l.startswith("model name")), cpu)
    versions = {}
    for pkg in ("onnx", "onnxruntime", "numpy", "onnxsim", "onnxslim", "onnxopt"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join(["python"] + argv), "python": platform.python_version(),
            "versions": versions, "nproc": os.cpu_count(), "cpu": cpu, "platform": platform.platform()}


def kept_rows(json_path, rerun):
    """For --keep-others: the committed rows of the models not in `rerun`, and where they come
    from (the earlier runs the old table names for them, else the run that wrote it)."""
    if not Path(json_path).exists():
        return [], None
    old = json.loads(Path(json_path).read_text())
    kept = [r for r in old["rows"] if r["model"] not in rerun]
    models = {r["model"] for r in kept}
    earlier = old.get("kept_from") or []
    earlier = [earlier] if isinstance(earlier, dict) else earlier
    sources, named = [], set()
    for source in earlier:
        mine = sorted(models & set(source["models"]))
        named |= set(mine)
        if mine:
            sources.append({"models": mine, "date": source["date"], "command": source["command"],
                            "machine": source.get("machine")})
    rest = sorted(models - named)
    if rest:
        env = old["environment"]
        sources.append({"models": rest, "date": env["date"], "command": env.get("command"),
                        "machine": env.get("cpu")})
    return kept, sources or None


def provenance_lines(kept_from):
    """The header lines naming the earlier runs that kept rows come from."""
    lines = []
    for source in kept_from or []:
        on = f", on {source['machine']}" if source.get("machine") else ", machine not recorded"
        lines.append(f"- the rows of {', '.join(source['models'])} come from an earlier run: "
                     f"{source['date']}, `{source['command']}`{on}")
    return lines


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def write_reports(env, rows, md_path, json_path):
    json_path.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    v = env["versions"]
    lines = [
        "# onnxopt benchmark results", "",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, onnxsim {v['onnxsim']}, "
        f"onnxslim {v['onnxslim']}, onnxopt {v['onnxopt']}, numpy {v['numpy']}, Python {env['python']}",
        f"- machine: nproc={env['nproc']}, CPU: {env['cpu']}, {env['platform']}",
        f"- outputs match: rtol={RTOL}, atol={ATOL} vs the original (ORT_DISABLE_ALL); latency "
        "ratio: median of per-round candidate/original times, 1 thread, <1 is faster", "",
        "| model | tool | nodes | non-Constant nodes | size MB | params | checker | outputs match "
        "| latency ratio | ratio, ORT opts off | session ms | opt time s | peak MB | notes |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        match = "" if r.get("outputs_match") is None else ("yes" if r["outputs_match"] else "NO")
        checker = (r.get("checker") or "").split(":")[0]
        notes = r.get("notes") or ""
        if checker == "FAIL":
            notes = f"{notes}; checker: {r['checker'][6:]}"
        notes = notes.replace("|", "/")
        lines.append(f"| {r['model']} | {r['tool']} | {fmt(r.get('nodes'), 'd')} | "
                     f"{fmt(r.get('nonconst_nodes'), 'd')} | "
                     f"{fmt(r.get('size_mb'), '.2f')} | {fmt(r.get('params'), ',d')} | {checker} | "
                     f"{match} | {fmt(r.get('latency_ratio'), '.3f')} | {fmt(r.get('latency_ratio_noopt'), '.3f')} | "
                     f"{fmt(r.get('session_ms'), '.0f')} | {fmt(r.get('opt_time_s'), '.2f')} | "
                     f"{fmt(r.get('peak_mb'), '.0f')} | {notes} |")
    md_path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------ main ---
def bench_tool(name, tool, src, feeds, lat_feeds, ref, args, out_dir):
    row = {"model": name, "tool": tool}
    out = out_dir / f"{name}.{tool}.onnx"
    for stale in out_dir.glob(f"{name}.{tool}.*"):
        stale.unlink()
    inputs = out_dir / f"{name}.inputs.npz"
    np.savez(inputs, **feeds)
    cmd, reason = tool_command(tool, src, out, args, inputs)
    if cmd is None:
        row["notes"] = "skipped: " + reason
        return row
    row["command"] = shlex.join(cmd[:2] + ["<script>"] + cmd[3:] if cmd[1:2] == ["-c"] else cmd)
    log = out_dir / f"{name}.{tool}.log"
    rc, row["opt_time_s"], row["peak_mb"] = run_measured(cmd, log, args.timeout)
    if rc != 0 or not out.exists():
        row["notes"] = f"failed (exit {rc}): {tail(log.read_text(errors='replace'), 200)}"
        return row
    row.update(model_stats(out))
    try:
        row["outputs_match"], row["notes"] = compare(ref, out, feeds)
        row["latency_ratio"], row["orig_ms"], row["cand_ms"] = latency(src, out, lat_feeds, args.rounds, args.warmup)
        row["notes"] += f"; {row['cand_ms']:.2f} ms vs {row['orig_ms']:.2f} ms"
        row["session_ms"] = session_ms(out)
        if tool.startswith("onnxopt-fuse"):  # as on a runtime without an optimizer of its own
            row["latency_ratio_noopt"], _, _ = latency(src, out, lat_feeds, args.rounds, args.warmup,
                                                       ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except Exception as e:  # noqa: BLE001 - e.g. onnxruntime cannot load the output
        row["notes"] = "onnxruntime failed: " + tail(str(e), 200)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="all", help=f"comma-separated names or substrings of: {','.join(MODELS)}")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of: {','.join(TOOLS)}")
    ap.add_argument("--rounds", type=int, default=30, help="timed latency rounds (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warmup runs per session (default 5)")
    ap.add_argument("--shared-models", type=Path, default=REPO.parent / "shared" / "models")
    ap.add_argument("--cache", type=Path, default=BENCH / ".cache", help="downloads and tool outputs")
    ap.add_argument("--onnxopt-cmd", default="onnxopt", help="command used to run onnxopt (default: onnxopt)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per optimization run")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install missing baselines")
    ap.add_argument("--out-md", type=Path, default=BENCH / "results.md")
    ap.add_argument("--out-json", type=Path, default=BENCH / "results.json")
    args = ap.parse_args()

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tools {bad}; choose from {TOOLS}")
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [n for n in MODELS if "all" in wanted or any(w in n for w in wanted)]
    if not names:
        ap.error(f"no model matches {args.models!r}; choose from {list(MODELS)}")

    out_dir = args.cache / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    env, rows = environment(sys.argv), []
    ppocr_dir, ppocr_err = (None, None)
    if any(MODELS[n][0] == "ppocr" for n in names):
        ppocr_dir, ppocr_err = fetch_ppocr(args.cache)
    for name in names:
        source, fname, shape = MODELS[name]
        src = (args.shared_models if source == "shared" else ppocr_dir) / fname
        reason = ppocr_err if source == "ppocr" else None
        if reason is None and not src.exists():
            reason = f"{src} not found"
        if reason:
            print(f"[{name}] skipped: {reason}", flush=True)
            rows.append({"model": name, "tool": "original", "notes": "skipped: " + reason})
            continue
        print(f"[{name}] {src}", flush=True)
        feeds = make_feeds(src, shape, args.shared_models / "sample_inputs.npz")
        lat_feeds = latency_feeds(feeds) if shape is None else feeds
        ref = reference_outputs(src, feeds)
        orig = {"model": name, "tool": "original", "path": str(src), **model_stats(src)}
        # The original against itself (two sessions, same file): the noise floor of the ratios.
        orig["latency_ratio"], orig["orig_ms"], _ = latency(src, src, lat_feeds, args.rounds, args.warmup)
        orig["session_ms"] = session_ms(src)
        rows.append(orig)
        for tool in tools:
            row = bench_tool(name, tool, src, feeds, lat_feeds, ref, args, out_dir)
            rows.append(row)
            print(f"  {tool:13s} nodes={row.get('nodes')} time={fmt(row.get('opt_time_s'), '.2f')}s "
                  f"peak={fmt(row.get('peak_mb'), '.0f')}MB ratio={fmt(row.get('latency_ratio'), '.3f')} "
                  f"match={row.get('outputs_match')} {row.get('notes', '')}", flush=True)
            if "notes" not in orig:
                orig["notes"] = (f"original latency {orig['orig_ms']:.2f} ms (median, 1 thread); its ratio "
                                 "column is the original against itself: the noise floor")
            write_reports(env, rows, args.out_md, args.out_json)
        write_reports(env, rows, args.out_md, args.out_json)
    print(f"wrote {args.out_md} and {args.out_json}")


if __name__ == "__main__":
    main()
