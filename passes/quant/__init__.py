"""quant: lower precision, with the error kept inside a budget.

Modes (`--quant`):
- fp16: float16 weights and compute wherever onnxruntime has a float16 kernel and the values fit
  (fp16.py); graph inputs and outputs keep their types unless `quant.keep_io_types=false`.
- mixed: fp16 where the measured error stays inside the budget; runs of consecutive nodes go back
  to float32, the most sensitive first, until it holds.
- dynamic: int8 weights, activations quantized at run time, for MatMul/Gemm, embedding Gathers
  and (ort) packed-QKV attention (int8.py), SmoothQuant from the calibration data.
- int4 (ort): 4-bit block-wise weights in MatMulNBits / GatherBlockQuantized, GPTQ with
  calibration data, round-to-nearest without (int4.py).
- static: int8 QDQ calibrated on the calibration data, laid out for onnxruntime's integer
  kernels (static.py).
- int8: per operator, static QDQ for convolutions (and the ops between them) with calibration
  data, else float; dynamic for MatMul, Gemm, embeddings and attention; one budget for both.

The error is measured on the evaluation samples (held-out calibration samples when given, else
generated inputs) against the float model; when an output misses the budget (`--min-cosine`;
default 0.999 for fp16 and mixed, 0.98 for int4, 0.99 otherwise), every mode but fp16 puts the
most sensitive units back in float until it holds (budget.py; quant.fallback=false turns this
off). The final verification then checks every output's cosine against the original model and
that no NaN or Inf appears where the original has none; a result that misses the budget is not
written unless --write-over-budget.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from onnxopt.errors import UsageError
from onnxopt.graph import Names, cleanup, opset, raise_opset
from onnxopt.passes.cleanup import merge_duplicate_constants
from onnxopt.pipeline import Pass

from . import int4, int8
from . import static as qdq
from .budget import Measure, copy_model, fit_budget, latency_ratio, score_name
from .calib import channel_rows, input_products, observe, weight_products
from .fp16 import convert_to_fp16

MODES = ("fp16", "mixed", "dynamic", "static", "int8", "int4")
CONV_FAMILY = frozenset({"conv", "add", "mul", "concat", "globalaveragepool", "averagepool"})  # int8: static kinds
INT8_SLOWER = 1.05  # --quant int8 keeps convolutions float when static QDQ times above this ratio to float
SMOOTH_SAMPLES = 64  # calibration samples whose activations choose the SmoothQuant factors


@dataclass
class MixedUnit:
    """A node the mixed mode may run in float16."""

    index: int
    kind: str
    label: str
    params: int


class QuantPass(Pass):
    name = "quant"
    summary = "precision reduction inside an error budget (--quant fp16|mixed|dynamic|static|int8|int4)"
    after = ("fold", "cleanup", "fuse", "prune")
    tolerance = "lossy"

    @dataclass
    class Options:
        keep_io_types: bool = True  # graph inputs and outputs keep float32
        fallback: bool = True  # nodes go back to float until the budget holds
        reduce_range: bool = True  # int8: 7-bit weights; 8 bits saturate in onnxruntime's AVX2 kernels without VNNI
        smooth: bool = True  # int8: SmoothQuant where it cuts the simulated error (needs calibration data)
        method: str = ""  # int4, static: weight rounding, rtn or gptq (default: gptq with calibration data)
        accuracy_level: int = 0  # int4: MatMulNBits' accuracy_level (4: int8 arithmetic, faster, less exact)
        calibration: str = "minmax"  # static: how activation ranges are set (minmax, percentile or entropy)
        equalize: bool = True  # static: depthwise convs' input channels rescaled to share the uint8 range

    def run(self, model, ctx):
        if ctx.quant not in MODES:
            raise UsageError(f"bad --quant {ctx.quant}: expected one of {', '.join(MODES)}")
        if ctx.quant == "dynamic":
            return self.dynamic(model, ctx)
        if ctx.quant == "int4":
            return self.int4(model, ctx)
        if ctx.quant == "mixed":
            return self.mixed(model, ctx)
        if ctx.quant == "static":
            return self.static(model, ctx)
        if ctx.quant == "int8":
            return self.int8_auto(model, ctx)
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

    def dynamic(self, model, ctx, measure: Measure | None = None, only: frozenset[int] | None = None) -> Counter:
        """only: positions in graph.nodes the mode may quantize (the partition pass's int8 devices)."""
        graph, version = model.graph, opset(model.graph)
        sites, skipped = int8.dynamic_sites(graph, ctx.target, version)
        if only is not None:
            sites = [s for s in sites if s.index in only]
        for label, reason in skipped.items() if measure is None else ():
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

        fit = fit_budget(model, sites, rewrite, measure or Measure.of(model, ctx),
                         self.options.fallback)
        rewrite(model, fit.chosen)
        self.log_fit(ctx, fit, sites, "dynamic int8")
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

    def int4(self, model, ctx) -> Counter:
        if ctx.target != "ort":
            raise UsageError("--quant int4 needs --target ort (onnxruntime's MatMulNBits and GatherBlockQuantized)")
        method = self.options.method or ("gptq" if ctx.calibration_data else "rtn")
        if method not in ("rtn", "gptq"):
            raise UsageError(f"bad --opt quant.method={method}: expected rtn or gptq")
        if method == "gptq" and not ctx.calibration_data:
            raise UsageError("quant.method=gptq needs --calibration-data")
        graph = model.graph
        version = opset(graph)
        sites = [s for s in int8.dynamic_sites(graph, "ort", version)[0]
                 if s.kind != "gather" or graph.nodes[s.index].inputs[0].shape[1] % int4.BLOCK == 0]
        if not sites:
            ctx.log("quant: nothing to quantize in int4 mode (no MatMul, Gemm or Gather with float32 weights)")
            return Counter()
        if not ctx.calibration_data:
            ctx.log("quant: no --calibration-data: round-to-nearest, and the error is measured on generated inputs")
        hessians = self.input_products(model, sites, ctx) if method == "gptq" else {}
        nodes = graph.nodes
        weights = {s.index: int4.site_weight(nodes[s.index], s.kind, hessians.get(nodes[s.index].inputs[0].name))
                   for s in sites}

        def rewrite(m, chosen):
            int4.quantize_sites(m.graph, chosen, weights, version, Names(m.graph), self.options.accuracy_level)
            cleanup(m.graph)

        fit = fit_budget(model, sites, rewrite, Measure.of(model, ctx),
                         self.options.fallback)
        rewrite(model, fit.chosen)
        self.log_fit(ctx, fit, sites, f"int4 ({method})")
        counts = Counter(f"{s.kind}_int4" for s in fit.chosen)
        counts["kept_float_for_budget"] = len(fit.kept)
        counts["weights_int4"] = sum(s.params for s in fit.chosen)
        return +counts

    @staticmethod
    def input_products(model, sites, ctx) -> dict:
        """X^T X of every linear site's input over the calibration samples (GPTQ's H)."""
        nodes = model.graph.nodes
        return input_products(model, [nodes[s.index].inputs[0].name for s in sites if s.kind != "gather"],
                              ctx.calibration_data)

    @staticmethod
    def log_latency(ctx, ratio: float | None) -> None:
        """Say how the int8 graph runs against the float one here: integer kernels are not
        faster everywhere (onnxruntime's QLinearConv loses to its NCHWc float convolutions at
        small channel counts on AVX2 without VNNI: PP-OCR's classifier runs 1.5x slower)."""
        if ratio is None:
            return
        ctx.details.setdefault("quant", {})["latency_vs_float"] = round(ratio, 3)
        ctx.log(f"quant: onnxruntime here (1 thread) runs the int8 graph in {ratio:.2f}x the float graph's time")
        if ratio > 1.0:
            ctx.log("quant: warning: the int8 graph is slower than the float one on this machine: onnxruntime's "
                    "integer kernels lose to its float ones here; the run without quant gives the faster model")

    @staticmethod
    def log_fit(ctx, fit, sites, what: str, noun: str = "nodes") -> None:
        score = score_name(ctx)
        for label, loss in list(fit.sensitivity.items())[:10]:
            ctx.log(f"quant: sensitivity {label}: {score} {1 - loss:.6f} with only it quantized")
        if fit.kept:
            ctx.log(f"quant: kept in float for the budget ({score} >= {ctx.min_cosine}): "
                    f"{', '.join(s.label for s in fit.kept)}")
        ctx.log(f"quant: {what}: {len(fit.chosen)} of {len(sites)} {noun} quantized, "
                f"worst output mean {score} {fit.score:.6f} on {len(ctx.evaluation)} sample(s), {fit.trials} trial(s)")

    def mixed(self, model, ctx, only: frozenset[int] | None = None) -> Counter:
        """float16 wherever the budget holds: the fp16 conversion, measured; when an output misses
        the budget, nodes (runs of them on large graphs) go back to float32, the most sensitive first."""
        version = opset(model.graph)
        trial = copy_model(model)
        converted = convert_to_fp16(trial.graph, version, Names(trial.graph), self.options.keep_io_types).converted_at
        del trial
        if not converted:
            ctx.log("quant: nothing runs in float16 here")
            return Counter()
        nodes = model.graph.nodes
        units = [MixedUnit(i, "fp16", nodes[i].name or f"{nodes[i].op}#{i}", 0) for i in converted
                 if only is None or i in only]
        if not units:
            return Counter()

        def rewrite(m, chosen):
            keep = frozenset(converted) - {u.index for u in chosen}
            convert_to_fp16(m.graph, version, Names(m.graph), self.options.keep_io_types, keep=keep)
            merge_duplicate_constants(m.graph)
            cleanup(m.graph)

        fit = fit_budget(model, units, rewrite, Measure.of(model, ctx),
                         self.options.fallback)
        rewrite(model, fit.chosen)
        self.log_fit(ctx, fit, units, "mixed float16")
        return Counter({"nodes_to_fp16": len(fit.chosen), "nodes_kept_fp32_for_budget": len(fit.kept)}) + Counter()

    def static(self, model, ctx, measure: Measure | None = None, kinds: frozenset | None = None) -> Counter:
        if not ctx.calibration_data:
            raise UsageError("--quant static needs --calibration-data: activation ranges come from real inputs")
        method = self.options.calibration
        if method not in ("minmax", "percentile", "entropy"):
            raise UsageError(f"bad --opt quant.calibration={method}: expected minmax, percentile or entropy")
        if self.options.method not in ("", "rtn", "gptq"):
            raise UsageError(f"bad --opt quant.method={self.options.method}: expected rtn or gptq")
        counts = Counter()
        if opset(model.graph) < 13:  # per-channel QuantizeLinear/DequantizeLinear: opset 13
            before = opset(model.graph)
            raise_opset(model, 13)
            counts[f"opset_raised_{before}_to_13"] = 1
            ctx.log(f"quant: opset {before} raised to 13 for per-channel QuantizeLinear/DequantizeLinear")
        graph = model.graph
        sites, absorbed = qdq.static_sites(graph)
        if kinds is not None:
            sites = [x for x in sites if x.kind in kinds]
        if not sites:
            ctx.log("quant: nothing to quantize in static mode (no Conv, Gemm, MatMul, Add, Concat or pooling)")
            return counts
        if self.options.equalize:
            counts["depthwise_inputs_equalized"] = self.equalize(model, sites, ctx)
        observed = qdq.observed_tensors(graph, sites, absorbed)
        ranges = qdq.RangeObserver()
        observe(model, observed, ctx.calibration_data, ranges.add)
        if method != "minmax":
            observe(model, observed, ctx.calibration_data, lambda outs: ranges.add(outs, histograms=True))
        params = {name: qdq.quant_params(*ranges.range(name, method)) for name in observed}
        qmax = 63 if self.options.reduce_range else 127
        weights = {}
        if self.options.method in ("", "gptq"):  # weights rounded by GPTQ through their calibration inputs
            weighted = {x.index: graph.nodes[x.index] for x in sites if x.kind in ("conv", "gemm", "matmul")
                        and qdq.weight_rows(graph.nodes[x.index]).shape[1] <= qdq.GPTQ_MAX_K}
            weights = qdq.site_weights(weighted, weight_products(model, weighted, ctx.calibration_data), qmax)

        def rewrite(m, chosen, variant=None):  # variant 1: round to nearest where GPTQ rounded
            _, here = qdq.static_sites(m.graph)  # the same positions in a copy: its own nodes
            given = {i: w for i, w in weights.items() if not (variant or {}).get(i)}
            qdq.quantize_static(m.graph, chosen, here, params, Names(m.graph), qmax, given)
            cleanup(m.graph)

        # GPTQ's weights fit each layer's float inputs best, but end to end a few layers do
        # better rounded to nearest (on PP-OCRv4 rec, a depthwise conv after an outlier-heavy
        # input: cosine 0.964 against 0.986): when the budget is missed, the most sensitive
        # units are measured both ways
        fit = fit_budget(model, sites, rewrite, measure or Measure.of(model, ctx),
                         self.options.fallback, variants=2 if weights else 1)
        before = copy_model(model) if kinds is None else None  # --quant int8 times its own whole
        rewrite(model, fit.chosen, fit.variant)
        self.log_fit(ctx, fit, sites, f"static int8 ({method}, {len(ctx.calibration_data)} calibration samples)")
        if before is not None and fit.chosen and ctx.evaluation:
            self.log_latency(ctx, latency_ratio(model, before, ctx.evaluation[0]))
        counts.update(f"{s.kind}_int8" for s in fit.chosen)
        counts["activations_absorbed"] = sum(s.index in absorbed for s in fit.chosen)
        counts["kept_float_for_budget"] = len(fit.kept)
        counts["weights_gptq"] = sum(x.index in weights and not fit.variant.get(x.index) for x in fit.chosen)
        return +counts

    @staticmethod
    def equalize(model, sites, ctx) -> int:
        """Rescale the input channels of the depthwise convs among `sites` where that is free
        (`static.equalize_depthwise`), from their per-channel extremes on the calibration samples."""
        chosen = {id(model.graph.nodes[s.index]) for s in sites}
        found = [f for f in qdq.depthwise_inputs(model.graph) if id(f[0]) in chosen]
        if not found:
            return 0
        lo, hi = {}, {}

        def add(outs):
            for name, x in outs.items():
                axes = tuple(k for k in range(x.ndim) if k != 1)
                lo[name] = np.minimum(lo.get(name, 0.0), x.min(axis=axes))
                hi[name] = np.maximum(hi.get(name, 0.0), x.max(axis=axes))

        observe(model, sorted({f[0].inputs[0].name for f in found}), ctx.calibration_data, add)
        done = qdq.equalize_depthwise(found, lo, hi, Names(model.graph))
        if done:
            ctx.log(f"quant: the input channels of {done} depthwise convolution(s) rescaled to share their uint8 range")
        return done

    def int8_auto(self, model, ctx) -> Counter:
        """int8, the fastest correct form per operator on onnxruntime's CPU: convolutions (and the
        Add/Mul/Concat/pooling between them) as static QDQ when there is calibration data, else
        float (ConvInteger is slower than float Conv); MatMul, Gemm, embeddings and attention
        dynamic (run-time activation ranges, SmoothQuant). One budget for both, measured against
        the float model. The static part is timed against the graph before it (`latency_ratio`):
        where its integer kernels run clearly slower than the float ones on this machine (above
        INT8_SLOWER), the convolutions stay float after all, and it says so."""
        measure = Measure.of(model, ctx)
        convs = [x for x in qdq.static_sites(model.graph)[0] if x.kind == "conv"]
        counts = Counter()
        if convs and ctx.calibration_data:
            ctx.log(f"quant: int8 chose static QDQ for the {len(convs)} convolutions and the ops between them")
            before = copy_model(model)
            done = self.static(model, ctx, measure, CONV_FAMILY)
            ratio = latency_ratio(model, before, ctx.evaluation[0]) if done and ctx.evaluation else None
            if ratio is not None:
                ctx.details.setdefault("quant", {})["static_latency_vs_float"] = round(ratio, 3)
            if ratio is not None and ratio > INT8_SLOWER:
                model.graph, model.meta = before.graph, before.meta
                ctx.log(f"quant: int8 leaves the {len(convs)} convolutions in float after all (opset "
                        f"{opset(model.graph)} kept): with static QDQ the graph ran {ratio:.2f}x its float time in "
                        "onnxruntime here (1 thread)")
            else:
                counts += done
                if ratio is not None:
                    ctx.log(f"quant: with static QDQ the graph runs {ratio:.2f}x its float time in onnxruntime here "
                            "(1 thread)")
        elif convs:
            ctx.log(f"quant: int8 leaves the {len(convs)} convolutions in float: static QDQ needs --calibration-data, "
                    "and dynamic ConvInteger is slower than float Conv")
        if int8.dynamic_sites(model.graph, ctx.target, opset(model.graph))[0]:
            ctx.log("quant: int8 chose dynamic quantization for MatMul, Gemm, embeddings and attention")
            counts += self.dynamic(model, ctx, measure)
        return counts
