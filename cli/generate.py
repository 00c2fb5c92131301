"""`mlx-v4 generate`: one prompt, one streamed answer (stdout), reasoning and stats (stderr)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import MODEL_HELP, UserError, consume, generation_kwargs, load_model, user_errors


@user_errors
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
):
    import sys

    from .ui import UI

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
    if effort not in (None, "high", "max"):
        raise UserError(f"unknown effort {effort!r}", "use --effort high or --effort max")
    gen = generation_kwargs(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    ui = UI()
    m, tok, _ = load_model(ui, model)
    from mlx_v4.chat import ChatSession

    session = ChatSession(m, tok, system=system, thinking=think, reasoning_effort=effort)
    stats, reason = consume(ui, session.send(text, **gen))
    ui.stats_line(stats)
    if reason == "interrupted":
        raise typer.Exit(130)
