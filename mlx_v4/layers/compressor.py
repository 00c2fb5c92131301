"""KV compressors (paper §2.3.1 eqs. 9-12 for ratio 4, §2.3.2 eqs. 20-23 for ratio 128).

Each compressed entry pools a window of tokens with a per-channel softmax over learned gates
plus a position bias ``ape``:

* ratio 128: entry i pools tokens 128i .. 128i+127;
* ratio 4 (overlapping): entry i pools 8 tokens: tokens 4i-4 .. 4i-1 through the first half of
  the projected channels and tokens 4i .. 4i+3 through the second half (one softmax over all 8).
  For i = 0 the previous half is absent (kv 0, gate -inf).

The pooled vector is RMS-normalised, rotated by RoPE at position i*ratio and rounded like the
window KV (FP8) or, in the indexer, Hadamard-rotated and rounded to FP4. Projections run in
float32, as in the official code. Chunks may end anywhere: rows of a window still open are
carried in :class:`CompressorState` (constant size) so chunked prefill and decode produce
exactly the entries of one full pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .fake_quant import hadamard, quantize_index_key, quantize_kv_entry
from .norm import RMSNorm
from .rope import RoPE


@dataclass
class CompressorState:
    """The open window's projected rows and, for ratio 4, the last closed window's first half."""

    kv: mx.array | None = None  # [B, m, c*d] fp32, m = tokens since the last closed window
    score: mx.array | None = None  # same, gate logits + ape
    prev_kv: mx.array | None = None  # [B, ratio, d] (ratio 4 only)
    prev_score: mx.array | None = None
    #: While a speculative chunk is recorded (cache.speculate): this chunk's own projected rows
    #: (kv, score) [B, L, c*d], from which the state after any prefix of the chunk is rebuilt.
    rows: tuple[mx.array, mx.array] | None = None

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.kv, self.score, self.prev_kv, self.prev_score) if a is not None]

    def advance(self, kv: mx.array, score: mx.array, ratio: int, half: int | None) -> tuple[CompressorState, int]:
        """The state after also consuming the projected rows ``kv``/``score`` [B, j, c*d],
        without pooling, and the number of windows they close: exactly what
        :meth:`Compressor.__call__` leaves for those rows. ``half``: d for ratio 4 (its next
        window reads the first half of the last closed one), None otherwise."""
        m = 0 if self.kv is None else self.kv.shape[1]
        if m:
            kv, score = mx.concatenate([self.kv, kv], axis=1), mx.concatenate([self.score, score], axis=1)
        n = kv.shape[1] // ratio
        out = CompressorState(mx.contiguous(kv[:, n * ratio:]), mx.contiguous(score[:, n * ratio:]),
                              self.prev_kv, self.prev_score)
        if half is not None and n:
            out.prev_kv = mx.contiguous(kv[:, (n - 1) * ratio: n * ratio, :half])
            out.prev_score = mx.contiguous(score[:, (n - 1) * ratio: n * ratio, :half])
        return out, n


class Compressor(nn.Module):
    def __init__(self, hidden_size: int, head_dim: int, ratio: int, rope: RoPE, eps: float,
                 for_indexer: bool, fake_quant: bool):
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * head_dim
        self.wkv = nn.Linear(hidden_size, width, bias=False)
        self.wgate = nn.Linear(hidden_size, width, bias=False)
        self.ape = mx.zeros((ratio, width))
        self.norm = RMSNorm(head_dim, eps)
        self._rope = rope
        self.for_indexer, self.fake_quant = for_indexer, fake_quant

    def __call__(self, x: mx.array, offset: int, state: CompressorState, keep_rows: bool = False):
        """x [B, L, D] at positions offset.. -> (values [B, n, d], packed or None, new state).
        ``n`` is the number of windows that close inside this chunk. ``keep_rows``: the new
        state also carries this chunk's projected rows (see :attr:`CompressorState.rows`)."""
        B, L, _ = x.shape
        r, d = self.ratio, self.head_dim
        xf = x.astype(mx.float32)
        kv = self.wkv(xf).astype(mx.float32)
        pos_in_window = (mx.arange(offset, offset + L) % r).astype(mx.int32)
        score = self.wgate(xf).astype(mx.float32) + self.ape[pos_in_window]
        rows = (kv, score) if keep_rows else None
        m = 0
        if state.kv is not None:
            m = state.kv.shape[1]
            kv = mx.concatenate([state.kv, kv], axis=1)
            score = mx.concatenate([state.score, score], axis=1)
        n = (m + L) // r
        first_entry = (offset - m) // r
        # contiguous copies: slices of the chunk would keep its whole projection buffer alive
        new_state = CompressorState(mx.contiguous(kv[:, n * r:]), mx.contiguous(score[:, n * r:]),
                                    state.prev_kv, state.prev_score, rows)
        if n == 0:
            return None, None, new_state

        kv = kv[:, : n * r].reshape(B, n, r, -1)  # [B, n, r, c*d]
        score = score[:, : n * r].reshape(B, n, r, -1)
        if self.overlap:
            # Entry i: previous window's first half (rows 4i-4..4i-1) ++ own second half.
            if state.prev_kv is None:
                prev_kv = mx.zeros((B, 1, r, d), dtype=mx.float32)
                prev_score = mx.full((B, 1, r, d), -mx.inf, dtype=mx.float32)
            else:
                prev_kv, prev_score = state.prev_kv[:, None], state.prev_score[:, None]
            prev_kv = mx.concatenate([prev_kv, kv[:, :-1, :, :d]], axis=1)
            prev_score = mx.concatenate([prev_score, score[:, :-1, :, :d]], axis=1)
            new_state.prev_kv = mx.contiguous(kv[:, -1, :, :d])
            new_state.prev_score = mx.contiguous(score[:, -1, :, :d])
            kv = mx.concatenate([prev_kv, kv[..., d:]], axis=2)  # [B, n, 2r, d]
            score = mx.concatenate([prev_score, score[..., d:]], axis=2)
        pooled = (kv * mx.softmax(score, axis=2, precise=True)).sum(axis=2)  # [B, n, d]
        pooled = self.norm(pooled.astype(x.dtype))
        cos, sin = self._rope.cos_sin(mx.arange(first_entry, first_entry + n) * r)
        pooled = self._rope(pooled, cos, sin)
        if not self.fake_quant:
            return pooled, None, new_state
        if self.for_indexer:
            values, packed = quantize_index_key(hadamard(pooled))
        else:
            values, packed = quantize_kv_entry(pooled, self._rope.rope_dim)
        return values, packed, new_state
