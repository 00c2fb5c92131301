"""Kernel 3: lightning-indexer scoring over packed FP4 keys, then top-k (paper §2.3.1, eqs. 13-17).

For query row t (absolute position ``offset + l``) and index key s the score is
``I(t, s) = sum_h w_h(t) * ReLU(q_h(t) . K_s)`` (eq. 16); only entries with
``s < (t + 1) // 4`` are visible (causal at ratio 4), the rest score -inf. Each query keeps
the ``k`` best entries (eq. 17); -1 fills the picks when fewer than ``k`` are visible. The
definition is :func:`indexer_topk_reference` (dequantize the keys, the Indexer's scoring, then
``argpartition``); the kernels must pick the same set.

Keys stay packed as the cache holds them (``mlx_v4/cache.py`` CSACache.index_keys): e2m1
codes, element 2i in the low nibble, one E8M0 byte per 32 dims (68 bytes for d = 128; the
same bits as MLX's ``mxfp4``). The kernel reads the codes as uint32 words (8 elements each)
and decodes them in registers; the power-of-two scale multiplies the 32-dim partial dot.

Design (why two kernels): at 1M context a decode query sees N = 262,144 keys, whose fp32
scores (1 MB) do not fit in 32 KB of threadgroup memory, so a one-kernel "score into
threadgroup memory, select there" only works for short rows. Instead:

1. ``v4_indexer_score``: one threadgroup per (tile of ``TG`` keys, query row, batch); each
   thread owns one key. The query's heads are staged ``HC`` at a time in threadgroup memory
   (64 x 128 fp32 would be exactly 32 KB), every thread walks its key in 32-dim blocks with
   ``HC`` accumulators, then adds ``w_h * ReLU(dot_h)``. Writes fp32 scores [B, L, N]
   (-inf where not visible; fully invisible tiles skip the maths). 4 bytes out per 68 in.
2. ``v4_indexer_select``: one threadgroup per row (or per chunk of a row, see below) finds
   the k-th largest score by a radix select on order-preserving uint keys of the float bits:
   8 passes of 4 bits, each pass counting, per thread, the entries at or above the 15
   candidate thresholds (no atomics, no dynamic register indexing), summed with ``simd_sum``
   and threadgroup memory. The last pass gives the exact k-th key T; an emission pass then
   writes every entry above T and the first ``k - #above`` entries equal to T at offsets
   from a threadgroup prefix scan. A row's scores are read :data:`SELECT_READS` = 10 times
   (8 radix passes, a count and an emission pass; L1/L2 serve the re-reads); only ``k``
   indices are written.
   Split select (long rows, e.g. decode): ``P`` threadgroups each select the top k of one
   chunk of the row and write (score, index) candidates; a second launch of the same body
   selects the final k from the ``P * k`` candidates. Exact: with distinct scores every
   global top-k entry is in its own chunk's top k.

Bytes per call (N visible keys, H heads, d dims, R = B * L rows; decode R = 1):
scoring reads ``N * (d/2 + d/32)`` key bytes per row (68 * N at d = 128; the same key tile is
re-read by each row's threadgroup in prefill, mostly from L2), ``R * H * (d + 1) * 4`` of
queries/weights, writes ``4 * N * R``; select reads ``10 * 4 * N * R`` (with split: plus
``10 * 8 * P * k * R`` in the merge), writes ``4 * k * R`` (+ ``8 * P * k * R`` candidates).
At Flash decode, 1M context (N = 262,144): 17.8 MB of keys, 1 MB of scores written, 10.5 MB
of score re-reads + 2.6 MB of candidate traffic, 2 KB of picks.
See ``benchmarks/kernels.py`` for Flash/Pro numbers. FLOPs: ``2 * H * d * N * R``.

Ties: with distinct scores the picked set equals the reference's. With exact ties at the cut
the kernel takes tied entries in its thread order (deterministic for a given launch shape,
not lowest-index first), and argpartition takes an implementation-defined subset, so the
sets may differ (both are valid top-k sets); the kernel also ranks -0 below +0. The order of
the k returned indices is not sorted by score: callers use them as a set.

Not done: the scoring is plain FMAs (portable to CUDA and the emulator). At 1M context it is
4.3 GFLOP per layer and token, compute- rather than bandwidth-bound, so a Metal-only
``simdgroup_matrix`` path (q heads x key tile, as a GEMM) is the natural next step; prefill
would also gain from scoring several query rows per key tile. Neither is measured here.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ._base import CUDA_PRELUDE, DECODE_HEADER, KernelSpec, metal_runner

#: Times the select reads each score (8 radix passes of 4 bits, a count pass, an emission pass).
SELECT_READS = 10

# uint overloads of the collectives the select kernel uses (the shared prelude has float ones).
_CUDA_EXTRA = r"""
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
typedef unsigned int uint32_t;  // the packed keys arrive as uint32 words
__device__ inline uint simd_sum(uint x) {
  for (int k = 1; k < 32; k <<= 1) x += __shfl_xor_sync(0xffffffffu, x, k);
  return x;
}
__device__ inline uint simd_shuffle(uint x, uint src) { return __shfl_sync(0xffffffffu, x, int(src)); }
#endif
"""

_SELECT_HEADER = r"""
// Order-preserving map float -> uint: a > b (as floats, no NaN) implies key(a) > key(b);
// equal floats get equal keys except -0 < +0.
inline uint v4_order_key(float x) {
  uint u = as_type<uint>(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
"""

SCORE_SOURCE = r"""
  // Template: D (index head dim), H (heads), HC (heads staged at once), TG (threads = keys per tile).
  constexpr int WPB = 4;  // uint32 words per 32-dim block: 8 e2m1 codes each
  const int tid = int(thread_index_in_threadgroup);
  const int tile = int(threadgroup_position_in_grid.x);
  const int l = int(threadgroup_position_in_grid.y);
  const int b = int(threadgroup_position_in_grid.z);
  const int L = dims[0];
  const int N = dims[1];        // keys that exist (rows of the score output)
  const int cap = dims[2];      // rows allocated in the packed store (>= N)
  const int offset = dims[3];   // absolute position of query row 0
  const int n_vis = min(N, (offset + l + 1) / 4);
  const int s = tile * TG + tid;
  const size_t row = size_t(b) * L + l;
  threadgroup float tq[HC * D];
  threadgroup float tw[HC];
  float score = 0.0f;
  // Uniform per threadgroup: a tile wholly past the causal limit skips every barrier together.
  if (tile * TG < n_vis) {
    auto qrow = q + row * (H * D);
    auto wrow = w + row * H;
    const bool active = s < n_vis;
    auto kw = keys + (size_t(b) * cap + (active ? s : 0)) * (D / 8);
    auto ks = kscales + (size_t(b) * cap + (active ? s : 0)) * (D / 32);
    for (int h0 = 0; h0 < H; h0 += HC) {
      for (int i = tid; i < HC * D; i += TG) tq[i] = qrow[h0 * D + i];
      for (int i = tid; i < HC; i += TG) tw[i] = wrow[h0 + i];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (active) {
        float acc[HC];
        for (int hh = 0; hh < HC; ++hh) acc[hh] = 0.0f;
        for (int blk = 0; blk < D / 32; ++blk) {
          float kv[32];
          for (int j = 0; j < WPB; ++j) {
            const uint word = kw[blk * WPB + j];
            for (int i = 0; i < 8; ++i) kv[j * 8 + i] = v4_fp4_e2m1((word >> (4 * i)) & 15u);
          }
          const float sc = v4_e8m0(uint(ks[blk]));
          for (int hh = 0; hh < HC; ++hh) {
            float dot = 0.0f;
            for (int i = 0; i < 32; ++i) dot += tq[hh * D + blk * 32 + i] * kv[i];
            acc[hh] += dot * sc;
          }
        }
        for (int hh = 0; hh < HC; ++hh) score += tw[hh] * max(acc[hh], 0.0f);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);  // before the next heads overwrite tq
    }
  }
  if (s < N) scores[row * N + s] = s < n_vis ? score : -INFINITY;
"""

SELECT_SOURCE = r"""
  // Template: TG threads, K picks, HAS_IDS (input carries candidate ids; else ids are positions
  // and visibility is causal), WRITE_VALUES (emit the picked scores too: split first stage).
  constexpr int NSG = TG / 32;
  const int tid = int(thread_index_in_threadgroup);
  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int part = int(threadgroup_position_in_grid.x);
  const int l = int(threadgroup_position_in_grid.y);
  const int b = int(threadgroup_position_in_grid.z);
  const int M = dims[0];       // row length of vals
  const int L = dims[1];
  const int offset = dims[2];
  const int chunk = dims[3];
  const int P = dims[4];       // chunks per row (output slots per row = P * K)
  const size_t row = size_t(b) * L + l;
  const int n_valid = HAS_IDS ? M : min(M, (offset + l + 1) / 4);
  const int lo = part * chunk;
  const int hi = min(lo + chunk, n_valid);
  auto v = vals + row * M;
  auto id = ids + row * M;
  auto oi = out_idx + (row * P + part) * K;
  auto ov = out_val + (row * P + part) * K;

  threadgroup uint tcount[NSG * 16];
  threadgroup uint tscan[2 * NSG];

  // Radix select of the K-th largest key, 4 bits per pass from the top. prefix: the bits fixed
  // so far (the low bits zero); cnt[d] = entries with key >= prefix + (d << shift).
  uint prefix = 0u;
  int n_total = 0;
  bool take_all = false;
  for (int shift = 28; shift >= 0; shift -= 4) {
    uint cnt[16];
    for (int d = 0; d < 16; ++d) cnt[d] = 0u;
    for (int j = lo + tid; j < hi; j += TG) {
      if (HAS_IDS && id[j] < 0) continue;
      const uint key = v4_order_key(v[j]);
      for (int d = 0; d < 16; ++d) cnt[d] += key >= prefix + (uint(d) << shift) ? 1u : 0u;
    }
    for (int d = 0; d < 16; ++d) cnt[d] = simd_sum(cnt[d]);
    if (lane == 0) {
      for (int d = 0; d < 16; ++d) tcount[sg * 16 + d] = cnt[d];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint tot[16];
    for (int d = 0; d < 16; ++d) {
      tot[d] = 0u;
      for (int g = 0; g < NSG; ++g) tot[d] += tcount[g * 16 + d];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // tcount is rewritten next pass
    if (shift == 28) {
      n_total = int(tot[0]);  // every valid key is >= 0
      if (n_total <= K) {
        take_all = true;
        break;
      }
    }
    int best = 0;  // largest d whose threshold still has >= K entries at or above it
    for (int d = 1; d < 16; ++d) best = tot[d] >= uint(K) ? d : best;
    prefix += uint(best) << shift;
  }
  // Now prefix is the exact K-th largest key (unless take_all). Count what each thread emits.
  uint my_gt = 0u;
  uint my_eq = 0u;
  for (int j = lo + tid; j < hi; j += TG) {
    if (HAS_IDS && id[j] < 0) continue;
    const uint key = v4_order_key(v[j]);
    my_gt += (take_all || key > prefix) ? 1u : 0u;
    my_eq += (!take_all && key == prefix) ? 1u : 0u;
  }
  // Exclusive prefix sums over the threadgroup: a simdgroup scan, then the simdgroups' totals.
  uint inc_gt = my_gt;
  uint inc_eq = my_eq;
  for (int k = 1; k < 32; k <<= 1) {
    const uint src = uint(max(lane - k, 0));
    const uint up_gt = simd_shuffle(inc_gt, src);
    const uint up_eq = simd_shuffle(inc_eq, src);
    inc_gt += lane >= k ? up_gt : 0u;
    inc_eq += lane >= k ? up_eq : 0u;
  }
  if (lane == 31) {
    tscan[sg] = inc_gt;
    tscan[NSG + sg] = inc_eq;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint base_gt = 0u;
  uint base_eq = 0u;
  uint total_gt = 0u;
  for (int g = 0; g < NSG; ++g) {
    base_gt += g < sg ? tscan[g] : 0u;
    base_eq += g < sg ? tscan[NSG + g] : 0u;
    total_gt += tscan[g];
  }
  uint pos_gt = base_gt + inc_gt - my_gt;
  uint pos_eq = base_eq + inc_eq - my_eq;
  const uint need_eq = uint(K) - min(total_gt, uint(K));
  for (int j = lo + tid; j < hi; j += TG) {
    if (HAS_IDS && id[j] < 0) continue;
    const float x = v[j];
    const uint key = v4_order_key(x);
    int slot = -1;
    if (take_all || key > prefix) {
      slot = int(pos_gt++);
    } else if (key == prefix) {
      if (pos_eq < need_eq) slot = int(total_gt + pos_eq);
      pos_eq++;
    }
    if (slot >= 0) {
      oi[slot] = HAS_IDS ? id[j] : j;
      if (WRITE_VALUES) ov[slot] = x;
    }
  }
  // Fewer than K valid entries: -1 (and -inf) fill the rest.
  const int filled = take_all ? n_total : K;
  for (int i = filled + tid; i < K; i += TG) {
    oi[i] = -1;
    if (WRITE_VALUES) ov[i] = -INFINITY;
  }
"""

HEADER = CUDA_PRELUDE + _CUDA_EXTRA + DECODE_HEADER + _SELECT_HEADER

SCORE = KernelSpec(name="v4_indexer_score", input_names=("q", "w", "keys", "kscales", "dims"),
                   output_names=("scores",), source=SCORE_SOURCE, header=HEADER)
SELECT = KernelSpec(name="v4_indexer_select", input_names=("vals", "ids", "dims"),
                    output_names=("out_idx", "out_val"), source=SELECT_SOURCE, header=HEADER)


def indexer_scores_reference(q, w, packed, scales, *, n_keys: int, offset: int) -> mx.array:
    """Scores [B, L, N] (-inf where not visible): the Indexer's math on dequantized keys.

    q [B, L, H, d] fp32 (RoPE'd, rotated, FP4-rounded); w [B, L, H] fp32 (already scaled by
    d^-0.5 * H^-0.5); packed uint8 [B, C, d/2], scales uint8 [B, C, d/32] with C >= n_keys."""
    from ..formats import dequantize_fp4

    B, L, H, d = q.shape
    keys = dequantize_fp4(packed[:, :n_keys], scales[:, :n_keys])  # [B, N, d]
    dots = (q.astype(mx.float32).reshape(B, L * H, d) @ keys.swapaxes(1, 2)).reshape(B, L, H, n_keys)
    scores = (mx.maximum(dots, 0) * w.astype(mx.float32)[..., None]).sum(axis=2)
    visible = (mx.arange(offset, offset + L)[:, None] + 1) // 4
    return mx.where(mx.arange(n_keys)[None, :] >= visible, -mx.inf, scores)


def indexer_topk_reference(q, w, packed, scales, *, n_keys: int, offset: int, k: int) -> mx.array:
    """The definition: top-k entry ids [B, L, k] int32 per query, -1 where not visible."""
    B, L = q.shape[:2]
    scores = indexer_scores_reference(q, w, packed, scales, n_keys=n_keys, offset=offset)
    if n_keys < k:  # argpartition needs k <= N; the missing picks are -1 anyway
        scores = mx.concatenate([scores, mx.full((B, L, k - n_keys), -mx.inf)], axis=-1)
    idx = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    visible = (mx.arange(offset, offset + L)[:, None] + 1) // 4
    return mx.where(idx >= mx.minimum(visible, n_keys)[None], -1, idx)


def heads_per_stage(H: int, D: int, budget: int = 8192) -> int:
    """Heads staged in threadgroup memory at once: ``HC * D`` fp32 within ``budget`` bytes,
    dividing H (16 at Flash/Pro sizes: 8 KB, 16 accumulators per thread)."""
    hc = max(1, min(H, budget // (4 * D)))
    while H % hc:
        hc -= 1
    return hc


def default_select_splits(n_keys: int, k: int, rows: int) -> int:
    """Chunks per row for the select: only when few rows would leave the GPU idle (decode)
    and the row is long; each chunk keeps at least 8k (and 4096) entries."""
    if rows >= 32:
        return 1
    chunk = max(8 * k, 4096)
    return max(1, min(64, n_keys // chunk))


def indexer_scores_kernel(q, w, packed, scales, *, n_keys: int, offset: int, threads: int = 256,
                          heads_stage: int | None = None, runner=metal_runner) -> mx.array:
    """The scoring launch: fp32 scores [B, L, n_keys] as :func:`indexer_scores_reference`."""
    B, L, H, D = q.shape
    cap = packed.shape[1]
    if D % 32 or packed.shape[-1] * 2 != D or scales.shape[-1] * 32 != D or n_keys > cap or n_keys < 1:
        raise ValueError(f"indexer kernel: keys {packed.shape}/{scales.shape}/n_keys={n_keys} "
                         f"do not match head_dim={D}")
    if threads % 32:
        raise ValueError("threadgroup size must be a multiple of 32")
    hc = heads_stage or heads_per_stage(H, D)
    if H % hc:
        raise ValueError(f"heads_stage={hc} does not divide {H} heads")
    words = mx.contiguous(packed).view(mx.uint32)  # [B, C, D/8]: 8 codes per word, low nibble first
    dims = mx.array([L, n_keys, cap, offset], dtype=mx.int32)
    (scores,) = runner(SCORE, [q.astype(mx.float32), w.astype(mx.float32), words, scales, dims],
                       [(B, L, n_keys)], [mx.float32], (math.ceil(n_keys / threads) * threads, L, B),
                       (threads, 1, 1), [("D", D), ("H", H), ("HC", hc), ("TG", threads)])
    return scores


def topk_select_kernel(scores, *, offset: int, k: int, splits: int = 1, threads: int = 256,
                       runner=metal_runner) -> mx.array:
    """The select launch(es): ids [B, L, k] of the k largest visible scores of each row
    (visible: ``s < (offset + l + 1) // 4``), -1 fill; ``splits > 1``: chunked, then merged."""
    B, L, N = scores.shape
    if threads % 32:
        raise ValueError("threadgroup size must be a multiple of 32")
    tg = (threads, 1, 1)
    no_ids = mx.zeros((1,), dtype=mx.int32)  # not read without HAS_IDS; keeps the buffer non-empty
    chunk = math.ceil(N / max(1, splits))
    splits = math.ceil(N / chunk)
    dims = mx.array([N, L, offset, chunk, splits], dtype=mx.int32)
    template = [("TG", threads), ("K", k), ("HAS_IDS", False), ("WRITE_VALUES", splits > 1)]
    val_shape = (B, L, splits * k) if splits > 1 else (1,)  # scores of the picks: only for the merge
    idx, val = runner(SELECT, [scores, no_ids, dims], [(B, L, splits * k), val_shape], [mx.int32, mx.float32],
                      (threads * splits, L, B), tg, template)
    if splits == 1:
        return idx
    dims = mx.array([splits * k, L, offset, splits * k, 1], dtype=mx.int32)
    idx, _ = runner(SELECT, [val, idx, dims], [(B, L, k), (1,)], [mx.int32, mx.float32], (threads, L, B), tg,
                    [("TG", threads), ("K", k), ("HAS_IDS", True), ("WRITE_VALUES", False)])
    return idx


#: Largest fp32 score buffer (elements) one launch pair writes; prefill rows go in blocks.
SCORE_BUDGET = 1 << 24


def indexer_topk_kernel(q, w, packed, scales, *, n_keys: int, offset: int, k: int, splits: int = 1,
                        score_threads: int = 256, select_threads: int = 256, heads_stage: int | None = None,
                        score_budget: int | None = None, runner=metal_runner) -> mx.array:
    """The kernel launches for :func:`indexer_topk`: scoring, then one select (``splits == 1``)
    or a chunked select plus a merge select over the ``splits * k`` candidates. Query rows go
    in blocks whose [B, rows, N] scores fit ``score_budget`` (a 2K-token prefill chunk at 1M
    context would otherwise write 2 GB of scores)."""
    B, L = q.shape[:2]
    if n_keys == 0:
        return mx.full((B, L, k), -1, dtype=mx.int32)
    rows = max(1, min(L, (score_budget or SCORE_BUDGET) // (B * n_keys)))
    picks = []
    for s in range(0, L, rows):
        e = min(L, s + rows)
        scores = indexer_scores_kernel(q[:, s:e], w[:, s:e], packed, scales, n_keys=n_keys, offset=offset + s,
                                       threads=score_threads, heads_stage=heads_stage, runner=runner)
        picks.append(topk_select_kernel(scores, offset=offset + s, k=k, splits=splits, threads=select_threads,
                                        runner=runner))
    return picks[0] if len(picks) == 1 else mx.concatenate(picks, axis=1)


def indexer_topk(q, w, packed, scales, *, n_keys: int, offset: int, k: int, use_kernel: bool,
                 splits: int | None = None) -> mx.array:
    """Top-k index-key ids [B, L, k] (int32, -1 = none) of each query: shapes as in
    :func:`indexer_scores_reference`. ``use_kernel``: the Metal kernels (split select chosen
    by :func:`default_select_splits` unless ``splits`` is given), else the reference."""
    if not use_kernel:
        return indexer_topk_reference(q, w, packed, scales, n_keys=n_keys, offset=offset, k=k)
    if splits is None:
        splits = default_select_splits(n_keys, k, q.shape[0] * q.shape[1])
    return indexer_topk_kernel(q, w, packed, scales, n_keys=n_keys, offset=offset, k=k, splits=splits,
                               runner=metal_runner)
