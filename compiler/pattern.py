"""The pattern matcher fusion rules are written in.

A pattern is a small tree of `Op` nodes with named captures, matched backwards from a node over
producers. Matching never mutates the graph: it returns a `Match` (the captured tensors and the
matched nodes) or None. A `Rule` is a pattern, a `check` that returns why it refuses (or None),
and a `rewrite` that builds the replacement; a rule list is ordered by priority.

    GELU = Op("Mul", Op("Mul", X, Op("Add", Op("Erf", Op("Div", X, C("sqrt2"))), C("one"))), C("half"))

`Op(..., commute=True)` also tries the first two inputs swapped (the default for Add and Mul). A capture
name used twice must bind the same tensor (or, for a named `Op`, the same node). `C(name)` matches
a constant (never an overridable initializer); an overridable initializer (a weight that is also
a graph input, which a caller may feed) where a constant is wanted still matches, as a near-miss
that `weight_input_refusal` turns into the reason (so --explain can say why a fusion did not
happen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .graph import STANDARD_DOMAINS, is_constant, values


@dataclass(frozen=True)
class Var:
    """Any tensor, captured under `name`."""

    name: str


@dataclass(frozen=True)
class C:
    """A constant tensor, captured under `name`; `value`, when given, must match (allclose)."""

    name: str
    value: float | None = None


@dataclass(frozen=True)
class Op:
    """A node of type `op` (or one of a tuple) whose first inputs match `inputs`; the node is
    captured under `name` when given."""

    op: str | tuple
    inputs: tuple = ()
    name: str | None = None
    commute: bool = False
    domains: tuple = STANDARD_DOMAINS

    def __init__(self, op, *inputs, name=None, commute=None, domains=STANDARD_DOMAINS):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "commute", op in ("Add", "Mul") if commute is None else commute)
        object.__setattr__(self, "domains", domains)


@dataclass
class Match:
    tensors: dict = field(default_factory=dict)  # capture name -> tensor
    nodes: dict = field(default_factory=dict)  # capture name -> node
    matched: list = field(default_factory=list)  # every matched node, root last
    loose: list = field(default_factory=list)  # C captures bound to overridable weights: a near-miss

    def __getitem__(self, name):
        return self.tensors[name] if name in self.tensors else self.nodes[name]

    def value(self, name) -> np.ndarray:
        return values(self.tensors[name])

    def copy(self) -> "Match":
        return Match(dict(self.tensors), dict(self.nodes), list(self.matched), list(self.loose))


def match_node(pattern: Op, node: gs.Node) -> Match | None:
    """Match `pattern` with `node` as its root."""
    return _match_node(pattern, node, Match())


def _match_node(p: Op, node: gs.Node, m: Match) -> Match | None:
    ops = p.op if isinstance(p.op, tuple) else (p.op,)
    if node.op not in ops or node.domain not in p.domains or len(node.inputs) < len(p.inputs):
        return None
    orders = [list(range(len(p.inputs)))]
    if p.commute and len(p.inputs) >= 2:
        orders.append([1, 0] + orders[0][2:])  # the first two inputs, swapped
    loose = None
    for order in orders:
        trial = m.copy()
        if all(_match_tensor(sub, node.inputs[i], trial) for sub, i in zip(p.inputs, order)):
            if p.name:
                trial.nodes[p.name] = node
            trial.matched.append(node)
            if len(trial.loose) == len(m.loose):
                return trial
            loose = loose or trial  # a near-miss: an exact match in the other order wins
    return loose


def _match_tensor(p, t: gs.Tensor, m: Match) -> bool:
    if isinstance(p, Op):
        if not t.inputs:
            return False
        if p.name and p.name in m.nodes:  # a named node used twice in the pattern: the same node
            return t.inputs[0] is m.nodes[p.name]
        sub = _match_node(p, t.inputs[0], m)
        if sub is None:
            return False
        m.tensors, m.nodes, m.matched, m.loose = sub.tensors, sub.nodes, sub.matched, sub.loose
        return True
    if isinstance(p, C):
        if not is_constant(t):
            if not isinstance(t, gs.Constant):  # data, not a weight: not a near-miss
                return False
            if p.name not in m.loose:
                m.loose.append(p.name)
        elif p.value is not None:
            v = values(t)
            if v.size != 1 or not np.allclose(v.astype(np.float64), p.value, rtol=1e-6, atol=0):
                return False
    if p.name in m.tensors:
        return m.tensors[p.name] is t
    m.tensors[p.name] = t
    return True


def weight_input_refusal(m: Match) -> str | None:
    """Why a match with an overridable weight where a constant belongs cannot be fused."""
    if m.loose:
        t = m.tensors[m.loose[0]]
        return f"weight {t.name!r} is also a graph input, so not a constant (a caller may feed another value)"
    return None


def internal_uses_refusal(m: Match, graph_outputs: set[int]) -> str | None:
    """Why the match cannot be replaced as a whole: an intermediate result (any matched node's
    output but the root's) that is a graph output or is read by a node outside the match."""
    inside = {id(n) for n in m.matched}
    for node in m.matched[:-1]:
        for t in node.outputs:
            if id(t) in graph_outputs:
                return f"intermediate {t.name!r} is a graph output"
            if any(id(c) not in inside for c in t.outputs):
                return f"intermediate {t.name!r} is used elsewhere"
    return None


@dataclass(frozen=True)
class Rule:
    """A fusion: `pattern` matched at a node, `check(match, env)` returning the reason it refuses
    (None to accept, never mutating), and `rewrite(match, env)` returning the new nodes, which
    must write the root's outputs."""

    name: str
    pattern: Op
    rewrite: Callable
    check: Callable = lambda m, env: None
    targets: tuple = ("onnx", "ort")
