"""DeepSeek V4.1 Engram read-ahead: step time with every Engram layer's rows requested when the
step starts (the default) against each layer reading its own rows when it gets there.

A synthetic V4.1 checkpoint is written to a temp dir: the tiny test model's layer layout
(8 layers, Engram at layers 1 and 5) widened to ``--hidden``, with Engram rows of the release's
shape (24 rows of 256 FP8 + 8 scale bytes per token and layer: max n-gram 4, 8 heads) in two
sparse tables of ``--vocab``-sized hash ranges (2 x 59 GiB at the default, about 240M rows each, near
the release's 384M; nothing written).
A sparse file's rows come from no disk, so a slower disk is SIMULATED: ``EngramTable.read_hook``
sleeps ``--latency-us`` after every row read (sleep, like pread, releases the GIL, so reads in
flight on the reader threads overlap as an SSD's queue would). ``--real-disk`` instead writes
smaller tables for real and drops their pages from the page cache before each run: this
machine's disk (Linux, not a Mac's SSD).

Each (latency, mode) runs in its own process, modes interleaved ``--repeats`` times: a
``--prompt``-token prefill in chunks of ``--chunk`` (``generation.prefill``, which with read-ahead
also starts the next chunk's reads before evaluating the current one), then ``--decode`` steps
teacher-forced from a fixed random sequence.
Reported: prefill time, median decode step, and the time per decode step the model waited for
Engram rows (``wait_seconds`` of the tables' stats).

    python benchmarks/engram_read_ahead.py                     # the table in BENCHMARKS.md
    python benchmarks/engram_read_ahead.py --decode 8 --latencies 0,200   # a quick look
    python benchmarks/engram_read_ahead.py --real-disk --vocab 600000     # this machine's disk, 7 GiB written
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_v41" / "model"
MODES = ("at the layer", "read-ahead")


def _table_shard(path: Path, name: str, rows: int, dim: int, dense: bool) -> None:
    """Rewrite ``path`` as a shard holding one all-zero FP8 table and its scales: sparse, or
    with every byte written (``dense``: rows then really come from the disk)."""
    header = {name + ".weight": {"dtype": "F8_E4M3", "shape": [rows, dim], "data_offsets": [0, rows * dim]},
              name + ".scale": {"dtype": "F8_E8M0", "shape": [rows, dim // 32],
                                "data_offsets": [rows * dim, rows * dim + rows * (dim // 32)]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        size = rows * (dim + dim // 32)
        if dense:
            block = bytes(64 << 20)
            for done in range(0, size, len(block)):
                f.write(block[: min(len(block), size - done)])
            f.flush()
            os.fsync(f.fileno())
        else:
            f.truncate(8 + len(raw) + size)


def make_checkpoint(dst: Path, hidden: int, vocab: int, dense: bool) -> tuple[int, list[str]]:
    """-> (bytes of both Engram tables, their shards)."""
    from mlx_v4.testing.official_v41 import (
        engram_layout,
        random_official_v41_weights,
        write_official_v41_checkpoint,
    )

    config = json.loads((TINY / "config.json").read_text())
    text = config["text_config"]
    text.update(hidden_size=hidden, moe_intermediate_size=hidden // 2, engram_max_ngram_size=4, engram_n_heads=8,
                engram_head_dim=256)
    text["engram_num_embeddings"] = engram_layout(text).table_rows()  # small tables to write the weights
    write_official_v41_checkpoint(dst, config, random_official_v41_weights(text, seed=0), max_shard_bytes=64 << 20)
    text["engram_vocab_size"] = vocab
    text["engram_num_embeddings"] = engram_layout(text).table_rows()
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    total, shards = 0, []
    for layer, rows in zip(text["engram_layer_ids"], text["engram_num_embeddings"]):
        name = f"layers.{layer}.engram.embed"
        shards.append(str(dst / index[name + ".weight"]))
        _table_shard(dst / index[name + ".weight"], name, rows, text["engram_head_dim"], dense)
        total += rows * (text["engram_head_dim"] + text["engram_head_dim"] // 32)
    return total, shards


def child(spec: dict) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_v4.generation import prefill
    from mlx_v4.loader import load_model

    for shard in spec["drop"]:  # the real disk: none of the tables' pages in the page cache
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    model, _ = load_model(Path(spec["path"]))
    model.engram_read_ahead = spec["mode"] == "read-ahead"
    tables = [model.layers[i].engram.table for i in model.args.engram_layer_ids]
    latency = spec["latency_us"] * 1e-6
    for t in tables:
        t.read_hook = (lambda: time.sleep(latency)) if latency else None
    rng = np.random.default_rng(spec["seed"])
    vocab = model.args.vocab_size
    prompt = mx.array(rng.integers(3, vocab, (1, spec["prompt"])), dtype=mx.int32)
    forced = rng.integers(3, vocab, spec["decode"]).tolist()
    cache = model.make_cache()
    mx.eval(model(prompt[:, :8], model.make_cache()))  # warm-up: MLX's first kernels, the reader threads
    for t in tables:
        t.reset_stats()
    t0 = time.perf_counter()
    prefill(model, prompt[0].tolist(), cache, step_size=spec["chunk"])  # read-ahead: next chunk's rows too
    prefill_s = time.perf_counter() - t0
    prefill_wait = sum(t.wait_seconds for t in tables)
    prefill_rows = sum(t.rows_read for t in tables)
    steps = []
    for tok in forced:
        t0 = time.perf_counter()
        mx.eval(model(mx.array([[tok]], dtype=mx.int32), cache))
        steps.append(time.perf_counter() - t0)
    wait = sum(t.wait_seconds for t in tables) - prefill_wait
    return {"prefill_ms": 1e3 * prefill_s, "prefill_wait_ms": 1e3 * prefill_wait,
            "step_ms": 1e3 * float(np.median(steps)), "wait_ms_per_step": 1e3 * wait / len(steps),
            "rows_per_step": (sum(t.rows_read for t in tables) - prefill_rows) / len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=10_000_000, help="engram_vocab_size: rows per hash range")
    ap.add_argument("--latencies", default="0,100,1000", help="simulated microseconds per row read, comma-separated")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=32, help="prefill step size")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-disk", action="store_true",
                    help="write the tables for real (--vocab 600000: 2 x 3.6 GiB) and drop their pages before "
                         "each run; no simulated latency")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    with tempfile.TemporaryDirectory(prefix="engram-read-ahead-") as tmp:
        path = Path(tmp) / "ckpt"
        table_bytes, shards = make_checkpoint(path, args.hidden, args.vocab, args.real_disk)
        kind = "tables written to disk, pages dropped before each run" if args.real_disk else "sparse tables"
        print(f"synthetic V4.1: hidden {args.hidden}, 8 layers, Engram at 1 and 5, {kind}: "
              f"{table_bytes / 2**30:.1f} GiB in all; prompt {args.prompt} in chunks of {args.chunk}, "
              f"{args.decode} decode steps, "
              f"median of {args.repeats} runs per row (each in its own process)")
        print(f"{'latency/row':>12} {'mode':>13} {'prefill ms':>11} {'(waited)':>9} {'step ms':>8} "
              f"{'waited/step':>12} {'step ratio':>11} {'rows/step':>10}")
        for latency in [0.0] if args.real_disk else [float(v) for v in args.latencies.split(",")]:
            runs: dict[str, list[dict]] = {m: [] for m in MODES}
            for _ in range(args.repeats):
                for mode in MODES:
                    spec = {"path": str(path), "mode": mode, "latency_us": latency, "prompt": args.prompt,
                            "chunk": args.chunk, "decode": args.decode, "seed": args.seed,
                            "drop": shards if args.real_disk else []}
                    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                                         capture_output=True, text=True)
                    runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {m: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]} for m, rs in runs.items()}
            for mode in MODES:
                r = med[mode]
                ratio = med[MODES[0]]["step_ms"] / r["step_ms"]
                label = "real disk" if args.real_disk else f"{latency:.0f}us"
                print(f"{label:>12} {mode:>13} {r['prefill_ms']:>11.1f} {r['prefill_wait_ms']:>9.1f} "
                      f"{r['step_ms']:>8.2f} {r['wait_ms_per_step']:>12.2f} {ratio:>10.2f}x "
                      f"{r['rows_per_step']:>10.0f}")
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
