"""Kernel 1: sparse decode attention over the window plus top-k packed FP8 entries (paper §2.3).

One query token, H heads, one shared K = V head of D dims. Keys are the sliding window (dense
rows, already dequantized) followed by the compressed entries the lightning indexer picked,
read straight from the packed cache (e4m3 codes + E8M0 per 64 + bf16 RoPE dims) and
dequantized in registers; index -1 means no entry. A learned per-head sink joins the softmax
denominator. The definition is :func:`sparse_decode_reference` (gather, dequantize, then
:func:`mlx_v4.layers.attention.attend`); the kernel must match it.

Layout: a threadgroup of ``NSG`` simdgroups serves ``HG`` heads of one batch row. Lane ``l``
owns dims ``[l*D/32, (l+1)*D/32)`` of the query, the key and the output accumulator, so a
lane's slice never straddles an FP8 scale block or the RoPE boundary. Simdgroup ``g`` takes
keys ``g, g+NSG, ...`` with an online softmax; the simdgroups are merged through threadgroup
memory at the end. The split-K variant runs the same body over ``P`` key ranges (writing
unnormalised partials) and a second kernel merges them with the sink.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ._base import CUDA_PRELUDE, DECODE_HEADER, KernelSpec, metal_runner

# Shared with kernel 2: the query rows of the group (scaled) and the online-softmax state; a
# packed entry ``e`` of batch row ``b`` decoded into the lane's slice ``kv``.
LOAD_QUERY = r"""
  float qv[HG][DPL];
  float m[HG];
  float s[HG];
  float o[HG][DPL];
  for (int h = 0; h < HG; ++h) {
    auto qrow = q + (size_t(out_row) * H + h0 + h) * D + d0;
    for (int i = 0; i < DPL; ++i) {
      qv[h][i] = float(qrow[i]) * qscale;
      o[h][i] = 0.0f;
    }
    m[h] = -INFINITY;
    s[h] = 0.0f;
  }
"""

DECODE_ENTRY = r"""
      const size_t r = size_t(b) * N + e;
      if (d0 < NOPE) {
        auto c = codes + r * NOPE + d0;
        const float blk = v4_e8m0(uint(scales[r * (NOPE / 64) + d0 / 64]));
        for (int i = 0; i < DPL; ++i) kv[i] = v4_fp8_e4m3(uint(c[i])) * blk;
      } else {
        auto rp = rope + r * (D - NOPE) + (d0 - NOPE);
        for (int i = 0; i < DPL; ++i) kv[i] = v4_bf16_bits(uint(rp[i]));
      }
"""

# The online-softmax update of every head of the group with key row ``kv`` (lane slice), and
# the merge of the simdgroups (plus the sink without SPLIT): shared with kernel 2.
ACCUMULATE = r"""
    for (int h = 0; h < HG; ++h) {
      float dot = 0.0f;
      for (int i = 0; i < DPL; ++i) dot += qv[h][i] * kv[i];
      const float score = simd_sum(dot);
      const float mn = max(m[h], score);
      const float keep = exp(m[h] - mn);
      const float p = exp(score - mn);
      s[h] = s[h] * keep + p;
      for (int i = 0; i < DPL; ++i) o[h][i] = o[h][i] * keep + p * kv[i];
      m[h] = mn;
    }
"""

MERGE_SIMDGROUPS = r"""
  // Merge the simdgroups (and, without SPLIT, the sink); one head at a time through tg_o.
  threadgroup float tg_ms[2 * NSG * HG];
  threadgroup float tg_o[NSG * D];
  if (lane == 0) {
    for (int h = 0; h < HG; ++h) {
      tg_ms[sg * HG + h] = m[h];
      tg_ms[NSG * HG + sg * HG + h] = s[h];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int h = 0; h < HG; ++h) {
    const float sink = float(sinks[h0 + h]);
    float M = SPLIT ? -INFINITY : sink;
    for (int g = 0; g < NSG; ++g) M = max(M, tg_ms[g * HG + h]);
    float S = SPLIT ? 0.0f : exp(sink - M);
    for (int g = 0; g < NSG; ++g) {
      const float mg = tg_ms[g * HG + h];
      S += mg == -INFINITY ? 0.0f : tg_ms[NSG * HG + g * HG + h] * exp(mg - M);
    }
    const float f = m[h] == -INFINITY ? 0.0f : exp(m[h] - M);
    for (int i = 0; i < DPL; ++i) tg_o[sg * D + d0 + i] = o[h][i] * f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const size_t head = size_t(out_row) * H + h0 + h;
    for (int d = tid; d < D; d += NSG * 32) {
      float acc = 0.0f;
      for (int g = 0; g < NSG; ++g) acc += tg_o[g * D + d];
      if (SPLIT) {
        out[(head * P + part) * D + d] = acc;
      } else {
        out[head * D + d] = T(acc / S);
      }
    }
    if (SPLIT && tid == 0) {
      part_m[head * P + part] = M;
      part_s[head * P + part] = S;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
"""

SOURCE = r"""
  // Template: T (q/window/out dtype), D, NOPE, HG heads per group, NSG simdgroups, SPLIT.
  constexpr int DPL = D / 32;
  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int tid = int(thread_index_in_threadgroup);
  const int W = dims[0];
  const int K = dims[1];
  const int H = dims[2];
  const int N = dims[3];
  const int chunk = dims[4];
  const int P = dims[5];
  const int part = int(threadgroup_position_in_grid.x);
  const int h0 = int(threadgroup_position_in_grid.y) * HG;
  const int b = int(threadgroup_position_in_grid.z);
  const int out_row = b;  // output row of [B, H, D]
  const int d0 = lane * DPL;
  const int n_keys = W + K;
  const int k_begin = SPLIT ? part * chunk : 0;
  const int k_end = SPLIT ? min(n_keys, k_begin + chunk) : n_keys;
  const float qscale = scale[0];

""" + LOAD_QUERY + r"""
  for (int j = k_begin + sg; j < k_end; j += NSG) {
    float kv[DPL];
    if (j < W) {
      auto row = window + (size_t(b) * W + j) * D + d0;
      for (int i = 0; i < DPL; ++i) kv[i] = float(row[i]);
    } else {
      const int e = indices[size_t(b) * K + (j - W)];
      if (e < 0) continue;  // the whole simdgroup skips together
""" + DECODE_ENTRY + r"""    }
""" + ACCUMULATE + r"""
  }

""" + MERGE_SIMDGROUPS

MERGE_SOURCE = r"""
  // Template: T, D. Merges P partials of one (batch, head) with the sink.
  const int tid = int(thread_index_in_threadgroup);
  const int P = dims[0];
  const int H = dims[1];
  const int h = int(threadgroup_position_in_grid.y);
  const int b = int(threadgroup_position_in_grid.z);
  const size_t head = size_t(b) * H + h;
  const float sink = float(sinks[h]);
  float M = sink;
  for (int p = 0; p < P; ++p) M = max(M, part_m[head * P + p]);
  float S = exp(sink - M);
  for (int p = 0; p < P; ++p) S += part_s[head * P + p] * exp(part_m[head * P + p] - M);
  const float inv = 1.0f / S;
  for (int d = tid; d < D; d += int(threads_per_threadgroup.x)) {
    float acc = 0.0f;
    for (int p = 0; p < P; ++p) acc += part_o[(head * P + p) * D + d] * exp(part_m[head * P + p] - M);
    out[head * D + d] = T(acc * inv);
  }
"""

HEADER = CUDA_PRELUDE + DECODE_HEADER

ONE_PASS = KernelSpec(
    name="v4_sparse_decode", input_names=("q", "window", "codes", "scales", "rope", "indices", "sinks", "scale", "dims"),
    output_names=("out",), source=SOURCE.replace("part_m[", "out[").replace("part_s[", "out["), header=HEADER)
SPLIT_PASS = KernelSpec(
    name="v4_sparse_decode_split",
    input_names=("q", "window", "codes", "scales", "rope", "indices", "sinks", "scale", "dims"),
    output_names=("out", "part_m", "part_s"), source=SOURCE, header=HEADER)
MERGE = KernelSpec(
    name="v4_sparse_decode_merge", input_names=("part_o", "part_m", "part_s", "sinks", "dims"),
    output_names=("out",), source=MERGE_SOURCE, header=HEADER)


def sparse_decode_reference(q, window, codes, scales, rope, indices, sinks, *, scale: float) -> mx.array:
    """The definition: gather the selected packed rows, dequantize, attend with the sink.

    q [B, H, D]; window [B, W, D]; codes [B, N, nope] uint8; scales [B, N, nope/64] uint8;
    rope [B, N, D - nope] bf16; indices [B, K] int32 (-1 = none); sinks [H] -> [B, H, D]."""
    from ..formats import dequantize_kv_entry
    from .attend import attend

    B, H, D = q.shape
    K = indices.shape[1]
    idx = mx.maximum(indices, 0)[..., None]
    rows = dequantize_kv_entry(*[mx.take_along_axis(p, idx, axis=1) for p in (codes, scales, rope)], dtype=q.dtype)
    window_mask = mx.ones((B, 1, window.shape[1]), dtype=mx.bool_)
    out = attend(q[:, None], window.astype(q.dtype), window_mask, sinks, scale,
                 rows.reshape(B, 1, K, D), (indices >= 0)[:, None])
    return out[:, 0]


def _heads_per_group(H: int, D: int) -> int:
    # Registers per lane grow as 2 * HG * D/32 floats; keep it near 64.
    for hg in (4, 2, 1):
        if H % hg == 0 and hg * D <= 1024:
            return hg
    return 1


def default_splits(n_keys: int, *, min_chunk: int = 256, max_splits: int = 32) -> int:
    """Key ranges for the split-K variant: one pass below 2 chunks, else up to ``max_splits``."""
    return max(1, min(max_splits, n_keys // min_chunk))


def sparse_decode_kernel(q, window, codes, scales, rope, indices, sinks, *, scale: float,
                         splits: int = 1, heads_per_group: int | None = None, simdgroups: int = 8,
                         runner=metal_runner) -> mx.array:
    """The kernel launch(es) for :func:`sparse_decode_attention` (``splits > 1``: split-K)."""
    B, H, D = q.shape
    W, K, N, nope = window.shape[1], indices.shape[1], codes.shape[1], codes.shape[2]
    dpl = D // 32
    if D % 32 or nope % 64 or nope % dpl or 64 % dpl or rope.shape[-1] != D - nope:
        raise ValueError(f"sparse decode kernel: unsupported head_dim={D} / nope={nope}")
    hg = heads_per_group or _heads_per_group(H, D)
    if H % hg:
        raise ValueError(f"heads_per_group={hg} does not divide {H} heads")
    if W == 0:  # the kernel never reads a row; keep the buffer non-empty
        window = mx.zeros((B, 1, D), dtype=q.dtype)
    n_keys = W + K
    splits = max(1, min(splits, n_keys))
    chunk = math.ceil(n_keys / splits)
    splits = math.ceil(n_keys / chunk)
    dims = mx.array([W, K, H, N, chunk, splits], dtype=mx.int32)
    inputs = [q, window.astype(q.dtype), codes, scales, rope.view(mx.uint16), indices.astype(mx.int32),
              sinks.astype(mx.float32), mx.array([scale], dtype=mx.float32), dims]
    template = [("T", q.dtype), ("D", D), ("NOPE", nope), ("HG", hg), ("NSG", simdgroups)]
    tg = (simdgroups * 32, 1, 1)
    if splits == 1:
        (out,) = runner(ONE_PASS, inputs, [(B, H, D)], [q.dtype], (simdgroups * 32, H // hg, B), tg,
                        template + [("SPLIT", False)])
        return out
    part_o, part_m, part_s = runner(
        SPLIT_PASS, inputs, [(B, H, splits, D), (B, H, splits), (B, H, splits)], [mx.float32] * 3,
        (simdgroups * 32 * splits, H // hg, B), tg, template + [("SPLIT", True)])
    merge_dims = mx.array([splits, H], dtype=mx.int32)
    (out,) = runner(MERGE, [part_o, part_m, part_s, sinks.astype(mx.float32), merge_dims], [(B, H, D)],
                    [q.dtype], (128, H, B), (128, 1, 1), [("T", q.dtype), ("D", D)])
    return out


def sparse_decode_attention(q, window, codes, scales, rope, indices, sinks, *, scale: float,
                            use_kernel: bool, splits: int | None = None) -> mx.array:
    """Decode attention of one query token over window + selected packed entries.

    Shapes as in :func:`sparse_decode_reference`. ``use_kernel``: run the Metal kernel (one
    pass, or split-K when the key list is long; ``splits`` overrides), else the reference."""
    if not use_kernel:
        return sparse_decode_reference(q, window, codes, scales, rope, indices, sinks, scale=scale)
    if splits is None:
        splits = default_splits(window.shape[1] + indices.shape[1])
    return sparse_decode_kernel(q, window, codes, scales, rope, indices, sinks, scale=scale, splits=splits,
                                runner=metal_runner)
