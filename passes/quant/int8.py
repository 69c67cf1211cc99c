"""INT8 weight quantization for the `dynamic` mode: weights stored as int8, activations quantized
at run time (onnxruntime's fastest form for MatMul-heavy models on CPU).

Sites, found by `dynamic_sites`, each rewritten by `quantize_sites`:
- `matmul`: MatMul(x, W) with W a float32 constant [K, N] (x is then float32 too). `--target ort`:
  com.microsoft DynamicQuantizeMatMul(x, Wq, scale, , bias), taking in the Add of a constant [N]
  bias that follows (the kernel onnxruntime fuses the standard form into). `--target onnx`:
  DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(x_scale * w_scale), standard operators
  onnxruntime fuses into the same kernel when it loads the model.
- `gemm`: Gemm(A, B, C) with B constant and A not transposed: as `matmul` with W = alpha * op(B)
  and a bias of beta * C (ort), or an Add of it (onnx).
- `gather`: Gather from a float32 constant table [V, D] along axis 0 (word and position
  embeddings): int8 rows and one scale per row; only the rows looked up are dequantized
  (Gather -> Cast -> Mul by the gathered row scales), exactly what dequantizing the table first
  would give.
- `attention` (ort): com.microsoft Attention with a constant packed QKV weight: the projection
  becomes DynamicQuantizeMatMul, then Split into Q, K, V and MultiHeadAttention (same heads,
  scale and attention bias), with fuse's masked_keys on it: the keys a padding mask hides get K
  rows of 0 and a logit of -40, which onnxruntime's softmax runs faster than float32's lowest.
  Attention with a mask_index, past state or unequal Q/K/V sizes is left in float.

Weights are symmetric per output channel (column of W, row of a table): scale = max|w| / 127,
zero point 0. `reduce_range` uses 7 bits (max|w| / 63): onnxruntime's AVX2 kernels without VNNI
add pairs of uint8 x int8 products in int16, which saturate with full-range weights.

Not quantized here: Conv (ConvInteger is several times slower than float Conv on onnxruntime's
CPU: the static mode handles convolutions), MatMul of two activations (attention scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import STANDARD_DOMAINS, Names, output_tensors, values
from onnxopt.passes.fuse import Env
from onnxopt.passes.fuse.masked_keys import hide_masked_keys

MS = "com.microsoft"
FLOAT = onnx.TensorProto.FLOAT
MIN_ELEMENTS = 4096  # smaller weights save nothing worth a quantize/dequantize step


@dataclass
class Site:
    """One node the mode would quantize: its position in graph.nodes (stable in a graph copy)."""

    index: int
    kind: str  # matmul | gemm | gather | attention
    label: str  # the node's name (or op#index) for reports
    params: int  # weights it quantizes
    smooth: np.ndarray | None = None  # SmoothQuant factors per input channel: x / s, s * W


def quantize_columns(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of a 2-D weight: (q [K, N] int8, scale [N] float32)."""
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def dynamic_sites(graph: gs.Graph, target: str, opset_version: int) -> tuple[list[Site], dict[str, str]]:
    """The nodes the dynamic mode quantizes, and why notable others are left in float."""
    sites, skipped = [], {}
    inputs = {id(t) for t in graph.inputs}
    for i, node in enumerate(graph.nodes):
        label = node.name or f"{node.op}#{i}"
        kind, params = _site_kind(node, target, opset_version, inputs)
        if kind is not None:
            sites.append(Site(i, kind, label, params))
        elif node.op in ("Conv", "ConvTranspose") and node.domain in STANDARD_DOMAINS:
            skipped[label] = "Conv stays float in dynamic mode (ConvInteger is slower than float Conv on CPU)"
    return sites, skipped


def _float_const(t: gs.Tensor, inputs: set[int], rank: int) -> bool:
    return (isinstance(t, gs.Constant) and id(t) not in inputs and t.dtype == np.float32
            and t.shape is not None and len(t.shape) == rank)


def _site_kind(node: gs.Node, target: str, opset_version: int, inputs: set[int]) -> tuple[str | None, int]:
    ins = node.inputs
    standard = node.domain in STANDARD_DOMAINS
    if target == "onnx" and opset_version < 10:  # MatMulInteger, DynamicQuantizeLinear: opset 10
        return _gather_kind(node, inputs)
    if standard and node.op == "MatMul" and len(ins) == 2 and _float_const(ins[1], inputs, 2) \
            and np.prod(ins[1].shape) >= MIN_ELEMENTS and (ins[0].shape is None or len(ins[0].shape) >= 2):
        return "matmul", int(np.prod(ins[1].shape))
    if standard and node.op == "Gemm" and _float_const(ins[1], inputs, 2) and not node.attrs.get("transA", 0) \
            and np.prod(ins[1].shape) >= MIN_ELEMENTS \
            and (len(ins) < 3 or not ins[2].name or _bias_vector(ins[2], _gemm_n(node)) is not None):
        return "gemm", int(np.prod(ins[1].shape))
    if standard and node.op == "Gather":
        return _gather_kind(node, inputs)
    if target == "ort" and node.op == "Attention" and node.domain == MS:
        return ("attention", int(np.prod(ins[1].shape))) if _plain_attention(node, inputs) else (None, 0)
    return None, 0


def _gather_kind(node: gs.Node, inputs: set[int]) -> tuple[str | None, int]:
    data = node.inputs[0]
    if node.domain in STANDARD_DOMAINS and node.op == "Gather" and node.attrs.get("axis", 0) in (0, -2) \
            and _float_const(data, inputs, 2) and np.prod(data.shape) >= MIN_ELEMENTS:
        return "gather", int(np.prod(data.shape))
    return None, 0


def _gemm_n(node: gs.Node) -> int:
    b = node.inputs[1].shape
    return b[0] if node.attrs.get("transB", 0) else b[1]


def _bias_vector(t: gs.Tensor, n: int) -> np.ndarray | None:
    """A constant bias that is one value per output column: as a [n] float32 vector, else None."""
    if not isinstance(t, gs.Constant) or t.dtype != np.float32 or t.shape is None:
        return None
    if np.prod(t.shape) == n and (len(t.shape) == 1 or list(t.shape) == [1, n]):
        return np.asarray(values(t), np.float32).reshape(n)
    if np.prod(t.shape) == 1:
        return np.full(n, float(np.asarray(values(t)).reshape(())), np.float32)
    return None


def _plain_attention(node: gs.Node, inputs: set[int]) -> bool:
    ins = node.inputs
    if len(ins) < 2 or not _float_const(ins[1], inputs, 2) or ins[1].shape[1] % 3:
        return False
    if len(ins) > 2 and ins[2].name and _bias_vector(ins[2], ins[1].shape[1]) is None:
        return False
    if any(t.name for k, t in enumerate(ins) if k in (3, 4) or k > 5):  # mask_index, past, past length
        return False
    allowed = {"num_heads", "scale", "mask_filter_value", "unidirectional"}
    return set(node.attrs) <= allowed and not node.attrs.get("unidirectional", 0)


def quantize_sites(graph: gs.Graph, sites: list[Site], target: str, opset_version: int, names: Names,
                   reduce_range: bool = False, cache: dict | None = None) -> None:
    """Rewrite the given sites in place; each one's new nodes take its place in the node order
    (dead nodes are left for the caller's cleanup). `cache` keeps quantized weights between calls
    on copies of the same graph."""
    qmax = 63 if reduce_range else 127
    cache = {} if cache is None else cache
    graph_outputs = output_tensors(graph)
    nodes = list(graph.nodes)
    readers: dict[int, int] = {}  # how many linear sites read each input: they share its quantization
    for site in sites:
        if site.kind != "gather":
            readers[id(nodes[site.index].inputs[0])] = readers.get(id(nodes[site.index].inputs[0]), 0) + 1
    shared: dict[int, tuple] = {}  # input -> (its smoothed tensor, its quantization's outputs)
    replaced = {}
    for site in sites:
        node = nodes[site.index]
        key = (site.index, qmax)
        if key not in cache:
            cache[key] = _quantized_weight(node, site.kind, qmax, site.smooth)
        q, scale, bias = cache[key]
        if site.kind == "gather":
            new = _gather(node, q, scale, names)
        else:
            x = node.inputs[0]
            new = []
            if id(x) not in shared:
                shared[id(x)] = (x, None)
                if site.smooth is not None:  # x / s in front; the weights were multiplied by s
                    xs = _var(names, f"{x.name}_smoothed", np.float32, x.shape)
                    new.append(gs.Node("Mul", names.new(f"{x.name}_smooth"), {}, [x, _const(
                        names, f"{x.name}_smooth_inv", (1.0 / site.smooth).astype(np.float32))], [xs]))
                    shared[id(x)] = (xs, None)
                if readers[id(x)] > 1 or target == "onnx":  # one run-time quantization for all readers
                    xq = (_var(names, f"{x.name}_uint8", np.uint8), _var(names, f"{x.name}_scale", np.float32, []),
                          _var(names, f"{x.name}_zero", np.uint8, []))
                    new.append(gs.Node("DynamicQuantizeLinear", names.new(f"{x.name}_quantize"), {},
                                       [shared[id(x)][0]], list(xq)))
                    shared[id(x)] = (shared[id(x)][0], xq)
            source, quantized = shared[id(x)]
            if site.kind == "attention":
                new += _attention(node, source, quantized, q, scale, bias, opset_version, names)
            else:
                new += _linear(node, source, quantized, q, scale, bias, target, names, graph_outputs)
        node.inputs.clear()
        node.outputs.clear()
        replaced[site.index] = new
    graph.nodes = [n for i, node in enumerate(nodes) for n in replaced.get(i, (node,))]
    hide_keys(graph, replaced, target, opset_version, names)


def hide_keys(graph: gs.Graph, replaced: dict, target: str, opset_version: int, names: Names) -> None:
    """fuse's masked_keys on the MultiHeadAttention nodes written in place of Attention: a padding
    mask's keys at a logit of -40, not float32's lowest (onnxruntime's softmax runs exp of that
    slowly; see passes/fuse/masked_keys.py)."""
    written = [n for new in replaced.values() for n in new if n.op == "MultiHeadAttention"]
    if written:
        hide_masked_keys(Env(graph, target, opset_version, names), written)


def _quantized_weight(node: gs.Node, kind: str, qmax: int, smooth: np.ndarray | None):
    """(int8 weight, its scales, the float bias or None) of a site, in the layout its rewrite uses:
    [K, N] with a scale per column for the linear kinds, the table's [V, D] with a scale per row."""
    if kind == "gather":
        q, scale = quantize_columns(np.asarray(values(node.inputs[0]), np.float32).T, 127)  # rows = columns of .T
        return q.T, scale.reshape(-1, 1), None
    w, bias = linear_weight(node, kind)
    if smooth is not None:
        w = w * smooth[:, None]
    q, scale = quantize_columns(w, qmax)
    return q, scale, bias


def linear_weight(node: gs.Node, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A linear site's float weight as [K, N] (y = x @ W + bias) and its bias vector or None."""
    w = np.asarray(values(node.inputs[1]), np.float32)
    bias = None
    if kind == "gemm":
        a = node.attrs
        w = (w.T if a.get("transB", 0) else w) * np.float32(a.get("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = _bias_vector(node.inputs[2], w.shape[1]) * np.float32(a.get("beta", 1.0))
    elif kind == "attention" and len(node.inputs) > 2 and node.inputs[2].name:
        bias = _bias_vector(node.inputs[2], w.shape[1])
    return w, bias


# ----------------------------------------------------------------------------------- SmoothQuant

ALPHAS = (0.5, 0.7, 0.8, 0.9)  # migration strengths tried per site (SmoothQuant's alpha)
SMOOTH_GAIN = 0.5  # smoothing is used where it cuts the simulated error to this fraction or less


def simulate_dynamic(x: np.ndarray) -> np.ndarray:
    """x through DynamicQuantizeLinear (uint8, range over the whole tensor, zero included) and back."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255 or 1.0
    zero = float(np.clip(np.rint(-lo / scale), 0, 255))
    return ((np.clip(np.rint(x / np.float32(scale)) + zero, 0, 255) - zero) * np.float32(scale)).astype(np.float32)


def output_error(w: np.ndarray, samples: list[np.ndarray], qmax: int, smooth: np.ndarray | None) -> float:
    """Relative squared error of x @ w with dynamic int8 activations and per-column int8 weights,
    each sample quantized on its own range as at run time."""
    ws = w if smooth is None else w * smooth[:, None]
    q, scale = quantize_columns(ws, qmax)
    wq = q.astype(np.float32) * scale
    err = ref = 0.0
    for x in samples:
        y = x @ w
        xs = x if smooth is None else x / smooth
        err += float(np.square(y - simulate_dynamic(xs) @ wq).sum())
        ref += float(np.square(y).sum())
    return err / ref if ref else 0.0


def choose_smoothing(w: np.ndarray, samples: list[np.ndarray], qmax: int) -> tuple[np.ndarray | None, float, float]:
    """SmoothQuant for one linear site: the factors s = max|x_k|^a / max|w_k|^(1-a) with the `a`
    of ALPHAS that gives the least simulated output error, or None when none beats plain
    quantization by SMOOTH_GAIN. Returns (factors or None, plain error, chosen error)."""
    amax = np.max([np.abs(x).max(axis=0) for x in samples], axis=0)
    wmax = np.abs(w).max(axis=1)
    plain = output_error(w, samples, qmax, None)
    best, best_err = None, plain
    for alpha in ALPHAS:
        s = np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        s = np.clip(s, 1e-3, 1e3).astype(np.float32)
        s[amax == 0] = 1.0
        err = output_error(w, samples, qmax, s)
        if err < best_err:
            best, best_err = s, err
    if best is None or best_err > SMOOTH_GAIN * plain:
        return None, plain, plain
    return best, plain, best_err


def _const(names: Names, base: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(names.new(base), np.ascontiguousarray(value))


def _var(names: Names, base: str, dtype, shape=None) -> gs.Variable:
    return gs.Variable(names.new(base), dtype=dtype, shape=shape)


def _absorbable_bias(y: gs.Tensor, n: int, graph_outputs: set[int]):
    """The Add right after `y` of a constant [n] bias, when y has no other reader: (node, bias).
    A com.microsoft BiasGelu(y, bias) counts too: its bias goes into the matmul, a Gelu stays."""
    if id(y) in graph_outputs or len(y.outputs) != 1:
        return None
    add = y.outputs[0]
    if add.op == "BiasGelu" and add.domain == MS and len(add.inputs) == 2 and add.inputs[0] is y:
        bias = _bias_vector(add.inputs[1], n)
        return None if bias is None else (add, bias)
    if add.op != "Add" or add.domain not in STANDARD_DOMAINS or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    bias = _bias_vector(other, n)
    if bias is None or add.outputs[0].shape is not None and y.shape is not None \
            and len(add.outputs[0].shape) != len(y.shape):
        return None  # a bias that broadcasts y to a higher rank is not a plain bias
    return add, bias


def _linear(node, x, xq, q, scale, bias, target, names, graph_outputs) -> list[gs.Node]:
    """y = x @ w (+ bias) with int8 weights. x is quantized at run time: by DynamicQuantizeMatMul
    itself, or already (xq: DynamicQuantizeLinear's uint8 tensor, scale and zero point)."""
    y = node.outputs[0]
    base = node.name or "matmul"
    wq, ws = _const(names, f"{base}_w_int8", q), _const(names, f"{base}_w_scale", scale)
    if target == "ort":
        if bias is None:
            found = _absorbable_bias(y, q.shape[1], graph_outputs)
            if found is not None:
                add, bias = found
                if add.op == "BiasGelu":  # y + bias goes on to a plain Gelu
                    add.op = "Gelu"
                    add.inputs.pop(1)
                else:
                    y = add.outputs[0]
                    add.inputs.clear()
                    add.outputs.clear()
        b = [_const(names, f"{base}_bias", bias)] if bias is not None else []
        if xq is None:
            ins = [x, wq, ws] + ([gs.Variable.empty()] + b if b else [])
            return [gs.Node("DynamicQuantizeMatMul", names.new(f"{base}_int8"), {}, ins, [y], domain=MS)]
        ins = [xq[0], wq, xq[1], ws, xq[2]] + ([gs.Variable.empty()] + b if b else [])
        return [gs.Node("MatMulIntegerToFloat", names.new(f"{base}_int8"), {}, ins, [y], domain=MS)]
    acc = _var(names, f"{base}_int32", np.int32)
    acc_f = _var(names, f"{base}_int32_float", np.float32)
    both = _var(names, f"{base}_scale", np.float32, [q.shape[1]])
    out = y if bias is None else _var(names, f"{base}_nobias", np.float32)
    new = [
        gs.Node("MatMulInteger", names.new(f"{base}_int8"), {}, [xq[0], wq, xq[2]], [acc]),
        gs.Node("Cast", names.new(f"{base}_cast"), {"to": FLOAT}, [acc], [acc_f]),
        gs.Node("Mul", names.new(f"{base}_scales"), {}, [xq[1], ws], [both]),
        gs.Node("Mul", names.new(f"{base}_rescale"), {}, [acc_f, both], [out]),
    ]
    if bias is not None:
        new.append(gs.Node("Add", names.new(f"{base}_bias"), {}, [out, _const(names, f"{base}_bias", bias)], [y]))
    return new


def _gather(node, q, scale, names) -> list[gs.Node]:
    """Gather rows of an int8 table and multiply each by its own row scale."""
    base = node.name or "gather"
    idx, y = node.inputs[1], node.outputs[0]
    rows = _var(names, f"{base}_int8", np.int8)
    rows_f = _var(names, f"{base}_int8_float", np.float32)
    row_scale = _var(names, f"{base}_row_scale", np.float32)
    return [
        gs.Node("Gather", names.new(f"{base}_int8"), {"axis": 0}, [_const(names, f"{base}_table_int8", q), idx],
                [rows]),
        gs.Node("Cast", names.new(f"{base}_cast"), {"to": FLOAT}, [rows], [rows_f]),
        gs.Node("Gather", names.new(f"{base}_scales"), {"axis": 0},
                [_const(names, f"{base}_table_scale", scale), idx], [row_scale]),
        gs.Node("Mul", names.new(f"{base}_dequantize"), {}, [rows_f, row_scale], [y]),
    ]


def _attention(node, x, xq, q, scale, bias, opset_version, names) -> list[gs.Node]:
    """com.microsoft Attention -> int8 packed-QKV projection + Split + MultiHeadAttention."""
    hidden = q.shape[1] // 3
    base = node.name or "attention"
    qkv = _var(names, f"{base}_qkv", np.float32)
    wq, ws = _const(names, f"{base}_qkv_w_int8", q), _const(names, f"{base}_qkv_w_scale", scale)
    b = [gs.Variable.empty(), _const(names, f"{base}_qkv_bias", bias)] if bias is not None else []
    if xq is None:
        projection = gs.Node("DynamicQuantizeMatMul", names.new(f"{base}_qkv_int8"), {}, [x, wq, ws] + b, [qkv],
                             domain=MS)
    else:
        projection = gs.Node("MatMulIntegerToFloat", names.new(f"{base}_qkv_int8"), {},
                             [xq[0], wq, xq[1], ws, xq[2]] + b, [qkv], domain=MS)
    return [projection] + _attention_core(node, qkv, hidden, opset_version, names)


def _attention_core(node, qkv, hidden, opset_version, names) -> list[gs.Node]:
    """What follows a packed QKV projection `qkv` that replaced Attention `node`: Split into Q, K,
    V and MultiHeadAttention with the node's heads, scale, mask value and attention bias."""
    base = node.name or "attention"
    x = node.inputs[0].shape
    parts = [_var(names, f"{base}_{p}", np.float32, list(x[:-1]) + [hidden] if x is not None and len(x) == 3 else None)
             for p in "qkv"]
    sizes = np.array([hidden] * 3, np.int64)
    split = gs.Node("Split", names.new(f"{base}_split"), {"axis": -1}, [qkv], parts)
    if opset_version >= 13:
        split.inputs.append(_const(names, f"{base}_split_sizes", sizes))
    else:
        split.attrs["split"] = [int(s) for s in sizes]
    attention_bias = node.inputs[5] if len(node.inputs) > 5 and node.inputs[5].name else gs.Variable.empty()
    mha_ins = parts + ([gs.Variable.empty(), gs.Variable.empty(), attention_bias] if attention_bias.name else [])
    attrs = {k: v for k, v in node.attrs.items() if k in ("num_heads", "scale", "mask_filter_value")}
    return [split,
            gs.Node("MultiHeadAttention", names.new(f"{base}_mha"), attrs, mha_ins, list(node.outputs), domain=MS)]
