"""DeepSeek V4.1 attention: a sliding window plus compressed entries shared across layers.

Against V4 (architecture notes §6; official V4.1 ``inference/model.py``):

* no per-head RMS norm of the queries (ik_llama.cpp #2455: keeping V4's alone wrecks the model);
* compression ratio 2 (a softmax gate over each pair, in float32) or 1 (a plain projection),
  neither overlapping nor with ``ape``; only kv sources compress, the layers after a source
  read its entries;
* index keys ``k_norm(wk(latent))`` from the kv source's *pre-RoPE* latent (no Hadamard), then
  RoPE at the group's first position and FP4 (block 32); queries ``wq_b(qr)``, RoPE, FP4;
* a two-level top-k: the candidate source keeps its ``candidate_topk_blocks`` best blocks of
  ``candidate_block_size`` entries per query (the block holding the newest visible entry always
  kept); later index sources pick ``index_topk`` inside them;
* window KV rounded to FP8 in blocks of 32 over all dims; compressed entries to FP4 in blocks
  of 16 with e4m3 scales;
* with ``act_quant`` the inputs of the FP8 GEMMs (``wq_a``, ``wkv``, ``wq_b``, the indexer's
  ``wq_b``, ``wo_b``) are FP8-rounded in blocks of 32, as the official ``linear()`` does; the
  compressor, ``wo_a``, ``weights_proj`` and the index ``wk`` are not FP8 there and see x as is.

Selection: each query sees entries ``j < (t + 1) // ratio``; with no more than ``index_topk``
entries it attends to every visible one, otherwise to its picks (-1 = none).

Reference decode bug: the official ``Indexer.forward`` republishes an owner's keys only when its
group completes, so on the other decode steps a ratio-2 owner scores against the previous
owner's keys. We follow the intended behaviour: every index source reads its owner's keys.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..layers.attention import attend, grouped_projection
from ..layers.fake_quant import gemm_input
from ..layers.norm import RMSNorm
from ..layers.rope import RoPE
from .cache import GroupState, LayerCache, SharedState
from .quant import quantize_entry, quantize_index, quantize_window

#: Largest score piece (elements) the indexer builds at once: the [rows, N] scores top-k reads and
#: the [rows, heads, cols] products, so prefill memory stays flat with context.
SCORE_BUDGET = 1 << 22
#: Most gathered entry elements (k rows of head_dim per query) one query block decodes at once.
GATHER_BUDGET = 1 << 22


class Compressor(nn.Module):
    """Ratio 1: ``norm(wkv(x))`` per token. Ratio 2: each pair pooled by a per-channel softmax of
    ``wgate(x)`` over ``wkv(x)`` in float32, then ``norm``. Returns pre-RoPE latents."""

    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float):
        super().__init__()
        self.ratio = ratio
        self.wkv = nn.Linear(dim, head_dim, bias=False)
        if ratio > 1:
            self.wgate = nn.Linear(dim, head_dim, bias=False)
        self.norm = RMSNorm(head_dim, eps)

    def __call__(self, x: mx.array, offset: int, state: GroupState, record=None):
        """x [B, L, D] at positions offset.. -> (latents [B, n, d] or None, index of the first
        group, new state); ``n`` groups close in this chunk. ``record(kv, score)`` (a speculating
        cache's) receives the chunk's projected rows."""
        if self.ratio == 1:
            return self.norm(self.wkv(x)), offset, state
        B, L, _ = x.shape
        r = self.ratio
        xf = x.astype(mx.float32)
        kv, score = self.wkv(xf).astype(mx.float32), self.wgate(xf).astype(mx.float32)
        if record is not None:
            record(kv, score)
        m = 0
        if state.kv is not None:
            m = state.kv.shape[1]
            kv, score = mx.concatenate([state.kv, kv], axis=1), mx.concatenate([state.score, score], axis=1)
        n = (m + L) // r
        rest = GroupState(mx.contiguous(kv[:, n * r:]), mx.contiguous(score[:, n * r:])) if (m + L) % r else GroupState()
        if n == 0:
            return None, 0, rest
        kv = kv[:, : n * r].reshape(B, n, r, -1)
        score = score[:, : n * r].reshape(B, n, r, -1)
        pooled = (kv * mx.softmax(score, axis=2, precise=True)).sum(axis=2)
        return self.norm(pooled.astype(x.dtype)), (offset - m) // r, rest


class Indexer(nn.Module):
    def __init__(self, args, layer: int, rope: RoPE):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.ratio = args.compress_ratios[layer]
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.owns_keys = layer in args.kv_source_layer_ids
        if self.owns_keys:
            self.wk = nn.Linear(args.head_dim, self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.is_candidate_source = layer == args.candidate_source_layer_id
        self.uses_candidates = args.uses_candidates(layer)
        self.blocks, self.block_size = args.candidate_topk_blocks, args.candidate_block_size
        self._rope, self.fake_quant, self.act_block = rope, args.fake_quant, args.act_block  # wq_b's input rounded

    def keys(self, latent: mx.array, first: int):
        """Index keys of new groups (owners only): -> (values, packed or None)."""
        cos, sin = self._rope.cos_sin(mx.arange(first, first + latent.shape[1]) * self.ratio)
        k = self._rope(self.k_norm(self.wk(latent)), cos, sin)
        if self.fake_quant:
            return quantize_index(k)
        return k, None

    def select(self, x, qr, offset: int, cos, sin, keys: list[mx.array], shared: SharedState) -> mx.array | None:
        """Picks [B, L, k] (-1 = none), or None when every visible entry fits in k. ``keys``: the
        owner's index keys as stored (packed FP4 parts, or [values])."""
        B, L, _ = x.shape
        n = keys[0].shape[1]
        if n <= self.topk:
            return None
        q = self.wq_b(gemm_input(qr, self.act_block)).reshape(B, L, self.n_heads, self.head_dim)
        q = self._rope(q, cos[:, None], sin[:, None])
        if self.fake_quant:
            q, _ = quantize_index(q)
        q = q.astype(mx.float32)
        w = self.weights_proj(x).astype(mx.float32) * (self.head_dim**-0.5 * self.n_heads**-0.5)
        visible = (mx.arange(offset, offset + L) + 1) // self.ratio
        rows = max(1, min(L, SCORE_BUDGET // (B * n)))
        cols = max(1, min(n, SCORE_BUDGET // (B * rows * self.n_heads)))
        picks, blocks = [], []
        for s in range(0, L, rows):
            e = min(L, s + rows)
            qs = q[:, s:e].reshape(B, -1, self.head_dim)  # [B, rows*heads, d]
            pieces = []
            for c in range(0, n, cols):  # ReLU sits between the heads' products and their sum
                dots = mx.maximum(_scores(qs, [k[:, c:c + cols] for k in keys]), 0).reshape(B, e - s, self.n_heads, -1)
                pieces.append((dots * w[:, s:e, :, None]).sum(axis=2))
            scores = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)  # [B, rows, N]
            scores = mx.where(mx.arange(n)[None, :] < visible[s:e, None], scores, -mx.inf)
            if self.is_candidate_source:
                blocks.append(self._candidate_blocks(scores, visible[s:e]))
            elif self.uses_candidates:
                keep = mx.repeat(shared.candidates[:, s:e], self.block_size, axis=-1)[..., :n]
                scores = mx.where(keep, scores, -mx.inf)
            idx = mx.argpartition(-scores, kth=self.topk - 1, axis=-1)[..., : self.topk]
            picked = mx.take_along_axis(scores, idx, axis=-1)
            picks.append(mx.where(picked > -mx.inf, idx.astype(mx.int32), -1))
            if e < L:  # independent row blocks could otherwise be scored all at once
                mx.eval(picks[-1], blocks[-1] if blocks else picks[-1])
        if self.is_candidate_source:
            shared.candidates = blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=1)
        return picks[0] if len(picks) == 1 else mx.concatenate(picks, axis=1)

    def _candidate_blocks(self, scores: mx.array, visible: mx.array) -> mx.array:
        """Level one: bool [B, L, blocks] marking each query's best ``candidate_topk_blocks``
        blocks of ``candidate_block_size`` entries (a block scores its best entry)."""
        B, L, n = scores.shape
        bs = self.block_size
        nb = -(-n // bs)
        padded = mx.concatenate([scores, mx.full((B, L, nb * bs - n), -mx.inf)], axis=-1) if nb * bs > n else scores
        block = padded.reshape(B, L, nb, bs).max(axis=-1)
        newest = (visible - 1) // bs  # partly filled, so pinned in; -1 when nothing is visible
        block = mx.where(mx.arange(nb)[None, :] == newest[:, None], mx.inf, block)
        k = min(self.blocks, nb)
        top = mx.argpartition(-block, kth=k - 1, axis=-1)[..., :k]
        keep = mx.take_along_axis(block, top, axis=-1) > -mx.inf
        return mx.put_along_axis(mx.zeros((B, L, nb), dtype=mx.bool_), top, keep, axis=-1)


def _scores(q: mx.array, keys: list[mx.array]) -> mx.array:
    """q [B, M, d] . keys [B, N, d] -> [B, M, N] float32; packed FP4 keys (E8M0 per 32, low
    nibble first: MLX's mxfp4 layout) are read without dequantizing them."""
    if len(keys) == 2:
        codes, scales = keys
        return mx.quantized_matmul(q, codes.view(mx.uint32), scales, transpose=True, group_size=32, bits=4,
                                   mode="mxfp4")
    return q @ keys[0].astype(mx.float32).swapaxes(1, 2)


class Attention(nn.Module):
    def __init__(self, args, layer: int):
        super().__init__()
        D, H, hd = args.hidden_size, args.num_attention_heads, args.head_dim
        self.layer, self.n_heads, self.head_dim, self.groups = layer, H, hd, args.o_groups
        self.ratio = args.compress_ratios[layer]
        self.window, self.fake_quant = args.sliding_window, args.fake_quant
        self.act_block = args.act_block  # FP8-round the inputs of wq_a, wq_b, wkv, wo_b (official linear())
        self.wq_a = nn.Linear(D, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        self.wkv = nn.Linear(D, hd, bias=False)
        self.kv_norm = RMSNorm(hd, args.rms_norm_eps)
        self.wo_a = nn.Linear(H * hd // args.o_groups, args.o_groups * args.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, D, bias=False)
        self.attn_sink = mx.zeros((H,))
        self._rope = RoPE(args.rope_inv_freq(compressed=self.ratio > 0), args.qk_rope_head_dim)
        self.is_kv_source = layer in args.kv_source_layer_ids
        self.is_index_source = layer in args.index_source_layer_ids
        self.index_source = args.index_source(layer)
        if self.is_kv_source:
            self.compressor = Compressor(D, hd, self.ratio, args.rms_norm_eps)
        if self.is_index_source:
            self.indexer = Indexer(args, layer, self._rope)

    def __call__(self, x: mx.array, cache: LayerCache, shared: SharedState) -> mx.array:
        """x [B, L, D] at positions cache.offset.. -> [B, L, D]; appends to ``cache``."""
        B, L, _ = x.shape
        offset, dtype = cache.offset, x.dtype
        cos, sin = self._rope.cos_sin(mx.arange(offset, offset + L))
        xq = gemm_input(x, self.act_block)  # wq_a and wkv share one rounded x; the compressor reads x
        qr, q = self._queries(xq, cos, sin)

        kv = self._rope(self.kv_norm(self.wkv(xq)), cos, sin)
        parts = (kv,)
        if self.fake_quant:
            kv, parts = quantize_window(kv)
        prev = cache.window_values(dtype)
        window = kv if prev is None else mx.concatenate([prev, kv], axis=1)
        cache.push_window(parts if cache.packed else (kv,))
        qpos = mx.arange(offset, offset + L)[:, None]
        kpos = mx.arange(offset + L - window.shape[1], offset + L)[None, :]
        window_mask = mx.broadcast_to((kpos <= qpos) & (kpos > qpos - self.window), (B, L, window.shape[1]))

        store, picks = (self._compress_and_select(x, qr, cache, shared, cos, sin) if self.ratio else (None, None))
        o = self._attend(q, window, window_mask, store, picks, qpos)
        o = self._rope(o, cos[:, None], sin[:, None], inverse=True)
        o = grouped_projection(o.reshape(B, L, self.groups, -1), self.wo_a, self.groups)
        cache.offset += L
        return self.wo_b(gemm_input(o, self.act_block))

    def _queries(self, x: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array]:
        """x (rounded when act_quant is on) -> (qr [B, L, q_lora], q [B, L, H, hd]): unlike V4, no
        per-head RMS norm of q."""
        B, L, _ = x.shape
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(gemm_input(qr, self.act_block)).reshape(B, L, self.n_heads, self.head_dim)
        return qr, self._rope(q, cos[:, None], sin[:, None])

    def _compress_and_select(self, x, qr, cache: LayerCache, shared: SharedState, cos, sin):
        """Compress (sources) and select (index sources) -> (the store read, picks or None)."""
        store = cache.source
        if self.is_kv_source:
            record = cache.record_rows if cache.speculating else None
            latent, first, store.group = self.compressor(x, cache.offset, store.group, record)
            if latent is not None:
                if self.indexer.owns_keys:
                    keys, packed = self.indexer.keys(latent, first)
                    store.index_keys.append(packed if store.packed else (keys,))
                ecos, esin = self._rope.cos_sin(mx.arange(first, first + latent.shape[1]) * self.ratio)
                entries = self._rope(latent, ecos, esin)
                packed = None
                if self.fake_quant:
                    entries, packed = quantize_entry(entries)
                store.entries.append(packed if store.packed else (entries,))
        if store.entries.length == 0:
            return None, None
        if self.is_index_source:
            picks = self.indexer.select(x, qr, cache.offset, cos, sin, cache.keys.key_parts(), shared)
            shared.picks[self.layer] = picks
        else:
            picks = shared.picks[self.index_source]
        return store, picks

    def _attend(self, q, window, window_mask, store, picks, qpos):
        """Window plus compressed entries: every visible entry (j < (t + 1) // ratio) while they
        fit in ``index_topk``, else each query's picks, gathered in query blocks."""
        B, L, H, hd = q.shape
        scale = self.head_dim**-0.5
        if store is None:
            return attend(q, window, window_mask, self.attn_sink, scale)
        if picks is None:
            n = store.entries.length
            mask = mx.broadcast_to(mx.arange(n)[None, :] < (qpos + 1) // self.ratio, (B, L, n))
            return attend(q, window, window_mask, self.attn_sink, scale, store.entry_values(q.dtype), mask)
        k = picks.shape[-1]
        block = max(1, min(L, GATHER_BUDGET // (B * k * hd)))
        outs = []
        for s in range(0, L, block):
            e = min(L, s + block)
            p = picks[:, s:e]
            rows = store.gather_entries(mx.maximum(p, 0).reshape(B, -1), q.dtype).reshape(B, e - s, k, hd)
            outs.append(attend(q[:, s:e], window, window_mask[:, s:e], self.attn_sink, scale, rows, p >= 0))
            if e < L:
                mx.eval(outs[-1])
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
