"""`mlx-v4 bench`: prefill and decode speed and peak memory per context length.

Random token ids (the speed of a forward pass does not depend on the text) through
mlx_v4.generation.stream_generate into a fresh cache; its Stats give each row, rendered by
ui.bench_table. With a drafter (--draft, default auto), a second table compares plain and
speculative decoding on a few chat prompts (drafts are only accepted on text the model
predicts, not on random ids): tok/s side by side, acceptance rate, tokens per target forward.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import (
    DRAFT_HELP,
    DRAFT_TOKENS_HELP,
    EXPERT_BUDGET_HELP,
    MODEL_HELP,
    UserError,
    draft_kwargs,
    load_model,
    user_errors,
)

#: Chat prompts for the drafting table (the bundled demo knows Python's reference manual).
DRAFT_PROMPTS = ["What is the assert statement?", "Explain the for statement.", "What are lambdas?",
                 "How do I use the with statement?"]


def parse_contexts(text: str) -> list[int]:
    try:
        out = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--contexts must be comma-separated integers, got {text!r}",
                        "e.g. --contexts 256,1024") from None
    if not out or any(n <= 0 for n in out):
        raise UserError(f"--contexts needs positive lengths, got {text!r}", "e.g. --contexts 256,1024")
    return out


def measure(model, tokenizer, context: int, gen: int, seed: int = 0, draft: str | None = None,
            draft_tokens: int | None = None) -> dict:
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
                              logits_processors=[no_eos], draft=draft, draft_tokens=draft_tokens):
        if type(ev).__name__ == "Stats":
            stats = ev
    return dict(context=context, prefill_tps=stats.prompt_tps, decode_tps=stats.generation_tps,
                generated=stats.generation_tokens, cache_bytes=stats.cache_bytes,
                peak_memory_bytes=stats.peak_memory_bytes, draft_tokens=stats.draft_tokens,
                accepted_tokens=stats.accepted_tokens, target_forwards=stats.target_forwards)


def measure_drafting(model, tokenizer, gen: int, draft: str, draft_tokens: int | None,
                     prompts=DRAFT_PROMPTS) -> list[dict]:
    """Plain then speculative greedy decoding of each chat prompt (``gen`` tokens at most, both
    runs in this process, back to back): tok/s of each, acceptance, and whether the two outputs
    are the same tokens."""
    from mlx_v4.chat import ChatSession
    from mlx_v4.generation import Stats, Token

    rows = []
    for prompt in prompts:
        row = dict(prompt=prompt)
        outs = []
        for name, d in (("plain", None), ("draft", draft)):
            session = ChatSession(model, tokenizer, thinking=False)
            ids, stats = [], None
            for ev in session.send(prompt, max_tokens=gen, temperature=0.0, draft=d, draft_tokens=draft_tokens):
                if isinstance(ev, Token):
                    ids.append(ev.id)
                elif isinstance(ev, Stats):
                    stats = ev
            # decode time (after the first token), as Stats.generation_tps counts it
            row[f"{name}_seconds"] = (len(ids) - 1) / stats.generation_tps if stats.generation_tps else 0.0
            row[f"{name}_tps"] = stats.generation_tps
            outs.append(ids)
        row.update(tokens=len(outs[1]), same=outs[0] == outs[1], draft_tokens=stats.draft_tokens,
                   accepted_tokens=stats.accepted_tokens, target_forwards=stats.target_forwards)
        rows.append(row)
    return rows


@user_errors
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    contexts: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "256,1024",
    gen: Annotated[int, typer.Option(help="Tokens to decode after each prefill.")] = 32,
    expert_budget: Annotated[str | None, typer.Option("--expert-budget", help=EXPERT_BUDGET_HELP)] = None,
    draft: Annotated[str, typer.Option(help=DRAFT_HELP)] = "auto",
    draft_tokens: Annotated[int | None, typer.Option(help=DRAFT_TOKENS_HELP)] = None,
):
    from .ui import UI

    lengths = parse_contexts(contexts)
    drafting = draft_kwargs(draft, draft_tokens)
    if gen < 1:
        raise UserError("--gen must be >= 1", "e.g. --gen 32")
    ui = UI()
    m, tok, path = load_model(ui, model, expert_budget)
    limit = m.args.max_position_embeddings
    if max(lengths) + gen > limit:
        raise UserError(f"context {max(lengths)} + {gen} generated is past this model's maximum {limit}",
                        "choose smaller --contexts")
    from mlx_v4.draft.speculative import make_drafter

    drafter = None if drafting["draft"] is None else make_drafter(m, drafting["draft"], draft_tokens,
                                                                  custom_sampler=False)
    if drafter is None:
        drafting["draft"] = None  # auto, and this checkpoint has no drafter
    else:
        draft_tokens = drafter.tokens  # the drafter's default when --draft-tokens is not given
    rows = []
    for n in lengths:
        with ui.status(f"context {n:,}"):
            rows.append(measure(m, tok, n, gen, **drafting))
    ui.bench_table(path, rows)
    store = getattr(m, "expert_store", None)
    if store is not None:
        ui.expert_stats(store.stats(), tokens=sum(r["context"] + r["generated"] for r in rows))
    if drafting["draft"] is not None and tok.vocab_size > m.args.vocab_size:
        ui.notice(f"no drafting table: the tokenizer's {tok.vocab_size} ids do not fit this model's "
                  f"vocabulary of {m.args.vocab_size} (a test model?)")
    elif drafting["draft"] is not None:
        with ui.status("drafting on chat prompts"):
            chat_rows = measure_drafting(m, tok, max(gen, 64), drafting["draft"], draft_tokens)
        ui.draft_table(path, chat_rows, draft_tokens)
