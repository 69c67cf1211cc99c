"""The summary table printed on stderr and the report written with --report."""

from __future__ import annotations

import json
import os

from .errors import OnnxoptError


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}K"
    return str(n)


def summary_lines(result, verbose: bool = False) -> list[str]:
    """A compact table: one row per pass with its time and change counts, then totals and the
    verification outcome."""
    lines = []
    if result.order_note:
        lines.append(result.order_note)
    width = max([len(r.name) for r in result.passes] + [4])
    for r in result.passes:
        changes = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items())) or "no change"
        lines.append(f"  {r.name:<{width}}  {r.seconds:7.2f}s  {changes}")
        if r.verification is not None and verbose:
            lines.extend(_metric_lines(r.verification, indent="      "))
    b, a = result.before, result.after
    lines.append(f"  nodes {b['nodes']} -> {a['nodes']}   params {human_count(b['params'])} -> "
                 f"{human_count(a['params'])}   size {human_bytes(b['size'])} -> {human_bytes(a['size'])}"
                 f"   time {result.seconds:.2f}s")
    v = result.verification
    if v["skipped"]:
        lines.append(f"  verify {v['mode']}: skipped ({v['skipped']})")
    elif v["outputs"]:
        worst_abs = max(o["max_abs"] for o in v["outputs"])
        worst_cos = min(o["cosine"] for o in v["outputs"])
        n = v["outputs"][0].get("samples", 1)
        on = f" on {n} held-out samples (cosine: the samples' mean)" if n > 1 else ""
        agreements = [o for o in v["outputs"] if o.get("agreement") is not None]
        argmax = ""
        if agreements:
            argmax = ", " + _agreement_words({k: min(o[k] for o in agreements)
                                              for k in ("plain_agreement", "agreement")})
        lines.append(f"  verify {v['mode']}: {len(v['outputs'])} output(s) match the original{on} "
                     f"(max abs err {worst_abs:.2e}, min cosine {worst_cos:.6f}{argmax})")
        if verbose:
            lines.extend(_metric_lines(v["outputs"], indent="      "))
    return lines


def _metric_lines(metrics, indent):
    return [f"{indent}{m['name']}: max_abs {m['max_abs']:.3e}  max_rel {m['max_rel']:.3e}  "
            f"cosine {m['cosine']:.8f}"
            f"{'' if m.get('worst_cosine') is None else '  worst sample ' + format(m['worst_cosine'], '.6f')}"
            f"{'' if m.get('agreement') is None else '  ' + _agreement_words(m)}"
            f"{'  ' + m['note'] if m['note'] else ''}" for m in metrics]


def _agreement_words(m) -> str:
    """A Softmax output's argmax agreement: plain (every change counted), and with the original's
    close calls aside (what the budget binds without --min-agreement)."""
    return f"argmax agreement {m['plain_agreement']:.4f} ({m['agreement']:.4f} with the original's close calls aside)"


def write_report(result, path: str) -> None:
    """Write the report JSON atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(result.as_dict(), f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OnnxoptError(f"cannot write --report {path}: {e.strerror or e}") from None


def _jsonable(x):
    if isinstance(x, float):
        return str(x)
    return str(x)
