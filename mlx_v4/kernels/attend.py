"""Softmax attention with a per-head sink over one shared K = V (paper §2.3; official
``sparse_attn``): the pure-MLX definition the attention layer computes and the sparse
kernels (sparse_decode.py, sparse_prefill.py) are tested against."""

from __future__ import annotations

import mlx.core as mx


def attend(q: mx.array, window: mx.array, window_mask: mx.array, sinks: mx.array, scale: float,
           comp: mx.array | None = None, comp_mask: mx.array | None = None) -> mx.array:
    """Softmax attention of every head over one shared K = V, with a per-head sink.

    q [B, L, H, d]; window [B, W, d] keys shared by all queries, window_mask [B, L, W];
    comp: either [B, N, d] shared by all queries (comp_mask [B, L, N]) or [B, L, k, d] rows
    gathered per query (comp_mask [B, L, k]); sinks [H] -> [B, L, H, d].
    Shared keys are two plain GEMMs with the heads folded into the query rows."""
    B, L, H, d = q.shape
    per_query = comp is not None and comp.ndim == 4
    scores = (q.reshape(B, L * H, d) @ window.swapaxes(1, 2)).reshape(B, L, H, -1)
    masks = [window_mask]
    if comp is not None:
        if per_query:
            comp_scores = q @ comp.swapaxes(-1, -2)  # [B, L, H, k]
        else:
            comp_scores = (q.reshape(B, L * H, d) @ comp.swapaxes(1, 2)).reshape(B, L, H, -1)
        scores = mx.concatenate([scores, comp_scores], axis=-1)
        masks.append(comp_mask)
    mask = masks[0] if len(masks) == 1 else mx.concatenate(masks, axis=-1)
    scores = mx.where(mask[:, :, None], scores.astype(mx.float32) * scale, -mx.inf)
    sinks = sinks.astype(mx.float32)[:, None]
    peak = mx.maximum(scores.max(axis=-1, keepdims=True), sinks)  # [B, L, H, 1]
    weights = mx.exp(scores - peak)
    weights = (weights / (weights.sum(axis=-1, keepdims=True) + mx.exp(sinks - peak))).astype(q.dtype)
    W = window.shape[1]
    out = (weights[..., :W].reshape(B, L * H, W) @ window).reshape(B, L, H, d)
    if comp is not None:
        wc = weights[..., W:]
        if per_query:
            out = out + wc @ comp  # [B, L, H, k] @ [B, L, k, d]
        else:
            out = out + (wc.reshape(B, L * H, -1) @ comp).reshape(B, L, H, d)
    return out
