"""Keeping a lossy rewrite inside the error budget by measurement.

`fit_budget` tries the rewrite of every site on a copy of the model and measures it on the
evaluation samples (those the final verification uses: calibration samples held back, or the
generated inputs) against the float model. When that misses the budget (`--min-cosine`: every
output's mean cosine, and the argmax agreement of an output a Softmax computes), each site's
own error is measured (the model with only that site rewritten), and the most sensitive sites
go back to float, as few as the budget allows (a binary search over the sensitivity order).
Above 48 sites, runs of consecutive sites are measured and reverted together, so the cost stays
bounded on large graphs. Returns what to rewrite and the measurements for the report.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Callable

from onnxopt import verify as verification
from onnxopt.graph import Model, export_model


MAX_UNITS = 48  # at most this many units are measured one by one
VARIANT_UNITS = 4  # fit_budget with variants: at least this many units measured in each variant


@dataclass
class Fit:
    chosen: list  # the sites to rewrite
    score: float  # the worst output's mean cosine with them rewritten
    kept: list = field(default_factory=list)  # sites left in float for the budget
    sensitivity: dict = field(default_factory=dict)  # site label -> 1 - cosine with only it rewritten
    trials: int = 0
    variant: dict = field(default_factory=dict)  # site index -> the rewrite variant chosen (absent: 0)


def score_name(ctx) -> str:
    """What a budget score is, for the notes: the cosine, or where a Softmax output's argmax
    agreement counts too (`Measure.score`), the lower of the two."""
    if not ctx.argmax:
        return "cosine"
    if ctx.min_agreement is not None:
        return "cosine or argmax agreement (the lower; the agreement shifted by the budget less --min-agreement)"
    return "cosine or argmax agreement (the lower)"


def copy_model(m: Model) -> Model:
    """A copy whose graph can be rewritten apart (weights are shared, not copied)."""
    return Model(m.graph.copy(), m.meta, m.value_info_names, m.dropped_initializers)


class Measure:
    """Runs models on the evaluation samples; compares with the float model's outputs (those of
    `model`, or `reference` when given)."""

    def __init__(self, model: Model, samples: list[dict], budget: float, reference: list | None = None,
                 argmax: dict | None = None, min_agreement: float | None = None):
        self.samples, self.budget, self.argmax, self.min_agreement = samples, budget, argmax, min_agreement
        self.reference = reference if reference is not None else self.run(model)

    @classmethod
    def of(cls, model: Model, ctx, share: float = 1.0) -> "Measure":
        """The measure of a lossy pass: against the model before the first lossy pass of the run
        (so a later pass sees the error of those before it), with `share` of the loss budget
        (1 - --min-cosine, and 1 - --min-agreement) for a pass that leaves the rest to passes after it."""
        floor = None if ctx.min_agreement is None else 1.0 - (1.0 - ctx.min_agreement) * share
        m = cls(model, ctx.evaluation, 1.0 - (1.0 - (ctx.min_cosine or 0.99)) * share, ctx.reference, ctx.argmax,
                floor)
        ctx.reference = m.reference
        return m

    def run(self, model: Model) -> list[dict]:
        with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
            path = verification.write_for_runtime(export_model(model), tmp, consume=True)
            return verification.run_samples(path, self.samples)

    def score(self, model: Model) -> float:
        """The worst output's mean cosine, or argmax agreement where lower (the outputs in `argmax`:
        `verify.argmax_axes`); -1 when an output has new NaN or Inf. With `min_agreement`, the
        plain agreement counts instead, as the budget less its shortfall under that floor: the
        score is inside the budget exactly when both the cosine and the agreement are."""
        metrics = verification.compare_samples(self.reference, self.run(model), "lossy", self.budget, self.argmax,
                                               self.min_agreement)
        return min(-1.0 if m.note else min(m.cosine, self._agreement_score(m)) for m in metrics)

    def _agreement_score(self, m) -> float:
        if m.agreement is None:
            return 1.0
        if self.min_agreement is None:
            return m.agreement
        return self.budget + m.plain_agreement - self.min_agreement


LATENCY_ROUNDS = 10  # interleaved runs of each model in latency_ratio
LATENCY_BYTES = 1 << 30  # latency_ratio skips models larger than this (two sessions in memory)


def latency_ratio(candidate: Model, baseline: Model, feeds: dict, rounds: int = LATENCY_ROUNDS) -> float | None:
    """The median over interleaved rounds of the candidate's time over the baseline's, in
    onnxruntime with its default graph optimizations on one thread, on `feeds` (after a warm-up
    run each; the order alternates so neither always runs second). None for a model too large
    to time cheaply, or one onnxruntime does not load with its optimizations on (the timing only
    informs: it never fails a run)."""
    import statistics
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = []
    for m in (candidate, baseline):
        proto = export_model(m)
        if proto.ByteSize() > LATENCY_BYTES:
            return None
        try:
            sessions.append(ort.InferenceSession(proto.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"]))
        except Exception:  # noqa: BLE001 - onnxruntime raises its own exception types
            return None
        del proto
    wanted = {i.name for i in sessions[0].get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    try:
        for s in sessions:
            s.run(None, feeds)
    except Exception:  # noqa: BLE001
        return None
    ratios = []
    for r in range(rounds):
        seconds = {}
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            sessions[k].run(None, feeds)
            seconds[k] = time.perf_counter() - start
        ratios.append(seconds[0] / max(seconds[1], 1e-9))
    return statistics.median(ratios)


def fit_budget(model: Model, sites: list, rewrite: Callable[..., None], measure: Measure,
               fallback: bool = True, max_units: int = MAX_UNITS, variants: int = 1) -> Fit:
    """The sites to rewrite so the result stays inside measure.budget (see the module doc). With
    more than `max_units` sites, runs of consecutive sites are measured and kept together, so a
    large graph costs at most max_units + log2(max_units) + 1 trials.

    variants > 1: each site can be rewritten in that many ways, and `rewrite(m, sites, variant)`
    takes {site index: variant} (absent: 0). Variant 0 is tried first everywhere; when that
    misses the budget, the most sensitive quarter of the units (at least VARIANT_UNITS) is
    measured in the other variants too, and each keeps the variant it errs least in
    (`Fit.variant`): the units the budget would send back to float are those it can save."""
    trials = 0

    def trial(units, choice=None) -> float:
        nonlocal trials
        trials += 1
        m = copy_model(model)
        chosen = [s for u in units for s in u]
        if variants > 1:
            rewrite(m, chosen, choice or {})
        else:
            rewrite(m, chosen)
        return measure.score(m)

    ordered = sorted(sites, key=lambda s: s.index)
    size = max(1, -(-len(ordered) // max_units))
    units = [ordered[k:k + size] for k in range(0, len(ordered), size)]
    full = trial(units)
    if full >= measure.budget or not fallback or not sites:
        return Fit(ordered, full, trials=trials)
    loss = [1.0 - trial([u]) for u in units]
    choice = {}  # site index -> its variant, where not 0
    for k in sorted(range(len(units)), key=lambda k: -loss[k])[:max(VARIANT_UNITS, len(units) // 4)]:
        for v in range(1, variants):  # the most sensitive units, in the other variants
            other = 1.0 - trial([units[k]], {s.index: v for s in units[k]})
            if other < loss[k]:
                loss[k] = other
                choice.update({s.index: v for s in units[k]})
    order = sorted(range(len(units)), key=lambda k: -loss[k])  # the most sensitive first
    lo, hi, best = 1, len(order), None  # order[hi:] (nothing) always fits
    while lo < hi:
        mid = (lo + hi) // 2
        score = trial([units[k] for k in order[mid:]], choice)
        if score >= measure.budget:
            hi, best = mid, score
        else:
            lo = mid + 1
    chosen = [s for k in order[hi:] for s in units[k]]
    return Fit(sorted(chosen, key=lambda s: s.index), best if chosen else 1.0,
               kept=[s for k in order[:hi] for s in units[k]],
               sensitivity={_label(units[k]): loss[k] for k in order}, trials=trials,
               variant={s.index: choice[s.index] for s in chosen if s.index in choice})


def _label(unit: list) -> str:
    return unit[0].label + (f" (+{len(unit) - 1} after it)" if len(unit) > 1 else "")
