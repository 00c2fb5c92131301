"""`mlx-v4 serve`'s library side: an ASGI app speaking the OpenAI Chat Completions and Responses
and Anthropic Messages protocols (converted by deepseek-recipe), one worker thread that owns the
model, and a prefix cache that keeps earlier conversations' KV caches resident.

Needs the ``serve`` extra (starlette, uvicorn). Nothing else in mlx_v4 imports this package.
"""

from __future__ import annotations


def create_app(model, tokenizer, config=None, **kwargs):
    from .app import create_app as _create

    return _create(model, tokenizer, config, **kwargs)


def __getattr__(name):
    if name == "ServerConfig":
        from .app import ServerConfig

        return ServerConfig
    raise AttributeError(name)


__all__ = ["create_app", "ServerConfig"]
