"""partition: decide ahead of time which device runs each node, and write it into the model.

Each main-graph node gets three metadata_props: `layer_ann` = `onnxopt/DEVICE/pK` (the key
onnxruntime's `session.layer_assignment_settings` matches), `onnxopt.device` and
`onnxopt.partition`. The settings string that maps the annotations to devices is in the report
(`details.partition.session_config`), ready to pass to onnxruntime; `--split DIR` writes one model
per partition that `onnxopt.PartitionedSession` runs. The pass only annotates: it never changes
an output (tolerance `exact`), and a second run finds every annotation already in place. With
`partition.precision` it also converts the nodes of chosen devices to float16 or int8 through the
quant pass (tolerance `lossy`).

Subgraph (If/Loop/Scan) bodies go with the node that owns them and are not annotated themselves.
See plan.py for the partitioner and cost.py for the cost model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt.errors import UsageError
from onnxopt.graph import cleanup, node_metadata, onnx_dtype
from onnxopt.pipeline import Pass

from . import specs
from .cost import itemsize, node_costs, tensor_infos
from .plan import Problem, node_reads, node_refusal, make_plan, order_runs, parse_pins, plan_cost, runs
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
        precision: str = ""  # per device, DEVICE=fp16|int8 comma-separated (cuda=fp16,cpu=int8): lossy

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.precision:
            self.tolerance = "lossy"  # the quant pass's conversions, inside the --min-cosine budget

    def run(self, model, ctx):
        if self.options.min_size < 1:
            raise UsageError("partition.min_size must be at least 1")
        devices = load_devices(ctx.devices or DEFAULT_DEVICES)
        modes = parse_precision(self.options.precision, devices)
        graph = model.graph
        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in graph.import_domains or []}
        opsets.setdefault("", int(graph.opset or 0))
        infos = tensor_infos(model, ctx.evaluation[0] if ctx.evaluation else None)
        costs = node_costs(graph, infos)
        problem = Problem(graph, devices, costs, infos, parse_pins(ctx.pins), opsets)
        plan = make_plan(problem, self.options.min_size)
        summary = report(problem, plan, costs)
        device_of = {id(node): k for node, k in zip(problem.nodes, plan.assignment)}
        counts = Counter()
        if modes:
            counts += apply_precision(model, ctx, devices, device_of, modes, opsets)
            summary["precision"] = {devices[k].name: mode for k, mode in modes.items()}
        nodes = list(graph.nodes)
        reads = [node_reads(n) for n in nodes]
        assign = [device_of[id(n)] for n in nodes]
        seq = order_runs(nodes, reads, assign)
        for k, run in enumerate(seq):
            device = devices[assign[run[0]]].name
            for i in run:
                meta = node_metadata(nodes[i])
                wanted = {ANNOTATION: annotation(device, k), DEVICE_KEY: device, PARTITION_KEY: str(k)}
                if any(meta.get(key) != v for key, v in wanted.items()):
                    if not meta.get(ANNOTATION, "onnxopt/").startswith("onnxopt/"):
                        ctx.log(f"partition: node {nodes[i].name!r} had layer_ann {meta[ANNOTATION]!r}: replaced")
                    meta.update(wanted)
                    counts["nodes_annotated"] += 1
        if modes:  # the plan's partitions as the conversions left them (the estimates are the float plan's)
            summary["partitions"] = [{"index": k, "device": devices[assign[run[0]]].name, "nodes": len(run),
                                      "ops": dict(Counter(nodes[i].op for i in run).most_common())}
                                     for k, run in enumerate(seq)]
            summary["nodes_per_device"] = dict(Counter(devices[a].name for a in assign))
            summary["session_config"] = {
                "session.layer_assignment_settings": settings_string(devices, set(summary["nodes_per_device"]))}
        settings = summary["session_config"]["session.layer_assignment_settings"]
        fallback = summary["ort_fallback"]
        ctx.details["partition"] = summary
        used = set(summary["nodes_per_device"])
        _set_metadata(model.meta, {
            DEVICES_KEY: json.dumps({d.name: {"designator": d.designator, "provider": d.provider}
                                     for d in devices if d.name in used}, sort_keys=True),
            SETTINGS_KEY: settings})
        ctx.log(f"partition: {len(seq)} partitions "
                f"({', '.join(f'{d} {n} nodes' for d, n in summary['nodes_per_device'].items())}), "
                f"{summary['boundary_bytes']} bytes across devices; onnxruntime's node-by-node fallback: "
                f"{fallback['partitions']} partitions, {fallback['boundary_bytes']} bytes")
        ctx.log(f"partition: session.layer_assignment_settings = {settings}")
        for k, why in plan.stuck.items():
            part = plan.partitions[k]
            ctx.log(f"partition: partition {k} ({part.device}, {len(part.nodes)} nodes) is under min_size: {why}")
        for i in plan.unplaced:
            ctx.log(f"partition: no device runs node {problem.nodes[i].name!r} ({problem.nodes[i].op}): left on cpu")
        return +counts


PRECISIONS = ("fp16", "int8")


def parse_precision(text: str, devices: list[specs.DeviceSpec]) -> dict[int, str]:
    """`cuda=fp16,cpu=int8` into {device index: mode}."""
    by_name = {d.name: k for k, d in enumerate(devices)}
    out = {}
    for item in (x.strip() for x in (text or "").split(",") if x.strip()):
        device, sep, mode = item.partition("=")
        if not sep or mode not in PRECISIONS:
            raise UsageError(f"bad partition.precision item {item!r}: expected DEVICE=fp16 or DEVICE=int8")
        if device not in by_name:
            raise UsageError(f"partition.precision names {device!r}, which is not among the devices "
                             f"({', '.join(by_name)})")
        out[by_name[device]] = mode
    return out


def apply_precision(model, ctx, devices, device_of: dict[int, int], modes: dict[int, str], opsets) -> Counter:
    """The quant pass's float16 conversion (mixed: measured, most sensitive nodes back to float32)
    on the nodes of the fp16 devices, then its dynamic int8 on the int8 devices'. New nodes get a
    device in device_of: int8's go with the device that asked for them; a float16 Cast goes to the
    side of the boundary that makes the tensor crossing it the smaller, when that device runs it."""
    from onnxopt.passes.quant import QuantPass

    quant = QuantPass()
    counts = Counter()
    for mode in PRECISIONS:
        targets = sorted(k for k, m in modes.items() if m == mode)
        if not targets:
            continue
        graph = model.graph
        before = {id(n) for n in graph.nodes}
        only = frozenset(i for i, n in enumerate(graph.nodes) if device_of.get(id(n)) in targets)
        counts += quant.mixed(model, ctx, only) if mode == "fp16" else quant.dynamic(model, ctx, only=only)
        cleanup(graph).toposort(mode="nodes")
        producer = {t.name: n for n in graph.nodes for t in n.outputs if t.name}
        readers: dict[str, list] = {}
        for n in graph.nodes:
            for name in node_reads(n):
                readers.setdefault(name, []).append(n)
        host = next(k for k, d in enumerate(devices) if d.host)
        outputs = {t.name for t in graph.outputs}
        for node in (n for n in graph.nodes if id(n) not in before):
            src = {device_of.get(id(producer[t.name]), host) if t.name in producer else host
                   for t in node.inputs if t.name and not isinstance(t, gs.Constant)}
            dst = {device_of[id(r)] for t in node.outputs for r in readers.get(t.name, []) if id(r) in device_of}
            dst |= {host for t in node.outputs if t.name in outputs}  # graph outputs are read on the host
            if mode == "int8":
                near = (dst | src) & set(targets)
                choice = min(near) if near else targets[0]
            else:
                shrinks = (itemsize(onnx_dtype(node.outputs[0])) < itemsize(onnx_dtype(node.inputs[0]))
                           if node.inputs else True)
                side = src if shrinks or len(dst) != 1 else dst
                choice = min(side) if len(side) == 1 else host
            if node_refusal(devices[choice], node, opsets) is not None:
                choice = host
            device_of[id(node)] = choice
    return counts


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
    fallback = [min(ok) for ok in problem.allowed]  # onnxruntime's node-by-node fallback
    estimates = {"plan": _ms(plan_cost(problem, plan.assignment)[0]),
                 "onnxruntime_fallback": _ms(plan_cost(problem, fallback)[0])}
    for k, d in enumerate(plan.devices):  # everything on one device, where that device runs every node
        if all(k in ok for ok in problem.allowed):
            estimates[f"all_on_{d.name}"] = _ms(plan_cost(problem, [k] * len(nodes))[0])
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
        "estimated_ms": estimates,
        "ort_fallback": {"partitions": len(runs(problem, fallback)), "boundary_bytes": problem.total(fallback)[2]},
        "unsupported": {d: dict(c.most_common()) for d, c in unsupported.items()},
        "small_partitions_kept": {str(k): why for k, why in plan.stuck.items()},
        "unplaced": [nodes[i].name for i in plan.unplaced],
        "shapes_unknown": sum(not c.known for c in costs),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)
