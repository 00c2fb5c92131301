"""The ASGI app: OpenAI Chat Completions and Responses, Anthropic Messages, models, health.

``create_app(model, tokenizer, ...)`` returns a Starlette app whose handlers convert requests
(deepseek-recipe, see protocols.py), hand them to the engine (one worker thread that
owns the model: :class:`BatchEngine` unless one is given) and stream what it emits back as server-sent events, or as one JSON body.
Anything a client can get wrong is answered 4xx in the protocol's own error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .batch_engine import BatchEngine
from .engine import Engine, Job
from .guards import (
    MAX_JSON_DEPTH,
    check_json_content_type,
    check_origin,
    json_depth_exceeds,
    normalize_hosts,
    read_body,
)
from .prefix_cache import PrefixCache
from .protocols import PROTOCOLS, ApiError, Protocol, conversion_options, prepare

MAX_BODY = 64 << 20


@dataclass
class ServerConfig:
    model_name: str = "deepseek-v4"
    aliases: list[str] = field(default_factory=lambda: ["DeepSeek-V4-Pro", "DeepSeek-V4-Flash", "deepseek-v4-flash",
                                                        "deepseek-v4-pro", "deepseek-chat", "deepseek-reasoner"])
    api_key: str | None = None
    default_max_tokens: int = 4096
    cache_budget_bytes: int = 8 << 30
    cache_dir: str | None = None
    max_active: int = 8
    max_queue: int = 256
    prefill_step: int = 512
    prefill_chunk: int = 512  # prompt ids prefilled per engine step (all requests together)
    accept_any_model: bool = False  # answer every model name (some agents insist on their own)
    max_body_bytes: int = MAX_BODY  # request bodies beyond this get 413, chunked or not
    # Without api_key the server answers only requests whose Host (and Origin, when sent) is
    # localhost, 127.0.0.1 or [::1] (DNS rebinding, cross-site posts); these names widen
    # that ("*": any host).
    allowed_hosts: list[str] = field(default_factory=list)
    # Speculative decoding per request ("auto", "mtp", "dspark" or None, see stream_generate):
    # each decoding request drafts and verifies inside the batching engine's shared step.
    draft: str | None = None
    draft_tokens: int | None = None

    def __post_init__(self):
        # an empty key would switch authentication off while looking like one was set
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("ServerConfig.api_key is empty; pass None for no key, or a non-empty key")


class _State:
    def __init__(self, model, tokenizer, config: ServerConfig, engine: Engine | None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.context = int(model.args.max_position_embeddings)
        self.names = [config.model_name] + [a for a in config.aliases if a != config.model_name]
        from ..chat import model_version

        self.options = conversion_options(self.names, self.context, model_version(model))
        self.pool = engine.pool if engine else PrefixCache(model, config.cache_budget_bytes, config.cache_dir)
        self.engine = engine or BatchEngine(model, tokenizer, self.pool, max_active=config.max_active,
                                            prefill_step=config.prefill_step, prefill_chunk=config.prefill_chunk,
                                            max_queue=config.max_queue, draft=config.draft,
                                            draft_tokens=config.draft_tokens)
        self.started = time.time()


def _error(protocol: Protocol, err: ApiError) -> JSONResponse:
    return JSONResponse(protocol.error_body(err), status_code=err.status)


def _protocol_of(request: Request) -> Protocol:
    """The error shape for a request that names no protocol by its path (models, health)."""
    return PROTOCOLS["messages" if "anthropic-version" in request.headers else "chat"]


def _authorized(request: Request, key: str | None) -> bool:
    if not key:
        return True
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = given or auth[7:].strip()
    return hmac.compare_digest(given.encode(), key.encode())


def create_app(model, tokenizer, config: ServerConfig | None = None, *, engine: Engine | None = None) -> Starlette:
    """The ASGI app serving ``model``. The engine's worker thread starts now; the app's
    shutdown stops it and writes the prefix cache to ``config.cache_dir`` (if set)."""
    config = config or ServerConfig()
    state = _State(model, tokenizer, config, engine)
    allowed_hosts = normalize_hosts(config.allowed_hosts)

    def admit(request: Request) -> None:
        """A keyed server wants the key; an unkeyed one only answers its own loopback names."""
        if config.api_key is None:
            check_origin(request.headers, allowed_hosts)
        elif not _authorized(request, config.api_key):
            raise ApiError(401, "invalid or missing API key")

    def parse(protocol: Protocol, body: bytes):
        """On a worker thread (every step is linear in the body, which may be 64 MB)."""
        if json_depth_exceeds(body, MAX_JSON_DEPTH):
            raise ApiError(400, f"request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
        return prepare(protocol, body, tokenizer=tokenizer, options=state.options, context=state.context,
                       default_max_tokens=config.default_max_tokens,
                       model_override=config.model_name if config.accept_any_model else None)

    async def completion(request: Request, protocol: Protocol) -> Response:
        try:
            admit(request)
            check_json_content_type(request.headers)
            body = await read_body(request, config.max_body_bytes)
            prep = await asyncio.to_thread(parse, protocol, body)
        except ApiError as e:
            return _error(protocol, e)
        if prep.sampling.get("logprobs") and not getattr(state.engine, "supports_logprobs", False):
            return _error(protocol, ApiError(400, "logprobs are not supported by this server's engine "
                                                  "(distributed serving)", param="logprobs"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(prep, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        if not state.engine.alive:
            return _error(protocol, ApiError(503, "the engine has stopped; see the server log and restart it",
                                             "api_error"))
        if not state.engine.submit(job):
            return _error(protocol, ApiError(503, "the server is busy; retry later", "overloaded_error"))
        if prep.stream:
            return StreamingResponse(_stream(state.engine, job, queue, protocol), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(request, state.engine, job, queue, protocol)

    async def chat(request):
        return await completion(request, PROTOCOLS["chat"])

    async def messages(request):
        return await completion(request, PROTOCOLS["messages"])

    async def responses(request):
        return await completion(request, PROTOCOLS["responses"])

    async def models(request: Request):
        try:
            admit(request)
        except ApiError as e:
            return _error(_protocol_of(request), e)
        created = int(state.started)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.started))
        data = [{"id": n, "object": "model", "created": created, "owned_by": "mlx-v4", "type": "model",
                 "display_name": n, "created_at": stamp, "context_length": state.context} for n in state.names]
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"], "last_id": data[-1]["id"]})

    async def health(request: Request):
        try:
            admit(request)  # usage and cache stats are the key holder's business
        except ApiError as e:
            return _error(_protocol_of(request), e)
        alive = state.engine.alive
        body = {"status": "ok" if alive else "engine stopped", "model": config.model_name,
                "context": state.context, "engine": state.engine.stats(), "prefix_cache": state.pool.stats()}
        store = getattr(model, "expert_store", None)
        if store is not None:
            body["experts"] = store.stats()
        return JSONResponse(body, status_code=200 if alive else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(state.engine.shutdown, True)

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/chat/completions", chat, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.server = state
    return app


async def _stream(engine: Engine, job: Job, queue: asyncio.Queue, protocol: Protocol):
    """SSE pieces as the worker emits them. Leaving early (the client went away: Starlette
    cancels this generator) cancels the job, which frees its slot at the next step."""
    try:
        while True:
            item = await queue.get()
            if item[0] == "data":
                yield item[1]
            elif item[0] == "end":
                return
            else:
                yield protocol.sse_error(ApiError(item[1], item[2], "api_error" if item[1] >= 500 else None))
                return
    finally:
        engine.cancel(job)


async def _whole(request: Request, engine: Engine, job: Job, queue: asyncio.Queue, protocol: Protocol):
    """Wait for the whole response; a client that disconnects meanwhile cancels the job."""

    async def watch():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                engine.cancel(job)
                return

    watcher = asyncio.create_task(watch())
    try:
        while True:
            item = await queue.get()
            if item[0] == "end":
                return Response(item[1], media_type="application/json")
            if item[0] == "error":
                err = ApiError(item[1], item[2], "api_error" if item[1] >= 500 else None)
                return _error(protocol, err)
    finally:
        watcher.cancel()
        engine.cancel(job)
