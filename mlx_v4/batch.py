"""One model step over several sequences (continuous batching).

Each sequence brings its own cache and a row of token ids: one id for a decode step, a chunk
for prefill. The rows are stacked along the length axis into one [1, T] batch, so every layer
that acts on tokens independently (embedding, hyper-connections, norms, the attention
projections, the MoE with tokens grouped by expert across sequences, the head) runs once over
all T tokens: on a bandwidth-bound machine R decode rows cost little more than one. Only the
part of attention that reads a cache (the window, the compressors, the indexer, the sparse
attention itself) runs per sequence, since lengths, compressor states and index keys differ.

A row's computation is the same function as the single-sequence ``Model.__call__``; the only
numerical difference is that a stacked matmul may round differently from a one-row one (BLAS
picks another kernel or blocking for another row count). tests/test_batch.py pins this down.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import mlx.nn as nn

from .config import PositionError
from .layers.hyper import tapped_layers
from .platform import metal_available

#: On the CPU backend MLX's quantized matmul dequantizes the weights again for every row, so a
#: step of R sequences would pay the head (vocab x hidden, the largest matrix) R times. There
#: the batched step multiplies by a float copy of a quantized head instead (one GEMM, weights
#: read once), made on first use and kept with the head if it takes at most this many bytes.
DENSE_HEAD_BYTES = 256 << 20


def _row_bounds(lengths: list[int]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(lengths))
    return [(e - n, e) for n, e in zip(lengths, ends)]


def step_batch(model, token_rows, caches) -> mx.array:
    """``token_rows[r]`` (a list or 1-D array of ids, length >= 1) continues ``caches[r]``
    (one per-layer cache list per sequence). -> logits [R, vocab] float32 at each row's last
    token. Every cache advances by its row's length."""
    x, bounds = stacked_streams(model, token_rows, caches)
    return head_logits(model, x, [e - 1 for _, e in bounds])  # only the rows' last tokens reach the head


def stacked_streams(model, token_rows, caches) -> tuple[mx.array, list[tuple[int, int]]]:
    """The model body of :func:`step_batch`: -> (the last layer's streams [1, T, hc, D] of
    all rows' tokens stacked, each row's (start, end) in T). Every cache advances by its row."""
    x, _, bounds = tapped_stacked_streams(model, token_rows, caches, ())
    return x, bounds


def tapped_stacked_streams(model, token_rows, caches, taps) -> tuple[mx.array, mx.array | None, list[tuple[int, int]]]:
    """:func:`stacked_streams`, also returning the taps of every row's tokens (what
    :meth:`Model.tapped_streams` returns for one sequence: the mean input streams of the layers
    in ``taps``, [1, T, len(taps) * D], or None without taps) -> (streams, taps, bounds)."""
    if len(token_rows) != len(caches):
        raise ValueError(f"{len(token_rows)} token rows for {len(caches)} caches")
    if not token_rows:
        raise ValueError("step_batch needs at least one row")
    rows = [r if isinstance(r, mx.array) else mx.array(list(r), dtype=mx.int32) for r in token_rows]
    lengths = [int(r.size) for r in rows]
    if min(lengths) < 1:
        raise ValueError("every token row needs at least one id")
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("two rows share one cache")
    limit = model.args.max_position_embeddings
    starts = [c[0].offset for c in caches]
    for r, (start, n) in enumerate(zip(starts, lengths)):
        if start + n > limit:
            raise PositionError(f"row {r}: position {start + n} is past max_position_embeddings={limit}")
    bounds = _row_bounds(lengths)
    ids = mx.concatenate([r.reshape(-1).astype(mx.int32) for r in rows])[None]  # [1, T]
    positions = mx.concatenate([mx.arange(s, s + n) for s, n in zip(starts, lengths)])  # [T]
    T = ids.shape[1]
    x = model.embed(ids)  # [1, T, D]
    x = mx.broadcast_to(x[:, :, None, :], (1, T, model.args.hc_mult, x.shape[-1]))  # [1, T, hc, D]

    def step(i, layer, h):
        layer_caches = [c[i] for c in caches]
        return layer.forward(h, ids, lambda g: layer.attn.call_rows(g, layer_caches, bounds, positions))

    x, tapped = tapped_layers(model.layers, x, taps, step)
    return x, tapped, bounds


def head_logits(model, x: mx.array, index: list[int]) -> mx.array:
    """streams [1, T, hc, D] -> logits [len(index), vocab] float32 at positions ``index`` of T."""
    x = x[:, mx.array(index)]  # [1, N, hc, D]
    x = model.norm(model.hc_head(x))
    return apply_head(model.head, x.astype(mx.float32)).astype(mx.float32)[0]


def _dense_head(head: nn.Module) -> mx.array | None:
    """The float copy of a quantized head used on the CPU backend, or None (see DENSE_HEAD_BYTES)."""
    if not isinstance(head, nn.QuantizedLinear) or metal_available():
        return None
    out_dims, packed = head.weight.shape
    if out_dims * (packed * 32 // head.bits) * 4 > DENSE_HEAD_BYTES:
        return None
    cached = getattr(head, "_mlx_v4_dense", None)
    if cached is None or cached[0] is not head.weight:  # first use, or the weights were replaced
        w = mx.dequantize(head.weight, head.scales, head.get("biases"), group_size=head.group_size, bits=head.bits,
                          mode=head.mode).astype(mx.float32)
        mx.eval(w)
        cached = (head.weight, w)
        object.__setattr__(head, "_mlx_v4_dense", cached)  # not a parameter: kept out of the weights
    return cached[1]


def apply_head(head: nn.Module, x: mx.array) -> mx.array:
    """``head(x)`` for many rows at once (the float copy of a quantized head on the CPU, see DENSE_HEAD_BYTES)."""
    w = _dense_head(head)
    return head(x) if w is None else x @ w.T


# ---- undoing a failed step --------------------------------------------------------------------

def snapshot_caches(caches) -> list:
    """Per sequence, what :func:`restore_caches` needs to undo one step on its cache: each
    layer's constant-size state by reference and its entry stores' lengths (the cache's own
    snapshot). The stores' buffers are not referenced, so an append can still update them in
    place (a held reference would make MLX copy a whole store at every append)."""
    return [[c.snapshot() for c in cache] for cache in caches]


def restore_caches(caches, snaps) -> None:
    """Put each cache back as :func:`snapshot_caches` saw it (after a step that raised): rows a
    store gained past its old length are dropped (the next append overwrites them)."""
    for cache, layers in zip(caches, snaps, strict=True):
        for c, snap in zip(cache, layers, strict=True):
            c.restore(snap)
