"""Static INT8 (`--quant static`): a QDQ graph whose activation ranges come from calibration, laid
out so onnxruntime fuses each DequantizeLinear -> op -> QuantizeLinear group into its integer
kernel (QLinearConv, QGemm, QLinearMatMul, QLinearAdd, QLinearConcat, QLinearGlobalAveragePool...).

Placement (`static_sites` finds the nodes, `quantize_static` writes the graph):
- Compute nodes: Conv and Gemm/MatMul with a constant weight, Add and Mul of two activations,
  Concat, GlobalAveragePool, AveragePool. Each one's activation inputs and outputs are quantized;
  its weight is int8, symmetric, one scale per output channel (7-bit unless
  reduce_range=False: onnxruntime's AVX2 kernels without VNNI saturate full-range int8 weights);
  a Conv/Gemm bias becomes int32 with scale input_scale * weight_scale.
- Weights are rounded by GPTQ (`site_weights`): each input column's rounding error compensated
  in the columns not yet rounded, through X^T X of the rows the weight multiplies on the
  calibration data (a Conv's im2col patches, per group; up to GPTQ_MAX_K inputs, longer ones
  round to nearest). Where that does worse end to end than rounding to nearest, the budget's
  measurement keeps rounding to nearest (QuantPass.static).
- A depthwise conv's input channels are rescaled first where that costs nothing
  (`equalize_depthwise`): a depthwise conv reads each channel alone and per-channel weight
  scales absorb any factor, so when the node making its input can scale each channel (a Conv,
  or `x * a (+ b)` with scalar or per-channel constants: PP-LCNet's learnable affine block), the
  channels are stretched to share the tensor's one uint8 range (`channel_stretch`: the range's
  negative/positive ratio chosen to minimize the rounding error weighted by the depthwise
  weights). Per-tensor activations otherwise give a channel spanning 0.4 in a tensor spanning 22
  about 3 bits (PP-OCRv4 rec: 14 of its 16 depthwise convs; with every unit int8, held-out
  cosine 0.953 -> 0.986 and argmax agreement 92.9% -> 95.7%).
- An Add read by a Softmax (attention scores plus a mask) stays float: a padding mask's hidden
  keys (float32's lowest, or masked_keys' -40) quantized with a range calibrated on unpadded
  samples would clamp to its minimum and let the padded keys back in (a range that held them
  would leave the scores no bits). A Mul by a 0/1 factor (a bool cast to float: masked_keys'
  rows of K) stays float too: exact there, a requantization of K in int8.
- x * HardSigmoid(x) (fuse's HardSwish below opset 14) is an activation, not a product: it runs in
  float between one DequantizeLinear and one QuantizeLinear, as HardSwish would (a QLinearMul
  there costs a QuantizeLinear of the HardSigmoid besides: PP-OCRv4 det 0.80x -> 0.78x of the
  float model, rec 0.86x -> 0.82x).
- A Relu, or a Clip from 0, right after a quantized node (and its only reader) is dropped: the
  node's output is quantized with the activation's calibrated range starting at 0, which clamps
  exactly as the activation did.
- Data movement (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze) after a quantized
  tensor carries its scale and zero point, so onnxruntime runs it on the int8 data and drops the
  Q/DQ pair around it instead of re-quantizing.
- A quantized tensor T becomes producer -> T_f -> QuantizeLinear -> DequantizeLinear -> T: every
  reader and a graph output keep the name T; a graph input gets the pair in front of its readers.
  Anything else stays float; a float node between quantized ones reads dequantized values. A
  MatMul/Gemm whose output no quantized node reads keeps a float output (MatMulIntegerToFloat,
  QGemm with float output): logits are not rounded.

Activations are uint8 with a zero point; ranges always include 0. Calibration (`ranges`):
`minmax` (the extremes over the calibration samples; the default, and the best measured on
PP-OCRv4 rec), `percentile` (the 0.01% tails of a 2048-bin histogram dropped on each side) or
`entropy` (TensorRT's KL-divergence threshold on the histogram of magnitudes; per-tensor
clipping of this kind costs PP-OCR's HardSwish networks dearly: rec convolutions alone reach
37% argmax agreement with it, 91.5% with minmax).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import STANDARD_DOMAINS, Names, producer, values
from onnxopt.passes.fold import per_channel

from .calib import gptq_columns, inverse_factor
from .int8 import Site, quantize_columns

COMPUTE = {"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool"}
CARRY = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
BINS = 2048
GPTQ_MAX_K = 4608  # longest reduction GPTQ rounds (a 3x3 conv over 512 channels): X^T X is K^2 float64
PERCENTILE = 99.99


def static_sites(graph: gs.Graph) -> tuple[list[Site], dict[int, gs.Node]]:
    """The compute nodes static mode quantizes, and for each the activation it absorbs (or none)."""
    inputs = {id(t) for t in graph.inputs}
    outputs = {id(t) for t in graph.outputs}
    sites, absorbed = [], {}
    for i, node in enumerate(graph.nodes):
        if node.domain not in STANDARD_DOMAINS or node.op not in COMPUTE or not _float_node(node):
            continue
        if any(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in node.inputs):
            continue  # quantized already (a second run)
        weight = None
        if node.op in ("Conv", "Gemm", "MatMul"):
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if not (isinstance(weight, gs.Constant) and id(weight) not in inputs and weight.dtype == np.float32):
                continue
            if node.op == "Gemm" and node.attrs.get("transA", 0):
                continue
            if node.op == "MatMul" and len(weight.shape) != 2:
                continue
        elif node.op in ("Add", "Mul") and any(isinstance(t, gs.Constant) for t in node.inputs):
            continue  # a constant operand: nothing onnxruntime fuses here
        elif node.op == "Mul" and _hard_swish(node):
            continue  # x * HardSigmoid(x): one float activation, not a product of two tensors
        elif node.op == "Add" and any(r.op == "Softmax" for r in node.outputs[0].outputs):
            continue  # attention logits plus a mask: see the module doc
        elif node.op == "Mul" and any(_zero_one(t) for t in node.inputs):
            continue  # times a 0/1 factor (fuse's masked_keys on K): exact in float, a requantization in int8
        label = node.name or f"{node.op}#{i}"
        sites.append(Site(i, node.op.lower(), label, int(np.prod(weight.shape)) if weight is not None else 0))
        y = node.outputs[0]
        if len(y.outputs) == 1 and id(y) not in outputs and _absorbable(y.outputs[0]):
            absorbed[i] = y.outputs[0]
    return sites, absorbed


def _hard_swish(mul: gs.Node) -> bool:
    a, b = mul.inputs
    return any(t.inputs and t.inputs[0].op == "HardSigmoid" and t.inputs[0].inputs[0] is other
               for t, other in ((a, b), (b, a)))


def _zero_one(t: gs.Tensor) -> bool:
    """t is a bool cast to float (through a Reshape): a 0/1 factor."""
    node = producer(t)
    if node is not None and node.op == "Reshape":
        node = producer(node.inputs[0])
    return node is not None and node.op == "Cast" and node.inputs[0].dtype is not None \
        and np.dtype(node.inputs[0].dtype) == np.bool_


def _float_node(node: gs.Node) -> bool:
    return all(t.dtype in (None, np.float32) for t in list(node.inputs) + list(node.outputs) if t.name)


def _absorbable(act: gs.Node) -> bool:
    if act.domain not in STANDARD_DOMAINS:
        return False
    if act.op == "Relu":
        return True
    if act.op == "Clip" and len(act.inputs) > 1 and isinstance(act.inputs[1], gs.Constant):
        return float(np.asarray(values(act.inputs[1])).reshape(())) == 0.0
    return False


def observed_tensors(graph: gs.Graph, sites: list[Site], absorbed: dict) -> list[str]:
    """Names of the tensors whose ranges calibration must record."""
    nodes = graph.nodes
    names = set()
    for s in sites:
        node = nodes[s.index]
        for t in _activation_inputs(node):
            names.add(t.name)
        out = absorbed[s.index].outputs[0] if s.index in absorbed else node.outputs[0]
        names.add(out.name)
    return sorted(names)


def depthwise_inputs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node, gs.Node | None]]:
    """Depthwise convolutions whose input channels can be rescaled for free, as (conv, scaler,
    add): the conv (one input channel per group, a constant weight) is the input's only reader,
    and the input comes from a node that can scale each channel at no cost: `x * a (+ b)` with
    constants a and b that are scalars or per channel (PP-LCNet's learnable affine block before a
    padded depthwise conv: scaler is the Mul, add the Add), or a Conv with a constant weight
    (scaler; add is None)."""
    outs = {id(t) for t in graph.outputs}
    found = []
    for node in graph.nodes:
        if node.op != "Conv" or node.domain not in STANDARD_DOMAINS or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if not isinstance(w, gs.Constant) or w.dtype != np.float32 or len(w.shape) < 3 or w.shape[1] != 1 \
                or node.attrs.get("group", 1) != w.shape[0]:
            continue
        if id(x) in outs or len(x.outputs) != 1 or len(x.inputs) != 1:
            continue
        channels, rank = w.shape[0], len(w.shape)
        p = x.inputs[0]
        if p.op == "Conv" and p.domain in STANDARD_DOMAINS and len(p.inputs) > 1 \
                and isinstance(p.inputs[1], gs.Constant) and p.inputs[1].dtype == np.float32 \
                and p.inputs[1].shape[0] == channels and (len(p.inputs) < 3 or isinstance(p.inputs[2], gs.Constant)):
            found.append((node, p, None))
            continue
        add = None
        if p.op in ("Add", "Sub") and _channel_constant(p, channels, rank) is not None:
            add, p = p, next((t.inputs[0] for t in p.inputs if not isinstance(t, gs.Constant) and t.inputs), None)
            if p is None or len(p.outputs[0].outputs) != 1 or id(p.outputs[0]) in outs:
                continue
        if p.op == "Mul" and _channel_constant(p, channels, rank) is not None:
            found.append((node, p, add))
    return found


def _channel_constant(node: gs.Node, channels: int, rank: int) -> tuple[int, np.ndarray] | None:
    """For a standard binary node with one constant operand that is a scalar or per channel of a
    rank-`rank` NCHW tensor: (that operand's position, its values as [channels]); else None. Sub
    only as `x - c`."""
    if node.domain not in STANDARD_DOMAINS or len(node.inputs) != 2:
        return None
    k = [i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
    if len(k) != 1 or (node.op == "Sub" and k[0] != 1):
        return None
    c = per_channel(np.asarray(values(node.inputs[k[0]])), np.float32, rank, channels)
    return None if c is None else (k[0], c)


RATIOS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0, 16.0)  # negative/positive bound ratios tried


def channel_stretch(lo: np.ndarray, hi: np.ndarray, energy: np.ndarray | None = None) -> np.ndarray:
    """Factors s (the smallest 1) to multiply each channel of a tensor by before its one uint8
    range [L, H] is set, given each channel's calibrated [lo_c, hi_c]: s_c = min(H / hi_c, L / lo_c)
    stretches channel c to touch a bound, and the ratio L / H is chosen (the observed one or one of
    RATIOS) to minimize sum_c energy_c (step / s_c)^2, the rounding error in the channels' own
    units weighted by what it costs downstream (default 1). Stretching the mostly-negative
    channels past the observed L can pay even though it widens the step for all. Channels that
    never varied keep 1."""
    lo, hi = np.minimum(lo, 0.0).astype(np.float64), np.maximum(hi, 0.0).astype(np.float64)
    live = np.isfinite(lo) & np.isfinite(hi) & ((hi - lo) > 0)
    if not live.any() or hi[live].max() <= 0:
        return np.ones(lo.shape, np.float32)
    e = np.ones(lo.shape) if energy is None else np.asarray(energy, np.float64)
    observed = -lo[live].min() / hi[live].max()
    best, best_err = None, np.inf
    for rho in sorted(set(RATIOS) | {observed}):  # bounds [-rho, 1]
        if rho <= 0 and (lo < 0).any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            up = np.where(hi > 0, 1.0 / hi, np.inf)
            down = np.where(lo < 0, rho / -lo, np.inf)
        sc = np.minimum(up, down)[live]
        err = float(np.sum(e[live] * ((1.0 + rho) / sc) ** 2))
        if err < best_err:
            best, best_err = sc, err
    if best is None:
        return np.ones(lo.shape, np.float32)
    out = np.ones(lo.shape)
    out[live] = best / best.min()
    return out.astype(np.float32)


def equalize_depthwise(found: list, lo: dict[str, np.ndarray], hi: dict[str, np.ndarray], names: Names) -> int:
    """Rescale each depthwise conv's input channels (see `depthwise_inputs`) so that they share
    the tensor's one uint8 range (`channel_stretch`, each channel's error weighted by its
    depthwise weights' energy): channel c is multiplied by s_c in the node that makes it, and
    the conv's weights for it divided by s_c. Exact in float; the conv's per-output-channel
    weight scales absorb s_c, so only the activation's rounding changes: a channel calibrated at
    0.4 in a tensor spanning 22 gets most of 8 bits instead of 3. lo/hi: per-channel extremes of
    the inputs, by name. Returns the number of convs rescaled."""
    def replace(node, k, value):
        node.inputs[k] = gs.Constant(names.new(f"{node.inputs[k].name}_equalized"), value.astype(np.float32))

    done = 0
    for conv, scaler, add in found:
        name = conv.inputs[0].name
        if name not in lo:
            continue
        dw = np.asarray(values(conv.inputs[1]), np.float32)
        s = channel_stretch(lo[name], hi[name], np.square(dw.reshape(len(dw), -1)).sum(axis=1))
        if np.all(s == 1.0):
            continue
        rows = s.reshape((-1,) + (1,) * (dw.ndim - 1))  # per output channel of a weight of dw's rank
        if scaler.op == "Conv":  # its output channels: weight rows and bias
            replace(scaler, 1, values(scaler.inputs[1]) * rows)
            if len(scaler.inputs) > 2:
                replace(scaler, 2, values(scaler.inputs[2]) * s)
        else:
            for node in (scaler, add) if add is not None else (scaler,):
                k, c = _channel_constant(node, len(s), dw.ndim)
                replace(node, k, (c * s).reshape(rows.shape[:-1]))  # [C, 1, ..]: over axis 1 of the data
        replace(conv, 1, dw / rows)
        done += 1
    return done


def _activation_inputs(node: gs.Node) -> list[gs.Tensor]:
    if node.op in ("Conv", "Gemm", "MatMul"):
        return [node.inputs[0]]
    return [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]


class RangeObserver:
    """Per-tensor ranges over calibration samples: minmax in one pass; percentile needs the
    extremes first (`add` with histograms=False), then histograms (`add` again with True)."""

    def __init__(self):
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}

    def add(self, outs: dict[str, np.ndarray], histograms: bool = False) -> None:
        for name, x in outs.items():
            x = np.asarray(x, np.float32)
            finite = x[np.isfinite(x)] if not np.isfinite(x).all() else x
            if not finite.size:
                continue
            if histograms:
                lo, hi = self.lo[name], self.hi[name]
                h, _ = np.histogram(finite, bins=BINS, range=(lo, hi) if hi > lo else (lo, lo + 1))
                self.hist[name] = self.hist.get(name, 0) + h
            else:
                self.lo[name] = min(self.lo.get(name, 0.0), float(finite.min()))
                self.hi[name] = max(self.hi.get(name, 0.0), float(finite.max()))

    def range(self, name: str, method: str) -> tuple[float, float]:
        lo, hi = self.lo.get(name, 0.0), self.hi.get(name, 0.0)
        if method == "entropy" and name in self.hist and hi > lo:
            t = entropy_threshold(self.hist[name], lo, hi)
            return max(lo, -t), min(hi, t)
        if method == "percentile" and name in self.hist and hi > lo:
            h = self.hist[name].astype(np.float64)
            cdf = np.cumsum(h) / h.sum()
            edges = np.linspace(lo, hi, BINS + 1)
            tail = (100.0 - PERCENTILE) / 100.0
            lo = min(0.0, float(edges[np.searchsorted(cdf, tail)]))
            hi = max(0.0, float(edges[min(BINS, np.searchsorted(cdf, 1.0 - tail) + 1)]))
        return lo, hi


def entropy_threshold(hist: np.ndarray, lo: float, hi: float, levels: int = 128) -> float:
    """The |x| threshold whose clipped, `levels`-level quantized distribution is closest (KL
    divergence) to the observed one: TensorRT's entropy calibration, on the magnitudes of the
    2048-bin histogram over [lo, hi]."""
    edges = np.linspace(lo, hi, len(hist) + 1)
    centers = np.abs((edges[:-1] + edges[1:]) / 2)
    amax = max(-lo, hi)
    mags, _ = np.histogram(centers, bins=len(hist), range=(0.0, amax), weights=hist.astype(np.float64))
    best, best_kl = len(mags), np.inf
    for i in range(levels, len(mags) + 1, 16):
        kept = mags[:i]
        p = kept.copy()
        p[-1] += mags[i:].sum()  # the reference: outliers clipped into the last bin
        if kept.sum() == 0:
            continue
        q = np.zeros(i)  # the candidate: the kept bins merged into `levels`, spread back evenly
        for chunk in np.array_split(np.arange(i), levels):
            nonzero = kept[chunk] > 0
            if nonzero.any():
                q[chunk[nonzero]] = kept[chunk].sum() / nonzero.sum()
        pn, qn = p / p.sum(), q / q.sum()
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    return amax * best / len(mags)


def quant_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 scale and zero point for a range (0 always representable exactly)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


def quantize_static(graph: gs.Graph, sites: list[Site], absorbed: dict, params: dict[str, tuple],
                    names: Names, qmax: int = 63, weights: dict | None = None) -> None:
    """Write the QDQ graph for the chosen sites. params: tensor name -> (scale, zero point) from
    calibration (for an absorbed activation: under the activation's output name); weights:
    position -> `site_weights`' rounding (else to nearest)."""
    nodes = list(graph.nodes)
    graph_inputs = {id(t) for t in graph.inputs}
    done: dict[int, tuple] = {}  # quantized tensor id -> its (scale, zero point)
    inserted: dict[int, list] = {}  # node position -> Q/DQ nodes placed right after it
    before: dict[int, list] = {}  # node position -> its weight's DequantizeLinear nodes
    front: list[gs.Node] = []  # Q/DQ nodes of graph inputs

    def quantize(t: gs.Tensor, scale, zero, after: int | None):
        if id(t) in done or isinstance(t, gs.Constant):
            return
        done[id(t)] = (scale, zero)
        s_const = gs.Constant(names.new(f"{t.name}_scale"), np.array(scale, np.float32))
        z_const = gs.Constant(names.new(f"{t.name}_zero_point"), np.array(zero, np.uint8))
        q = gs.Variable(names.new(f"{t.name}_quantized"), np.uint8, t.shape)
        if id(t) in graph_inputs or not t.inputs:
            dq = gs.Variable(names.new(f"{t.name}_dequantized"), np.float32, t.shape)
            readers = [(n, k) for n in list(t.outputs) for k, x in enumerate(n.inputs) if x is t]
            for n, k in readers:
                n.inputs[k] = dq
            done[id(dq)] = (scale, zero)
            front.extend([gs.Node("QuantizeLinear", names.new(f"{t.name}_Q"), {}, [t, s_const, z_const], [q]),
                          gs.Node("DequantizeLinear", names.new(f"{t.name}_DQ"), {}, [q, s_const, z_const], [dq])])
            return
        producer = t.inputs[0]
        f = gs.Variable(names.new(f"{t.name}_float"), t.dtype, t.shape)
        producer.outputs[producer.outputs.index(t)] = f
        inserted.setdefault(after, []).extend([
            gs.Node("QuantizeLinear", names.new(f"{t.name}_Q"), {}, [f, s_const, z_const], [q]),
            gs.Node("DequantizeLinear", names.new(f"{t.name}_DQ"), {}, [q, s_const, z_const], [t])])

    position = {id(n): i for i, n in enumerate(nodes)}
    chosen = {s.index for s in sites}
    chosen_ids = {id(nodes[k]) for k in chosen}
    for i, node in enumerate(nodes):  # in order: a tensor is quantized once, by the first node that needs it
        if i not in chosen:
            if node.op in CARRY and node.domain in STANDARD_DOMAINS and node.inputs and id(node.inputs[0]) in done \
                    and node.outputs and node.outputs[0].dtype in (None, np.float32):
                quantize(node.outputs[0], *done[id(node.inputs[0])], i)  # data movement keeps the parameters
            continue
        for t in _activation_inputs(node):
            if t.name in params:
                p = position.get(id(t.inputs[0])) if t.inputs else None
                quantize(t, *params[t.name], p)
        act = absorbed.get(i)
        if act is not None:  # the activation goes; the node writes its output, quantized with its range
            y = act.outputs[0]
            node.outputs[0] = y
            act.inputs.clear()
            act.outputs.clear()
            quantize(y, *params[y.name], i)
        elif node.outputs[0].name in params and (node.op not in ("MatMul", "Gemm") or any(
                id(c) in chosen_ids or c.op in CARRY for c in node.outputs[0].outputs)):
            # a MatMul/Gemm read by nothing quantized keeps a float output (onnxruntime's
            # MatMulIntegerToFloat / QGemm with float output): no rounding of logits
            quantize(node.outputs[0], *params[node.outputs[0].name], i)
        before[i] = _quantize_weight(node, names, qmax, done, (weights or {}).get(i))
    out = list(front)
    for i, n in enumerate(nodes):
        out.extend(before.get(i, ()))
        out.append(n)
        out.extend(inserted.get(i, ()))
    graph.nodes = out


def _by_columns(node: gs.Node) -> bool:
    """Whether the weight holds an output per column ([K, N]: MatMul, Gemm without transB)."""
    return not (node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)))


def weight_rows(node: gs.Node) -> np.ndarray:
    """A weighted site's weight as [outputs, reduction] rows (a Conv's [M, C/g * kh * kw])."""
    w = np.asarray(values(node.inputs[1]), np.float32)
    return w.T if _by_columns(node) else w.reshape(w.shape[0], -1)


def _from_rows(node: gs.Node, rows: np.ndarray) -> np.ndarray:
    """`weight_rows`' inverse."""
    return np.ascontiguousarray(rows.T) if _by_columns(node) else rows.reshape(values(node.inputs[1]).shape)


def gptq_rows(w: np.ndarray, h: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of w [N, K] (the scale of round-to-nearest), each column's rounding
    error compensated in the columns not yet rounded through h = X^T X [K, K] of the calibration
    inputs (GPTQ), columns taken by decreasing h diagonal. Returns (q [N, K] int8, scale [N])."""
    n, k = w.shape
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    order = np.argsort(-np.diag(h), kind="stable")
    u, dead = inverse_factor(h[np.ix_(order, order)], k)
    if u is None:
        return quantize_columns(w.T, qmax)[0].T, scale
    wt = w[:, order].astype(np.float64)
    wt[:, dead] = 0.0  # inputs that never varied: nothing to compensate through
    sc = scale.astype(np.float64)
    q = np.zeros((n, k), np.int8)

    def round_column(col, w1, i):
        levels = np.clip(np.rint(w1[:, i] / sc), -qmax, qmax)
        q[:, col] = levels
        return levels * sc

    gptq_columns(wt, u, round_column)
    out = np.empty_like(q)
    out[:, order] = q
    return out, scale


def site_weights(nodes: dict[int, gs.Node], products: dict[int, list[np.ndarray]],
                 qmax: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """GPTQ-rounded weights (in the weight's own layout, and the scale per output channel) of the
    weighted sites that have calibration products (`calib.weight_products`), keyed by position;
    a Conv's groups are rounded each through its own product."""
    out = {}
    for i, node in nodes.items():
        if i not in products:
            continue
        hs = products[i]
        rows = weight_rows(node)
        per = len(rows) // len(hs)
        parts = [gptq_rows(rows[g * per:(g + 1) * per], h, qmax) for g, h in enumerate(hs)]
        out[i] = (_from_rows(node, np.concatenate([p[0] for p in parts])), np.concatenate([p[1] for p in parts]))
    return out


def _quantize_weight(node: gs.Node, names: Names, qmax: int, done: dict,
                     given: tuple[np.ndarray, np.ndarray] | None = None) -> list[gs.Node]:
    """The node's constant weight (and bias) as DequantizeLinear of int8 (int32) values, rounded
    to nearest unless `given` (int8 values in the weight's layout, scale per output channel);
    returns the DequantizeLinear nodes, to go before it."""
    if node.op not in ("Conv", "Gemm", "MatMul"):
        return []
    new: list[gs.Node] = []
    w = np.asarray(values(node.inputs[1]), np.float32)
    base = node.name or node.op
    if given is not None:
        q, scale = given
    else:
        q, scale = quantize_columns(weight_rows(node).T, qmax)
        q = _from_rows(node, q.T)
    axis = 1 if _by_columns(node) else 0
    node.inputs[1] = _dequantized(new, names, f"{base}_weight", q, scale, np.zeros(scale.shape, np.int8), axis,
                                  w.shape)
    x = node.inputs[0]
    has_bias = node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant)
    if has_bias and id(x) in done and not (node.op == "Gemm" and node.attrs.get("beta", 1.0) != 1.0):
        b = np.asarray(values(node.inputs[2]), np.float32)
        bias_scale = (done[id(x)][0] * scale).astype(np.float32)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            levels = np.rint(b.astype(np.float64) / bias_scale)
        # int32 at input scale x weight scale, as onnxruntime's integer kernels add it; a bias that
        # does not fit (a tiny scale) stays float: that node then runs in float
        if b.shape == scale.shape and node.attrs.get("alpha", 1.0) == 1.0 and np.all(bias_scale > 0) \
                and np.all(np.abs(levels) < 2**31 - 1):
            node.inputs[2] = _dequantized(new, names, f"{base}_bias", levels.astype(np.int32), bias_scale,
                                          np.zeros(b.shape, np.int32), 0, b.shape)
    return new


def _dequantized(new, names, base, q, scale, zero, axis, shape) -> gs.Variable:
    out = gs.Variable(names.new(f"{base}_dequantized"), np.float32, list(shape))
    node = gs.Node("DequantizeLinear", names.new(f"{base}_DQ"), {"axis": axis},
                   [gs.Constant(names.new(f"{base}_quantized"), np.ascontiguousarray(q)),
                    gs.Constant(names.new(f"{base}_scale"), scale.astype(np.float32)),
                    gs.Constant(names.new(f"{base}_zero_point"), zero)], [out])
    new.append(node)
    return out
