"""Quality report: the converted and the source model on one fixed token sequence.

Mean KL(source || converted) of the next-token distributions over the positions, and how often
the two models' top-1 tokens agree. Models are loaded one after the other (never both at once).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np


@dataclass
class VerifyReport:
    kl_mean: float
    kl_max: float
    top1_agreement: float
    tokens: int

    def __str__(self) -> str:
        return (f"mean KL {self.kl_mean:.5f} nats (max {self.kl_max:.4f}), top-1 agreement "
                f"{100 * self.top1_agreement:.1f}% over {self.tokens} tokens")


def fixed_tokens(vocab_size: int, n: int = 64, seed: int = 1234) -> mx.array:
    """The fixed sequence: deterministic pseudo-random ids (same on every machine)."""
    return mx.array(np.random.default_rng(seed).integers(0, vocab_size, size=(1, n)), dtype=mx.int32)


def _log_probs(path: Path, tokens: mx.array | None, n: int) -> tuple[mx.array, mx.array]:
    from mlx_v4.loader import load_model

    model, _ = load_model(path)
    if tokens is None:
        tokens = fixed_tokens(model.args.vocab_size, min(n, model.args.max_position_embeddings))
    logits = model(tokens)[0].astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(lp)
    del model
    gc.collect()
    mx.clear_cache()
    return lp, tokens


def verify_conversion(converted: str | Path, source: str | Path, *, tokens: mx.array | None = None,
                      n_tokens: int = 64) -> VerifyReport:
    conv, tokens = _log_probs(Path(converted), tokens, n_tokens)
    ref, _ = _log_probs(Path(source), tokens, n_tokens)
    kl = (mx.exp(ref) * (ref - conv)).sum(axis=-1)
    top1 = (mx.argmax(ref, axis=-1) == mx.argmax(conv, axis=-1)).astype(mx.float32)
    return VerifyReport(kl.mean().item(), kl.max().item(), top1.mean().item(), int(kl.size))
