"""What generate/chat/serve share when started by ``mlx.launch`` (group size > 1).

Every rank runs the same command with the same arguments; rank 0 owns the terminal (or the
HTTP side) and hands each request's text and seed to the others with
:func:`mlx_v4.distributed.broadcast_text` / ``broadcast_ints``, so every rank feeds the same
tokens through the same generation loop. Other ranks print nothing on stdout.
"""

from __future__ import annotations

from typing import Annotated

import typer

PARALLEL_HELP = ("Under mlx.launch: split the model over the ranks by layers (pipeline) or by heads and "
                 "experts (tensor). Ignored when running alone.")
LAYERS_HELP = "Pipeline split override, one inclusive range per rank, e.g. 0-20,21-42 (default: balanced by bytes)."
TIMEOUT_HELP = "Under mlx.launch: seconds without progress before a rank gives up on its peers."

ParallelOpt = Annotated[str, typer.Option("--parallel", help=PARALLEL_HELP)]
LayersOpt = Annotated[str | None, typer.Option("--layers", help=LAYERS_HELP)]
TimeoutOpt = Annotated[float, typer.Option("--dist-timeout", help=TIMEOUT_HELP)]


def group_if_launched(parallel: str, layers: str | None, timeout: float = 300.0):
    """The world group under mlx.launch with more than one rank, else None (options checked)."""
    from mlx_v4 import distributed as dist
    from mlx_v4 import split_plan

    from .common import UserError

    if parallel not in split_plan.MODES:
        raise UserError(f"unknown --parallel {parallel!r}", "use --parallel pipeline or --parallel tensor")
    if not dist.launched():
        return None
    return dist.init_group(timeout=timeout)


def load(ui, group, model: str | None, parallel: str, layers: str | None, timeout: float):
    """(distributed model, tokenizer) on every rank; a spinner on rank 0 only."""
    from contextlib import nullcontext

    from mlx_v4 import distributed as dist
    from mlx_v4.tokenizer import load_tokenizer
    from mlx_v4.weights import resolve_model_path

    from .common import resolve_model

    path = resolve_model(model)
    status = ui.status(f"loading {path} ({parallel}, rank 0 of {group.size()})") if group.rank() == 0 else nullcontext()
    with status:
        m = dist.load_distributed(path, group, mode=parallel, layers=layers, timeout=timeout)
        tok = load_tokenizer(resolve_model_path(path))
    return m, tok


def peer_errors(fn):
    """Turn the ring backend's 'peer lost' RuntimeError into one line and exit 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mlx_v4.distributed import exit_on_peer_loss, launched_rank_size

        with exit_on_peer_loss(*launched_rank_size(), fn.__name__):
            return fn(*args, **kwargs)

    return wrapper
