"""quant: lower precision, with the error kept inside a budget.

Modes (`--quant`):
- fp16: float16 weights and compute wherever onnxruntime has a float16 kernel and the values fit
  (fp16.py); graph inputs and outputs keep their types unless `quant.keep_io_types=false`.
- dynamic: int8 weights, activations quantized at run time, for MatMul/Gemm, embedding Gathers
  and (ort) packed-QKV attention (int8.py). Needs no calibration data: the error is measured on
  the evaluation samples (held-out calibration samples when given, else generated inputs).
- static, mixed, int4, int8: not built yet (issue 4).

The pass is lossy. The dynamic mode measures its result against the float model and, when an
output misses the budget (`--min-cosine`, default 0.99), puts the most sensitive nodes back in
float until it holds (budget.py; option quant.fallback=false turns this off). The final
verification then checks every output's cosine against the original model (default budget 0.999
for fp16) and that no NaN or Inf appears where the original has none; a result that misses the
budget is not written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from onnxopt.errors import UsageError
from onnxopt.graph import Names, cleanup, opset
from onnxopt.passes.cleanup import merge_duplicate_constants
from onnxopt.pipeline import Pass

from . import int8
from .budget import Measure, fit_budget
from .calib import channel_rows, observe
from .fp16 import convert_to_fp16

MODES = ("fp16", "dynamic")
SMOOTH_SAMPLES = 64  # calibration samples whose activations choose the SmoothQuant factors


class QuantPass(Pass):
    name = "quant"
    summary = "precision reduction inside an error budget (--quant fp16|dynamic)"
    after = ("fold", "cleanup", "fuse")
    tolerance = "lossy"

    @dataclass
    class Options:
        keep_io_types: bool = True  # graph inputs and outputs keep float32
        fallback: bool = True  # nodes go back to float until the budget holds
        reduce_range: bool = True  # int8: 7-bit weights; 8 bits saturate in onnxruntime's AVX2 kernels without VNNI
        smooth: bool = True  # int8: SmoothQuant where it cuts the simulated error (needs calibration data)

    def run(self, model, ctx):
        if ctx.quant not in MODES:
            raise UsageError(f"--quant {ctx.quant}: not built yet (available: {', '.join(MODES)})")
        if ctx.quant == "dynamic":
            return self.dynamic(model, ctx)
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

    def dynamic(self, model, ctx) -> Counter:
        graph, version = model.graph, opset(model.graph)
        sites, skipped = int8.dynamic_sites(graph, ctx.target, version)
        for label, reason in skipped.items():
            ctx.log(f"quant: {label}: {reason}")
        if not sites:
            ctx.log("quant: nothing to quantize in dynamic mode (no MatMul, Gemm or Gather with float32 weights)")
            return Counter()
        qmax = 63 if self.options.reduce_range else 127
        if not ctx.calibration_data:
            ctx.log("quant: no --calibration-data: no SmoothQuant, and the error is measured on generated inputs")
        elif self.options.smooth:
            smoothed = self.smooth(model, sites, ctx, qmax)
            ctx.log(f"quant: SmoothQuant on {smoothed} of {sum(s.kind != 'gather' for s in sites)} linear nodes")
        cache: dict = {}

        def rewrite(m, chosen):
            int8.quantize_sites(m.graph, chosen, ctx.target, version, Names(m.graph), self.options.reduce_range,
                                cache)
            cleanup(m.graph)

        fit = fit_budget(model, sites, rewrite, Measure(model, ctx.evaluation, ctx.min_cosine),
                         self.options.fallback)
        rewrite(model, fit.chosen)
        for label, loss in list(fit.sensitivity.items())[:10]:
            ctx.log(f"quant: sensitivity {label}: cosine {1 - loss:.6f} with only it quantized")
        if fit.kept:
            ctx.log(f"quant: kept in float for the budget (cosine >= {ctx.min_cosine}): "
                    f"{', '.join(s.label for s in fit.kept)}")
        ctx.log(f"quant: dynamic int8: {len(fit.chosen)} of {len(sites)} nodes quantized, "
                f"worst output mean cosine {fit.score:.6f} on {len(ctx.evaluation)} sample(s), {fit.trials} trial(s)")
        counts = Counter(f"{s.kind}_int8" for s in fit.chosen)
        counts["smoothed"] = sum(s.smooth is not None for s in fit.chosen)
        counts["kept_float_for_budget"] = len(fit.kept)
        counts["weights_int8"] = sum(s.params for s in fit.chosen)
        return +counts

    @staticmethod
    def smooth(model, sites, ctx, qmax: int) -> int:
        """Choose SmoothQuant factors per linear site from the calibration samples' activations."""
        nodes = model.graph.nodes
        linear = [s for s in sites if s.kind != "gather"]
        inputs = {s.index: nodes[s.index].inputs[0].name for s in linear}
        seen: dict[str, list] = {name: [] for name in inputs.values()}

        def keep(outs):
            for name, x in outs.items():
                seen[name].append(channel_rows(x, 512))

        observe(model, sorted(seen), ctx.calibration_data[:SMOOTH_SAMPLES], keep)
        groups: dict[str, list] = {}
        for site in linear:  # nodes reading the same input share its factors (and its quantization)
            groups.setdefault(inputs[site.index], []).append(site)
        for name, group in groups.items():
            w = np.concatenate([int8.linear_weight(nodes[s.index], s.kind)[0] for s in group], axis=1)
            factors, plain, err = int8.choose_smoothing(w, seen[name], qmax)
            for site in group:
                site.smooth = factors
            if ctx.explain:
                ctx.log(f"quant: {', '.join(s.label for s in group)}: simulated error {plain:.2e}"
                        + (f" -> {err:.2e} with SmoothQuant" if factors is not None else ", not smoothed"))
        return sum(s.smooth is not None for s in linear)
