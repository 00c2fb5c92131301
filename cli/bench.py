"""`mlx-v4 bench`: prefill and decode speed and peak memory per context length.

Random token ids (the speed of a forward pass does not depend on the text) through
mlx_v4.generation.stream_generate into a fresh cache; its Stats give each row, rendered by
ui.bench_table.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import EXPERT_BUDGET_HELP, MODEL_HELP, UserError, load_model, user_errors


def parse_contexts(text: str) -> list[int]:
    try:
        out = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--contexts must be comma-separated integers, got {text!r}",
                        "e.g. --contexts 256,1024") from None
    if not out or any(n <= 0 for n in out):
        raise UserError(f"--contexts needs positive lengths, got {text!r}", "e.g. --contexts 256,1024")
    return out


def measure(model, tokenizer, context: int, gen: int, seed: int = 0) -> dict:
    """One row: stream_generate over ``context`` random ids, greedy, EOS masked so every row
    decodes the same number of tokens."""
    import mlx.core as mx

    from mlx_v4.generation import stream_generate

    ids = mx.random.randint(0, model.args.vocab_size, (context,), key=mx.random.key(seed)).tolist()
    eos = mx.zeros((model.args.vocab_size,))
    eos[int(model.args.eos_token_id)] = -mx.inf

    def no_eos(history, logits):
        return logits + eos

    mx.reset_peak_memory()
    stats = None
    for ev in stream_generate(model, tokenizer, ids, max_tokens=max(gen, 1), temperature=0.0,
                              logits_processors=[no_eos]):
        if type(ev).__name__ == "Stats":
            stats = ev
    return dict(context=context, prefill_tps=stats.prompt_tps, decode_tps=stats.generation_tps,
                generated=stats.generation_tokens, cache_bytes=stats.cache_bytes,
                peak_memory_bytes=stats.peak_memory_bytes)


@user_errors
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    contexts: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "256,1024",
    gen: Annotated[int, typer.Option(help="Tokens to decode after each prefill.")] = 32,
    expert_budget: Annotated[str | None, typer.Option("--expert-budget", help=EXPERT_BUDGET_HELP)] = None,
):
    from .ui import UI

    lengths = parse_contexts(contexts)
    if gen < 1:
        raise UserError("--gen must be >= 1", "e.g. --gen 32")
    ui = UI()
    m, tok, path = load_model(ui, model, expert_budget)
    limit = m.args.max_position_embeddings
    if max(lengths) + gen > limit:
        raise UserError(f"context {max(lengths)} + {gen} generated is past this model's maximum {limit}",
                        "choose smaller --contexts")
    rows = []
    for n in lengths:
        with ui.status(f"context {n:,}"):
            rows.append(measure(m, tok, n, gen))
    ui.bench_table(path, rows)
    store = getattr(m, "expert_store", None)
    if store is not None:
        ui.expert_stats(store.stats(), tokens=sum(r["context"] + r["generated"] for r in rows))
