"""quant: lower precision, with the error kept inside a budget.

Modes (`--quant`):
- fp16: float16 weights and compute wherever onnxruntime has a float16 kernel and the values fit
  (fp16.py); graph inputs and outputs keep their types unless `quant.keep_io_types=false`.
- dynamic, static, mixed, int4, int8: not built yet (issue 4).

The pass is lossy: the final verification checks every output's cosine against the original
model (`--min-cosine`, default 0.999 for fp16) and that no NaN or Inf appears where the original
has none; a result that misses the budget is not written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from onnxopt.errors import UsageError
from onnxopt.graph import Names, opset
from onnxopt.passes.cleanup import merge_duplicate_constants
from onnxopt.pipeline import Pass

from .fp16 import convert_to_fp16

MODES = ("fp16",)


class QuantPass(Pass):
    name = "quant"
    summary = "precision reduction inside an error budget (--quant fp16)"
    after = ("fold", "cleanup", "fuse")
    tolerance = "lossy"

    @dataclass
    class Options:
        keep_io_types: bool = True  # graph inputs and outputs keep float32

    def run(self, model, ctx):
        if ctx.quant not in MODES:
            raise UsageError(f"--quant {ctx.quant}: not built yet (available: {', '.join(MODES)})")
        graph = model.graph
        report = convert_to_fp16(graph, opset(graph), Names(graph), keep_io_types=self.options.keep_io_types)
        # float32 constants that differ only below float16's precision are now equal: keep one
        merged = merge_duplicate_constants(graph)
        for name, biggest in report.out_of_range.items():
            ctx.log(f"quant: constant {name!r} holds {biggest:.4g}, beyond float16's range: its readers stay float32")
        if ctx.explain:
            for name, reason in report.kept.items():
                ctx.log(f"quant: {name} stays float32: {reason}")
        if not (report.converted or report.constants_converted or report.casts_inserted or merged):
            return Counter()  # already float16 (a second run): what stays float32 is no change
        return Counter({
            "nodes_to_fp16": len(report.converted),
            "nodes_kept_fp32": len(report.kept),
            "constants_to_fp16": report.constants_converted,
            "casts_inserted": report.casts_inserted,
            "casts_retargeted": report.casts_retargeted,
            "constants_out_of_fp16_range": len(report.out_of_range),
            "duplicate_constants_merged": merged,
        })
