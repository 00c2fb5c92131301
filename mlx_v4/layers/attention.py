"""V4 hybrid attention (paper §2.3): one shared 512-d KV head (K = V) over

* the sliding window of the last ``sliding_window`` tokens (every layer),
* plus, on ratio-128 layers (HCA), every visible compressed entry,
* plus, on ratio-4 layers (CSA), the compressed entries the lightning indexer selects.

Queries: low-rank ``wq_a -> q_norm -> wq_b``, then a weightless RMS norm per head. RoPE on the
last 64 dims (interleaved), its inverse on the output (the values carry rotated dims). A
learned per-head sink adds ``exp(sink)`` to the softmax denominator. The output projection is
grouped and low-rank: ``wo_a`` per group of heads, then ``wo_b``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .compressor import Compressor
from .fake_quant import quantize_kv_entry
from .indexer import Indexer
from .norm import RMSNorm, rms_normalize
from .rope import RoPE


def attend(q: mx.array, keys: mx.array, mask: mx.array, sinks: mx.array, scale: float) -> mx.array:
    """Softmax attention of every head over one shared K = V, with a per-head sink.

    q [B, L, H, d]; keys [B, N, d]; mask [B, L, N] (True = visible); sinks [H] -> [B, L, H, d].
    Heads fold into the query rows, so scores and output are two plain GEMMs (on MLX's CPU
    backend these use BLAS; its fused SDPA does not and is ~4x slower here)."""
    B, L, H, d = q.shape
    scores = (q.reshape(B, L * H, d) @ keys.swapaxes(1, 2)).reshape(B, L, H, -1).astype(mx.float32) * scale
    scores = mx.where(mask[:, :, None], scores, -mx.inf)
    sinks = sinks.astype(mx.float32)[:, None]
    peak = mx.maximum(scores.max(axis=-1, keepdims=True), sinks)  # [B, L, H, 1]
    weights = mx.exp(scores - peak)
    weights = weights / (weights.sum(axis=-1, keepdims=True) + mx.exp(sinks - peak))
    out = weights.astype(keys.dtype).reshape(B, L * H, -1) @ keys
    return out.reshape(B, L, H, d)


def grouped_projection(o: mx.array, layer: nn.Module, groups: int) -> mx.array:
    """o [B, L, G, in_g] through ``wo_a`` viewed as G blocks [R, in_g] -> [B, L, G*R]."""
    B, L, G, _ = o.shape
    if isinstance(layer, nn.QuantizedLinear):
        rows = layer.weight.shape[0] // groups
        outs = []
        for g in range(groups):
            sl = slice(g * rows, (g + 1) * rows)
            biases = layer.get("biases")
            outs.append(mx.quantized_matmul(
                o[:, :, g], layer.weight[sl], layer.scales[sl], None if biases is None else biases[sl],
                transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode))
        return mx.concatenate(outs, axis=-1)
    w = layer.weight.reshape(groups, -1, layer.weight.shape[-1])  # [G, R, in_g]
    return mx.einsum("blgi,gri->blgr", o, w.astype(o.dtype)).reshape(B, L, -1)


class Attention(nn.Module):
    def __init__(self, args, layer: int, fused_sdpa: bool = False):
        """``fused_sdpa``: use mx.fast.scaled_dot_product_attention (fast on Metal) instead of
        :func:`attend` (fast on the CPU); both compute the same thing."""
        super().__init__()
        D, H, hd = args.hidden_size, args.num_attention_heads, args.head_dim
        self.fused_sdpa = fused_sdpa
        self.n_heads, self.head_dim, self.groups = H, hd, args.o_groups
        self.ratio = args.compress_ratios[layer]
        self.window, self.eps, self.fake_quant = args.sliding_window, args.rms_norm_eps, args.fake_quant
        self.wq_a = nn.Linear(D, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        self.wkv = nn.Linear(D, hd, bias=False)
        self.kv_norm = RMSNorm(hd, args.rms_norm_eps)
        self.wo_a = nn.Linear(H * hd // args.o_groups, args.o_groups * args.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, D, bias=False)
        self.attn_sink = mx.zeros((H,))
        self._rope = RoPE(args.rope_inv_freq(compressed=self.ratio > 0), args.qk_rope_head_dim)
        if self.ratio:
            self.compressor = Compressor(D, hd, self.ratio, self._rope, args.rms_norm_eps,
                                         for_indexer=False, fake_quant=args.fake_quant)
        if self.ratio == 4:
            self.indexer = Indexer(args, self._rope)

    def __call__(self, x: mx.array, cache) -> mx.array:
        """x [B, L, D] at positions cache.offset .. -> [B, L, D]; appends to ``cache``."""
        B, L, _ = x.shape
        offset, dtype = cache.offset, x.dtype
        cos, sin = self._rope.cos_sin(mx.arange(offset, offset + L))

        qr = self.q_norm(self.wq_a(x))
        q = rms_normalize(self.wq_b(qr).reshape(B, L, self.n_heads, self.head_dim), self.eps)
        q = self._rope(q, cos[:, None], sin[:, None])

        kv = self._rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B, L, hd]
        packed = None
        if self.fake_quant:
            kv, packed = quantize_kv_entry(kv, self._rope.rope_dim)
        prev = cache.window_values(dtype)
        keys = kv if prev is None else mx.concatenate([prev, kv], axis=1)  # [B, P + L, hd]
        cache.push_window(packed if cache.packed else (kv,))
        qpos = mx.arange(offset, offset + L)[:, None]
        kpos = mx.arange(offset + L - keys.shape[1], offset + L)[None, :]
        mask = mx.broadcast_to((kpos <= qpos) & (kpos > qpos - self.window), (B, L, keys.shape[1]))

        if self.ratio:
            keys, mask = self._add_compressed(x, qr, cache, cos, sin, keys, mask, qpos)

        if self.fused_sdpa:
            o = mx.fast.scaled_dot_product_attention(
                q.transpose(0, 2, 1, 3), keys[:, None], keys[:, None], scale=self.head_dim**-0.5,
                mask=mask[:, None], sinks=self.attn_sink.astype(dtype)).transpose(0, 2, 1, 3)
        else:
            o = attend(q, keys, mask, self.attn_sink, self.head_dim**-0.5)
        o = self._rope(o, cos[:, None], sin[:, None], inverse=True)
        o = grouped_projection(o.reshape(B, L, self.groups, -1), self.wo_a, self.groups)
        cache.offset += L
        return self.wo_b(o)

    def _add_compressed(self, x, qr, cache, cos, sin, keys, mask, qpos):
        """Run the compressor(s) on this chunk, then append the compressed keys each query may
        see (all visible ones on HCA layers; the indexer's top-k on CSA layers) to keys/mask."""
        B, L, _ = x.shape
        dtype = x.dtype
        values, packed, cache.compressor = self.compressor(x, cache.offset, cache.compressor)
        if values is not None:
            cache.entries.append(packed if cache.packed else (values,))
        selected = None
        if self.ratio == 4:
            ivalues, ipacked, cache.index_compressor = self.indexer.compressor(
                x, cache.offset, cache.index_compressor)
            if ivalues is not None:
                cache.index_keys.append(ipacked if cache.packed else (ivalues,))
            selected = self.indexer.select(x, qr, cache.offset, cos, sin, cache.index_key_values(dtype))
        n = cache.entries.length
        if n == 0:
            return keys, mask
        visible = (qpos + 1) // self.ratio  # [L, 1] entries visible to each query
        if selected is None:
            comp = cache.entry_values(dtype)
            comp_mask = mx.broadcast_to(mx.arange(n)[None, :] < visible, (B, L, n))
        elif L == 1:
            # Decode: gather only the selected rows.
            comp = cache.gather_entries(mx.maximum(selected[:, 0], 0), dtype)  # [B, k, hd]
            comp_mask = selected >= 0  # [B, 1, k]
        else:
            comp = cache.entry_values(dtype)
            slots = mx.where(selected >= 0, selected, n)  # -1 -> a spill column dropped below
            comp_mask = mx.put_along_axis(mx.zeros((B, L, n + 1), dtype=mx.bool_), slots,
                                          mx.array(True), axis=-1)[..., :n]
        return mx.concatenate([keys, comp], axis=1), mx.concatenate([mask, comp_mask], axis=-1)
