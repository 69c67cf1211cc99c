"""partition: decide ahead of time which device runs each node, and write it into the model.

Each main-graph node gets three metadata_props: `layer_ann` = `onnxopt/DEVICE/pK` (the key
onnxruntime's `session.layer_assignment_settings` matches), `onnxopt.device` and
`onnxopt.partition`. The settings string that maps the annotations to devices is in the report
(`details.partition.session_config`), ready to pass to onnxruntime; `--split DIR` writes one model
per partition that `onnxopt.PartitionedSession` runs. The pass only annotates: it never changes
an output (tolerance `exact`), and a second run finds every annotation already in place.

Subgraph (If/Loop/Scan) bodies go with the node that owns them and are not annotated themselves.
See plan.py for the partitioner and cost.py for the cost model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from onnxopt.errors import UsageError
from onnxopt.graph import node_metadata
from onnxopt.pipeline import Pass

from . import specs
from .cost import node_costs, tensor_infos
from .plan import Problem, make_plan, parse_pins, plan_cost, runs
from .split import DEVICES_KEY, SETTINGS_KEY

DEFAULT_DEVICES = ("cuda", "cpu")
ANNOTATION = "layer_ann"
DEVICE_KEY = "onnxopt.device"
PARTITION_KEY = "onnxopt.partition"


def annotation(device: str, index: int) -> str:
    return f"onnxopt/{device}/p{index}"


def load_devices(items) -> list[specs.DeviceSpec]:
    """Device specs from names and spec files, in preference order; the cpu host is added last
    when it is missing (graph inputs and outputs live there, and it runs what nothing else does)."""
    names = [x.strip() for x in (items.split(",") if isinstance(items, str) else items) if str(x).strip()]
    if not names:
        raise UsageError("--devices is empty: give built-in names (cpu, cuda, tensorrt) or spec files")
    devices = [specs.load(x) for x in names]
    seen = Counter(d.name for d in devices)
    twice = [n for n, c in seen.items() if c > 1]
    if twice:
        raise UsageError(f"--devices names {twice[0]!r} twice")
    if not any(d.host for d in devices):
        devices.append(specs.builtin("cpu"))
    return devices


def settings_string(devices: list[specs.DeviceSpec], used: set[str]) -> str:
    """The value of onnxruntime's session.layer_assignment_settings for these annotations."""
    groups: dict[str, list[str]] = {}
    for d in devices:
        if d.name in used:
            groups.setdefault(d.designator, []).append(f"onnxopt/{d.name}/")
    return "; ".join(f"{designator}({', '.join(prefixes)})" for designator, prefixes in groups.items())


class PartitionPass(Pass):
    name = "partition"
    summary = "assign nodes to devices (cost model, pins, no tiny islands) and annotate them for onnxruntime"
    after = ("fold", "cleanup", "fuse", "prune", "quant")
    tolerance = "exact"

    @dataclass
    class Options:
        min_size: int = 4  # a partition of fewer nodes moves to a neighbouring device when that device can run it

    def run(self, model, ctx):
        if self.options.min_size < 1:
            raise UsageError("partition.min_size must be at least 1")
        devices = load_devices(ctx.devices or DEFAULT_DEVICES)
        graph = model.graph
        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in graph.import_domains or []}
        opsets.setdefault("", int(graph.opset or 0))
        infos = tensor_infos(model, ctx.evaluation[0] if ctx.evaluation else None)
        costs = node_costs(graph, infos)
        problem = Problem(graph, devices, costs, infos, parse_pins(ctx.pins), opsets)
        plan = make_plan(problem, self.options.min_size)
        changed = 0
        for part in plan.partitions:
            for i in part.nodes:
                meta = node_metadata(problem.nodes[i])
                wanted = {ANNOTATION: annotation(part.device, part.index), DEVICE_KEY: part.device,
                          PARTITION_KEY: str(part.index)}
                if any(meta.get(k) != v for k, v in wanted.items()):
                    if not meta.get(ANNOTATION, "onnxopt/").startswith("onnxopt/"):
                        ctx.log(f"partition: node {problem.nodes[i].name!r} had layer_ann {meta[ANNOTATION]!r}: "
                                "replaced")
                    meta.update(wanted)
                    changed += 1
        summary = report(problem, plan, costs)
        settings = summary["session_config"]["session.layer_assignment_settings"]
        fallback = summary["ort_fallback"]
        ctx.details["partition"] = summary
        used = set(summary["nodes_per_device"])
        _set_metadata(model.meta, {
            DEVICES_KEY: json.dumps({d.name: {"designator": d.designator, "provider": d.provider}
                                     for d in devices if d.name in used}, sort_keys=True),
            SETTINGS_KEY: settings})
        ctx.log(f"partition: {len(plan.partitions)} partitions "
                f"({', '.join(f'{d} {n} nodes' for d, n in summary['nodes_per_device'].items())}), "
                f"{summary['boundary_bytes']} bytes across devices; onnxruntime's node-by-node fallback: "
                f"{fallback['partitions']} partitions, {fallback['boundary_bytes']} bytes")
        ctx.log(f"partition: session.layer_assignment_settings = {settings}")
        for k, why in plan.stuck.items():
            part = plan.partitions[k]
            ctx.log(f"partition: partition {k} ({part.device}, {len(part.nodes)} nodes) is under min_size: {why}")
        for i in plan.unplaced:
            ctx.log(f"partition: no device runs node {problem.nodes[i].name!r} ({problem.nodes[i].op}): left on cpu")
        return {"nodes_annotated": changed}


def _set_metadata(meta, entries: dict[str, str]) -> None:
    """Model-level metadata_props: replace these keys, keep the others."""
    kept = [(e.key, e.value) for e in meta.metadata_props if e.key not in entries]
    del meta.metadata_props[:]
    for key, value in kept + sorted(entries.items()):
        meta.metadata_props.add(key=key, value=value)


def report(problem: Problem, plan, costs) -> dict:
    """The plan as the report shows it."""
    nodes = problem.nodes
    per_device = Counter()
    for part in plan.partitions:
        per_device[part.device] += len(part.nodes)
    used = set(per_device)
    settings = settings_string(plan.devices, used)
    host_only = [problem.host] * len(nodes)
    fallback = [min(ok) for ok in problem.allowed]  # onnxruntime's node-by-node fallback
    unsupported: dict[str, Counter] = {}
    for i, why in plan.refusals.items():
        for device in why:
            unsupported.setdefault(device, Counter())[nodes[i].op] += 1
    return {
        "devices": [{"name": d.name, "designator": d.designator, "provider": d.provider, "source": d.source}
                    for d in plan.devices],
        "session_config": {"session.layer_assignment_settings": settings},
        "partitions": [{
            "index": p.index, "device": p.device, "nodes": len(p.nodes),
            "ops": dict(Counter(nodes[i].op for i in p.nodes).most_common()),
            "inputs": p.inputs, "outputs": p.outputs, "transfer_in_bytes": p.transfer_in_bytes,
            "estimated_ms": round(p.seconds * 1e3, 6)} for p in plan.partitions],
        "nodes_per_device": dict(per_device),
        "boundary_tensors": sum(len(p.inputs) for p in plan.partitions),
        "boundary_bytes": plan.transfer_bytes,
        "estimated_ms": {"plan": _ms(plan_cost(problem, plan.assignment)[0]),
                         "all_on_cpu": _ms(plan_cost(problem, host_only)[0]),
                         "onnxruntime_fallback": _ms(plan_cost(problem, fallback)[0])},
        "ort_fallback": {"partitions": len(runs(problem, fallback)), "boundary_bytes": problem.total(fallback)[2]},
        "unsupported": {d: dict(c.most_common()) for d, c in unsupported.items()},
        "small_partitions_kept": {str(k): why for k, why in plan.stuck.items()},
        "unplaced": [nodes[i].name for i in plan.unplaced],
        "shapes_unknown": sum(not c.known for c in costs),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)
