"""Bytes, FLOPs and bandwidth-bound time per call of each custom kernel at Flash/Pro sizes.

No Metal runs here, so nothing is timed: this is the budget a Mac run should be held to.
Bytes count what each kernel must move from/to memory; "as launched" also counts the
re-reads of the shared K = V rows by every head group of the sparse decode kernel (the L2
may absorb them; the ideal counts each row once). Time = bytes / bandwidth.

    python benchmarks/kernels.py                    # M3 Ultra (800 GB/s)
    python benchmarks/kernels.py --bandwidth-gbs 546 --models pro
"""

from __future__ import annotations

import argparse

from mlx_v4.config import preset
from mlx_v4.kernels.indexer_topk import SELECT_READS, default_select_splits
from mlx_v4.kernels.sparse_decode import _heads_per_group, default_splits

KV_ROW = 448 + 7 + 128  # packed main KV entry: e4m3 codes, E8M0 per 64, bf16 RoPE dims


def sparse_decode_cost(args, act_bytes: int = 2) -> dict:
    """One CSA layer, one decode token (window of sliding_window rows + index_topk picks)."""
    H, D, W, K = args.num_attention_heads, args.head_dim, args.sliding_window, args.index_topk
    hg = _heads_per_group(H, D)
    keys = W * D * act_bytes + K * (KV_ROW + 4)
    io = 2 * H * D * act_bytes + H * 4
    splits = default_splits(W + K)
    partials = 0 if splits == 1 else 2 * H * splits * (D + 2) * 4  # written then read back
    flops = 4 * H * D * (W + K)  # QK and PV multiply-adds
    return dict(ideal=keys + io + partials, launched=keys * (H // hg) + io + partials, flops=flops,
                calls=sum(1 for r in args.compress_ratios[: args.num_hidden_layers] if r == 4),
                note=f"H={H} D={D} W={W} top-k={K} heads/group={hg} splits={splits}")


def sparse_prefill_cost(args, chunk: int = 2048, act_bytes: int = 2) -> dict:
    """One CSA layer, one prefill chunk of ``chunk`` queries (each: its sliding window of dense
    rows + index_topk picks). Ideal: every query's picks read once (not deduplicated across
    queries), the window rows once; as launched: every (query, head group) threadgroup reads its
    own rows. The "calls/token" column counts calls per chunk here."""
    H, D, W, K = args.num_attention_heads, args.head_dim, args.sliding_window, args.index_topk
    hg = _heads_per_group(H, D)
    io = 2 * chunk * H * D * act_bytes + H * 4 + chunk * K * 4
    ideal = io + (chunk + W) * D * act_bytes + chunk * K * (KV_ROW + 4)
    launched = io + (H // hg) * chunk * (W * D * act_bytes + K * (KV_ROW + 4))
    return dict(ideal=ideal, launched=launched, flops=4 * H * D * (W + K) * chunk,
                calls=sum(1 for r in args.compress_ratios[: args.num_hidden_layers] if r == 4),
                note=f"chunk={chunk} H={H} D={D} W={W} top-k={K} heads/group={hg} (per chunk)")


def indexer_topk_cost(args, context: int) -> dict:
    """One CSA layer, one decode token at ``context`` tokens: score every visible packed FP4
    index key (N = context / 4), then select the top k (chunked + merged when split).
    Ideal: keys, queries and picks once, the fp32 score row written and read once; as launched:
    the select re-reads its row once per radix pass (L1/L2 may serve those). FLOPs: at 1M
    context the scoring is 4.3 GFLOP per layer and token, so it is compute-bound there unless
    a matrix-unit (simdgroup_matrix) path replaces the scalar FMA body; bytes alone understate it."""
    H, d, k = args.index_n_heads, args.index_head_dim, args.index_topk
    n = context // 4
    keys = n * (d // 2 + d // 32)
    io = H * d * 4 + H * 4 + k * 4
    splits = default_select_splits(n, k, rows=1)
    cand = 0 if splits == 1 else splits * k * 8  # (score, id) candidates, written then read
    ideal = keys + io + 2 * n * 4 + 2 * cand
    launched = keys + io + n * 4 + SELECT_READS * (n * 4 + cand) + cand
    flops = 2 * H * d * n + 2 * H * n
    return dict(ideal=ideal, launched=launched, flops=flops,
                calls=sum(1 for r in args.compress_ratios[: args.num_hidden_layers] if r == 4),
                note=f"ctx={context // 1024}K N={n} H={H} d={d} top-k={k} select splits={splits}")


def hyper_mix_cost(args) -> dict:
    """One hyper-connection step for one token: mixes in, pre/post/comb out (fp32)."""
    hc, it = args.hc_mult, args.hc_sinkhorn_iters
    n = (2 + hc) * hc
    b = n * 4 + 2 * hc * 4 + hc * hc * 4
    flops = 2 * hc * 10 + hc * hc * 4 + it * 2 * hc * hc * 2
    return dict(ideal=b, launched=b, flops=flops, calls=2 * args.num_hidden_layers,
                note=f"hc={hc} iters={it}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth-gbs", type=float, default=800.0, help="Mac memory bandwidth (M3 Ultra: 800)")
    ap.add_argument("--models", default="flash,pro")
    a = ap.parse_args()
    bw = a.bandwidth_gbs * 1e9
    print(f"bandwidth {a.bandwidth_gbs:g} GB/s; time = bytes / bandwidth (no launch overhead)\n")
    print("| model | kernel | shape | bytes/call (ideal) | bytes/call (as launched) | FLOPs/call | "
          "us/call (ideal) | calls/token | us/token (ideal .. launched) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in a.models.split(","):
        args = preset(name)
        costs = [("sparse decode", sparse_decode_cost(args)), ("sparse prefill", sparse_prefill_cost(args)),
                 ("hyper mix", hyper_mix_cost(args))]
        costs += [("indexer top-k", indexer_topk_cost(args, ctx)) for ctx in (65536, 1 << 20)]
        for kname, cost in costs:
            t_i, t_l = cost["ideal"] / bw * 1e6, cost["launched"] / bw * 1e6
            print(f"| {name} | {kname} | {cost['note']} | {cost['ideal']:,} | {cost['launched']:,} | "
                  f"{cost['flops']:,} | {t_i:.2f} | {cost['calls']} | "
                  f"{t_i * cost['calls']:.1f} .. {t_l * cost['calls']:.1f} |")


if __name__ == "__main__":
    main()
