"""Lightning indexer (paper §2.3.1 eqs. 13-17): picks, per query, the top-k ratio-4
compressed entries that sparse attention will read.

Keys come from the indexer's own ratio-4 compressor at ``index_head_dim``; queries from the
low-rank query ``qr``. Both are RoPE'd (compressed-layer frequencies), Hadamard-rotated and
rounded to FP4 as in the official code. The score of entry s for query t is
``sum_h w_h(t) * ReLU(q_h(t) . K_s)`` with ``w = weights_proj(x) * d^-0.5 * n_heads^-0.5``;
only entries with ``s < (t + 1) // 4`` are visible.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..kernels.indexer_topk import indexer_topk
from .compressor import Compressor
from .fake_quant import fake_quant_fp4, gemm_input, hadamard
from .rope import RoPE

#: Largest score piece (elements) the indexer builds at once: [rows, heads, cols] products and
#: the [rows, N] scores top-k reads (4 MB in float32, so prefill memory stays flat with context).
SCORE_BUDGET = 1 << 20


class Indexer(nn.Module):
    def __init__(self, args, rope: RoPE, use_kernel: bool = False):
        """``use_kernel``: score the packed FP4 keys and pick the top k with the Metal kernels
        (mlx_v4/kernels/indexer_topk.py) when :meth:`select` is given them."""
        super().__init__()
        self.use_kernel = use_kernel
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(args.hidden_size, self.head_dim, 4, rope, args.rms_norm_eps,
                                     for_indexer=True, fake_quant=args.fake_quant)
        self._rope = rope
        self.fake_quant, self.act_quant = args.fake_quant, args.act_quant  # wq_b's input FP8-rounded

    def select(self, x: mx.array, qr: mx.array, offset: int, cos: mx.array, sin: mx.array,
               keys: tuple[mx.array, ...] | None, packed: list[mx.array] | None = None) -> mx.array | None:
        """Top-k entry ids [B, L, k] for each query (-1 = no entry); None when every visible
        entry fits in k (then the caller uses the plain causal mask, which is the same set).

        x [B, L, D]; qr [B, L, q_lora]; keys: all index keys that exist so far, either
        ``(values [B, N, d],)`` or packed ``(fp4 codes uint8 [B, N, d/2], E8M0 uint8 [B, N, d/32])``;
        packed: optionally the cache's whole packed store (FP4 codes [B, C, d/2], E8M0 bytes
        [B, C, d/32], C >= N rows of which the first N are the keys), read by the kernel in place."""
        B, L, _ = x.shape
        n_total = 0 if keys is None else keys[0].shape[1]
        if n_total <= self.topk:
            return None
        q = self.wq_b(gemm_input(qr, self.act_quant)).reshape(B, L, self.n_heads, self.head_dim)
        q = self._rope(q, cos[:, None], sin[:, None])
        if self.fake_quant:
            q = fake_quant_fp4(hadamard(q))
        q = q.astype(mx.float32)
        # weights_proj is a bf16 weight in the official code: its input x is not rounded
        w = self.weights_proj(x).astype(mx.float32) * (self.head_dim**-0.5 * self.n_heads**-0.5)
        if self.use_kernel and packed is not None:
            return indexer_topk(q, w, *packed, n_keys=n_total, offset=offset, k=self.topk, use_kernel=True)
        score = _packed_scores if len(keys) == 2 else _dense_scores
        visible = (mx.arange(offset, offset + L)[:, None] + 1) // 4  # entries visible to each query
        # ReLU sits between the heads' dot products and their weighted sum, so the [rows, heads, N]
        # product is built in pieces of at most SCORE_BUDGET elements, and the [rows, N] scores
        # that top-k needs whole are capped too: memory is bounded for any context.
        rows = max(1, min(L, SCORE_BUDGET // max(1, B * n_total)))
        cols = max(1, min(n_total, SCORE_BUDGET // max(1, B * rows * self.n_heads)))
        picks = []
        for s in range(0, L, rows):
            e = min(L, s + rows)
            qs = q[:, s:e].reshape(B, -1, self.head_dim)  # [B, rows*heads, d]
            pieces = []
            for c in range(0, n_total, cols):
                part = mx.maximum(score(qs, tuple(k[:, c:c + cols] for k in keys)), 0)
                part = part.reshape(B, e - s, self.n_heads, -1)  # [B, rows, heads, cols]
                pieces.append((part * w[:, s:e, :, None]).sum(axis=2))  # [B, rows, cols]
            scores = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)
            scores = mx.where(mx.arange(n_total)[None, :] >= visible[s:e], -mx.inf, scores)
            idx = mx.argpartition(-scores, kth=self.topk - 1, axis=-1)[..., : self.topk].astype(mx.int32)
            picks.append(mx.where(idx >= visible[None, s:e], -1, idx))
            if e < L:  # independent row blocks could otherwise be scored all at once
                mx.eval(picks[-1])
        return picks[0] if len(picks) == 1 else mx.concatenate(picks, axis=1)


def _dense_scores(q: mx.array, keys: tuple[mx.array]) -> mx.array:
    """q [B, M, d] . values [B, N, d] -> [B, M, N] float32."""
    return q @ keys[0].astype(mx.float32).swapaxes(1, 2)


def _packed_scores(q: mx.array, keys: tuple[mx.array, mx.array]) -> mx.array:
    """The same product read straight from the packed FP4 keys: their layout (element 2i in the
    low nibble, E8M0 per 32) is MLX's ``mxfp4``, so the keys are never dequantized in memory
    (68 bytes per key read instead of 512 written and read again; 2-3x faster on CPU)."""
    codes, scales = keys
    return mx.quantized_matmul(q, codes.view(mx.uint32), scales, transpose=True,
                               group_size=32, bits=4, mode="mxfp4")
