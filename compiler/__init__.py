"""onnxopt: a verified ONNX graph optimizer.

    import onnxopt
    result = onnxopt.optimize("in.onnx", "out.onnx", passes=["fold", "cleanup"])
    result = onnxopt.optimize(model_proto, passes=["fold"])   # result.model is the new ModelProto
"""

from __future__ import annotations

import functools
import gc
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx

from . import io
from . import verify as verification
from .errors import ModelError, OnnxoptError, UsageError, VerificationError
from .graph import Model, constant_bytes, count_nodes, count_params, export_model, import_model
from .pipeline import Context, Pass, PassRecord, order_passes, parse_options, parse_pass_list, registry, run_passes

__all__ = ["optimize", "Result", "Pass", "Context", "registry", "OnnxoptError", "UsageError", "ModelError",
           "VerificationError", "PartitionedSession"]
__version__ = "0.1.0"

VERIFY_MODES = ("none", "final", "each")
LOSSY_BUDGETS = {"fp16": 0.999, "mixed": 0.999, "int4": 0.98}  # default --min-cosine per quant mode (else 0.99)


@dataclass
class Result:
    """What `optimize` did: per-pass records, verification metrics, before/after sizes."""

    passes: list[PassRecord]
    verification: dict
    before: dict
    after: dict
    seconds: float
    order_note: str | None = None
    output: str | None = None
    written: list[str] = field(default_factory=list)
    model: onnx.ModelProto | None = None  # set when no output path was given
    explain: list[str] = field(default_factory=list)  # near-misses and why (explain=True)
    details: dict = field(default_factory=dict)  # per pass, what it reports beyond counts (the partition plan)

    def as_dict(self) -> dict:
        return _finite({
            "passes": [r.as_dict() for r in self.passes],
            "order_note": self.order_note,
            "verification": self.verification,
            "before": self.before,
            "after": self.after,
            "seconds": self.seconds,
            "output": self.output,
            "written": self.written,
            "explain": self.explain,
            "details": self.details,
        })


def optimize(model: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike | None = None,
             passes=("fold", "cleanup"), *, verify: str = "final", inputs: dict | str | None = None,
             input_shapes: dict | list | None = None, options: dict | list | None = None, target: str = "onnx",
             max_opset: int | None = None, external_data: bool | None = None, calibration_data=None,
             quant: str | None = None, min_cosine: float | None = None, min_agreement: float | None = None,
             write_over_budget: bool = False,
             prune: str | None = None, sparsity: float | None = None,
             devices=None, pins=None, split: str | os.PathLike | None = None,
             explain: bool = False, progress: Callable[[str], None] | None = None) -> Result:
    """Run the selected passes on a model file or ModelProto, verify, and write `output` atomically.

    quant: the quant pass's mode: fp16, mixed, dynamic, static, int8 or int4.
    prune: the prune pass's method: structured, unstructured or 2:4. sparsity: structured and
    unstructured: the fraction of the prunable layers' weights to remove (None: the most the budget allows).
    calibration_data: an .npz (one array per input, first axis = samples), a folder of .npz files
    (one sample each), or an iterable of feed dicts.
    min_cosine: the error budget of lossy passes: every output's cosine against the original
    (default 0.999 for fp16 and mixed, 0.98 for int4, else 0.99).
    min_agreement: for the outputs a Softmax or LogSoftmax computes, the fraction of argmaxes
    (classes, characters) that must stay the same, every change counted; without it, their
    agreement must reach min_cosine with the original's close calls (within 0.05) not counted.
    write_over_budget: write a result that misses it anyway (the misses are in
    Result.verification["over_budget"]); otherwise VerificationError.
    max_opset: the opset a pass may raise the model to when a fused operator needs it (None:
    the model's opset is kept).
    devices: the partition pass's devices in preference order, built-in names (cpu, cuda,
    tensorrt) or spec files, as a list or "cuda,cpu" (the default). pins: ["Softmax=cpu", ...]
    (an op type, a node name or a name pattern). split: a folder for one model per partition and
    a manifest (onnxopt.PartitionedSession runs it); checked to give the same outputs.
    explain: passes record why near-misses were not rewritten (Result.explain).
    options: {"fold": {"size_limit": 1024}} or ["fold.size_limit=1024"]. inputs: feeds for
    verification (dict or .npz path). input_shapes: {"x": [1, 3, 224, 224]} or ["x=1x3x224x224"].
    Raises UsageError (bad arguments), ModelError (bad input model), VerificationError (a pass
    changed the outputs; nothing is written) or OnnxoptError.
    """
    start = time.perf_counter()
    say = progress or (lambda message: None)
    names = parse_pass_list(passes)
    ordered = order_passes(names)
    note = None if ordered == names else f"passes reordered to respect their dependencies: {','.join(ordered)}"
    pass_options = parse_options(_option_items(options), ordered)
    if verify not in VERIFY_MODES:
        raise UsageError(f"bad --verify {verify!r}: expected one of {', '.join(VERIFY_MODES)}")
    shapes = _input_shapes(input_shapes)
    if quant is not None and "quant" not in ordered:
        raise UsageError(f"--quant {quant} needs the quant pass in --passes")
    if "quant" in ordered and quant is None:
        raise UsageError("the quant pass needs --quant MODE (fp16)")
    if prune is not None and "prune" not in ordered:
        raise UsageError(f"--prune {prune} needs the prune pass in --passes")
    if "prune" in ordered and prune is None:
        raise UsageError("the prune pass needs --prune METHOD (structured, unstructured or 2:4)")
    if sparsity is not None and prune is None:
        raise UsageError("--sparsity needs --prune")
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise UsageError(f"bad --sparsity {sparsity}: expected a number in (0, 1)")
    if sparsity is not None and prune == "2:4":
        raise UsageError("--sparsity does not apply to --prune 2:4 (half of every pruned layer); "
                         "the budget chooses the layers")
    for flag, value in (("--devices", devices), ("--pin", pins), ("--split", split)):
        if value and "partition" not in ordered:
            raise UsageError(f"{flag} needs the partition pass in --passes")
    if split is not None:
        from .passes.partition.split import check_split_dir

        check_split_dir(os.fspath(split))
    if min_cosine is not None and not 0.0 < min_cosine <= 1.0:
        raise UsageError(f"bad --min-cosine {min_cosine}: expected a number in (0, 1]")
    if min_agreement is not None and not 0.0 < min_agreement <= 1.0:
        raise UsageError(f"bad --min-agreement {min_agreement}: expected a number in (0, 1]")
    if max_opset is not None and not 1 <= max_opset <= onnx.defs.onnx_opset_version():
        raise UsageError(f"bad --max-opset {max_opset}: this onnx knows opsets 1 to {onnx.defs.onnx_opset_version()}")
    given = verification.load_inputs(inputs) if isinstance(inputs, (str, os.PathLike)) else inputs

    in_path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    out_path = os.fspath(output) if output is not None else None
    if in_path is not None:
        io.check_input_path(in_path)
    if out_path is not None:
        io.check_output_path(in_path, out_path)
    say("loading")
    if in_path is not None:
        # external weights stay in their files (read when a pass looks at them), so the reference
        # run below never has them in memory beside onnxruntime's copy
        proto, size_before = io.load_model_sized(in_path, keep_external=True)
    elif isinstance(model, onnx.ModelProto):
        io.check_model(model)
        io.check_types(model)
        proto = model
        size_before = _proto_size(proto)
    else:
        raise UsageError(f"model must be a path or an onnx.ModelProto, not {type(model).__name__}")

    m = import_model(proto, base_dir=os.path.dirname(os.path.abspath(in_path)) if in_path is not None else None)
    before = {"nodes": count_nodes(m.graph), "params": count_params(m.graph), "size": size_before}
    notes: list[str] = []
    samples = verification.load_calibration(calibration_data, m.graph) if calibration_data is not None else None
    calibration, evaluation = samples or None, None  # with given inputs, those verify: nothing is held back
    if samples and given is None:
        calibration, evaluation = verification.split_samples(samples)
    if not evaluation:
        needed = verify != "none" or "quant" in ordered or "prune" in ordered  # lossy passes measure on these
        if needed or "partition" in ordered:  # partition's cost model takes the sample's shapes
            try:
                evaluation = [verification.make_inputs(m.graph, shapes, given)]
            except (UsageError, TypeError, ValueError):  # an input no sample can be made for (float8...)
                if needed:
                    raise
            made_up = [n for n in evaluation[0] if n not in given] if given is not None and evaluation else []
            if made_up:
                notes.append(f"inputs: no values for {', '.join(made_up)} in the given inputs: generated")
    budget = min_cosine if min_cosine is not None else LOSSY_BUDGETS.get(quant, 0.99)
    check = _Checker(verify, evaluation, in_path, proto, say, budget, write_over_budget, min_agreement)
    if min_agreement is not None and not check.argmax:
        notes.append("--min-agreement: no output is computed by a Softmax or LogSoftmax, so no argmax agreement "
                     "is measured; the cosine budget alone applies")
    ctx = Context(target=target, max_opset=max_opset, quant=quant, prune=prune, sparsity=sparsity,
                  min_cosine=budget, min_agreement=min_agreement, calibration_data=calibration,
                  inputs=given, evaluation=evaluation, explain=explain, log=notes.append,
                  devices=devices, pins=list(pins or []), passes=tuple(ordered), argmax=check.argmax)
    each = functools.partial(check.after_pass, m=m) if verify == "each" else None
    records = run_passes(m, ordered, pass_options, ctx, after_each=each,
                         progress=lambda i, n, name: say(f"[{i + 1}/{n}] {name}"))
    after_nodes, after_params = count_nodes(m.graph), count_params(m.graph)
    say("exporting")
    pending = None
    written: list[str] = []
    if out_path is not None:
        # the weights stream straight to the file as the model is built: into the data file over
        # 2 GB (or when asked), else after the rest of the single file
        external = bool(external_data) or constant_bytes(m.graph) >= io.PROTOBUF_LIMIT
        pending = io.PendingOutput.streamed(functools.partial(export_model, m), out_path, external)
        out_model = None
    else:
        out_model = export_model(m)
    del m, proto, each  # the input's tensors are no longer needed: keep memory near one model
    if size_before and size_before > 64 << 20:
        gc.collect()  # the graph's nodes and tensors reference each other: free a big one now

    tolerance = _tolerance(ordered, pass_options)
    try:
        if pending is not None:
            pending.check()
            check.final(pending.tmp_model, ordered, tolerance)
            if split is not None:
                _write_split(pending.tmp_model, os.fspath(split), out_path, check, ctx.details, say,
                             tolerance != "lossy")
            written = pending.commit()
            pending = None
            size_after = sum(os.path.getsize(p) for p in written)
        else:
            io.check_model(out_model)
            if check.reference is not None or split is not None:  # else nothing to compare with: no file to write
                with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
                    path = verification.write_for_runtime(out_model, tmp)
                    check.final(path, ordered, tolerance)
                    if split is not None:
                        _write_split(path, os.fspath(split), None, check, ctx.details, say, tolerance != "lossy")
            size_after = _proto_size(out_model)
    except VerificationError:
        # a lossless run that changed the outputs: find the pass. A lossy run that missed the
        # budget is the lossy passes' doing (they measured it): the lossless ones before them
        # can drift past the fp32 tolerance through a deep network without any bug (PP-OCRv4 rec
        # after fold: 1.2e-4 on a near-tie probability), and blaming them would mislead
        if verify == "final" and len(ordered) > 1 and check.reference is not None and tolerance != "lossy":
            _localize(model, ordered, pass_options, ctx, evaluation, say)
        raise
    except ModelError as e:
        raise OnnxoptError(f"internal error: the optimized model is invalid ({e}); please report it") from None
    finally:
        if pending is not None:
            pending.discard()
    return Result(
        passes=records, verification=check.summary(), before=before,
        after={"nodes": after_nodes, "params": after_params, "size": size_after},
        seconds=time.perf_counter() - start, order_note=note, output=out_path, written=written,
        model=out_model, explain=notes, details=ctx.details)


def _write_split(model_path: str, folder: str, name: str | None, check: "_Checker", details: dict, say,
                 exact: bool) -> None:
    """Write the split of the verified model and check it: the model's outputs bit for bit, or
    after a lossy pass the error budget against the original (see split.compare_split)."""
    from .passes.partition.split import compare_split, write_split

    say("writing the split")
    manifest = write_split(model_path, folder, name)
    record = {"folder": folder, "partitions": len(manifest["partitions"])}
    if check.final_outputs is not None:
        say("verifying the split")
        record.update(compare_split(folder, check.feeds, check.final_outputs) if exact else
                      compare_split(folder, check.feeds, check.reference, check.budget, check.argmax,
                                    check.min_agreement))
    details.setdefault("partition", {})["split"] = record


def _input_shapes(input_shapes) -> dict:
    if input_shapes is None:
        return {}
    if isinstance(input_shapes, dict):
        return {k: [int(d) for d in v] for k, v in input_shapes.items()}
    return verification.parse_input_shapes(input_shapes)


def _option_items(options) -> list[str]:
    if options is None:
        return []
    if isinstance(options, dict):
        return [f"{p}.{k}={v}" for p, fields in options.items() for k, v in fields.items()]
    return list(options)


class _Checker:
    """Verification state: reference outputs, the previous stage's outputs, the metrics."""

    def __init__(self, mode, feeds: list[dict], in_path, proto, say, budget: float = 0.99,
                 over_budget_ok: bool = False, min_agreement: float | None = None):
        self.mode, self.say, self.budget, self.over_budget_ok = mode, say, budget, over_budget_ok
        self.min_agreement = min_agreement
        self.over_budget: list[str] = []
        self.reference = None
        self.previous = None
        self.skipped = "--verify none" if mode == "none" else None
        self.outputs: list[dict] = []
        self.final_outputs: list[dict] | None = None  # the result's outputs on the feeds
        self.argmax = verification.argmax_axes(proto)  # outputs whose argmax agreement counts too
        if mode == "none":
            return
        self.feeds = feeds
        say("running the original model")
        try:
            if in_path is not None:
                self.reference = verification.run_samples(in_path, self.feeds)
            else:
                with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
                    self.reference = verification.run_samples(verification.write_for_runtime(proto, tmp), self.feeds)
        except verification.RuntimeUnavailable as e:
            self.skipped = str(e)
        except verification.RunFailed as e:
            raise UsageError(f"cannot verify: the original model does not run on the generated inputs ({e}); "
                             "give --input-shape NAME=DxD.., --inputs FILE.npz, or --verify none") from None
        self.previous = self.reference

    def after_pass(self, p: Pass, record: PassRecord, m: Model) -> None:
        if self.reference is None:
            record.verification_skipped = self.skipped
            return
        self.say(f"verifying {p.name}")
        with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
            path = verification.write_for_runtime(export_model(m), tmp, consume=True)
            try:
                got = verification.run_samples(path, self.feeds)
            except (verification.RuntimeUnavailable, verification.RunFailed) as e:
                raise VerificationError(f"pass {p.name!r} produced a model onnxruntime cannot run: {e}",
                                        pass_name=p.name) from None
        metrics = verification.compare_samples(self.previous, got, p.tolerance, self.budget, self.argmax,
                                               self.min_agreement)
        record.verification = [x.as_dict() for x in metrics]
        if p.tolerance == "lossy" and self.over_budget_ok:
            self.over_budget += [f"pass {p.name!r}: {x.name!r} {x.miss()} (budget {self.budget})"
                                 for x in metrics if not x.ok]
        else:
            _raise_if_bad(metrics, f"pass {p.name!r}", p.name, p.tolerance, self.budget, self.min_agreement)
        self.previous = got

    def final(self, path: str, ordered: list[str], tolerance: str) -> None:
        if self.reference is None:
            return
        self.say("verifying the result")
        try:
            got = verification.run_samples(path, self.feeds)
        except (verification.RuntimeUnavailable, verification.RunFailed) as e:
            raise VerificationError(f"the optimized model cannot run on onnxruntime: {e}") from None
        self.final_outputs = got
        metrics = verification.compare_samples(self.reference, got, tolerance, self.budget, self.argmax,
                                               self.min_agreement)
        self.outputs = [x.as_dict() for x in metrics]
        label = f"pass {ordered[0]!r}" if len(ordered) == 1 else f"passes {','.join(ordered)}"
        if tolerance == "lossy" and self.over_budget_ok:  # the caller accepts a miss: report it, write
            self.over_budget += [f"{x.name!r} {x.miss()} (budget {self.budget})" for x in metrics if not x.ok]
            return
        _raise_if_bad(metrics, label, ordered[0] if len(ordered) == 1 else None, tolerance, self.budget,
                      self.min_agreement)

    def summary(self) -> dict:
        return {"mode": self.mode, "skipped": self.skipped, "outputs": self.outputs, "over_budget": self.over_budget}


def _tolerance(ordered: list[str], pass_options: dict) -> str:
    """The loosest tolerance class of the passes as configured (partition with precision is lossy)."""
    known = registry()
    kinds = {known[n](pass_options.get(n)).tolerance for n in ordered}
    return "lossy" if "lossy" in kinds else "fp32" if "fp32" in kinds else "exact"


def _raise_if_bad(metrics, label: str, pass_name: str | None, tolerance: str = "fp32",
                  budget: float = 0.99, min_agreement: float | None = None) -> None:
    bad = [x for x in metrics if not x.ok]
    if not bad:
        return
    if tolerance == "lossy":  # every output that missed the budget, and by how much
        detail = "; ".join(f"{x.name!r} {x.miss()}" for x in bad)
        what = f"cosine >= {budget}"
        if any(x.agreement is not None for x in bad):
            what = (f"cosine >= {budget}, argmax agreement >= {min_agreement}" if min_agreement is not None
                    else f"cosine and argmax agreement >= {budget}")
        raise VerificationError(f"{label} missed the error budget ({what}): {detail}; "
                                "nothing was written (--write-over-budget writes it anyway)",
                                pass_name=pass_name, output=bad[0].name)
    x = bad[0]
    detail = x.note or f"max abs err {x.max_abs:.3g}, max rel err {x.max_rel:.3g}, cosine {x.cosine:.6f}"
    raise VerificationError(f"{label} changed output {x.name!r}: {detail} "
                            "(tolerance rtol 1e-4 / atol 1e-5); nothing was written",
                            pass_name=pass_name, output=x.name)


def _localize(model, ordered, pass_options, ctx, feeds, say) -> None:
    """A final check failed after several passes: rerun verifying each pass to name the culprit."""
    say("finding the pass that changed the outputs")
    proto = io.load_model(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model
    m = import_model(proto)
    check = _Checker("each", feeds, None, proto, say, ctx.min_cosine or 0.99, min_agreement=ctx.min_agreement)
    run_passes(m, ordered, pass_options, ctx, after_each=lambda p, r: check.after_pass(p, r, m))
    # No pass failed on its own: the caller re-raises the original error.


def _proto_size(proto: onnx.ModelProto) -> int | None:
    try:
        return proto.ByteSize()
    except Exception:  # noqa: BLE001
        return None


def _finite(x: Any):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def __getattr__(name):  # the split runner, loaded when first used
    if name == "PartitionedSession":
        from .passes.partition.split import PartitionedSession

        return PartitionedSession
    raise AttributeError(f"module 'onnxopt' has no attribute {name!r}")
