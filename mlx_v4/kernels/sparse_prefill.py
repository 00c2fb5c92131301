"""Kernel 2: sparse attention for prefill chunks over the window plus packed FP8 entries (paper §2.3).

L queries at positions ``offset .. offset + L - 1``, H heads, one shared K = V head of D dims.
Each query attends to

* the dense window rows [B, W, D] (the kept window followed by this chunk's rows; row j holds
  position ``offset + L - W + j``) inside its own sliding window ``t - window < pos <= t``;
* compressed entries read straight from the packed cache (e4m3 codes + E8M0 per 64 + bf16
  RoPE dims), dequantized in registers: either its own list ``indices [B, L, K]`` (CSA: the
  lightning indexer's picks, -1 = none) or, with ``indices=None``, every entry it may see
  (``i < (t + 1) // ratio``: HCA, and CSA while every visible entry fits in the top-k).

The definition is :func:`sparse_prefill_reference` (the model's own ``attend`` with per-query
masks over gathered, dequantized rows); the kernel must match it.

Layout: kernel 1's (mlx_v4/kernels/sparse_decode.py), one threadgroup per (query, group of HG
heads): ``NSG`` simdgroups stride over the query's key rows with an online softmax, lane ``l``
owning dims ``[l*D/32, (l+1)*D/32)``, and the shared merge folds in the sink. No split-K: a
chunk has L x H/HG threadgroups, enough to fill the GPU. Traffic: each threadgroup reads its
query's key rows, so a row is read once per (query, head group) that sees it. A Flash CSA chunk
of 2,048 queries (H = 64, HG = 2, 128 window rows + 512 picks) runs 65,536 threadgroups of 640
rows (~25 GB of reads at ~600 bytes a row, most served by the cache: neighbouring queries share
their window and many picks) for 172 GFLOP. Tiles of queries sharing rows through threadgroup
memory would cut the re-reads; not done (no Mac here to measure it).
"""

from __future__ import annotations

import mlx.core as mx

from ._base import KernelSpec, metal_runner
from .sparse_decode import ACCUMULATE, DECODE_ENTRY, HEADER, LOAD_QUERY, MERGE_SIMDGROUPS, _heads_per_group

SOURCE = r"""
  // Template: T (q/window/out dtype), D, NOPE, HG heads per group, NSG simdgroups, DENSE
  // (entry j of every query is entry j, visible below (t + 1) / ratio; else indices[]).
  constexpr int DPL = D / 32;
  constexpr bool SPLIT = false;  // the shared merge's one-pass branch
  const int P = 1;
  const int part = 0;
  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int tid = int(thread_index_in_threadgroup);
  const int W = dims[0];
  const int K = dims[1];
  const int H = dims[2];
  const int N = dims[3];
  const int L = dims[4];
  const int offset = dims[5];
  const int window_len = dims[6];
  const int ratio = dims[7];
  const int h0 = int(threadgroup_position_in_grid.y) * HG;
  const int out_row = int(threadgroup_position_in_grid.z);  // b * L + l: output row of [B*L, H, D]
  const int b = out_row / L;
  const int l = out_row - b * L;
  const int d0 = lane * DPL;
  const int t = offset + l;
  // Window row j holds position offset + L - W + j; the query sees t - window_len < pos <= t.
  const int w_hi = l + (W - L) + 1;
  const int w_lo = max(0, w_hi - window_len);
  const int n_win = w_hi - w_lo;
  const int n_ent = DENSE ? min(K, (t + 1) / ratio) : K;
  const int n_keys = n_win + n_ent;
  const float qscale = scale[0];

""" + LOAD_QUERY + r"""
  for (int j = sg; j < n_keys; j += NSG) {
    float kv[DPL];
    if (j < n_win) {
      auto row = window + (size_t(b) * W + w_lo + j) * D + d0;
      for (int i = 0; i < DPL; ++i) kv[i] = float(row[i]);
    } else {
      const int e = DENSE ? j - n_win : indices[size_t(out_row) * K + (j - n_win)];
      if (e < 0) continue;  // the whole simdgroup skips together
""" + DECODE_ENTRY + r"""    }
""" + ACCUMULATE + r"""
  }

""" + MERGE_SIMDGROUPS.replace("part_m[", "out[").replace("part_s[", "out[")

SPEC = KernelSpec(
    name="v4_sparse_prefill",
    input_names=("q", "window", "codes", "scales", "rope", "indices", "sinks", "scale", "dims"),
    output_names=("out",), source=SOURCE, header=HEADER)


def _check(q, window, codes, rope):
    B, L, H, D = q.shape
    nope = codes.shape[2]
    dpl = D // 32
    if D % 32 or nope % 64 or nope % dpl or 64 % dpl or rope.shape[-1] != D - nope:
        raise ValueError(f"sparse prefill kernel: unsupported head_dim={D} / nope={nope}")
    if window.shape[1] < L:
        raise ValueError(f"window has {window.shape[1]} rows, fewer than the chunk's {L} queries")


def sparse_prefill_reference(q, window, codes, scales, rope, indices, sinks, *, scale: float, offset: int,
                             sliding_window: int, ratio: int, n_entries: int) -> mx.array:
    """The definition: per-query window mask, gathered (or all visible) dequantized entries,
    then :func:`mlx_v4.kernels.attend.attend`.

    q [B, L, H, D]; window [B, W, D] (W >= L, last L rows are this chunk); codes [B, C, nope]
    uint8, scales [B, C, nope/64] uint8, rope [B, C, D - nope] bf16 (C >= n_entries rows, the
    first n_entries valid); indices [B, L, K] int32 (-1 = none) or None (every visible entry,
    ``i < (t + 1) // ratio``); sinks [H] -> [B, L, H, D] in q's dtype."""
    from ..formats import dequantize_kv_entry
    from .attend import attend

    B, L, H, D = q.shape
    W = window.shape[1]
    qpos = mx.arange(offset, offset + L)[:, None]
    kpos = mx.arange(offset + L - W, offset + L)[None, :]
    window_mask = mx.broadcast_to((kpos <= qpos) & (kpos > qpos - sliding_window), (B, L, W))
    if indices is None:
        comp = dequantize_kv_entry(codes[:, :n_entries], scales[:, :n_entries], rope[:, :n_entries], dtype=q.dtype)
        comp_mask = mx.broadcast_to(mx.arange(n_entries)[None, :] < (qpos + 1) // ratio, (B, L, n_entries))
    else:
        K = indices.shape[-1]
        idx = mx.maximum(indices, 0).reshape(B, L * K, 1)
        parts = [mx.take_along_axis(p, idx, axis=1) for p in (codes, scales, rope)]
        comp = dequantize_kv_entry(*parts, dtype=q.dtype).reshape(B, L, K, D)
        comp_mask = indices >= 0
    return attend(q, window.astype(q.dtype), window_mask, sinks, scale, comp, comp_mask)


def sparse_prefill_kernel(q, window, codes, scales, rope, indices, sinks, *, scale: float, offset: int,
                          sliding_window: int, ratio: int, n_entries: int, heads_per_group: int | None = None,
                          simdgroups: int = 8, runner=metal_runner) -> mx.array:
    """The kernel launch for :func:`sparse_prefill_attention` (shapes as in the reference)."""
    _check(q, window, codes, rope)
    B, L, H, D = q.shape
    hg = heads_per_group or _heads_per_group(H, D)
    if H % hg:
        raise ValueError(f"heads_per_group={hg} does not divide {H} heads")
    dense = indices is None
    K = n_entries if dense else indices.shape[-1]
    if dense:  # never read; keep the buffer non-empty
        indices = mx.zeros((1,), dtype=mx.int32)
    dims = mx.array([window.shape[1], K, H, codes.shape[1], L, offset, sliding_window, ratio], dtype=mx.int32)
    inputs = [q.reshape(B * L, H, D), window.astype(q.dtype), codes, scales, rope.view(mx.uint16),
              indices.astype(mx.int32), sinks.astype(mx.float32), mx.array([scale], dtype=mx.float32), dims]
    template = [("T", q.dtype), ("D", D), ("NOPE", codes.shape[2]), ("HG", hg), ("NSG", simdgroups),
                ("DENSE", dense)]
    (out,) = runner(SPEC, inputs, [(B * L, H, D)], [q.dtype], (simdgroups * 32, H // hg, B * L),
                    (simdgroups * 32, 1, 1), template)
    return out.reshape(B, L, H, D)


def sparse_prefill_attention(q, window, codes, scales, rope, indices, sinks, *, scale: float, offset: int,
                             sliding_window: int, ratio: int, n_entries: int, use_kernel: bool) -> mx.array:
    """Prefill attention of a chunk over its windows and packed compressed entries (picked per
    query, or every visible one when ``indices`` is None). ``use_kernel``: the Metal kernel,
    else the reference. Shapes as in :func:`sparse_prefill_reference`."""
    kw = dict(scale=scale, offset=offset, sliding_window=sliding_window, ratio=ratio, n_entries=n_entries)
    if not use_kernel:
        return sparse_prefill_reference(q, window, codes, scales, rope, indices, sinks, **kw)
    return sparse_prefill_kernel(q, window, codes, scales, rope, indices, sinks, runner=metal_runner, **kw)
