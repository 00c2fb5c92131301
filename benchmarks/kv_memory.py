"""KV cache memory at the real attention dimensions of Flash and Pro, and long-context cost.

Part 1 (bytes): the real layer schedules and attention sizes (head_dim 512, index_head_dim 128,
ratios 4 and 128), with tiny hidden size and experts (they do not touch the cache). Prefills
N tokens, reports growth per token from cache.nbytes and from the allocated arrays, and the
extrapolation to 2**20 tokens beside the V3.2-style and V4-bf16 figures.

Part 2 (long context, small model): peak memory of chunked prefill at several prompt lengths
(it must grow only by the cache) and decode step time at several context lengths.

    python benchmarks/kv_memory.py                     # both parts, defaults
    python benchmarks/kv_memory.py --tokens 8192 --long 8192,32768,131072 --decode 2048,16384,65536
    python benchmarks/kv_memory.py --skip-bytes --fill random     # long context in minutes
"""

from __future__ import annotations

import argparse
import time

import mlx_v4  # noqa: F401  # isort: skip  (first: its BLAS preload must run before mlx.core loads)
import mlx.core as mx

from mlx_v4.cache import bytes_per_token, cache_breakdown, cache_nbytes, make_cache, planned_nbytes, reserve
from mlx_v4.config import preset
from mlx_v4.testing.tiny import random_model

GIB = 2**30
V32_STYLE = 61 * 2**20 * 1408  # 61 layers x (576 + 128) bf16 per token, one 1M sequence
V4_BF16_PRO = 10_334_371_840  # the 9.62 GiB figure (Pro schedule, bf16)


def small_preset(name: str, **over):
    """Real attention dims and layer schedule, tiny everything else."""
    base = dict(hidden_size=64, q_lora_rank=64, num_attention_heads=2, o_groups=1, o_lora_rank=32,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=512,
                index_n_heads=2)
    base.update(over)
    return preset(name, **base)


def prefill(model, ids, cache, step: int):
    for s in range(0, ids.shape[1], step):
        out = model(ids[:, s:s + step], cache, last_only=True)
        mx.eval(out, [c.state for c in cache])  # one chunk at a time: the graph never grows
    return out


def filled(cache) -> int:
    """Bytes of the rows actually written (the arrays' views), for growth per token."""
    return sum(a.nbytes for c in cache for a in c.state)


def part_bytes(tokens: int, step: int) -> None:
    print(f"== cache bytes, real attention dims, {tokens} tokens prefilled in chunks of {step} ==")
    print(f"{'model':6} {'B/token':>8} {'target':>7} {'nbytes':>10} {'allocated':>10} {'ratio':>6} "
          f"{'@2^20 tokens':>13} {'V3.2-style':>11} {'V4 bf16':>9}")
    targets = {"flash": 3514, "pro": 5031}
    for name in ("flash", "pro"):
        args = small_preset(name, max_position_embeddings=2**20)
        model = random_model(args, seed=0)
        ids = mx.random.randint(0, args.vocab_size, (1, tokens), key=mx.random.key(1))
        mx.eval(ids)
        half = tokens // 2
        base = mx.get_active_memory()
        cache = make_cache(args)
        reserve(cache, tokens)  # sized up front, as generation does: nbytes is what is allocated
        prefill(model, ids[:, :half], cache, step)
        used0 = filled(cache)
        out = prefill(model, ids[:, half:], cache, step)
        del out
        growth = (filled(cache) - used0) / (tokens - half)
        held = mx.get_active_memory() - base  # what MLX really holds for the cache now
        at_1m = planned_nbytes(args, 2**20)
        print(f"{name:6} {growth:8.1f} {targets[name]:7d} {cache_nbytes(cache) / 2**20:8.2f}MB {held / 2**20:8.2f}MB "
              f"{cache_nbytes(cache) / held:6.3f} {at_1m / GIB:9.2f} GiB {V32_STYLE / GIB:7.1f} GiB "
              f"{V4_BF16_PRO / GIB:5.2f} GiB")
        print(f"       asymptotic {bytes_per_token(args):.1f} B/token; breakdown {cache_breakdown(cache)}")
        del cache, model, ids  # so the next model's baseline does not include this cache


def fill_random(args, cache, tokens: int) -> None:
    """Stand in for prefilling ``tokens`` tokens: append random entries of the real packed formats
    (the counts a prefill would leave: tokens/ratio entries, tokens/4 index keys) and
    advance the offsets. A decode step's cost depends on these sizes, not on the values."""
    from mlx_v4.layers.fake_quant import quantize_index_key, quantize_kv_entry

    for c in cache:
        ratio = getattr(c, "ratio", 0)  # 0 for window-only layers
        if ratio:
            for s in range(0, tokens // ratio, 4096):
                n = min(4096, tokens // ratio - s)
                c.entries.append(quantize_kv_entry(mx.random.normal((1, n, args.head_dim)), c.rope_dim)[1])
                if ratio == 4:
                    c.index_keys.append(quantize_index_key(mx.random.normal((1, n, args.index_head_dim)))[1])
                mx.eval(c.state)
        c.offset = tokens


def part_long(lengths: list[int], decode_at: list[int], step: int, fill: str = "prefill") -> None:
    args = small_preset("flash", num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1,
                        max_position_embeddings=2**20)
    model = random_model(args, seed=0)
    how = "last chunk after random packed rows" if fill == "random" else "whole prompt"
    print(f"\n== chunked prefill peak memory ({how}), 4-layer model with real attention dims, chunk {step} ==")
    print(f"{'prompt':>8} {'cache':>10} {'peak':>10} {'peak - cache':>13} {'seconds':>8}")
    for n in lengths:
        ids = mx.random.randint(0, args.vocab_size, (1, n), key=mx.random.key(2))
        mx.eval(ids)
        cache = make_cache(args)
        reserve(cache, n)
        if fill == "random":
            # The last chunk sees the most context, so its peak is the prefill's peak: stand in
            # for all but two chunks, prefill one for real state, then measure the last.
            fill_random(args, cache, n - 2 * step)
            prefill(model, ids[:, n - 2 * step: n - step], cache, step)
            ids = ids[:, n - step:]
        mx.reset_peak_memory()
        t = time.perf_counter()
        prefill(model, ids, cache, step)
        dt = time.perf_counter() - t
        peak = mx.get_peak_memory()
        print(f"{n:8d} {cache_nbytes(cache) / 2**20:8.1f}MB {peak / 2**20:8.1f}MB {(peak - cache_nbytes(cache)) / 2**20:11.1f}MB {dt:8.1f}")
    print(f"\n== decode step time versus context (context: {'random packed rows + 1024 prefilled' if fill == 'random' else 'prefilled'}) ==")
    states = {}
    for n in decode_at:
        ids = mx.random.randint(0, args.vocab_size, (1, n), key=mx.random.key(3))
        cache = make_cache(args)
        reserve(cache, n + 256)
        if fill == "random":  # all but the last 1024 tokens stand-in, those prefilled for real
            fill_random(args, cache, n - 1024)
            ids = ids[:, n - 1024:]
        out = prefill(model, ids, cache, step)
        states[n] = (cache, mx.argmax(out[:, -1], axis=-1)[:, None])
    # Contexts take turns, round after round, and each keeps its median round: a noisy machine
    # slows every context alike instead of whichever happened to run during the noise.
    rounds, steps = 7, 8
    samples = {n: [] for n in decode_at}
    for r in range(rounds + 1):
        for n, (cache, tok) in states.items():
            t = time.perf_counter()
            for _ in range(steps):
                tok = mx.argmax(model(tok, cache)[:, -1], axis=-1)[:, None]
                mx.eval(tok)
            states[n] = (cache, tok)
            if r:  # round 0 warms up
                samples[n].append((time.perf_counter() - t) / steps)
    times = {n: sorted(v)[len(v) // 2] for n, v in samples.items()}
    for n, v in times.items():
        print(f"{n:8d} context: {v * 1000:7.2f} ms/token (median of {rounds} rounds of {steps} steps; "
              f"min {min(samples[n]) * 1000:.2f})")
    if not times:
        return
    lo, hi = min(times), max(times)
    print(f"decode speed at {hi} vs {lo}: {times[lo] / times[hi]:.2f}x "
          f"({100 * (1 - times[lo] / times[hi]):.0f}% slower; the best Mac engine loses 22% from 2K to 64K)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--long", default="8192,32768,131072")
    p.add_argument("--decode", default="2048,16384,65536")
    p.add_argument("--step", type=int, default=512)
    p.add_argument("--skip-long", action="store_true")
    p.add_argument("--fill", choices=("prefill", "random"), default="prefill",
                   help="random: contexts are random packed rows of the real sizes, then the last prefill "
                        "chunk (memory) or 1024 tokens (decode) run for real: minutes, not hours")
    p.add_argument("--skip-bytes", action="store_true")
    p.add_argument("--score-budget", type=int, help="override attention.SCORE_BUDGET (elements per query block)")
    p.add_argument("--index-budget", type=int, help="override indexer.SCORE_BUDGET (elements per score piece)")
    p.add_argument("--dequant-budget", type=int, help="override attention.DEQUANT_BUDGET (entry elements)")
    a = p.parse_args()
    from mlx_v4.layers import attention, indexer

    attention.SCORE_BUDGET = a.score_budget or attention.SCORE_BUDGET
    attention.DEQUANT_BUDGET = a.dequant_budget or attention.DEQUANT_BUDGET
    indexer.SCORE_BUDGET = a.index_budget or indexer.SCORE_BUDGET
    print(f"budgets (elements): attention scores {attention.SCORE_BUDGET}, dequantized entries "
          f"{attention.DEQUANT_BUDGET}, indexer scores {indexer.SCORE_BUDGET}")
    if not a.skip_bytes:
        part_bytes(a.tokens, a.step)
    if not a.skip_long:
        lengths = [int(x) for x in a.long.split(",") if x]
        part_long(lengths, [int(x) for x in a.decode.split(",") if x], a.step, a.fill)


if __name__ == "__main__":
    main()
