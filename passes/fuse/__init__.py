"""fuse: operator fusion with ordered pattern rules (see onnxopt.pattern).

`--target onnx` emits standard operators only, and only where the model's opset has them;
`--target ort` may also emit onnxruntime's `com.microsoft` operators. Rules run in list order at
every node, in sweeps until nothing changes (at most a few). Works in the main graph and inside
If/Loop/Scan bodies; model-local function bodies are left untouched. `--explain` (ctx.explain)
reports, per rule, the near-misses and why they were refused.
"""

from __future__ import annotations

from collections import Counter
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import UsageError
from onnxopt.graph import (Names, all_graphs, cleanup, is_constant, materialize_constant_nodes, output_tensors,
                           raise_opset, values)
from onnxopt.pattern import internal_uses_refusal, match_node, weight_input_refusal
from onnxopt.passes.cleanup import eliminate_common_subexpressions, merge_duplicate_constants
from onnxopt.pipeline import Pass

from .activations import RULES as ACTIVATION_RULES
from .attention import RULES as ATTENTION_RULES
from .conv import RULES as CONV_RULES
from .linear import RULES as LINEAR_RULES
from .masked_keys import hide_masked_keys
from .norms import RULES as NORM_RULES, residual_sums
from .runtime import kernel_refusal

# Priority order: the big patterns first, then norms, then the activations that sit inside them.
RULES = ATTENTION_RULES + NORM_RULES + ACTIVATION_RULES + CONV_RULES + LINEAR_RULES
_MAX_SWEEPS = 4


@dataclass
class Env:
    """What a rule's check and rewrite may consult: never mutated by a check."""

    graph: gs.Graph  # the graph being rewritten (a subgraph's own for bodies)
    target: str
    opset: int  # default-domain opset of the model
    names: Names
    max_opset: int = 0  # the opset the model may be raised to (--max-opset); 0: never raised
    wanted: int = 0  # the highest opset a refused match asked for within max_opset
    cache: dict = field(default_factory=dict)  # helper tensors rewrites share within one graph and sweep
    probed: dict = field(default_factory=dict)  # onnxruntime kernel probes, shared by the whole run

    def constant(self, base: str, array) -> gs.Constant:
        """A small constant: one the graph already has with the same values, or a new one
        (shared by the rewrites of this sweep, so a rule repeated over many layers adds one
        tensor, and a later cleanup finds nothing to merge)."""
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-D)
        if array.size > 64:
            return gs.Constant(self.names.new(base), array)
        if "constants" not in self.cache:
            self.cache["constants"] = {_key(values(t)): t for t in self.graph.tensors().values()
                                       if is_constant(t) and math.prod(t.shape) <= 64}
        known = self.cache["constants"]
        if _key(array) not in known:
            known[_key(array)] = gs.Constant(self.names.new(base), array)
        return known[_key(array)]

    def needs(self, version: int, what: str) -> str | None:
        """None when the model's opset has `what` (an operator new in opset `version`), else the
        refusal; a refusal that --max-opset allows is remembered so the pass can raise the opset
        and match again."""
        if self.opset >= version:
            return None
        if version <= self.max_opset:
            self.wanted = max(self.wanted, version)
        return f"{what} needs opset {version}, the model has {self.opset} (--max-opset {version} allows it)"


class FusePass(Pass):
    name = "fuse"
    summary = ("operator fusion: attention, LayerNorm, SkipLayerNorm, RMSNorm, GELU (erf, tanh), BiasGelu, SiLU, "
               "HardSigmoid, HardSwish, Mish, Conv+activation (ort), "
               "Pad into Conv/pools, BN/scale/Transpose into Gemm/MatMul, Gemm+activation (ort), shape chains")
    after = ("fold", "cleanup")
    tolerance = "fp32"

    @dataclass
    class Options:
        # SkipLayerNormalization measured slower than Add + LayerNormalization on onnxruntime's CPU
        # kernels (MiniLM legacy, 1 thread, seq 128: +4 to +7%), so it is opt-in, and with it
        # SkipSimplifiedLayerNormalization (skip_rms_norm), not measured on a real model here
        skip_layer_norm: bool = False
        disable: str = ""  # comma-separated rule names not to apply

    def run(self, model, ctx):
        off = {n.strip() for n in self.options.disable.split(",") if n.strip()}
        known = {r.name for r in RULES} | {"skip_add_as_sum", "masked_keys"}
        unknown = off - known
        if unknown:
            raise UsageError(f"fuse.disable: unknown rule(s) {', '.join(sorted(unknown))}; "
                             f"rules: {', '.join(sorted(known))}")
        if not self.options.skip_layer_norm:
            off |= {"skip_layer_norm", "skip_layer_norm_bias", "skip_rms_norm"}
        elif ctx.target == "ort":  # the residual Add is what SkipLayerNormalization takes in
            off |= {"skip_add_as_sum"}
        rules = [r for r in RULES if ctx.target in r.targets and r.name not in off]
        counts = Counter()
        misses: dict[tuple, str] = {}
        if ctx.max_opset and ctx.max_opset > int(model.graph.opset or 0):
            # raise first, so no rule rewrites part of a pattern that only the newer opset fuses
            # (a Mul by 0.5 folded into the next MatMul would break a GELU)
            wanted = self._sweep(model.graph, rules, ctx, Counter(), {}, {}, dry=True)
            self._raise(model, wanted, ctx, counts)
        probed: dict = {}
        before = {id(n) for g in all_graphs(model.graph) for n in g.nodes}
        wanted = self._sweep(model.graph, rules, ctx, counts, misses, probed)
        if self._raise(model, wanted, ctx, counts):  # a pattern another rewrite revealed
            misses.clear()
            self._sweep(model.graph, rules, ctx, counts, misses, probed)
        if "skip_add_as_sum" not in off:
            counts["skip_add_as_sum"] = sum(residual_sums(g) for g in all_graphs(model.graph))
        if "masked_keys" not in off:
            names, opset = Names(model.graph), int(model.graph.opset or 0)
            counts["masked_keys"] = sum(hide_masked_keys(Env(g, ctx.target, opset, names))
                                        for g in all_graphs(model.graph))
        # two spellings of one computation fuse into identical nodes: keep one (else cleanup's CSE
        # would only find them in a second run)
        new = {id(n) for g in all_graphs(model.graph) for n in g.nodes} - before
        if new:
            cleanup(model.graph).toposort(mode="nodes")
            counts["fused_duplicates_merged"] = sum(eliminate_common_subexpressions(g, only=new)
                                                    for g in all_graphs(model.graph))
        if ctx.explain:
            for (rule, where), reason in misses.items():
                ctx.log(f"fuse: {rule} at {where}: not fused: {reason}")
        return +counts

    @staticmethod
    def _raise(model, wanted: int, ctx, counts) -> bool:
        """Raise the model's opset to `wanted` (0: nothing asked); whether it was raised."""
        if not wanted:
            return False
        before = int(model.graph.opset or 0)
        try:
            raise_opset(model, wanted)
        except ValueError as e:
            ctx.log(f"fuse: opset not raised to {wanted}: {e}")
            return False
        counts[f"opset_raised_{before}_to_{wanted}"] = 1
        # the converter writes Constant nodes (axes moved from attributes to inputs...): make them
        # initializers, one per value, as fold and cleanup would
        materialize_constant_nodes(model.graph)
        merge_duplicate_constants(model.graph)
        return True

    @staticmethod
    def _sweep(graph, rules, ctx, counts, misses, probed, dry: bool = False) -> int:
        """Apply the rules in sweeps until nothing changes; return the opset a refused match
        asked for within --max-opset (0 if none). `dry`: one sweep of checks, no rewrites."""
        names = Names(graph)
        opset = int(graph.opset or 0)
        wanted = 0
        for _ in range(_MAX_SWEEPS):
            changed = 0
            for g in all_graphs(graph):
                env = Env(g, ctx.target, opset, names, max_opset=ctx.max_opset or 0, probed=probed)
                changed += apply_rules(rules, env, counts, misses, dry)
                wanted = max(wanted, env.wanted)
            if not changed:
                break
            cleanup(graph).toposort(mode="nodes")
        return wanted


def _key(array: np.ndarray) -> tuple:
    return array.dtype.str, array.shape, array.tobytes()


def apply_rules(rules, env: Env, counts: Counter, misses: dict, dry: bool = False) -> int:
    """One sweep over the graph's nodes: at each node, the first rule that matches and accepts
    rewrites it (with `dry`, nothing is rewritten: only the checks run, for what they ask of
    env). Nodes already taken by a rewrite in this sweep are not matched again. Refusals go to
    `misses` as {(rule, node): reason}."""
    outs = output_tensors(env.graph)
    taken: set[int] = set()
    applied = 0
    by_root = _rules_by_root_op(rules)
    for node in list(env.graph.nodes):
        if id(node) in taken or not node.outputs:
            continue
        for rule in by_root.get(node.op, ()):
            m = match_node(rule.pattern, node)
            if m is None or any(id(n) in taken for n in m.matched):
                continue
            reason = weight_input_refusal(m) or internal_uses_refusal(m, outs) or rule.check(m, env)
            if reason:
                misses[(rule.name, node.name or node.op)] = reason
                continue
            if dry:
                break
            outputs = list(node.outputs)
            node.outputs.clear()
            new = rule.rewrite(m, env, outputs)
            reason = kernel_refusal(new, {"": env.opset}, env.probed)
            if reason:  # undo: the new nodes let go of the outputs, the root writes them again
                for n in new:
                    n.outputs.clear()
                    n.inputs.clear()
                node.outputs.extend(outputs)
                misses[(rule.name, node.name or node.op)] = reason
                continue
            env.graph.nodes.extend(new)
            taken.update(id(n) for n in m.matched)
            counts[rule.name] += 1
            applied += 1
            break
    return applied


def _rules_by_root_op(rules) -> dict[str, list]:
    """{op type: the rules whose pattern root can match it, in priority order}."""
    index: dict[str, list] = {}
    for rule in rules:
        for op in rule.pattern.op if isinstance(rule.pattern.op, tuple) else (rule.pattern.op,):
            index.setdefault(op, []).append(rule)
    return index
