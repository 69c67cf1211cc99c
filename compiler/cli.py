"""The `onnxopt` command: parse, call optimize, print the summary, exit code.

Exit codes: 0 success, 1 failure (bad model, verification failed, cannot write), 2 usage error.
Every error is one line on stderr; `-v` adds the traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import click

from . import optimize
from .errors import OnnxoptError, UsageError
from .io import check_folder_writable
from .pipeline import registry
from .report import summary_lines, write_report


class Interrupted(OnnxoptError):
    exit_code = 130


class Progress:
    """One self-overwriting status line on a terminal; silent in a pipe or with -q."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.shown = False

    def __call__(self, message: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\033[Konnxopt: {message}...")
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("input_path", metavar="INPUT", required=False)
@click.option("-o", "--output", "output_path", metavar="OUTPUT", help="Where to write the optimized model.")
@click.option("--passes", default="fold,cleanup", show_default=True, metavar="LIST",
              help="Comma-separated passes to run (see --list-passes); reordered to respect dependencies.")
@click.option("--opt", "opts", multiple=True, metavar="PASS.OPTION=VALUE", help="A pass option; repeatable.")
@click.option("--verify", "verify_mode", default="final", show_default=True,
              help="Check outputs against onnxruntime: none, final (result vs original) or each (after every pass).")
@click.option("--inputs", "inputs_path", metavar="FILE.npz", help="Inputs for verification: one array per graph input.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDx..",
              help="Shape of a graph input with dynamic dimensions, for generated inputs; repeatable.")
@click.option("--target", default="onnx", show_default=True,
              help="onnx: standard operators only; ort: also onnxruntime's com.microsoft operators.")
@click.option("--max-opset", type=int, metavar="N",
              help="Let fuse raise the model's opset up to N where a fused standard operator needs it "
                   "(LayerNormalization 17, Gelu 20, Attention and RMSNormalization 23). Default: keep the opset.")
@click.option("--quant", "quant", metavar="MODE",
              help="The quant pass's mode (with quant in --passes): fp16 (float16 weights and compute), mixed "
                   "(float16 where the budget holds, measured), dynamic (int8 weights, activations quantized at "
                   "run time), static (int8 QDQ calibrated on --calibration-data), int8 (static for convolutions "
                   "with calibration data, dynamic for the rest) or int4 (4-bit block-wise weights, --target ort).")
@click.option("--prune", "prune", metavar="METHOD",
              help="The prune pass's method (put prune in --passes): structured (whole attention heads, FFN "
                   "neurons and conv channels removed: smaller and faster everywhere), unstructured or 2:4.")
@click.option("--sparsity", type=float, metavar="S",
              help="structured and unstructured: the fraction of the prunable layers' weights to remove; "
                   "default: the most --min-cosine allows.")
@click.option("--calibration-data", "calibration_path", metavar="PATH",
              help="Calibration samples: an .npz with one array per input (first axis = samples), or a folder "
                   "of .npz files with one sample each. Without --inputs, the last quarter (at most 64 samples) "
                   "is held back: the error budget and the final verification are measured on it, and the rest "
                   "calibrates; with --inputs, those verify and every sample calibrates.")
@click.option("--min-cosine", type=float, metavar="C",
              help="Error budget of lossy passes: every output's mean cosine similarity against the original "
                   "model must be at least C (default 0.999 for fp16 and mixed, 0.98 for int4, else 0.99), or "
                   "nothing is written.")
@click.option("--min-agreement", type=float, metavar="A",
              help="For outputs a Softmax or LogSoftmax computes (classes, characters): the fraction of argmaxes "
                   "that must stay the same, every change counted. Default: their agreement must reach "
                   "--min-cosine, changes among the original's close calls (within 0.05) not counted.")
@click.option("--write-over-budget", is_flag=True,
              help="Write the result even when an output misses --min-cosine (each miss is a warning).")
@click.option("--external-data", is_flag=True,
              help="Write tensors to OUTPUT.data beside the model (always done above 2 GB).")
@click.option("--devices", metavar="LIST",
              help="The partition pass's devices, in preference order: built-in cpu, cuda, tensorrt, or spec files "
                   "(.json, .yaml); default cuda,cpu.")
@click.option("--pin", "pins", multiple=True, metavar="WHAT=DEVICE",
              help="Put nodes on a device: WHAT is an op type, a node name or a name pattern ('*attn*=cuda'); "
                   "repeatable.")
@click.option("--split", "split_dir", metavar="DIR",
              help="Also write one model per partition and a manifest into DIR (run with onnxopt-run or "
                   "onnxopt.PartitionedSession); checked to give the model's outputs.")
@click.option("--report", "report_path", metavar="FILE.json", help="Write per-pass counts and times, metrics, sizes.")
@click.option("--explain", is_flag=True, help="Show, per rule, why near-misses were not rewritten (also with -v).")
@click.option("--list-passes", is_flag=True, help="List the passes and their options, then exit.")
@click.option("-v", "--verbose", is_flag=True, help="Per-output metrics, and tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.version_option(package_name="onnxopt")
def cli(input_path, output_path, passes, opts, verify_mode, inputs_path, input_shapes, target, max_opset,
        quant, prune, sparsity, calibration_path, min_cosine, min_agreement, write_over_budget, external_data,
        devices, pins, split_dir, report_path, explain, list_passes, verbose, quiet):
    """Optimize the ONNX model INPUT and write it to OUTPUT, verified against onnxruntime.

    Example: onnxopt model.onnx -o model.opt.onnx --passes fold,cleanup
    """
    if list_passes:
        click.echo(passes_table())
        return 0
    if not input_path:
        raise UsageError("missing INPUT model path")
    if not output_path:
        raise UsageError("missing -o OUTPUT path")
    if target not in ("onnx", "ort"):
        raise UsageError(f"bad --target {target!r}: expected onnx or ort")
    if report_path:
        check_report_path(report_path, input_path, output_path)
    progress = Progress(enabled=not quiet and sys.stderr.isatty())
    try:
        result = optimize(input_path, output_path, passes=passes, verify=verify_mode, inputs=inputs_path,
                          input_shapes=list(input_shapes), options=list(opts), target=target, max_opset=max_opset,
                          quant=quant, prune=prune, sparsity=sparsity, calibration_data=calibration_path,
                          min_cosine=min_cosine, min_agreement=min_agreement,
                          write_over_budget=write_over_budget, external_data=True if external_data else None,
                          devices=devices, pins=list(pins), split=split_dir,
                          explain=explain or verbose, progress=progress)
    except KeyboardInterrupt:
        raise Interrupted("interrupted") from None  # before click's own handler adds a blank line
    finally:
        progress.clear()
    if report_path:
        write_report(result, report_path)
    if not quiet:
        lines = [f"onnxopt: wrote {output_path}"] + summary_lines(result, verbose)
        lines += [f"  explain: {line}" for line in result.explain]
        if result.verification["skipped"] and verify_mode != "none":
            lines.append(f"onnxopt: warning: verification skipped: {result.verification['skipped']}")
        click.echo("\n".join(lines), err=True)
    for miss in result.verification.get("over_budget", []):  # even with -q: the user must see it
        click.echo(f"onnxopt: warning: over the error budget, written anyway: {miss}", err=True)
    return 0


def check_report_path(report_path: str, input_path: str, output_path: str) -> None:
    """Refuse a report that would overwrite the input or the output, or cannot be written."""
    if os.path.isdir(report_path):
        raise UsageError(f"--report path is a folder: {report_path}")
    for label, other in (("input", input_path), ("output", output_path)):
        if os.path.realpath(report_path) == os.path.realpath(other) or (
                os.path.exists(report_path) and os.path.exists(other) and os.path.samefile(report_path, other)):
            raise UsageError(f"--report path is the {label} path: {report_path}")
    check_folder_writable(report_path, "--report")


def passes_table() -> str:
    import dataclasses

    lines = []
    for name, p in registry().items():
        after = f" (after {', '.join(p.after)})" if p.after else ""
        lines.append(f"{name:<10} {p.summary}{after} [{p.tolerance}]")
        for f in dataclasses.fields(p.Options):
            lines.append(f"{'':<10}   --opt {name}.{f.name}={f.default}")
    return "\n".join(lines)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the cleanup that removes temporary files


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("split_dir", metavar="DIR")
@click.option("--inputs", "inputs_path", metavar="FILE.npz", help="The graph inputs: one array per input, by name.")
@click.option("-o", "--output", "output_path", metavar="OUT.npz", help="Write the outputs here (one array per output).")
@click.option("--provider", "providers", multiple=True, metavar="DEVICE=PROVIDER",
              help="Run DEVICE's partitions with this execution provider instead of the manifest's; repeatable.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.version_option(package_name="onnxopt")
def run_cli(split_dir, inputs_path, output_path, providers, verbose, quiet):
    """Run the split in DIR (written by onnxopt --split): each partition with its device's execution
    provider, falling back to the CPU with a warning where this onnxruntime lacks it.

    Example: onnxopt-run parts/ --inputs inputs.npz -o outputs.npz
    """
    import warnings

    import numpy as np

    from . import PartitionedSession
    from .verify import load_inputs

    if not inputs_path:
        raise UsageError("missing --inputs FILE.npz")
    chosen = {}
    for item in providers:
        device, sep, provider = item.partition("=")
        if not sep or not device or not provider:
            raise UsageError(f"bad --provider {item!r}: expected DEVICE=PROVIDER")
        chosen[device] = provider
    feeds = load_inputs(inputs_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = PartitionedSession(split_dir, chosen)
    for w in caught:
        click.echo(f"onnxopt-run: warning: {str(w.message).removeprefix('onnxopt: ')}", err=True)
    outputs = session.run(None, feeds)
    if output_path:
        tmp = output_path + ".tmp.npz"
        try:
            np.savez(tmp, **dict(zip(session.get_outputs(), outputs)))
            os.replace(tmp, output_path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise OnnxoptError(f"cannot write {output_path}: {e.strerror or e}") from None
    if not quiet:
        lines = [f"  partition {p['index']}: {p['device']} on {provider}, {p['nodes']} nodes"
                 for p, provider in zip(session.parts, session.providers)]
        lines += [f"  output {name}: {value.dtype} {list(value.shape)}" for name, value in
                  zip(session.get_outputs(), map(np.asarray, outputs))]
        click.echo("\n".join([f"onnxopt-run: ran {len(session.parts)} partitions"] + lines), err=True)
    return 0


def main(argv=None) -> None:
    _run(cli, "onnxopt", argv)


def run_main(argv=None) -> None:
    _run(run_cli, "onnxopt-run", argv)


def _run(command, prog: str, argv) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    args = sys.argv[1:] if argv is None else list(argv)
    verbose = any(a in ("-v", "--verbose") for a in args)
    try:
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:  # click's own usage errors
        _fail(e.format_message(), 2, verbose, prog)
    except OnnxoptError as e:
        _fail(str(e), e.exit_code, verbose, prog)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail("interrupted", 130, False, prog)
    except Exception as e:  # noqa: BLE001 - a bug: still one line unless -v
        _fail(f"internal error: {type(e).__name__}: {e}", 1, verbose, prog)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int, verbose: bool, prog: str = "onnxopt") -> None:
    if verbose:
        traceback.print_exc()
    text = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {text}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
