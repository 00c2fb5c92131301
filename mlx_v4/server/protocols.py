"""The three wire protocols, all through deepseek-recipe.

Request conversion (validation, messages -> Conversation, thinking mode, reasoning effort,
tools, stop sequences, sampling values), the prompt encoding, and the stream processor that
turns generated ids into protocol chunks (reasoning, text, DSML tool calls -> tool_calls /
tool_use / function_call items, finish reasons, usage) are the recipe's. This module only
picks the right recipe classes per protocol, formats errors in each protocol's own shape, and
frames chunks as server-sent events.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..chat import recipe_tokenizer
from ..tokenizer import ASSISTANT_ID, USER_ID
from .prompt_size import tokens_beyond


def _recipe():
    import deepseek_recipe

    return deepseek_recipe


class ApiError(Exception):
    """A request the server refuses: HTTP status, message and the error type to report."""

    def __init__(self, status: int, message: str, kind: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                             413: "request_too_large", 429: "rate_limit_error",
                             503: "overloaded_error"}.get(status, "invalid_request_error")


@dataclass(frozen=True)
class Protocol:
    name: str  # "chat", "messages", "responses"
    id_prefix: str

    @property
    def request_cls(self):
        r = _recipe()
        return {"chat": r.ChatCompletionRequest, "messages": r.MessagesRequest,
                "responses": r.ResponsesRequest}[self.name]

    @property
    def response_cls(self):
        r = _recipe()
        return {"chat": r.ChatCompletionResponse, "messages": r.MessagesResponse,
                "responses": r.ResponsesResponse}[self.name]

    def error_body(self, err: ApiError) -> dict:
        if self.name == "messages":
            kind = "invalid_request_error" if err.kind == "context_length_exceeded" else err.kind
            return {"type": "error", "error": {"type": kind, "message": err.message}}
        kind = {"not_found_error": "invalid_request_error", "authentication_error": "invalid_request_error",
                "permission_error": "invalid_request_error", "overloaded_error": "server_error",
                "api_error": "server_error"}.get(err.kind, err.kind)
        code = {401: "invalid_api_key", 404: "model_not_found"}.get(err.status, kind)
        return {"error": {"message": err.message, "type": kind, "param": err.param, "code": code}}

    def sse(self, event: str | None, data: str) -> str:
        if self.name == "chat" or event is None:
            return f"data: {data}\n\n"
        return f"event: {event}\ndata: {data}\n\n"

    def sse_error(self, err: ApiError) -> str:
        body = json.dumps(self.error_body(err))
        if self.name == "messages":
            return f"event: error\ndata: {body}\n\n"
        if self.name == "responses":
            return f"event: error\ndata: {json.dumps({'type': 'error', 'code': err.kind, 'message': err.message})}\n\n"
        return f"data: {body}\n\n"


PROTOCOLS = {p.name: p for p in (Protocol("chat", "chatcmpl-"), Protocol("messages", "msg_"),
                                 Protocol("responses", "resp_"))}


def conversion_options(model_names: list[str], context: int, version: str = "v4"):
    """Accept ``model_names`` (all rendered with the V4 encoding, or V4.1's for ``version``
    "v41", see :func:`mlx_v4.chat.model_version`) and bound max_tokens by the model's context."""
    r = _recipe()
    # DeepseekV4Pro selects DeepseekV4Encoding (Flash and Pro share it); DeepseekV41Flash V4.1's
    mv = r.ModelVersion.DeepseekV41Flash if version == "v41" else r.ModelVersion.DeepseekV4Pro
    return (r.ConversionOptions()
            .with_model_versions_by_name({n: mv for n in model_names})
            .with_thinking_max_tokens_upper_bound(context)
            .with_non_thinking_max_tokens_upper_bound(context))


@dataclass
class Prepared:
    """A converted request, ready for the engine."""
    protocol: Protocol
    request: object  # the recipe's ConversationRequest
    ids: list[int]
    max_tokens: int
    sampling: dict
    stream: bool
    model: str
    echo: object | None = None  # Responses settings to report back
    rid: str = ""
    marks: list[int] = field(default_factory=list)
    turn_mark: int = 0


_ENCODING_LOCK = threading.Lock()


def prompt_encoding(tokenizer, version: str = "v4"):
    """The recipe's V4 (or, ``version`` "v41", V4.1) prompt encoding over ``tokenizer``, made once
    (``with_tokenizer`` copies the whole vocabulary: ~0.1 s) and cached on the tokenizer."""
    attr = "_recipe_v41_encoding" if version == "v41" else "_recipe_v4_encoding"
    with _ENCODING_LOCK:
        enc = getattr(tokenizer, attr, None)
        if enc is None:
            cls = _recipe().DeepseekV41Encoding if version == "v41" else _recipe().DeepseekV4Encoding
            enc = cls().with_tokenizer(recipe_tokenizer(tokenizer))
            setattr(tokenizer, attr, enc)
        return enc


def _error_from_conversion(e) -> ApiError:
    message = str(e)
    try:
        message = json.loads(e.body)["error"]["message"]
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    status = int(getattr(e, "status_code", 400) or 400)
    if not 400 <= status < 500:
        status = 400
    kind = "not_found_error" if "model names" in message else None
    return ApiError(404 if kind else status, message, kind)


def prepare(protocol: Protocol, body: bytes, *, tokenizer, options, context: int, default_max_tokens: int,
            max_marks: int = 12, model_override: str | None = None) -> Prepared:
    """Validate and convert a request body; encode its prompt; resolve max_tokens against the
    context. Raises :class:`ApiError` (4xx) for anything the client got wrong.
    ``model_override``: answer as this model whatever model name the request gives."""
    r = _recipe()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # callers bound the depth first (guards.json_depth_exceeds); a last line
        raise ApiError(400, "request body nests too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    if model_override is not None and isinstance(data.get("model"), str):
        data["model"] = model_override
    sampling: dict = {}
    top_k = data.get("top_k")
    if top_k is not None and protocol.name == "messages":
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ApiError(400, "top_k: must be a non-negative integer", param="top_k")
        sampling["top_k"] = top_k
    try:
        req = protocol.request_cls(data)
        model = req.model
        echo = req.echo() if protocol.name == "responses" else None
        conv = req.convert(options)
    except r.ConversionError as e:
        raise _error_from_conversion(e) from None
    except (ValueError, TypeError, OverflowError) as e:  # the recipe's own parse errors
        raise ApiError(400, str(e) or "invalid request body") from None
    io = conv.inference_options
    try:  # no lock: the encoding is immutable and lets other threads run while it works
        enc = prompt_encoding(tokenizer, "v41" if conv.model_version == r.ModelVersion.DeepseekV41Flash else "v4")
        rendered = enc.render_conversation(conv.conversation)
        beyond = tokens_beyond(rendered.prompt, rendered.special_ranges, tokenizer, context)
        ids = enc.encode(conv.conversation) if beyond is None else None
    except (RuntimeError, ValueError) as e:
        raise ApiError(400, f"cannot encode the conversation: {e}") from None
    if beyond is not None:  # refused before encoding it all (prompt_size.py)
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your messages "
                            f"hold at least {beyond} tokens. Please reduce the length of the messages.",
                       "context_length_exceeded" if protocol.name != "messages" else None)
    if r.IMAGE_SPECIAL_TOKEN_ID in ids:
        raise ApiError(400, "image inputs are not supported: this server runs the text model only")
    try:
        max_tokens = conv.resolve_max_tokens(len(ids), context)
    except r.ConversionError as e:
        err = _error_from_conversion(e)
        err.kind = "context_length_exceeded" if protocol.name != "messages" else "invalid_request_error"
        raise err from None
    if io.max_tokens is None:
        max_tokens = min(max_tokens, default_max_tokens)
    sampling.update(temperature=io.temperature, top_p=io.top_p, seed=io.seed, logprobs=bool(io.logprobs),
                    top_logprobs=int(io.top_logprobs or 0))
    tags = [i + 1 for i, t in enumerate(ids) if t in (USER_ID, ASSISTANT_ID)]
    turn_mark = max([t for t in tags if ids[t - 1] == ASSISTANT_ID] or [0])
    marks = sorted(set(tags[-max_marks:]) | {len(ids)})
    return Prepared(protocol, conv, list(ids), int(max_tokens), sampling, bool(conv.stream), model, echo,
                    rid=protocol.id_prefix + uuid.uuid4().hex[:24], marks=marks, turn_mark=turn_mark)


def with_usage(data: str, extra: dict) -> str:
    """A response or chunk JSON whose usage (its own, or its ``response``'s: the Responses
    API's final events) gains ``extra``'s keys; unchanged when it carries no usage."""
    body = json.loads(data)
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict) and isinstance(body, dict) and isinstance(body.get("response"), dict):
        usage = body["response"].get("usage")
    if not isinstance(usage, dict):
        return data
    usage.update(extra)
    return json.dumps(body, separators=(",", ":"))


class Sink:
    """Turns generated ids into protocol output with the recipe's stream processor. Lives on
    the engine's worker thread. ``start``/``token``/``finish`` return SSE text pieces (for a
    streamed request) or nothing; ``result`` is the whole response JSON (non-streamed).

    ``usage_extra`` (given to ``finish``): keys added to the reply's usage (the final usage
    chunk of an OpenAI stream, Anthropic's final ``message_delta``, the Responses API's final
    event, or the whole response), e.g. ``{"drafting": {...}}``."""

    def __init__(self, prep: Prepared, tokenizer):
        r = _recipe()
        self.prep = prep
        gen = prep.protocol.request_cls.chunk_generator(prep.request, prep.rid, prep.model)
        if prep.echo is not None:
            gen = gen.with_echo(prep.echo)
        self.sp = r.StreamProcessor(gen, prep.request.parsing_options, recipe_tokenizer(tokenizer))
        self.response = None
        self.completion_tokens = 0
        self.usage_extra: dict | None = None

    @property
    def done(self) -> bool:
        return self.sp.finished

    def _out(self, chunks) -> list[str]:
        cls = self.prep.protocol.response_cls
        if self.response is not None:
            for c in chunks:
                self.response.accumulate(c)
            return []
        extra = self.usage_extra
        return [self.prep.protocol.sse(cls.sse_event_name(c), with_usage(c.to_json(), extra) if extra else c.to_json())
                for c in chunks]

    def start(self, prompt_tokens: int, cached_tokens: int) -> list[str]:
        r = _recipe()
        if not self.prep.stream:
            self.response = self.prep.protocol.response_cls(
                self.prep.rid, self.prep.model, int(time.time()), prompt_tokens, cached_tokens)
        usage = r.PromptUsage(prompt_tokens=prompt_tokens, prompt_cache_hit_tokens=cached_tokens)
        return self._out(self.sp.push(r.InferenceChunk.ready(prompt_usage=usage)))

    def token(self, token_id: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> list[str]:
        """``logprob``: (the token's log-probability, [(alternative id, log-probability), ...])."""
        if self.sp.finished:
            return []
        self.completion_tokens += 1
        chunk = _recipe().InferenceChunk.tokens([token_id], logprobs=None if logprob is None else [logprob])
        return self._out(self.sp.push(chunk))

    def finish(self, length: bool, usage_extra: dict | None = None) -> list[str]:
        r = _recipe()
        self.usage_extra = usage_extra or None
        out = []
        if not self.sp.finished:
            reason = r.InferenceFinishReason.Length if length else r.InferenceFinishReason.Stop
            out += self._out(self.sp.push(r.InferenceChunk.finish(reason)))
        if not self.sp.finished:
            out += self._out(self.sp.finish())
        if self.prep.stream:
            done = self.prep.protocol.response_cls.sse_done_data()
            if done is not None:
                out.append(f"data: {done}\n\n")
        return out

    def result(self) -> str:
        if self.response is None:
            return "{}"
        data = self.response.to_json()
        return with_usage(data, self.usage_extra) if self.usage_extra else data

    def close(self) -> None:
        try:
            if not self.sp.finished:
                self.sp.close()
        except RuntimeError:
            pass
