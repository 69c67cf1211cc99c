"""The partitioner: assign each main-graph node to a device so the estimated time (node times plus
transfers across device boundaries) is least, then order the nodes into partitions.

- Capability: a node may go to a device whose spec runs its operator at the model's opset with
  its element types; a pin (`Softmax=cpu`, a node name, or a name pattern) restricts it to one
  device. A node no device runs stays on the host (cpu) and is reported.
- Assignment: min-cut moves (alpha-expansion). With one accelerator and the host the first move
  is an exact minimum s-t cut over the nodes, one edge per unary cost and a pair of auxiliary
  vertices per tensor so a tensor read on another device is paid once; with more devices each move
  ("which nodes switch to device d") is solved the same way and kept only if it lowers the exact
  total. Graph inputs and outputs live on the host.
- Islands: the nodes are ordered into runs of one device (a topological order that stays on the
  current device while it can); a run of fewer than `min_size` nodes moves to a neighbouring run's
  device when that device runs all of its nodes, the cheapest such move first, until none is left.
  Runs that cannot move (an operator only one device has, a pin) stay and are reported.

Subgraph (If/Loop/Scan) nodes go with the node that owns them; the outer tensors they read count
as that node's inputs.
"""

from __future__ import annotations

import fnmatch
import heapq
from collections import deque
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxopt.errors import UsageError
from onnxopt.graph import all_graphs, is_constant, subgraphs

from .cost import NodeCost, TensorInfo
from .specs import DeviceSpec, node_types, schema

BIG = 1e30  # an edge the cut must not take


@dataclass
class Tensor:
    name: str
    producer: int  # node index, or HOST (a graph input)
    consumers: list[int]  # node indices, HOST for a graph output
    nbytes: int


HOST = -1


@dataclass
class Partition:
    index: int
    device: str
    nodes: list[int]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    transfer_in_bytes: int = 0


@dataclass
class Plan:
    devices: list[DeviceSpec]
    assignment: list[int]  # device index per node
    partitions: list[Partition]
    transfer_bytes: int
    refusals: dict[int, dict[str, str]]  # node -> device -> why it cannot run there
    stuck: dict[int, str] = field(default_factory=dict)  # partitions under min_size that did not move, and why
    unplaced: list[int] = field(default_factory=list)  # nodes no device runs (left on the host)


class Problem:
    """Nodes, their costs per device, and the tensors between them."""

    def __init__(self, graph: gs.Graph, devices: list[DeviceSpec], costs: list[NodeCost],
                 infos: dict[str, TensorInfo], pins: list[tuple[str, str]], opsets: dict[str, int]):
        self.graph, self.devices, self.nodes = graph, devices, list(graph.nodes)
        self.host = next(i for i, d in enumerate(devices) if d.host)
        index = {id(n): i for i, n in enumerate(self.nodes)}
        self.reads = [node_reads(n) for n in self.nodes]
        producers = {t.name: index[id(n)] for n in self.nodes for t in n.outputs if t.name}
        consumers: dict[str, list[int]] = {}
        for i, names in enumerate(self.reads):
            for name in names:
                consumers.setdefault(name, []).append(i)
        graph_inputs = {t.name for t in graph.inputs}
        self.tensors: list[Tensor] = []
        for t in graph.outputs:
            consumers.setdefault(t.name, []).append(HOST)
        for name, readers in consumers.items():
            if name in producers or name in graph_inputs:
                info = infos.get(name)
                self.tensors.append(Tensor(name, producers.get(name, HOST), readers, info.nbytes if info else 0))
        self.node_tensors: list[list[int]] = [[] for _ in self.nodes]  # tensors each node writes or reads
        for t, tensor in enumerate(self.tensors):
            for i in {tensor.producer, *tensor.consumers} - {HOST}:
                self.node_tensors[i].append(t)
        self.seconds = [[c.seconds(d) for d in devices] for c in costs]
        self.refusals: dict[int, dict[str, str]] = {}
        self.allowed: list[list[int]] = []
        self.unplaced: list[int] = []
        pinned = _pins(self.nodes, devices, pins)
        for i, node in enumerate(self.nodes):
            why = {d.name: r for d in devices if (r := node_refusal(d, node, opsets)) is not None}
            ok = [k for k, d in enumerate(devices) if d.name not in why]
            if i in pinned:
                k = pinned[i]
                if k not in ok:
                    raise UsageError(f"--pin puts node {node.name!r} ({node.op}) on {devices[k].name}, "
                                     f"which cannot run it: {why[devices[k].name]}")
                ok = [k]
            if not ok:
                ok = [self.host]
                self.unplaced.append(i)
            if why:
                self.refusals[i] = why
            self.allowed.append(ok)

    def transfer(self, a: int, b: int, nbytes: int) -> float:
        if a == b:
            return 0.0
        return sum(self.devices[k].link.seconds(nbytes) for k in (a, b) if not self.devices[k].host)

    def label(self, assign: list[int], i: int) -> int:
        return self.host if i == HOST else assign[i]

    def ends(self, t: int) -> list[int]:
        """The producer and the readers of tensor t (HOST for a graph input or output)."""
        tensor = self.tensors[t]
        return [tensor.producer] + tensor.consumers

    def tensor_seconds(self, t: int, assign: list[int], moved: dict[int, int] | None = None) -> float:
        """The transfers of tensor t: once to each device other than its producer's that reads it;
        `moved` overrides some nodes' devices."""
        tensor = self.tensors[t]

        def at(i):
            return moved[i] if moved and i in moved else self.label(assign, i)

        src = at(tensor.producer)
        return sum(self.transfer(src, dst, tensor.nbytes) for dst in {at(c) for c in tensor.consumers} - {src})

    def switch_seconds(self, a: int, b: int) -> float:
        """The synchronisation between consecutive partitions on devices a and b."""
        if a == b:
            return 0.0
        return max(self.devices[k].link.latency for k in (a, b) if not self.devices[k].host)

    def total(self, assign: list[int]) -> tuple[float, float, int]:
        """(compute seconds, transfer seconds, bytes transferred) of an assignment."""
        compute = sum(self.seconds[i][a] for i, a in enumerate(assign))
        moved, nbytes = 0.0, 0
        for t in self.tensors:
            src = self.label(assign, t.producer)
            for dst in {self.label(assign, c) for c in t.consumers} - {src}:
                moved += self.transfer(src, dst, t.nbytes)
                nbytes += t.nbytes
        return compute, moved, nbytes


def node_reads(node: gs.Node) -> list[str]:
    """Names of the non-constant tensors a node reads, its subgraphs' outer reads included."""
    names = [t.name for t in node.inputs if t.name and not is_constant(t)]
    for sub in subgraphs(node):
        local = {t.name for g in all_graphs(sub) for n in g.nodes for t in n.outputs}
        local |= {t.name for g in all_graphs(sub) for t in g.inputs}
        for g in all_graphs(sub):
            for n in g.nodes:
                names += [t.name for t in n.inputs if t.name and t.name not in local and not is_constant(t)]
    return list(dict.fromkeys(names))


def node_refusal(device: DeviceSpec, node: gs.Node, opsets: dict[str, int]) -> str | None:
    domain = "" if node.domain in (None, "ai.onnx") else node.domain
    key = node.op if domain == "" else f"{domain}.{node.op}"
    found = schema(node.op, opsets.get(domain), domain)
    since = found.since_version if found is not None else None
    reason = device.refusal(key, since, node_types(node, found))
    if reason is None:
        for sub in subgraphs(node):
            for g in all_graphs(sub):
                for n in g.nodes:
                    inner = node_refusal(device, n, opsets)
                    if inner is not None:
                        return f"its subgraph: {inner}"
    return reason


def parse_pins(items) -> list[tuple[str, str]]:
    """`--pin WHAT=DEVICE` items: WHAT is an op type, a node name or a name pattern (fnmatch)."""
    pins = []
    for item in items or ():
        what, sep, device = str(item).rpartition("=")
        if not sep or not what.strip() or not device.strip():
            raise UsageError(f"bad --pin {item!r}: expected OP_TYPE=DEVICE, NODE_NAME=DEVICE or 'PATTERN*=DEVICE'")
        pins.append((what.strip(), device.strip()))
    return pins


def _pins(nodes: list[gs.Node], devices: list[DeviceSpec], pins: list[tuple[str, str]]) -> dict[int, int]:
    """Node index -> device index. A later pin wins over an earlier one for the same node."""
    by_name = {d.name: k for k, d in enumerate(devices)}
    out: dict[int, int] = {}
    for what, device in pins:
        if device not in by_name:
            raise UsageError(f"--pin {what}={device}: {device!r} is not among the devices ({', '.join(by_name)})")
        hits = [i for i, n in enumerate(nodes) if n.op == what or n.name == what or
                (any(c in what for c in "*?[") and fnmatch.fnmatchcase(n.name or "", what))]
        if not hits:
            raise UsageError(f"--pin {what}={device}: no node has that op type or name, nor matches that pattern")
        out.update((i, by_name[device]) for i in hits)
    return out


# ------------------------------------------------------------------------------ min-cut moves


class _Flow:
    """Dinic's maximum flow; after `run`, `source_side` is the minimum cut's source set."""

    def __init__(self, n: int):
        self.adj: list[list[int]] = [[] for _ in range(n)]
        self.head: list[int] = []
        self.cap: list[float] = []

    def vertex(self) -> int:
        self.adj.append([])
        return len(self.adj) - 1

    def edge(self, u: int, v: int, cap: float) -> None:
        if cap <= 0:
            return
        self.adj[u].append(len(self.head))
        self.head.append(v)
        self.cap.append(cap)
        self.adj[v].append(len(self.head))
        self.head.append(u)
        self.cap.append(0.0)

    def run(self, s: int, t: int) -> None:
        while True:
            level = self._levels(s)
            if level[t] < 0:
                return
            cursor = [0] * len(self.adj)
            while self._push(s, t, BIG, level, cursor) > 0:
                pass

    def _levels(self, s: int) -> list[int]:
        level = [-1] * len(self.adj)
        level[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for e in self.adj[u]:
                if self.cap[e] > 1e-18 and level[self.head[e]] < 0:
                    level[self.head[e]] = level[u] + 1
                    queue.append(self.head[e])
        return level

    def _push(self, s: int, t: int, limit: float, level: list[int], cursor: list[int]) -> float:
        # iterative depth-first search for one augmenting path in the level graph
        path: list[int] = []
        u = s
        while True:
            if u == t:
                flow = min([limit] + [self.cap[e] for e in path])
                for e in path:
                    self.cap[e] -= flow
                    self.cap[e ^ 1] += flow
                return flow
            while cursor[u] < len(self.adj[u]):
                e = self.adj[u][cursor[u]]
                v = self.head[e]
                if self.cap[e] > 1e-18 and level[v] == level[u] + 1:
                    path.append(e)
                    u = v
                    break
                cursor[u] += 1
            else:
                if not path:
                    return 0.0
                level[u] = -1  # dead end: never visit again in this phase
                e = path.pop()
                u = self.head[e ^ 1]
                cursor[u] += 1

    def source_side(self, s: int) -> set[int]:
        seen = {s}
        stack = [s]
        while stack:
            u = stack.pop()
            for e in self.adj[u]:
                if self.cap[e] > 1e-18 and self.head[e] not in seen:
                    seen.add(self.head[e])
                    stack.append(self.head[e])
        return seen


def expand(p: Problem, assign: list[int], alpha: int) -> list[int]:
    """The best assignment in which each node keeps its device or switches to `alpha`."""
    n = len(assign)
    f = _Flow(n + 3)
    s, t, host = n, n + 1, n + 2
    for i, a in enumerate(assign):
        if a == alpha:
            f.edge(s, i, BIG)
        elif alpha not in p.allowed[i]:
            f.edge(i, t, BIG)
        else:
            f.edge(s, i, p.seconds[i][a])  # cut when i keeps its device
            f.edge(i, t, p.seconds[i][alpha])  # cut when i switches
    f.edge(*((s, host) if p.host == alpha else (host, t)), BIG)
    vertex = {HOST: host}
    for tensor in p.tensors:
        u = vertex.get(tensor.producer, tensor.producer)
        readers = list(dict.fromkeys(vertex.get(c, c) for c in tensor.consumers))
        kept = {p.label(assign, c) for c in tensor.consumers} - {alpha}
        if kept:  # the producer switches, a reader keeps its device: one transfer
            a = f.vertex()
            f.edge(u, a, max(p.transfer(alpha, k, tensor.nbytes) for k in kept))
            for r in readers:
                f.edge(a, r, BIG)
        src = p.label(assign, tensor.producer)
        if src != alpha:  # the producer keeps its device, a reader switches: one transfer
            b = f.vertex()
            f.edge(b, u, p.transfer(src, alpha, tensor.nbytes))
            for r in readers:
                f.edge(r, b, BIG)
    f.run(s, t)
    side = f.source_side(s)
    return [alpha if i in side else a for i, a in enumerate(assign)]


def assign_devices(p: Problem, rounds: int = 4) -> list[int]:
    """Alpha-expansion from everything on the host (and each node on a device it may use)."""
    assign = [p.host if p.host in ok else ok[0] for ok in p.allowed]
    best = sum(p.total(assign)[:2])
    order = [k for k in range(len(p.devices)) if k != p.host] + [p.host]
    for _ in range(rounds):
        improved = False
        for alpha in order:
            candidate = expand(p, assign, alpha)
            cost = sum(p.total(candidate)[:2])
            if cost < best - 1e-15:
                assign, best, improved = candidate, cost, True
        if not improved:
            break
    return assign


# ------------------------------------------------------------------------------ partitions


def runs(p: Problem, assign: list[int]) -> list[list[int]]:
    return order_runs(p.nodes, p.reads, assign)


def order_runs(nodes: list[gs.Node], reads: list[list[str]], assign: list[int]) -> list[list[int]]:
    """Nodes in a topological order that stays on one device as long as it can; a run per stretch.
    reads: per node, the tensors it reads (node_reads)."""
    n = len(assign)
    index_of = {name: i for i, node in enumerate(nodes) for name in (t.name for t in node.outputs) if name}
    deps = [{index_of[name] for name in names if name in index_of} for names in reads]
    waiting = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in range(n)]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready: dict[int, list[int]] = {}
    for i in range(n):
        if not waiting[i]:
            heapq.heappush(ready.setdefault(assign[i], []), i)
    out: list[list[int]] = []
    current = None
    while any(ready.values()):
        if not ready.get(current):
            current = min((h[0], k) for k, h in ready.items() if h)[1]
            out.append([])
        i = heapq.heappop(ready[current])
        out[-1].append(i)
        for j in users[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready.setdefault(assign[j], []), j)
    return out


def plan_cost(p: Problem, assign: list[int]) -> tuple[float, list[list[int]]]:
    """The estimated seconds of an assignment with its runs: node times, transfers, and one
    synchronisation per switch between runs on different devices (the larger link latency)."""
    seq = runs(p, assign)
    switches = sum(p.switch_seconds(assign[a[0]], assign[b[0]]) for a, b in zip(seq, seq[1:]))
    return sum(p.total(assign)[:2]) + switches, seq


MERGE_SLACK = 0.05  # island merges may raise the estimated time by this fraction in all


def merge_islands(p: Problem, assign: list[int], min_size: int) -> tuple[list[int], list[list[int]], dict]:
    """Move whole runs to a neighbouring run's device: any run when the move lowers the estimate;
    a run under `min_size` nodes also when it raises it, as long as such moves together cost at
    most MERGE_SLACK of the estimate (a small island in the middle of heavy work on the other
    device stays: moving it would move that work). Cheapest move first.

    A move's change is computed locally (its nodes' times, the transfers of the tensors it
    touches, the switches with its two neighbours) and the runs are kept as a linked list that a
    move merges into its neighbours, so cascades (each move making the next one pay) cost
    O(moves log runs), not a rescan each; the true runs are recomputed after each sweep.
    Returns the assignment, its runs, and the runs left under min_size with the reason."""
    assign = list(assign)
    cost, seq = plan_cost(p, assign)
    budget = [MERGE_SLACK * cost]
    for _ in range(8):  # sweeps; a sweep that moves nothing ends it
        if not _merge_sweep(p, assign, seq, min_size, budget):
            break
        cost, seq = plan_cost(p, assign)
    stuck = {}
    for k, run in enumerate(seq):
        if len(run) < min_size and len(seq) > 1:
            near = {assign[seq[j][0]] for j in (k - 1, k + 1) if 0 <= j < len(seq)}
            movable = any(all(d in p.allowed[i] for i in run) for d in near)
            stuck[k] = "moving it would cost too much" if movable else "no neighbouring device runs all of its nodes"
    return assign, seq, stuck


@dataclass
class _Run:
    nodes: list[int]
    device: int
    prev: "_Run | None" = None
    next: "_Run | None" = None
    version: int = 0


def _merge_sweep(p: Problem, assign: list[int], seq: list[list[int]], min_size: int, budget: list[float]) -> int:
    """One sweep of merge_islands over the runs `seq`; `budget` holds the slack left. Returns the
    number of moves made."""
    chain = [_Run(list(run), assign[run[0]]) for run in seq]
    for a, b in zip(chain, chain[1:]):
        a.next, b.prev = b, a
    heap: list = []
    tie = 0

    def consider(run: _Run) -> None:
        nonlocal tie
        for d in {r.device for r in (run.prev, run.next) if r is not None} - {run.device}:
            if all(d in p.allowed[i] for i in run.nodes):
                delta = _move_delta(p, assign, run, d)
                if delta < -1e-15 or len(run.nodes) < min_size:
                    tie += 1
                    heapq.heappush(heap, (delta, tie, run, d, _versions(run)))

    for run in chain:
        consider(run)
    moves = 0
    while heap:
        delta, _, run, d, versions = heapq.heappop(heap)
        if versions != _versions(run) or not (delta < -1e-15 or delta <= budget[0]):
            continue
        for i in run.nodes:
            assign[i] = d
        budget[0] -= max(0.0, delta)
        moves += 1
        run.device, run.version = d, run.version + 1
        for other in (run.prev, run.next):  # merge with the neighbours now on the same device
            if other is not None and other.device == d:
                first, second = (other, run) if other is run.prev else (run, other)
                first.nodes += second.nodes
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                second.version += 1  # stale: its heap entries are dropped
                run = first
        run.version += 1
        for r in (run, run.prev, run.next):
            if r is not None:
                r.version += 1
                consider(r)
    return moves


def _versions(run: _Run) -> tuple:
    """What a move of `run` was computed against: it and its neighbours, unchanged."""
    return tuple((id(r), r.version) if r is not None else None for r in (run.prev, run, run.next))


def _move_delta(p: Problem, assign: list[int], run: _Run, d: int) -> float:
    """The change in the estimate when the run moves to device d, computed from what it touches."""
    cur = run.device
    delta = sum(p.seconds[i][d] - p.seconds[i][cur] for i in run.nodes)
    moved = dict.fromkeys(run.nodes, d)
    for t in {t for i in run.nodes for t in p.node_tensors[i]}:
        delta += p.tensor_seconds(t, assign, moved) - p.tensor_seconds(t, assign)
    for other in (run.prev, run.next):
        if other is not None:
            delta += p.switch_seconds(other.device, d) - p.switch_seconds(other.device, cur)
    return delta


def make_plan(p: Problem, min_size: int) -> Plan:
    """The min-cut assignment, or onnxruntime's fallback one where the merged result is cheaper
    (the cut does not see the per-switch synchronisation plan_cost adds), islands merged."""
    candidates = [merge_islands(p, a, min_size) for a in (assign_devices(p), [min(ok) for ok in p.allowed])]
    assign, seq, stuck = min(candidates, key=lambda c: plan_cost(p, c[0])[0])
    produced_in: dict[str, int] = {}
    parts = []
    for k, nodes in enumerate(seq):
        part = Partition(k, p.devices[assign[nodes[0]]].name, sorted(nodes))
        part.seconds = sum(p.seconds[i][assign[i]] for i in nodes)
        for i in nodes:
            for t in p.nodes[i].outputs:
                if t.name:
                    produced_in[t.name] = k
        parts.append(part)
    by_tensor = {t.name: t for t in p.tensors}
    for part in parts:
        mine = set(part.nodes)
        reads = dict.fromkeys(name for i in part.nodes for name in p.reads[i])
        part.inputs = [name for name in reads if produced_in.get(name) != part.index]
        for name in part.inputs:
            src = produced_in.get(name)
            src_device = p.host if src is None else assign[seq[src][0]]
            if src_device != assign[part.nodes[0]]:
                part.transfer_in_bytes += by_tensor[name].nbytes
        part.outputs = [p.tensors[t].name for t in dict.fromkeys(t for i in part.nodes for t in p.node_tensors[i])
                        if p.tensors[t].producer in mine and
                        any(c == HOST or c not in mine for c in p.tensors[t].consumers)]
    return Plan(p.devices, assign, parts, p.total(assign)[2], p.refusals, stuck, p.unplaced)
