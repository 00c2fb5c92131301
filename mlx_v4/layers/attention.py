"""V4 hybrid attention (paper §2.3): one shared 512-d KV head (K = V) over

* the sliding window of the last ``sliding_window`` tokens (every layer),
* plus, on ratio-128 layers (HCA), every visible compressed entry,
* plus, on ratio-4 layers (CSA), the compressed entries the lightning indexer selects.

Queries: low-rank ``wq_a -> q_norm -> wq_b``, then a weightless RMS norm per head. RoPE on the
last 64 dims (interleaved), its inverse on the output (the values carry rotated dims). A
learned per-head sink adds ``exp(sink)`` to the softmax denominator. The output projection is
grouped and low-rank: ``wo_a`` per group of heads, then ``wo_b``.

Memory: queries are processed in blocks sized so that the score matrix stays under
:data:`SCORE_BUDGET` elements; CSA queries gather only their selected entries once scoring all
of them would dequantize more than :data:`DEQUANT_BUDGET` elements, in blocks of at most
:data:`GATHER_BUDGET` gathered elements, each evaluated before the next. A prefill chunk's
working set therefore does not grow with the context (benchmarks/kv_memory.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..kernels.attend import attend
from ..kernels.sparse_decode import sparse_decode_attention
from ..kernels.sparse_prefill import sparse_prefill_attention
from .compressor import Compressor
from .fake_quant import gemm_input, quantize_kv_entry
from .indexer import Indexer
from .norm import RMSNorm, rms_normalize
from .rope import RoPE

#: Largest score matrix (elements) one query block may build.
SCORE_BUDGET = 1 << 24
#: Most compressed-entry elements a CSA layer dequantizes at once to score them all under a pick
#: mask (4 MB in float32); past it the picks are gathered, so prefill memory stays flat.
DEQUANT_BUDGET = 1 << 20
#: Most gathered entry elements one query block decodes at once (k rows of head_dim per query;
#: 16 MB in float32, decoded through a few temporaries of that size).
GATHER_BUDGET = 1 << 22
#: Tests force one way of reading CSA picks ("gather" or "mask"); None chooses by cost.
PICKS_PATH: str | None = None
#: In a batched step, decode rows of window-only layers whose window is full attend together
#: (one stacked attention); False runs every row on its own (the reference, for tests).
BATCH_WINDOW_DECODE = True


def grouped_projection(o: mx.array, layer: nn.Module, groups: int) -> mx.array:
    """o [B, L, G, in_g] through ``wo_a`` viewed as G blocks [R, in_g] -> [B, L, G*R]."""
    B, L, G, _ = o.shape
    if isinstance(layer, nn.QuantizedLinear):
        rows = layer.weight.shape[0] // groups
        biases = layer.get("biases")
        outs = []
        for g in range(groups):
            sl = slice(g * rows, (g + 1) * rows)
            outs.append(mx.quantized_matmul(
                o[:, :, g], layer.weight[sl], layer.scales[sl], None if biases is None else biases[sl],
                transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode))
        return mx.concatenate(outs, axis=-1)
    w = layer.weight.reshape(groups, -1, layer.weight.shape[-1])  # [G, R, in_g]
    return mx.einsum("blgi,gri->blgr", o, w.astype(o.dtype)).reshape(B, L, -1)


class Attention(nn.Module):
    def __init__(self, args, layer: int, use_kernel: bool = False):
        """``use_kernel``: the Metal kernels read the packed FP8 cache rows directly: decode
        steps on CSA layers (kernel 1, mlx_v4/kernels/sparse_decode.py), prefill chunks on
        compressed layers (kernel 2, sparse_prefill.py), the indexer (kernel 3)."""
        super().__init__()
        self.use_kernel = use_kernel
        D, H, hd = args.hidden_size, args.num_attention_heads, args.head_dim
        self.n_heads, self.head_dim, self.groups = H, hd, args.o_groups
        self.ratio = args.compress_ratios[layer]
        self.window, self.eps, self.fake_quant = args.sliding_window, args.rms_norm_eps, args.fake_quant
        self.act_quant = args.act_quant  # FP8-round the inputs of wq_a, wq_b, wkv, wo_b (official linear())
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
            self.indexer = Indexer(args, self._rope, use_kernel=use_kernel)

    def __call__(self, x: mx.array, cache) -> mx.array:
        """x [B, L, D] at positions cache.offset .. -> [B, L, D]; appends to ``cache``."""
        L = x.shape[1]
        cos, sin = self._rope.cos_sin(mx.arange(cache.offset, cache.offset + L))
        q, kv, packed, qr = self.project(x, cos, sin)
        return self.output(self.attend_cached(x, qr, q, kv, packed, cache, cos, sin), cos, sin)

    def call_rows(self, x: mx.array, caches: list, bounds: list[tuple[int, int]], positions: mx.array) -> mx.array:
        """Several sequences' tokens stacked along L: x [1, T, D], row r = x[:, s:e] for
        ``bounds[r] = (s, e)`` continuing ``caches[r]``; positions [T] -> [1, T, D]. The
        projections run over all T tokens at once; only the cache-reading part runs per row."""
        cos, sin = self._rope.cos_sin(positions)  # [T, rope_dim / 2]
        q, kv, packed, qr = self.project(x, cos, sin)
        outs = [None] * len(bounds)
        together = self._full_window_decode_rows(caches, bounds)
        if together:
            o = self._attend_windows([caches[r] for r in together], [bounds[r][0] for r in together], q, kv, packed)
            for i, r in enumerate(together):
                outs[r] = o[i:i + 1]
        for r, ((s, e), cache) in enumerate(zip(bounds, caches, strict=True)):
            if outs[r] is None:
                part = None if packed is None else tuple(p[:, s:e] for p in packed)
                outs[r] = self.attend_cached(x[:, s:e], qr[:, s:e], q[:, s:e], kv[:, s:e], part, cache,
                                             cos[s:e], sin[s:e])
        o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)  # [1, T, H, hd]
        return self.output(o, cos, sin)

    def _full_window_decode_rows(self, caches, bounds) -> list[int]:
        """Rows that can attend as one batch: on a window-only layer, one query each, over a
        full window (so every kept entry is visible and all windows have the same length)."""
        if not BATCH_WINDOW_DECODE or self.ratio:
            return []
        keep = self.window - 1
        rows = [r for r, ((s, e), c) in enumerate(zip(bounds, caches))
                if e - s == 1 and c.window_parts and c.window_parts[0].shape[1] == keep]
        return rows if len(rows) > 1 else []

    def _attend_windows(self, caches, starts, q, kv, packed) -> mx.array:
        """Decode rows over full windows in one attention: -> o [R, 1, H, hd]. Same function as
        :meth:`attend_cached` for each row (window-only layer, every kept entry visible)."""
        idx = mx.array(starts)
        prev = caches[0]._decode_entries([mx.concatenate(parts, axis=0) for parts in
                                          zip(*(c.window_parts for c in caches))], q.dtype)  # [R, P, hd]
        window = mx.concatenate([prev, kv[0, idx][:, None]], axis=1)  # [R, P + 1, hd]
        R, W = window.shape[:2]
        o = attend(q[0, idx][:, None], window, mx.ones((R, 1, W), dtype=mx.bool_), self.attn_sink,
                   self.head_dim**-0.5)
        for c, s in zip(caches, starts):
            c.push_window(tuple(p[:, s:s + 1] for p in packed) if c.packed else (kv[:, s:s + 1],))
            c.offset += 1
        return o

    def project(self, x: mx.array, cos: mx.array, sin: mx.array):
        """Per-token projections: x [B, L, D] -> (q [B, L, H, hd] RoPE'd, kv [B, L, hd] RoPE'd
        (rounded under fake_quant), its packed form or None, qr [B, L, q_lora])."""
        B, L, _ = x.shape
        xq = gemm_input(x, self.act_quant)  # wq_a and wkv share one rounded x
        qr = self.q_norm(self.wq_a(xq))
        q = rms_normalize(self.wq_b(gemm_input(qr, self.act_quant)).reshape(B, L, self.n_heads, self.head_dim),
                          self.eps)
        q = self._rope(q, cos[:, None], sin[:, None])
        kv = self._rope(self.kv_norm(self.wkv(xq)), cos, sin)  # [B, L, hd]
        packed = None
        if self.fake_quant:
            kv, packed = quantize_kv_entry(kv, self._rope.rope_dim)
        return q, kv, packed, qr

    def attend_cached(self, x, qr, q, kv, packed, cache, cos, sin) -> mx.array:
        """One sequence's attention over its cache (window, compressor, indexer), appending
        this chunk to it: -> o [B, L, H, hd] (still rotated; see :meth:`output`)."""
        B, L, _ = x.shape
        offset, dtype = cache.offset, x.dtype
        prev = cache.window_values(dtype)
        window = kv if prev is None else mx.concatenate([prev, kv], axis=1)  # [B, P + L, hd]
        cache.push_window(packed if cache.packed else (kv,))
        qpos = mx.arange(offset, offset + L)[:, None]
        kpos = mx.arange(offset + L - window.shape[1], offset + L)[None, :]
        window_mask = mx.broadcast_to((kpos <= qpos) & (kpos > qpos - self.window), (B, L, window.shape[1]))

        comp, selected = None, None
        if self.ratio:
            comp, selected = self._compress(x, qr, cache, cos, sin)
        o = self._attend_blocks(q, window, window_mask, comp, selected, cache, qpos)
        cache.offset += L
        return o

    def output(self, o: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """o [B, L, H, hd] -> inverse RoPE -> grouped low-rank output projection -> [B, L, D]."""
        B, L = o.shape[:2]
        o = self._rope(o, cos[:, None], sin[:, None], inverse=True)
        # wo_a is a plain bf16 einsum in the official code (its input is not rounded)
        o = grouped_projection(o.reshape(B, L, self.groups, -1), self.wo_a, self.groups)
        return self.wo_b(gemm_input(o, self.act_quant))

    def _compress(self, x, qr, cache, cos, sin):
        """Run the compressor(s) on this chunk and append their entries to the cache.
        Returns (all compressed entries [B, N, hd] or None, indexer picks [B, L, k] or None)."""
        dtype = x.dtype
        keep = cache.speculating  # record this chunk's rows so a rejected tail can be dropped
        values, packed, cache.compressor = self.compressor(x, cache.offset, cache.compressor, keep_rows=keep)
        cache.record_rows("compressor", cache.compressor)
        if values is not None:
            cache.entries.append(packed if cache.packed else (values,))
        selected = None
        if self.ratio == 4:
            ivalues, ipacked, cache.index_compressor = self.indexer.compressor(
                x, cache.offset, cache.index_compressor, keep_rows=keep)
            cache.record_rows("index_compressor", cache.index_compressor)
            if ivalues is not None:
                cache.index_keys.append(ipacked if cache.packed else (ivalues,))
            selected = self.indexer.select(x, qr, cache.offset, cos, sin, cache.index_key_parts(),
                                           packed=cache.index_keys.parts if cache.packed else None)
        if cache.entries.length == 0:
            return None, None
        return (cache.entry_values(dtype) if selected is None else None), selected

    @staticmethod
    def _gather_picks(L: int, H: int, hd: int, n: int, k: int) -> bool:
        """Gather the picked rows unless scoring every entry under a mask is cheaper: it is
        while the heads' dot products with all N entries cost less than reading k rows per query
        (H*N <= k*hd), the L*k gathered rows outnumber the N rows to dequantize, and the N
        dequantized rows stay within DEQUANT_BUDGET (so memory does not grow with context)."""
        if PICKS_PATH is not None:
            return PICKS_PATH == "gather"
        return H * n > k * hd or L * k < n or n * hd > DEQUANT_BUDGET

    def _attend_blocks(self, q, window, window_mask, comp, selected, cache, qpos):
        """Attention in query blocks. HCA (and CSA while every entry is visible) attend to the
        compressed entries under the causal rule ``i < (t + 1) // ratio``; CSA queries attend to
        their own picks (-1 = none), gathered per query or scored against all entries under a
        pick mask (see :meth:`_gather_picks`)."""
        B, L, H, hd = q.shape
        if self.use_kernel and L == 1 and selected is not None and cache.packed:
            # Every kept window row is visible to the one query; the kernel gathers and
            # dequantizes the picked rows itself (the whole store: picks index below length).
            return sparse_decode_attention(q[:, 0], window, *cache.entries.parts, selected[:, 0], self.attn_sink,
                                           scale=self.head_dim**-0.5, use_kernel=True)[:, None]
        n = cache.entries.length if self.ratio else 0
        if self.use_kernel and L > 1 and n and cache.packed:
            # Each query reads its window rows and its picks (or every entry it may see) straight
            # from the packed store: no gathered or dequantized copies, no query blocks.
            return sparse_prefill_attention(q, window, *cache.entries.parts, selected, self.attn_sink,
                                            scale=self.head_dim**-0.5, offset=cache.offset,
                                            sliding_window=self.window, ratio=self.ratio, n_entries=n,
                                            use_kernel=True)
        gather = selected is not None and self._gather_picks(L, H, hd, n, selected.shape[-1])
        if selected is not None and not gather:
            comp = cache.entry_values(q.dtype)
        if gather:  # the gathered rows are decoded through several temporaries of their size
            block = max(1, min(L, GATHER_BUDGET // (B * selected.shape[-1] * hd),
                               SCORE_BUDGET // (B * H * (window.shape[1] + selected.shape[-1]))))
        else:
            block = max(1, min(L, SCORE_BUDGET // (B * H * (window.shape[1] + n))))
        outs = []
        for s in range(0, L, block):
            e = min(L, s + block)
            comp_blk, comp_mask = None, None
            if gather:
                picks = selected[:, s:e]
                rows = cache.gather_entries(mx.maximum(picks, 0).reshape(B, -1), q.dtype)
                comp_blk, comp_mask = rows.reshape(B, e - s, picks.shape[-1], -1), picks >= 0
            elif selected is not None:
                slots = mx.where(selected[:, s:e] >= 0, selected[:, s:e], n)  # -1 -> a spill column
                comp_mask = mx.put_along_axis(mx.zeros((B, e - s, n + 1), dtype=mx.bool_), slots,
                                              mx.array(True), axis=-1)[..., :n]
                comp_blk = comp
            elif comp is not None:
                visible = (qpos[s:e] + 1) // self.ratio
                comp_blk, comp_mask = comp, mx.broadcast_to(mx.arange(n)[None, :] < visible, (B, e - s, n))
            outs.append(attend(q[:, s:e], window, window_mask[:, s:e], self.attn_sink, self.head_dim**-0.5,
                               comp_blk, comp_mask))
            if gather and e < L:
                # Blocks are independent, so MLX may run several blocks' gathers at once (781 MB
                # instead of 92 at 32K context): finishing each block bounds the working set.
                mx.eval(outs[-1])
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
