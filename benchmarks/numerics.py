"""How far numerical variants of the default mode land from it, on tiny release-format checkpoints.

    python benchmarks/numerics.py [--seeds 3]

Each variant runs the same random official-format checkpoint (TINY_CONFIG with whole 128-blocks,
300 tokens, float32 on the CPU) and is compared with the default mode (fake_quant and act_quant
on) by top-1 agreement and the median over positions of the largest logit error:

* ``act_quant off``: no FP8 rounding of GEMM inputs (the port before issue 18);
* ``reordered``: attention normalised after P.V instead of before, in float32: the same function
  summed in another order, a control for how far pure float32 reordering moves these models;
* ``bf16 P``: the unnormalised probabilities rounded to bf16 before P.V, as the official
  ``sparse_attn`` kernel stores them (here relative to the global max over all keys; the kernel
  uses a running max over blocks of 64, so its roundings differ in detail).

Small random models with FP8 roundings are chaotic: a flipped rounding early changes every later
position that reads it, so these are sensitivity figures, not accuracy figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_v4  # noqa: E402  # isort: skip  (first: its BLAS preload must run before mlx.core loads)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_v4.layers import attention  # noqa: E402
from mlx_v4.testing import official  # noqa: E402
from mlx_v4.testing.tiny import TINY_CONFIG  # noqa: E402

CONFIG = dict(TINY_CONFIG, q_lora_rank=128, moe_intermediate_size=128)


def attend_variant(bf16_probs: bool):
    """attention.attend with the normalisation after P.V, optionally P rounded to bf16 first."""

    def attend(q, window, window_mask, sinks, scale, comp=None, comp_mask=None):
        B, L, H, d = q.shape
        per_query = comp is not None and comp.ndim == 4
        scores = (q.reshape(B, L * H, d) @ window.swapaxes(1, 2)).reshape(B, L, H, -1)
        masks = [window_mask]
        if comp is not None:
            cs = q @ comp.swapaxes(-1, -2) if per_query else \
                (q.reshape(B, L * H, d) @ comp.swapaxes(1, 2)).reshape(B, L, H, -1)
            scores = mx.concatenate([scores, cs], axis=-1)
            masks.append(comp_mask)
        mask = masks[0] if len(masks) == 1 else mx.concatenate(masks, axis=-1)
        scores = mx.where(mask[:, :, None], scores.astype(mx.float32) * scale, -mx.inf)
        sink = sinks.astype(mx.float32)[:, None]
        peak = mx.maximum(scores.max(axis=-1, keepdims=True), sink)
        p = mx.exp(scores - peak)
        denom = p.sum(axis=-1, keepdims=True) + mx.exp(sink - peak)
        if bf16_probs:
            p = p.astype(mx.bfloat16).astype(mx.float32)
        W = window.shape[1]
        out = (p[..., :W].reshape(B, L * H, W) @ window).reshape(B, L, H, d)
        if comp is not None:
            pc = p[..., W:]
            out = out + (pc @ comp if per_query else (pc.reshape(B, L * H, -1) @ comp).reshape(B, L, H, d))
        return out / denom

    return attend


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return float((a.argmax(-1) == b.argmax(-1)).mean()), float(np.median(np.abs(a - b).max(-1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    original = attention.attend
    results: dict[str, list[tuple[float, float]]] = {"act_quant off": [], "reordered": [], "bf16 P": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(a.seeds):
            path = Path(tmp) / str(seed)
            official.write_official_checkpoint(path, CONFIG, official.random_official_weights(CONFIG, seed, False))
            ids = mx.array(np.random.default_rng(100 + seed).integers(0, CONFIG["vocab_size"], (1, 300)))
            model, _ = mlx_v4.load(path, dtype=mx.float32)
            base = np.array(model(ids))
            off, _ = mlx_v4.load(path, dtype=mx.float32, model_config={"act_quant": False})
            results["act_quant off"].append(compare(np.array(off(ids)), base))
            for name, bf16 in (("reordered", False), ("bf16 P", True)):
                attention.attend = attend_variant(bf16)
                try:
                    results[name].append(compare(np.array(model(ids)), base))
                finally:
                    attention.attend = original
    print(f"vs the default mode (fake_quant + act_quant, float32), {a.seeds} seeds x 300 positions")
    print("| variant | top-1 agreement per seed | median max-logit error per seed |")
    print("|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {', '.join(f'{r[0]:.2f}' for r in rows)} | {', '.join(f'{r[1]:.3f}' for r in rows)} |")


if __name__ == "__main__":
    main()
