"""`mlx-v4 generate`: one prompt, one streamed answer (stdout), reasoning and stats (stderr)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DRAFT_HELP,
    DRAFT_TOKENS_HELP,
    EXPERT_BUDGET_HELP,
    MODEL_HELP,
    UserError,
    consume,
    draft_kwargs,
    generation_kwargs,
    load_model,
    no_distributed_budget,
    user_errors,
)
from .distributed import LayersOpt, ParallelOpt, TimeoutOpt, peer_errors


@user_errors
@peer_errors
def generate(
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt text ('-' reads stdin).")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the prompt from this file.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Reason before answering.")] = False,
    effort: Annotated[str | None, typer.Option(help="Reasoning effort when thinking: high or max.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 512,
    temp: Annotated[float | None, typer.Option(help="Sampling temperature, 0 = greedy (default: the model's generation_config).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for reproducible sampling.")] = None,
    expert_budget: Annotated[str | None, typer.Option("--expert-budget", help=EXPERT_BUDGET_HELP)] = None,
    draft: Annotated[str, typer.Option(help=DRAFT_HELP)] = "auto",
    draft_tokens: Annotated[int | None, typer.Option(help=DRAFT_TOKENS_HELP)] = None,
    parallel: ParallelOpt = "pipeline",
    layers: LayersOpt = None,
    dist_timeout: TimeoutOpt = 300.0,
):
    from .distributed import group_if_launched

    group = group_if_launched(parallel, layers, dist_timeout)
    no_distributed_budget(group, expert_budget)
    drafting = draft_kwargs(draft, draft_tokens, distributed=group is not None)
    if group is not None:
        return _generate_distributed(group, prompt, prompt_file, model, system, think, effort, max_tokens, temp,
                                     top_p, seed, parallel, layers, dist_timeout)
    text = _read_prompt(prompt, prompt_file)
    if effort not in (None, "high", "max"):
        raise UserError(f"unknown effort {effort!r}", "use --effort high or --effort max")
    gen = generation_kwargs(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed) | drafting
    from .ui import UI

    ui = UI()
    m, tok, _ = load_model(ui, model, expert_budget)
    from mlx_v4.chat import ChatSession

    session = ChatSession(m, tok, system=system, thinking=think, reasoning_effort=effort)
    stats, reason = consume(ui, session.send(text, **gen))
    ui.stats_line(stats)
    if reason == "interrupted":
        raise typer.Exit(130)


def _read_prompt(prompt, prompt_file) -> str:
    import sys

    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt and --prompt-file", "e.g. mlx-v4 generate -p 'Hello'")
    if prompt_file is not None:
        text = prompt_file.read_text()
    elif prompt == "-":
        text = sys.stdin.read()
    else:
        text = prompt
    if not text.strip():
        raise UserError("the prompt is empty", "pass some text with --prompt or --prompt-file")
    return text


def _generate_distributed(group, prompt, prompt_file, model, system, think, effort, max_tokens, temp, top_p,
                          seed, parallel, layers, timeout):
    """Every rank loads its share; rank 0 reads the prompt, hands it and the seed to the others,
    and prints; the other ranks run the same steps silently."""
    import random

    from mlx_v4.chat import ChatSession
    from mlx_v4.distributed import broadcast_ints, broadcast_text

    from .ui import UI

    rank = group.rank()
    if effort not in (None, "high", "max"):
        raise UserError(f"unknown effort {effort!r}", "use --effort high or --effort max")
    gen = generation_kwargs(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    ui = UI()
    text = _read_prompt(prompt, prompt_file) if rank == 0 else None  # errors before the load
    m, tok = _load(ui, group, model, parallel, layers, timeout)
    if m.watchdog is not None:
        m.watchdog.kick("start-up (receiving the prompt from rank 0)")
    text = broadcast_text(text, group)
    gen["seed"] = broadcast_ints([seed if seed is not None else random.randrange(2**31)], group)[0]
    session = ChatSession(m, tok, system=system, thinking=think, reasoning_effort=effort)
    try:
        if rank == 0:
            stats, reason = consume(ui, session.send(text, **gen))
            ui.stats_line(stats)
        else:
            reason = None
            for ev in session.send(text, **gen):
                if type(ev).__name__ == "Finish":
                    reason = ev.reason
    finally:
        m.idle()
    if reason == "interrupted":
        raise typer.Exit(130)


def _load(ui, group, model, parallel, layers, timeout):
    from .distributed import load

    return load(ui, group, model, parallel, layers, timeout)
