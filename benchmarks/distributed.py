"""Distributed inference: one process versus 2 ranks (pipeline, tensor) on this machine.

    PYTHONPATH=. python benchmarks/distributed.py [--decode 64] [--prompt 256]

Writes a small random checkpoint in the official format, runs ``mlx_v4.testing.dist_worker``
alone and under ``mlx.launch -n 2`` (ring backend over loopback), and prints tokens/s side by
side with the bytes each rank handed to the collectives per decoded token, both counted (the
arrays' sizes as they were sent) and computed from the shapes. Then it prints the traffic a
token costs for the real V4-Pro config, and what that means over Thunderbolt.

On one machine the ranks share its cores, so this measures overhead (the transport and the
extra synchronisation), not a speed-up: pipeline ranks run one after another by design, and
tensor ranks split the work but wait on each other twice per layer.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_CONFIG = dict(
    model_type="deepseek_v4", vocab_size=8192, hidden_size=512, num_hidden_layers=6,
    compress_ratios=[0, 4, 128, 4, 128, 4, 0], num_hash_layers=1, num_attention_heads=8, head_dim=128,
    qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=128, n_routed_experts=16,
    num_experts_per_tok=4, moe_intermediate_size=256, index_n_heads=16, index_head_dim=64, index_topk=32,
    sliding_window=128, max_position_embeddings=65536,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                  "beta_fast": 32, "beta_slow": 1},
)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("MLX_HOSTFILE", "MLX_RANK"):
        env.pop(k, None)
    return env


def run(n: int, mode: str, ckpt: Path, out: Path, a) -> dict:
    args = [str(ckpt), str(out), "--mode", mode, "--prompt", str(a.prompt), "--decode", str(a.decode),
            "--chunk", str(a.prompt)]
    if n == 1:
        cmd = [sys.executable, "-m", "mlx_v4.testing.dist_worker", *args]
    else:
        launch = Path(sys.executable).parent / "mlx.launch"
        cmd = [str(launch), "--backend", "ring", "-n", str(n), "-p", str(a.port), "--python", sys.executable,
               "-m", "mlx_v4.testing.dist_worker", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if not out.exists():
        raise SystemExit(f"{mode} x{n} failed:\n{r.stdout}\n{r.stderr}")
    z = np.load(out)
    out.unlink()
    return dict(n=n, mode=mode, wall=time.perf_counter() - t0, prefill_tps=a.prompt / float(z[f"{mode}/t_prefill"]),
                decode_tps=a.decode / float(z[f"{mode}/t_decode"]), traffic=json.loads(str(z[f"{mode}/traffic"])),
                logits=z[f"{mode}/logits"], tokens=z[f"{mode}/tokens"])


def expected_per_token(args, mode: str, n: int, dtype_bytes: int) -> dict[str, float]:
    """Bytes per decoded token per rank handed to collectives, from the shapes (see
    mlx_v4/distributed.py and mlx_v4/parallel.py)."""
    D, hc, V = args.hidden_size, args.hc_mult, args.vocab_size
    if mode == "pipeline":
        return {"send (per boundary)": hc * D * dtype_bytes, "logits all_sum": V * 4}
    # wo_b output in the compute dtype, routed experts' output in float32, per layer
    return {"all_sum": args.num_hidden_layers * D * (dtype_bytes + 4)}


def pro_traffic() -> None:
    from mlx_v4 import config

    pro = config.preset("pro")
    D, hc, V, L = pro.hidden_size, pro.hc_mult, pro.vocab_size, pro.num_hidden_layers
    stream = hc * D * 2  # bf16 on Metal
    logits = V * 4
    per_layer_tp = D * 2 + D * 4
    print("\nExpected per-token traffic, DeepSeek V4-Pro (hidden 7168, hc_mult 4, 61 layers, vocab 129280, "
          "bf16 activations on Metal):")
    print(f"  pipeline: {stream:,} B of hyper-connection streams [1, 1, 4, 7168] bf16 per rank boundary, "
          f"plus the logits broadcast ({logits:,} B float32, one all_sum per token)")
    print(f"  tensor:   {2 * L} all_sum per token ({per_layer_tp:,} B per layer: wo_b bf16 + experts fp32), "
          f"{L * per_layer_tp:,} B reduced per token")
    print("  a ring all_sum of S bytes moves about 2 (N-1)/N x S bytes in and out of each rank")
    for name, gbps in (("Thunderbolt 4 (40 Gb/s)", 40), ("Thunderbolt 5 (80 Gb/s)", 80), ("10 GbE", 10)):
        bps = gbps * 1e9 / 8
        for n in (2, 4):
            pp = (stream + 2 * (n - 1) / n * logits) / bps
            tp = (2 * (n - 1) / n * L * per_layer_tp) / bps
            print(f"  {name}, {n} Macs: wire time per token at line rate: pipeline {pp * 1e3:.2f} ms per boundary, "
                  f"tensor {tp * 1e3:.2f} ms (+ {2 * L} round-trip latencies)")


def collectives_rank() -> None:
    """Under mlx.launch: the time of one collective by size (rank 0 prints)."""
    import mlx.core as mx

    g = mx.distributed.init(backend="ring", strict=True)
    for nbytes in (4, 2048, 1 << 19):
        x = mx.ones((nbytes // 4,))
        mx.eval(mx.distributed.all_sum(x, group=g))
        t = time.perf_counter()
        for _ in range(30):
            mx.eval(mx.distributed.all_sum(x, group=g))
        dt = (time.perf_counter() - t) / 30
        if g.rank() == 0:
            print(f"  ring all_sum of {nbytes:>7,} B: {dt * 1e3:6.2f} ms", flush=True)


def _tcp_peer(port: int) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(200):
            c.sendall(c.recv(2048, socket.MSG_WAITALL))


def tcp_rtt() -> float:
    """Round trip of 2 KB over plain loopback TCP between two processes (seconds)."""
    import multiprocessing
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        peer = multiprocessing.Process(target=_tcp_peer, args=(srv.getsockname()[1],))
        peer.start()
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * 2048
        t = time.perf_counter()
        for _ in range(200):
            c.sendall(msg)
            c.recv(2048, socket.MSG_WAITALL)
        dt = (time.perf_counter() - t) / 200
        c.close()
        peer.join()
    return dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--port", type=int, default=41000)
    p.add_argument("--collectives-rank", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.collectives_rank:
        return collectives_rank()
    from mlx_v4.config import ModelArgs
    from mlx_v4.testing import official

    args = ModelArgs.from_dict(BENCH_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        official.write_official_checkpoint(ckpt, BENCH_CONFIG, official.random_official_weights(BENCH_CONFIG, 1))
        out = Path(tmp) / "out.npz"
        rows = [run(1, "single", ckpt, out, a), run(2, "pipeline", ckpt, out, a), run(2, "tensor", ckpt, out, a)]
    ref = rows[0]["logits"]
    print(f"model: hidden {args.hidden_size}, {args.num_hidden_layers} layers, {args.n_routed_experts} experts, "
          f"vocab {args.vocab_size}, float32 on CPU; prompt {a.prompt} tokens, {a.decode} decode steps; "
          f"{os.cpu_count()} cores shared by all ranks")
    hdr = (f"{'run':<14}{'prefill tok/s':>14}{'decode tok/s':>14}{'vs single':>11}{'prompt |dlogit|':>16}"
           f"{'same tokens':>13}  bytes/token/rank (counted | from shapes)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        name = "single" if r["n"] == 1 else f"{r['mode']} x{r['n']}"
        diff = float(np.abs(r["logits"][0] - ref[0]).max())
        same = int((r["tokens"] == rows[0]["tokens"]).cumprod().sum())
        counted = ""
        if r["n"] > 1:
            per = [{k: v / a.decode for k, v in t.items()} for t in r["traffic"]]
            counted = "; ".join(f"r{i}: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(t.items())) for i, t in enumerate(per))
            exp = expected_per_token(args, r["mode"], r["n"], 4)
            counted += " | " + ", ".join(f"{k} {v:,}" for k, v in exp.items())
        print(f"{name:<14}{r['prefill_tps']:>14.1f}{r['decode_tps']:>14.1f}{r['decode_tps'] / rows[0]['decode_tps']:>10.2f}x"
              f"{diff:>16.2e}{f'{same}/{a.decode}':>13}  {counted}")
    print("\nFixed cost of one collective here (2 ranks, loopback):")
    launch = Path(sys.executable).parent / "mlx.launch"
    r = subprocess.run([str(launch), "--backend", "ring", "-n", "2", "-p", str(a.port + 10), "--python", sys.executable,
                        str(Path(__file__).resolve()), "--collectives-rank"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    print(r.stdout.rstrip() or r.stderr)
    print(f"  plain TCP round trip of 2,048 B between two processes: {tcp_rtt() * 1e3:.3f} ms")
    pro_traffic()


if __name__ == "__main__":
    main()
