"""INT4 weight-only quantization for the `int4` mode (`--target ort`): 4-bit weights in blocks of
BLOCK values along the reduction axis, each block with its own float scale and 4-bit zero point
(asymmetric: the block's min..max onto 0..15); activations stay float.

Sites are those of the dynamic mode (int8.dynamic_sites), rewritten to onnxruntime's kernels:
- `matmul` / `gemm`: com.microsoft MatMulNBits(x, B, scales, zero_points) (a Gemm's bias in an Add);
- `attention`: MatMulNBits for the packed QKV projection, then Split and MultiHeadAttention;
- `gather` (embeddings): com.microsoft GatherBlockQuantized, blocks along the embedding axis.

Two ways to round (`quant.method`):
- `rtn`: each block rounded to its nearest levels;
- `gptq` (the default with calibration data): GPTQ (Frantar et al. 2022). Columns of the weight
  are quantized in order along the reduction axis and each one's rounding error is compensated
  in the columns not yet quantized, weighted by the inverse of H = X^T X from the layer's
  calibration inputs, so the layer's outputs on real inputs move least. Block scales are set
  when a block is reached, from the already-compensated weights. Embedding tables use rtn.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import Names, values

from .calib import gptq_columns, inverse_factor
from .int8 import MS, Site, _attention_core, _const, _var, hide_keys, linear_weight

BLOCK = 32


def quantize_blocks(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest 4-bit of w [K, N] in blocks of `block` along K: (q [N, K'] uint8 in 0..15,
    scales [N, K'/block], zero points [N, K'/block] uint8), K' = K rounded up to whole blocks (the
    padding is zeros)."""
    wt = _padded(w, block)  # [N, K']
    n, k = wt.shape
    blocks = wt.reshape(n, k // block, block)
    lo, hi = np.minimum(blocks.min(axis=2), 0.0), np.maximum(blocks.max(axis=2), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(blocks / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return q.reshape(n, k), scale, zero


def _padded(w: np.ndarray, block: int) -> np.ndarray:
    k = w.shape[0]
    pad = -k % block
    wt = np.ascontiguousarray(w.T, dtype=np.float32)
    return np.pad(wt, ((0, 0), (0, pad))) if pad else wt


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int, block: int = BLOCK) -> np.ndarray:
    """The float weight [k, N] that (q, scale, zero) stand for."""
    n = q.shape[0]
    blocks = q.reshape(n, -1, block).astype(np.float32) - zero[..., None]
    return (blocks * scale[..., None]).reshape(n, -1)[:, :k].T


def gptq(w: np.ndarray, h: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ with 4-bit blocks: like quantize_blocks, the rounding errors compensated through
    h = X^T X [K, K] of the layer's calibration inputs."""
    wt = _padded(w, block).astype(np.float64)  # [N, K']: a row per output, columns along K
    n, k = wt.shape
    u, dead = inverse_factor(h, k)
    if u is None:
        return quantize_blocks(w, block)
    wt[:, dead] = 0.0  # inputs that never varied (and the padding): nothing to compensate
    q = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, k // block), np.float32)
    zeros = np.zeros((n, k // block), np.uint8)
    scale = zero = None

    def round_column(col, w1, i):
        nonlocal scale, zero
        if col % block == 0:  # a new block: its scale from the weights as compensated so far
            b = w1[:, i:i + block]
            lo, hi = np.minimum(b.min(axis=1), 0.0), np.maximum(b.max(axis=1), 0.0)
            scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
            zero = np.clip(np.rint(-lo / scale), 0, 15)
            scales[:, col // block], zeros[:, col // block] = scale, zero
        levels = np.clip(np.rint(w1[:, i] / scale) + zero, 0, 15)
        q[:, col] = levels
        return (levels - zero) * scale

    gptq_columns(wt, u, round_column)
    return q, scales, zeros


def _pack(q: np.ndarray) -> np.ndarray:
    """4-bit values [..., 2m] into bytes [..., m]: the even index in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _pack_zeros(zero: np.ndarray) -> np.ndarray:
    """Zero points [N, blocks] into bytes [N, ceil(blocks / 2)]."""
    if zero.shape[1] % 2:
        zero = np.pad(zero, ((0, 0), (0, 1)))
    return _pack(zero)


def quantize_sites(graph: gs.Graph, sites: list[Site], weights: dict, opset_version: int, names: Names,
                   accuracy_level: int = 0) -> None:
    """Rewrite the sites in place with their 4-bit weights (weights[site.index] = (q, scales,
    zeros) in quantize_blocks' layout); each one's new nodes take its place in the node order."""
    nodes = list(graph.nodes)
    replaced = {}
    for site in sites:
        node = nodes[site.index]
        q, scale, zero = weights[site.index]
        base = node.name or node.op
        if site.kind == "gather":
            new = [gs.Node("GatherBlockQuantized", names.new(f"{base}_int4"),
                           {"gather_axis": 0, "quantize_axis": 1, "block_size": BLOCK, "bits": 4},
                           [_const(names, f"{base}_table_int4", _pack(q)), node.inputs[1],
                            _const(names, f"{base}_table_scale", scale),
                            _const(names, f"{base}_table_zero", _pack_zeros(zero))],
                           list(node.outputs), domain=MS)]
        else:
            w, bias = linear_weight(node, site.kind)
            k, n = w.shape
            out = node.outputs[0] if site.kind != "attention" else _var(names, f"{base}_qkv", np.float32)
            y = out if bias is None or site.kind == "attention" else _var(names, f"{base}_nobias", np.float32)
            packed = _pack(q.reshape(n, -1, BLOCK))  # [N, blocks, BLOCK / 2]
            ins = [node.inputs[0], _const(names, f"{base}_w_int4", packed),
                   _const(names, f"{base}_w_scale", scale.reshape(-1)),
                   _const(names, f"{base}_w_zero", _pack_zeros(zero).reshape(-1))]
            attrs = {"K": k, "N": n, "bits": 4, "block_size": BLOCK, "accuracy_level": accuracy_level}
            new = [gs.Node("MatMulNBits", names.new(f"{base}_int4"), attrs, ins, [y], domain=MS)]
            if site.kind == "attention":
                if bias is not None:
                    biased = _var(names, f"{base}_qkv_biased", np.float32)
                    new.append(gs.Node("Add", names.new(f"{base}_qkv_bias"), {},
                                       [y, _const(names, f"{base}_qkv_bias", bias)], [biased]))
                    y = biased
                new += _attention_core(node, y, n // 3, opset_version, names)
            elif bias is not None:
                new.append(gs.Node("Add", names.new(f"{base}_bias"), {}, [y, _const(names, f"{base}_bias", bias)],
                                   [out]))
        node.inputs.clear()
        node.outputs.clear()
        replaced[site.index] = new
    graph.nodes = [n for i, node in enumerate(nodes) for n in replaced.get(i, (node,))]
    hide_keys(graph, replaced, "ort", opset_version, names)


def site_weight(node: gs.Node, kind: str, h: np.ndarray | None):
    """(q, scales, zeros) of a site: GPTQ when h (X^T X of its input) is given, else rtn."""
    if kind == "gather":
        return quantize_blocks(np.asarray(values(node.inputs[0]), np.float32).T)  # blocks along the row
    w, _ = linear_weight(node, kind)
    return gptq(w, h) if h is not None else quantize_blocks(w)
