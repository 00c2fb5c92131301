"""The `mlx-v4` command: one Typer app, one module per command.

Command modules import mlx_v4 (and so MLX) only inside the command functions, which keeps
`mlx-v4 --help` fast.
"""

from __future__ import annotations

import typer

from .bench import bench
from .chat import chat
from .convert import convert
from .generate import generate
from .info import info
from .serve import serve

app = typer.Typer(
    name="mlx-v4",
    help="DeepSeek V4 (Flash and Pro) on Apple Silicon with MLX. Without --model every command "
         "runs the bundled tiny demo model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

app.command(help="Chat in the terminal (streaming, /help for slash commands, saved sessions).")(chat)
app.command(help="Answer one prompt; the answer goes to stdout, reasoning and stats to stderr.")(generate)
app.command(help="Memory plan: weights, KV cache at a context length, and which Macs it fits.")(info)
app.command(help="Prefill and decode speed and peak memory at several context lengths.")(bench)
app.command(help="OpenAI/Anthropic-compatible HTTP server with a resident prefix cache.")(serve)
app.command(help="Convert a checkpoint into an MLX model directory (opens in mlx-v4 and mlx-lm).")(convert)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                       is_eager=True)):
    if version:
        from importlib.metadata import version as _v

        typer.echo(_v("mlx-v4"))
        raise typer.Exit()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
