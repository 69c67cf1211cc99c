"""Run the full conformance sweep and write tests/conformance/summary.md (and summary.json).

    python -m tests.conformance.run                      # every case, every configuration
    python -m tests.conformance.run --configs fold,all --sources node --jobs 2

Exit status 1 when any configuration fails on any case, 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections import defaultdict

import numpy as np
import onnx

from tests.conformance import harness

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "summary.md")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.run", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", help="comma-separated configurations (default: all of "
                        f"{','.join(c.name for c in harness.configs())})")
    parser.add_argument("--sources", default=",".join(harness.SOURCES),
                        help="comma-separated case sources (default: %(default)s)")
    parser.add_argument("--every", type=int, default=1, help="run every N-th case of each source (default 1: all)")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="worker processes (default 1)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="summary file; the JSON goes beside it (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        selected = harness.select_configs(args.configs)
    except ValueError as e:
        parser.error(str(e))
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in harness.SOURCES]
    if unknown:
        parser.error(f"unknown source(s) {', '.join(unknown)}; available: {', '.join(harness.SOURCES)}")
    if args.every < 1:
        parser.error("--every must be at least 1")

    start = time.perf_counter()
    collected = harness.collect_cases(sources)
    cases = harness.sample(collected, args.every)
    print(f"{len(cases)} cases x {len(selected)} configurations ({', '.join(c.name for c in selected)})",
          file=sys.stderr)

    def progress(done, total):
        if done % 100 == 0 or done == total:
            print(f"  {done}/{total} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr)

    records = harness.sweep(cases, selected, jobs=args.jobs, progress=progress)
    seconds = time.perf_counter() - start
    command = "python -m tests.conformance.run" + "".join(f" {shlex.quote(a)}" for a in argv)
    summary = summarize(cases, selected, records, command=command, seconds=seconds, jobs=args.jobs)
    md_path = args.out
    json_path = os.path.splitext(md_path)[0] + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as f:
        f.write(markdown(summary))
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=False)
        f.write("\n")
    t = summary["totals"]
    print(f"{t['cases_collected']} cases: {t['cases_skipped']} skipped, {t['cases_run']} run; "
          f"{t['runs']} runs: {t['passed']} passed, {t['failed']} failed ({seconds:.0f} s); wrote {md_path}, "
          f"{json_path}", file=sys.stderr)
    for r in summary["failed"]:
        print(f"FAILED {r['case']} [{r['config']}] {r['reason']}: {r['detail']}", file=sys.stderr)
    return 1 if t["failed"] else 0


def versions() -> dict:
    import onnx_graphsurgeon
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx-graphsurgeon": onnx_graphsurgeon.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def summarize(cases: list[harness.Case], selected: list[harness.Config], records: list[harness.Record],
              command: str, seconds: float, jobs: int) -> dict:
    """Everything summary.md and summary.json show, as plain data."""
    source_of = {c.id: c.source for c in cases}
    skipped = [r for r in records if r.status == "skipped"]
    runs = [r for r in records if r.status != "skipped"]
    failed = [r for r in runs if r.status == "failed"]
    run_cases = sorted({r.case for r in runs})
    by_source = {}
    for source in harness.SOURCES:
        ids = [c.id for c in cases if c.source == source]
        if ids:
            n_skipped = sum(1 for r in skipped if source_of[r.case] == source)
            by_source[source] = {"collected": len(ids), "skipped": n_skipped, "run": len(ids) - n_skipped}
    by_config = {}
    for c in selected:
        mine = [r for r in runs if r.config == c.name]
        by_config[c.name] = {"passes": ",".join(c.passes), "target": c.target + (
            f", --max-opset {c.max_opset}" if c.max_opset else ""), "run": len(mine),
                             "passed": sum(r.status == "passed" for r in mine),
                             "failed": sum(r.status == "failed" for r in mine),
                             "unchanged": sum(r.detail == "unchanged" for r in mine)}
    reasons = defaultdict(list)
    for r in skipped:
        reasons[r.reason].append({"case": r.case, "detail": r.detail})
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(seconds, 1),
        "jobs": jobs,
        "versions": versions(),
        "configs": by_config,
        "totals": {"cases_collected": len(cases), "cases_skipped": len(skipped), "cases_run": len(run_cases),
                   "runs": len(runs), "passed": sum(r.status == "passed" for r in runs), "failed": len(failed)},
        "sources": by_source,
        "skipped": {reason: sorted(items, key=lambda x: x["case"])
                    for reason, items in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
        "failed": [r.as_dict() for r in failed],
    }


def markdown(s: dict) -> str:
    t, v = s["totals"], s["versions"]
    lines = [
        "# Conformance: the ONNX backend test suite through every lossless pass",
        "",
        f"Generated {s['date']} by `{s['command']}` in {s['seconds']:.0f} s ({s['jobs']} process"
        f"{'es' if s['jobs'] > 1 else ''}); "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "A case is run when onnxruntime (CPU, graph optimizations off) runs its original model and matches",
        "the expected outputs; otherwise it is skipped, with the reason. A run case goes through",
        "`onnxopt.optimize(model, passes, verify=\"none\", target, max_opset)` once per configuration, and the result",
        "must pass `onnx.checker` (full_check when the original does), load on onnxruntime and give the",
        "expected outputs (dtype, shape, values within the case's rtol/atol). See",
        "`tests/conformance/harness.py`; the skipped cases' details are in `summary.json`.",
        "",
        "| | count |",
        "|---|---:|",
        f"| cases collected | {t['cases_collected']} |",
        f"| cases skipped (the original cannot be judged) | {t['cases_skipped']} |",
        f"| cases run | {t['cases_run']} |",
        f"| runs (cases run x configurations) | {t['runs']} |",
        f"| passed | {t['passed']} |",
        f"| **failed** | **{t['failed']}** |",
        "",
        "## By configuration",
        "",
        "| configuration | passes | target | runs | passed | failed | result identical to the original |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, c in s["configs"].items():
        lines.append(f"| {name} | {c['passes']} | {c['target']} | {c['run']} | {c['passed']} | {c['failed']} "
                     f"| {c['unchanged']} |")
    lines += ["", "## By source", "", "| source | collected | skipped | run |", "|---|---:|---:|---:|"]
    for name, c in s["sources"].items():
        lines.append(f"| {name} | {c['collected']} | {c['skipped']} | {c['run']} |")
    lines += ["", "## Skipped, by reason", "", "| reason | cases |", "|---|---:|"]
    for reason, items in s["skipped"].items():
        lines.append(f"| {reason} | {len(items)} |")
    for reason, items in s["skipped"].items():
        lines += ["", f"<details><summary>{reason} ({len(items)})</summary>", "",
                  ", ".join(f"`{x['case']}`" for x in items), "", "</details>"]
    lines += ["", "## Failed", ""]
    if not s["failed"]:
        lines.append("None.")
    else:
        lines += ["| case | configuration | reason | detail |", "|---|---|---|---|"]
        for r in s["failed"]:
            detail = r["detail"].replace("|", "\\|")
            lines.append(f"| {r['case']} | {r['config']} | {r['reason']} | {detail} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
