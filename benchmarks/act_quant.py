"""What the FP8 rounding of GEMM inputs (``act_quant``) costs: CPU prefill and decode with it on
and off, each run in its own process, alternated; then the Metal cost as a projection.

    python benchmarks/act_quant.py [--prompt 512] [--decode 64] [--repeats 2]

A random official-format checkpoint (the BENCH_CONFIG of benchmarks/distributed.py: hidden 512,
6 layers of all three kinds, 16 experts top-4, every rounded width a multiple of 128), float32
on the CPU backend. The projection counts, from the real V4 shapes, how many values are rounded
per token and how many extra kernels that is; the arithmetic is printed, nothing is measured on
a Mac.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# benchmarks/distributed.py's BENCH_CONFIG
BENCH_CONFIG = dict(
    model_type="deepseek_v4", vocab_size=8192, hidden_size=512, num_hidden_layers=6,
    compress_ratios=[0, 4, 128, 4, 128, 4, 0], num_hash_layers=1, num_attention_heads=8, head_dim=128,
    qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=128, n_routed_experts=16,
    num_experts_per_tok=4, moe_intermediate_size=256, index_n_heads=16, index_head_dim=64, index_topk=32,
    sliding_window=128, max_position_embeddings=65536,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                  "beta_fast": 32, "beta_slow": 1},
)


def worker(ckpt: str, act_quant: bool, prompt: int, decode: int) -> dict:
    import mlx_v4  # noqa: I001  (first: the BLAS preload must run before mlx.core loads)
    import mlx.core as mx

    model, _ = mlx_v4.load(ckpt, dtype=mx.float32, model_config={"act_quant": act_quant})
    assert model.args.act_quant == act_quant and model.args.fake_quant
    ids = mx.random.randint(0, model.args.vocab_size, (1, prompt), key=mx.random.key(0))

    def run(n_prompt: int, n_decode: int) -> dict:
        """tok/s by wall clock and by this process's CPU time (less sensitive to other jobs on a
        shared machine; equal to wall time for a single-threaded process on an idle core)."""
        cache = model.make_cache()
        w0, c0 = time.perf_counter(), time.process_time()
        logits = model(ids[:, :n_prompt], cache)
        mx.eval(logits, [c.state for c in cache])
        w1, c1 = time.perf_counter(), time.process_time()
        tok = logits[:, -1:].argmax(-1)
        for _ in range(n_decode):
            logits = model(tok, cache)
            tok = logits[:, -1:].argmax(-1)
            mx.eval(tok)
        w2, c2 = time.perf_counter(), time.process_time()
        return {"prefill_tps": n_prompt / (w1 - w0), "decode_tps": n_decode / (w2 - w1),
                "prefill_cpu_tps": n_prompt / (c1 - c0), "decode_cpu_tps": n_decode / (c2 - c1)}

    run(min(prompt, 64), 4)  # warm-up: kernels compiled, BLAS threads started
    return {"act_quant": act_quant, **run(prompt, decode)}


def micro(rows: int = 512, width: int = 4096, repeats: int = 20) -> str:
    """The rounding alone, in this process: act_quant_fp8 (bit-pattern e4m3 grid, compiled) vs
    the to_fp8/from_fp8 round trip of the KV rounding at block 128 (bit-identical, tested)."""
    import mlx_v4  # noqa: F401, I001  (first: the BLAS preload must run before mlx.core loads)
    import mlx.core as mx
    from mlx_v4.layers import fake_quant as fq

    x = mx.random.normal((rows, width), key=mx.random.key(0))
    mx.eval(x)
    out = {}
    for name, fn in (("act_quant_fp8", fq.act_quant_fp8), ("to_fp8 round trip", lambda v: fq.fake_quant_fp8(v, 128)),
                     ("one copy (x * 1)", lambda v: v * 1.0)):
        mx.eval(fn(x))
        t = time.perf_counter()
        for _ in range(repeats):
            mx.eval(fn(x))
        out[name] = (time.perf_counter() - t) / repeats * 1e3
    return f"rounding a [{rows}, {width}] float32 input, ms per call: " + ", ".join(
        f"{k} {v:.2f}" for k, v in out.items())


def projection() -> list[str]:
    """Values rounded per token and extra kernels per decode step for the released configs."""
    from mlx_v4.config import preset

    lines = []
    for name in ("flash", "pro"):
        a = preset(name)
        D, ql, GR, inter, k = (a.hidden_size, a.q_lora_rank, a.o_groups * a.o_lora_rank,
                               a.moe_intermediate_size, a.num_experts_per_tok)
        csa = sum(1 for r in a.compress_ratios if r == 4)
        # per layer: x (wq_a+wkv), qr (wq_b), wo_b input, MoE x (w1/w3 of every expert),
        # the shared and k routed w2 inputs; CSA layers also round qr for the indexer's wq_b
        per_layer = D + ql + GR + D + inter + k * inter
        values = a.num_hidden_layers * per_layer + csa * ql
        roundings = a.num_hidden_layers * 6 + csa
        bytes_ = values * 6  # bf16: read for the block max, read again and written by the fused pass
        lines.append(
            f"{name}: {a.num_hidden_layers} layers x ({D} + {ql} + {GR} + {D} + {inter} + {k}x{inter}) + "
            f"{csa} CSA x {ql} = {values:,} values rounded per token; x 6 B (bf16 read twice, written "
            f"once) = {bytes_ / 1e6:.1f} MB per token = {bytes_ / 800e9 * 1e6:.0f} us at 800 GB/s; "
            f"{roundings} roundings x up to 3 kernels (|x|, block max, one fused elementwise pass) = "
            f"{3 * roundings} extra kernel dispatches per decode step = {3 * roundings * 2.5e-3:.1f}-"
            f"{3 * roundings * 5e-3:.1f} ms at an assumed 2.5-5 us each")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", nargs=2, metavar=("CKPT", "ACT_QUANT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1] == "1", a.prompt, a.decode)))
        return
    from mlx_v4.testing import official

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        official.write_official_checkpoint(ckpt, BENCH_CONFIG, official.random_official_weights(BENCH_CONFIG, 1))
        rows = {False: [], True: []}
        for _ in range(a.repeats):
            for on in (False, True):  # alternated, so load drifts hit both alike
                cmd = [sys.executable, __file__, "--worker", str(ckpt), "1" if on else "0",
                       "--prompt", str(a.prompt), "--decode", str(a.decode)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
                rows[on].append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ("prefill_tps", "decode_tps", "prefill_cpu_tps", "decode_cpu_tps")
    best = {on: {k: max(r[k] for r in rows[on]) for k in keys} for on in rows}
    print(f"CPU, float32, BENCH_CONFIG, prompt {a.prompt}, decode {a.decode}, best of {a.repeats} per mode "
          f"(each a fresh process, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| act_quant | prefill tok/s | decode tok/s | prefill tok/CPU-s | decode tok/CPU-s |")
    print("|---|---:|---:|---:|---:|")
    for on in (False, True):
        print(f"| {'on' if on else 'off'} | " + " | ".join(f"{best[on][k]:.1f}" for k in keys) + " |")
    print("| on / off | " + " | ".join(f"{best[True][k] / best[False][k]:.3f}" for k in keys) + " |")
    print("all runs:", json.dumps(rows))
    print(micro())
    print("\nMetal projection (arithmetic, not measured):")
    for line in projection():
        print("-", line)


if __name__ == "__main__":
    main()
