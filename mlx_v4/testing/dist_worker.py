"""One rank of a distributed check or benchmark, started by ``mlx.launch`` (tests/test_distributed.py,
benchmarks/distributed.py); also runs alone (no launcher) as the single-process reference.

    mlx.launch -n 2 --python python -m mlx_v4.testing.dist_worker MODEL_DIR OUT.npz \
        --mode pipeline --prompt 37 --decode 20

``--mode`` is a comma list (pipeline, tensor, single; ``MODE:fq`` keeps fake_quant on under
``--exact``). Feeds a fixed prompt (ids from a seeded generator) in prefill chunks, then ``--decode`` greedy
steps, recording the logits of the prompt's last position and of every step. Rank 0 writes
them, the tokens, the timings and every rank's counted traffic to OUT.npz. ``--die-rank R
--die-step S`` makes rank R stop at decode step S (``kill`` = exit at once, ``hang`` = sleep
forever) to test the others' reaction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--mode", default="pipeline")
    p.add_argument("--layers", default=None)
    p.add_argument("--prompt", type=int, default=37)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--decode", type=int, default=20)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--die-rank", type=int, default=-1)
    p.add_argument("--die-step", type=int, default=-1)
    p.add_argument("--die-how", default="kill")
    p.add_argument("--exact", action="store_true", help="fake_quant off (no FP8/FP4 activation rounding), "
                   "except for modes written MODE:fq")
    a = p.parse_args(argv)

    from mlx_v4 import distributed as dist

    group = dist.init_group(timeout=a.timeout)
    results = {}
    for item in a.mode.split(","):
        mode, _, opt = item.partition(":")  # "tensor:fq": fake_quant on even with --exact
        cfg = {"fake_quant": False} if a.exact and opt != "fq" else None
        if group is None:
            from mlx_v4.loader import load_model

            model, _ = load_model(a.model, model_config=cfg)
        else:
            model = dist.load_distributed(a.model, group, mode=mode, layers=a.layers, timeout=a.timeout,
                                          model_config=cfg)
        with dist.exit_on_peer_loss(0 if group is None else group.rank(), 1 if group is None else group.size(),
                                    f"the {item} check"):
            results[item.replace(":", "_")] = run(model, group, a)
    if group is None or group.rank() == 0:
        flat = {f"{mode}/{k}": v for mode, r in results.items() for k, v in r.items()}
        np.savez(a.out, **flat)
    return 0


def run(model, group, a) -> dict:
    import mlx.core as mx

    from mlx_v4.generation import prefill

    rank, size = (0, 1) if group is None else (group.rank(), group.size())
    vocab = model.args.vocab_size
    ids = np.random.default_rng(7).integers(2, vocab, size=a.prompt).tolist()
    # warm-up on a throwaway cache (first-call costs such as compiling fused kernels stay out
    # of the timings)
    warm = model.make_cache()
    prefill(model, ids[:8], warm, step_size=8)
    mx.eval(model(mx.array([ids[8:9]], mx.int32), warm))
    del warm
    cache = model.make_cache()
    t0 = time.perf_counter()
    prefill(model, ids[:-1], cache, step_size=a.chunk)
    logits = model(mx.array([ids[-1:]], mx.int32), cache)[:, -1]
    mx.eval(logits)
    t_prefill = time.perf_counter() - t0
    out_logits, tokens = [np.array(logits[0])], []
    traffic0 = dict(getattr(model, "traffic", None).bytes) if size > 1 else {}
    t1 = time.perf_counter()
    for step in range(a.decode):
        if rank == a.die_rank and step == a.die_step:
            sys.stderr.write(f"rank {rank}: dying at step {step} ({a.die_how})\n")
            sys.stderr.flush()
            if a.die_how == "hang":  # a stuck machine: sockets stay open, nothing answers
                if size > 1:
                    model.idle()  # (its own watchdog would otherwise end it and close the sockets)
                while True:
                    time.sleep(60)
            os._exit(3)
        tok = int(mx.argmax(logits, axis=-1).item())
        tokens.append(tok)
        logits = model(mx.array([[tok]], mx.int32), cache)[:, -1]
        mx.eval(logits)
        out_logits.append(np.array(logits[0]))
    t_decode = time.perf_counter() - t1
    traffic = {}
    if size > 1:
        model.idle()
        counted = model.traffic
        traffic = {k: counted.bytes[k] - traffic0.get(k, 0) for k in counted.bytes}
        # every rank's decode traffic, gathered to rank 0 (as JSON bytes)
        blob = json.dumps(traffic).encode()
        lens = mx.distributed.all_gather(mx.array([len(blob)], mx.int32), group=group).tolist()
        buf = np.zeros(max(lens), np.uint8)
        buf[:len(blob)] = np.frombuffer(blob, np.uint8)
        allb = np.array(mx.distributed.all_gather(mx.array(buf), group=group)).reshape(size, -1)
        traffic = [json.loads(bytes(allb[r, :lens[r]]).decode()) for r in range(size)]
    return dict(logits=np.stack(out_logits), tokens=np.array(tokens, np.int64), prompt=np.array(ids),
                t_prefill=t_prefill, t_decode=t_decode, traffic=json.dumps(traffic), size=size)


if __name__ == "__main__":
    sys.exit(main())
