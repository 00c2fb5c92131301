"""`mlx-v4 serve`: an OpenAI- and Anthropic-compatible HTTP server with a resident prefix cache.

Flags map onto :class:`mlx_v4.server.ServerConfig`; the server itself lives in mlx_v4.server.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DRAFT_TOKENS_HELP,
    EXPERT_BUDGET_HELP,
    MODEL_HELP,
    UserError,
    draft_kwargs,
    is_demo,
    load_model,
    no_distributed_budget,
    resolve_model,
    user_errors,
)
from .distributed import LayersOpt, ParallelOpt, TimeoutOpt, peer_errors

SERVE_DRAFT_HELP = ("Speculative decoding: none (default), auto, mtp or dspark (each decoding request drafts "
                    "with the checkpoint's drafter, its MTP block or a Flash-0731 checkpoint's DSpark, and "
                    "verifies its drafts inside the batching engine's shared step; auto picks the one the "
                    "checkpoint has; on a CPU the MTP was not faster at 1-4 streams, see BENCHMARKS.md).")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40}


def parse_bytes(text: str) -> int:
    """'8G', '512MB', '1073741824' -> bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read the size {text!r}", "use e.g. --cache-budget 8G or 512M")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@user_errors
@peer_errors
def serve(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="MLX_V4_API_KEY",
                                                help="Key clients must send (Bearer or x-api-key); required off loopback.")] = None,
    allowed_hosts: Annotated[str | None, typer.Option(
        "--allowed-hosts", help="Comma-separated host names an unkeyed server answers besides localhost, "
                                "127.0.0.1 and [::1] (Host and Origin checks); '*' for any.")] = None,
    model_name: Annotated[str | None, typer.Option(help="Model id clients use (default: deepseek-v4, or 'demo').")] = None,
    any_model: Annotated[bool, typer.Option("--any-model", help="Answer whatever model name a client asks for.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Default max tokens when a request sets none.")] = 4096,
    cache_budget: Annotated[str, typer.Option(help="Bytes of KV caches kept resident for prefix reuse (LRU).")] = "8G",
    cache_dir: Annotated[Path | None, typer.Option(help="Persist prefix caches here; a restart resumes them.")] = None,
    max_active: Annotated[int, typer.Option(help="Requests decoded together (batched: one model step per token for all).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond that before 503s.")] = 256,
    prefill_chunk: Annotated[int, typer.Option(help="Prompt ids prefilled per engine step, all requests together (bounds how long a step stalls the decoding streams).")] = 512,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    expert_budget: Annotated[str | None, typer.Option("--expert-budget", help=EXPERT_BUDGET_HELP)] = None,
    draft: Annotated[str, typer.Option(help=SERVE_DRAFT_HELP)] = "none",
    draft_tokens: Annotated[int | None, typer.Option(help=DRAFT_TOKENS_HELP)] = None,
    parallel: ParallelOpt = "pipeline",
    layers: LayersOpt = None,
    dist_timeout: TimeoutOpt = 300.0,
):
    api_key = api_key if api_key and api_key.strip() else None  # an empty key is no key
    if api_key is None and not is_loopback(host):
        raise UserError(f"binding {host} (beyond loopback) needs --api-key",
                        "pass --api-key KEY (or set MLX_V4_API_KEY), or bind 127.0.0.1")
    if not 0 < port < 65536:
        raise UserError(f"bad port {port}", "use a port between 1 and 65535")
    if max_tokens < 1 or max_active < 1 or max_queue < 1 or prefill_chunk < 1:
        raise UserError("--max-tokens, --max-active, --max-queue and --prefill-chunk must be positive")
    budget = parse_bytes(cache_budget)
    hosts = [h.strip() for h in (allowed_hosts or "").split(",") if h.strip()]
    from .distributed import group_if_launched

    group = group_if_launched(parallel, layers, dist_timeout)
    no_distributed_budget(group, expert_budget)
    drafting = draft_kwargs(draft, draft_tokens, distributed=group is not None)
    try:
        import uvicorn

        from mlx_v4.server import ServerConfig, create_app
    except ImportError as e:
        raise UserError(f"the server needs extra packages ({e.name} is missing)",
                        "pip install 'mlx-v4[serve]'") from None
    from .ui import UI

    ui = UI()
    engine = None
    if group is not None:
        from mlx_v4.server.distributed import LeaderEngine, follow

        from .distributed import load

        path = resolve_model(model)
        m, tok = load(ui, group, model, parallel, layers, dist_timeout)
        if group.rank() != 0:
            return follow(m, tok, group, prefill_chunk=prefill_chunk)
        engine = LeaderEngine(m, tok, group, max_active=max_active, prefill_chunk=prefill_chunk, max_queue=max_queue)
        ui.notice(f"distributed: {m.split.describe()}; rank 0 of {group.size()} serves HTTP "
                  "(no prefix reuse across requests in this mode)")
    else:
        m, tok, path = load_model(ui, model, expert_budget)
    name = model_name or ("demo" if is_demo(path) else "deepseek-v4")
    config = ServerConfig(model_name=name, api_key=api_key, default_max_tokens=max_tokens,
                          cache_budget_bytes=budget, cache_dir=str(cache_dir) if cache_dir else None,
                          max_active=max_active, max_queue=max_queue, prefill_chunk=prefill_chunk,
                          accept_any_model=any_model, allowed_hosts=hosts, **drafting)
    app = create_app(m, tok, config, engine=engine)
    ui.notice(f"serving {path} as '{name}' on http://{host}:{port}  (OpenAI: /v1/chat/completions, "
              f"/v1/responses; Anthropic: /v1/messages)")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
