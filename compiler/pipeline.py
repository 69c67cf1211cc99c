"""The pass contract, the registry, ordering, and running passes with timing and reports.

A pass is a small class: a CLI `name`, a one-line `summary`, the passes it runs `after` when both
are selected, a tolerance class, an `Options` dataclass, and `run(model, ctx)` that rewrites the
graph in place and returns counts of what it changed.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UsageError
from .graph import Model, cleanup

# The canonical order of the pass families; passes declare it through `after`.
CANONICAL = ("fold", "cleanup", "fuse", "prune", "quant", "partition")


class Pass:
    """Base class. Subclasses set the class attributes and implement `run`."""

    name: str = ""
    summary: str = ""
    after: tuple[str, ...] = ()
    tolerance: str = "fp32"  # exact | fp32 | lossy

    @dataclass
    class Options:
        pass

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def run(self, model: Model, ctx: "Context") -> dict[str, int]:
        raise NotImplementedError


@dataclass
class Context:
    """What passes may need beyond the graph: never globals."""

    target: str = "onnx"
    max_opset: int | None = None  # a pass may raise the default-domain opset up to this (None: never)
    quant: str | None = None  # the quant pass's mode (--quant)
    prune: str | None = None  # the prune pass's method (--prune)
    sparsity: float | None = None  # the prune pass's target (--sparsity; None: as much as the budget allows)
    min_cosine: float | None = None  # the error budget of lossy passes (--min-cosine)
    min_agreement: float | None = None  # the floor of Softmax outputs' plain argmax agreement (--min-agreement)
    calibration_data: list[dict] | None = None  # samples to calibrate on (without --inputs, the held-out ones excluded)
    inputs: dict | None = None
    evaluation: list[dict] | None = None  # samples a lossy pass measures its error on: those verification uses
    devices: list[str] | None = None  # the partition pass's devices: built-in names or spec files (--devices)
    pins: list[str] = field(default_factory=list)  # the partition pass's pins, WHAT=DEVICE (--pin)
    details: dict[str, Any] = field(default_factory=dict)  # per pass, what the report shows beyond counts
    passes: tuple[str, ...] = ()  # the passes this run applies, in order
    reference: list | None = None  # the outputs lossy passes compare with (set by the first one's measure)
    argmax: dict = field(default_factory=dict)  # outputs whose argmax agreement the budget bounds too
    explain: bool = False
    log: Callable[[str], None] = lambda message: None


@dataclass
class PassRecord:
    name: str
    counts: dict[str, int]
    seconds: float
    nodes_after: int
    verification: list[dict] | None = None
    verification_skipped: str | None = None

    def as_dict(self):
        return dataclasses.asdict(self)


def registry() -> dict[str, type[Pass]]:
    from .passes import PASSES

    return {p.name: p for p in PASSES}


def parse_pass_list(text) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise UsageError("no passes given; see --list-passes")
    known = registry()
    for n in names:
        if n not in known:
            raise UsageError(f"unknown pass {n!r}; available: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise UsageError(f"a pass is listed twice: {','.join(names)}")
    return names


def order_passes(names: list[str]) -> list[str]:
    """Order the selected passes so each runs after those it declares in `after`; among passes
    free to run, the user's order wins. Raises UsageError on a dependency cycle."""
    known = registry()
    pending = list(names)
    done: list[str] = []
    while pending:
        for n in pending:
            if all(dep in done or dep not in pending for dep in known[n].after):
                done.append(n)
                pending.remove(n)
                break
        else:
            raise UsageError(f"passes depend on each other in a cycle: {', '.join(pending)}")
    return done


def parse_options(items, names: list[str]) -> dict[str, Any]:
    """`--opt PASS.FIELD=VALUE` items into an Options instance per selected pass."""
    known = registry()
    raw: dict[str, dict[str, str]] = {n: {} for n in names}
    for item in items or ():
        key, sep, value = item.partition("=")
        pass_name, dot, field_name = key.strip().partition(".")
        if not sep or not dot or not field_name:
            raise UsageError(f"bad --opt {item!r}: expected PASS.OPTION=VALUE")
        if pass_name not in known:
            raise UsageError(f"--opt {item!r}: unknown pass {pass_name!r}")
        if pass_name not in raw:
            raise UsageError(f"--opt {item!r}: pass {pass_name!r} is not selected in --passes")
        raw[pass_name][field_name] = value.strip()
    return {n: make_options(known[n], raw[n]) for n in names}


def make_options(pass_cls: type[Pass], values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(pass_cls.Options)}
    hints = typing.get_type_hints(pass_cls.Options)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            choices = ", ".join(fields) or "none"
            raise UsageError(f"pass {pass_cls.name!r} has no option {key!r} (options: {choices})")
        kwargs[key] = _convert(value, hints[key], f"{pass_cls.name}.{key}")
    return pass_cls.Options(**kwargs)


def _convert(value, kind, label):
    if not isinstance(value, str):
        return value
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (int, float):
            return kind(value)
    except ValueError:
        raise UsageError(f"bad value {value!r} for option {label}: expected {kind.__name__}") from None
    return value


def run_passes(model: Model, names: list[str], options: dict[str, Any], ctx: Context,
               after_each: Callable[[Pass, PassRecord], None] | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> list[PassRecord]:
    """Run each pass once, in order; time it; clean up and sort the graph after it, and call
    `after_each` (verification) with the pass and its record. Dead nodes the model already had
    are removed before the pass and reported as its `dead_nodes_removed`, so every change to the
    model is counted by the pass that made it."""
    from .graph import count_nodes

    known = registry()
    records = []
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        p = known[name](options.get(name))
        start = time.perf_counter()
        before = count_nodes(model.graph, functions=True)
        cleanup(model.graph)
        dead = before - count_nodes(model.graph, functions=True)
        counts = Counter(p.run(model, ctx) or {})
        counts["dead_nodes_removed"] += dead
        # mode="nodes": gs's function-list sort recurses forever when the graph has both subgraphs
        # and functions (onnx-graphsurgeon 0.6.1, Graph.toposort.get_used_funcs); ONNX needs no order there
        cleanup(model.graph).toposort(mode="nodes")
        seconds = time.perf_counter() - start
        record = PassRecord(name, {k: int(v) for k, v in counts.items() if v}, seconds, count_nodes(model.graph))
        if after_each:
            after_each(p, record)
        records.append(record)
    return records
