"""`mlx-v4 bench`: prefill and decode speed and peak memory per context length.

Random token ids (the speed of a forward pass does not depend on the text), prefill in chunks
into a fresh cache, then greedy decode steps; the table is rendered by ui.bench_table.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from .common import MODEL_HELP, UserError, load_model, user_errors

PREFILL_CHUNK = 512


def parse_contexts(text: str) -> list[int]:
    try:
        out = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--contexts must be comma-separated integers, got {text!r}",
                        "e.g. --contexts 256,1024") from None
    if not out or any(n <= 0 for n in out):
        raise UserError(f"--contexts needs positive lengths, got {text!r}", "e.g. --contexts 256,1024")
    return out


def measure(model, context: int, gen: int, seed: int = 0) -> dict:
    import mlx.core as mx

    from mlx_v4.cache import cache_nbytes

    ids = mx.random.randint(0, model.args.vocab_size, (1, context), key=mx.random.key(seed))
    cache = model.make_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for start in range(0, context, PREFILL_CHUNK):
        logits = model(ids[:, start:start + PREFILL_CHUNK], cache, last_only=True)
        mx.eval(logits, [c.state for c in cache])
    prefill_s = time.perf_counter() - t0
    token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
    t0 = time.perf_counter()
    for _ in range(gen):
        logits = model(token, cache, last_only=True)
        token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        mx.eval(token)
    decode_s = time.perf_counter() - t0
    return dict(context=context, prefill_tps=context / max(prefill_s, 1e-9),
                decode_tps=gen / max(decode_s, 1e-9) if gen else 0.0, generated=gen,
                cache_bytes=cache_nbytes(cache), peak_memory_bytes=mx.get_peak_memory())


@user_errors
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    contexts: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "256,1024",
    gen: Annotated[int, typer.Option(help="Tokens to decode after each prefill.")] = 32,
):
    from .ui import UI

    lengths = parse_contexts(contexts)
    if gen < 0:
        raise UserError("--gen must be >= 0", "e.g. --gen 32")
    ui = UI()
    m, _, path = load_model(ui, model)
    limit = m.args.max_position_embeddings
    if max(lengths) + gen > limit:
        raise UserError(f"context {max(lengths)} + {gen} generated is past this model's maximum {limit}",
                        "choose smaller --contexts")
    rows = []
    for n in lengths:
        with ui.status(f"context {n:,}"):
            rows.append(measure(m, n, gen))
    ui.bench_table(path, rows)
