"""Generation: chunked prefill, pipelined decode, typed events.

``stream_generate`` yields, in order: for each generated token a :class:`Token`, followed by
the :class:`Reasoning` or :class:`Answer` text it completed (if any); then one :class:`Stats`
and one :class:`Finish`. The CLI and the server see generation only through these events.

Cache contract: the cache passed in (or a fresh one) always ends holding exactly the tokens
that were fed to the model, ``Finish.cache_offset`` positions in all: the prompt, then every
generated token that was fed back (all of them, except the last one when the run ends on
``max_tokens``, which is sampled but never fed). A Ctrl-C while this generator computes is
deferred to the next token (or prefill chunk) boundary and ends the run with
``Finish("interrupted")``, so the cache is never left half-updated.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .cache import cache_nbytes, cache_offset, checkpoint
from .draft.speculative import Sampling, Speculator, make_drafter

#: V4's generation_config.json (temperature 1.0, top_p 1.0), used when a model has none.
V4_GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


class ContextLengthError(ValueError):
    """A prompt plus ``max_tokens`` that does not fit the model's context."""


# ---- events ------------------------------------------------------------------------------------

@dataclass
class Token:
    """One generated token: its id and its text (a special token's spelling; may be empty
    while a multi-byte character is still incomplete)."""
    id: int
    text: str


@dataclass
class Reasoning:
    """Text of the reasoning (before ``</think>`` when the prompt opened thinking)."""
    text: str


@dataclass
class Answer:
    """Text of the answer."""
    text: str


@dataclass
class ToolCall:
    """A complete tool call parsed from the model's DSML block (emitted by chat.py)."""
    id: str
    name: str
    arguments: str  # JSON object text

    def parsed_arguments(self) -> dict:
        return json.loads(self.arguments) if self.arguments else {}


@dataclass
class Stats:
    prompt_tokens: int  # tokens prefilled by this call
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_bytes: int
    context_tokens: int  # positions in the cache at the end
    max_context: int
    cache_bytes: int
    draft_tokens: int = 0  # draft tokens verified (speculative decoding)
    accepted_tokens: int = 0  # of those, accepted
    target_forwards: int = 0  # target forwards in the decode phase (0 without drafts)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per verifying forward (accepted drafts + the target's own token)."""
        return (self.accepted_tokens + self.target_forwards) / self.target_forwards if self.target_forwards else 0.0


@dataclass
class Finish:
    reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or "interrupted"
    prompt_tokens: int = 0  # prompt tokens of this call now in the cache
    generation_tokens: int = 0  # tokens sampled
    cache_offset: int = 0  # positions in the cache at the end
    generated: list[int] = field(default_factory=list)  # the sampled ids
    stop_string: str | None = None  # the stop string that ended the run, if any


Event = Token | Reasoning | Answer | ToolCall | Stats | Finish


# ---- sampling defaults -------------------------------------------------------------------------

def load_generation_defaults(model_dir: str | Path | None) -> dict:
    """Sampling settings from ``model_dir/generation_config.json`` (temperature, top_p,
    top_k, min_p; whichever it sets), over V4's defaults (temperature 1.0, top_p 1.0)."""
    out = dict(V4_GENERATION_DEFAULTS)
    if model_dir is None:
        return out
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return out
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable generation config ({e})") from None
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    for key in ("temperature", "top_p", "top_k", "min_p"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def sampling_settings(model=None, *, temperature=None, top_p=None, min_p=None, top_k=None) -> Sampling:
    """Resolved settings; unset values come from ``model.generation_defaults`` (a dict, set by
    the loader from generation_config.json) or V4's defaults."""
    d = dict(getattr(model, "generation_defaults", None) or V4_GENERATION_DEFAULTS)
    temp = d.get("temperature", 1.0) if temperature is None else temperature
    top_p = d.get("top_p", 1.0) if top_p is None else top_p
    min_p = d.get("min_p", 0.0) if min_p is None else min_p
    top_k = d.get("top_k", 0) if top_k is None else top_k
    return Sampling(float(temp), float(top_p), float(min_p), int(top_k or 0))


def build_sampler(model=None, *, temperature=None, top_p=None, min_p=None, top_k=None) -> Callable:
    """An mlx-lm sampler for :func:`sampling_settings`."""
    from mlx_lm.sample_utils import make_sampler

    s = sampling_settings(model, temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    return make_sampler(temp=s.temperature, top_p=s.top_p if s.top_p < 1.0 else 0.0, min_p=s.min_p, top_k=s.top_k)


# ---- Ctrl-C deferral ---------------------------------------------------------------------------

class _DeferInterrupt:
    """While active (main thread only), SIGINT sets ``hit`` instead of raising, so a step is
    never abandoned half-way. Installed only around this module's own work, never while the
    generator is suspended in the caller."""

    def __init__(self):
        self.hit = False
        self._prev = None

    def _handler(self, signum, frame):
        self.hit = True

    def __enter__(self):
        self._prev = None
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGINT)
            if prev is not None:
                signal.signal(signal.SIGINT, self._handler)
                self._prev = prev
        return self

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
            self._prev = None
        return False


# ---- prefill -----------------------------------------------------------------------------------

def _eval_cache(cache, *extra) -> None:
    mx.eval(*extra, [c.state for c in cache])


def prefill(model, ids: list[int], cache, *, step_size: int = 512, checkpoints=(),
            guard: _DeferInterrupt | None = None) -> int:
    """Feed ``ids`` into ``cache`` in chunks of ``step_size``, evaluating each chunk together
    with the cache state so the lazy graph never spans more than one chunk. Logits are not
    computed. ``checkpoints``: positions within ``ids`` (0..len) after which the cache takes a
    checkpoint (chunks end there). Returns how many ids were fed (fewer than all only when
    interrupted)."""
    if step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {step_size}")
    marks = sorted(p for p in set(checkpoints) if 0 <= p <= len(ids))
    fed = 0
    if marks and marks[0] == 0:
        checkpoint(cache)

    def chunk_end(start: int) -> int:
        return min([start + step_size, len(ids)] + [p for p in marks if p > start])

    prefetch = getattr(model, "prefetch", None)  # DeepSeek V4.1: the next chunk's Engram rows
    while fed < len(ids):
        if guard is not None and guard.hit:
            break
        end = chunk_end(fed)
        model(mx.array([ids[fed:end]], dtype=mx.int32), cache=cache)
        if prefetch is not None and end < len(ids):  # read while this chunk computes
            prefetch([ids[end:chunk_end(end)]], cache)
        _eval_cache(cache)
        fed = end
        if fed in marks:
            checkpoint(cache)
    return fed


def check_context(model, start: int, prompt_tokens: int, max_tokens: int) -> None:
    limit = int(model.args.max_position_embeddings)
    need = start + prompt_tokens + max_tokens
    if need > limit:
        held = f" after the {start} tokens already in the cache" if start else ""
        room = limit - start - prompt_tokens
        hint = (f"lower max_tokens to at most {room}" if room > 0
                else "shorten the prompt or start a new conversation")
        raise ContextLengthError(
            f"prompt of {prompt_tokens} tokens{held} plus max_tokens={max_tokens} needs {need} positions, "
            f"but the model's context (max_position_embeddings) is {limit}; {hint}")


# ---- text channels and stop strings ------------------------------------------------------------

class _TextRouter:
    """Routes decoded text to Reasoning/Answer and watches for stop strings, holding back any
    tail that could still grow into one."""

    def __init__(self, stop: list[str], reasoning: bool):
        self.stop = [s for s in stop if s]
        self.reasoning = reasoning
        self.held = ""
        self.matched: str | None = None

    def _event(self, text: str):
        return Reasoning(text) if self.reasoning else Answer(text)

    def push(self, text: str) -> list[Event]:
        if not text or self.matched is not None:
            return []
        self.held += text
        cut, hit = None, None
        for s in self.stop:
            i = self.held.find(s)
            if i >= 0 and (cut is None or i < cut):
                cut, hit = i, s
        if hit is not None:
            out, self.held, self.matched = self.held[:cut], "", hit
            return [self._event(out)] if out else []
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.held)), 0, -1):
                if self.held.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out):]
        return [self._event(out)] if out else []

    def flush(self) -> list[Event]:
        out, self.held = self.held, ""
        return [self._event(out)] if out and self.matched is None else []

    def end_reasoning(self) -> list[Event]:
        events = self.flush()
        self.reasoning = False
        return events


# ---- the generator -----------------------------------------------------------------------------

def stream_generate(model, tokenizer, prompt: str | list[int], *, cache=None, max_tokens: int = 256,
                    sampler: Callable | None = None, temperature: float | None = None,
                    top_p: float | None = None, min_p: float | None = None, top_k: int | None = None,
                    seed: int | None = None, logits_processors: list[Callable] | None = None,
                    stop: str | list[str] | None = None, prefill_step_size: int = 512,
                    thinking: bool | None = None, eos_token_ids=None, checkpoints=(),
                    draft: str | None = None, draft_tokens: int | None = None) -> Iterator[Event]:
    """Generate from ``prompt`` (text, encoded without BOS, or ids), continuing ``cache``.

    ``thinking``: whether the output starts in reasoning (ends at ``</think>``); None decides
    from the prompt (its last token is ``<think>``). ``stop``: strings that end the run
    (excluded from the text). Raises :class:`ContextLengthError` before any work when the
    cache + prompt + ``max_tokens`` exceed ``max_position_embeddings``. ``checkpoints``:
    positions within the prompt (0..len) at which the cache takes a checkpoint to rewind to.

    ``draft``: speculative decoding with the checkpoint's drafter ("mtp", "dspark"; "auto" uses
    the one the checkpoint has when the settings allow it; None: plain decoding). ``draft_tokens``:
    guesses verified per target forward (None: 1 for the MTP, the block size for DSpark). Greedy
    output is the plain output token for token; sampled output follows the same distribution (see
    mlx_v4/draft/speculative.py).
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt: give at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    cache = model.make_cache() if cache is None else cache
    start = cache_offset(cache)
    check_context(model, start, len(ids), max_tokens)
    if seed is not None:
        mx.random.seed(seed)
    drafter = make_drafter(model, draft, draft_tokens, custom_sampler=sampler is not None,
                           distributed=getattr(type(model), "distributed", False))
    settings = sampling_settings(model, temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    sampler = sampler or build_sampler(model, temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    eos = set(getattr(tokenizer, "eos_token_ids", {tokenizer.eos_id})) | {int(model.args.eos_token_id)}
    eos |= set(eos_token_ids or ())
    control = eos | {tokenizer.think_id, tokenizer.end_think_id, tokenizer.bos_id}
    thinking = (ids[-1] == tokenizer.think_id) if thinking is None else thinking
    router = _TextRouter([stop] if isinstance(stop, str) else list(stop or []), reasoning=thinking)
    detok = tokenizer.detokenizer()
    history = mx.array(ids, dtype=mx.int32) if logits_processors else None
    generated: list[int] = []
    guard = _DeferInterrupt()

    def process(logits: mx.array, before: list[int] = ()) -> mx.array:
        """The logits processors, seeing the prompt and the tokens generated before this row."""
        if logits_processors:
            done = generated + list(before)
            hist = mx.concatenate([history, mx.array(done, dtype=mx.int32)]) if done else history
            for proc in logits_processors:
                logits = proc(hist, logits)
        return logits

    def sample(logits: mx.array) -> mx.array:
        logits = process(logits)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).reshape(-1)

    def step(token: mx.array) -> mx.array:
        return sample(model(token.reshape(1, -1), cache=cache)[:, -1, :])

    spec = None
    if drafter is not None:
        rows_processed = (lambda rows, fed: mx.concatenate([process(rows[i:i + 1], fed[:i]) for i in range(len(fed))])
                          ) if logits_processors else None
        spec = Speculator(model, cache, drafter, settings, rows_processed)

    def finish(reason: str, prompt_fed: int) -> Iterator[Event]:
        _eval_cache(cache)
        t_end = time.perf_counter()
        n = len(generated)
        gen_time = max(t_end - t_first, 1e-9) if t_first is not None else 0.0
        counts = spec.counts if spec is not None else None
        yield Stats(prompt_tokens=prompt_fed, prompt_tps=prompt_fed / max(t_prefill, 1e-9),
                    generation_tokens=n, generation_tps=(n - 1) / gen_time if n > 1 else 0.0,
                    peak_memory_bytes=int(mx.get_peak_memory()), context_tokens=cache_offset(cache),
                    max_context=int(model.args.max_position_embeddings), cache_bytes=int(cache_nbytes(cache)),
                    draft_tokens=counts.drafted if counts else 0, accepted_tokens=counts.accepted if counts else 0,
                    target_forwards=counts.steps if counts else 0)
        yield Finish(reason, prompt_tokens=prompt_fed, generation_tokens=n, cache_offset=cache_offset(cache),
                     generated=list(generated), stop_string=router.matched)

    t0 = time.perf_counter()
    t_first = None
    t_prefill = 0.0
    # -- prefill all but the last prompt token, then the last one gives the first logits
    try:
        with guard:
            marks = [p for p in checkpoints if p < len(ids)]
            if spec is None:
                fed = prefill(model, ids[:-1], cache, step_size=prefill_step_size, guard=guard, checkpoints=marks)
            else:
                fed, tail = spec.prefill(ids[:-1], step_size=prefill_step_size, guard=guard, checkpoints=marks)
            y = None
            if not guard.hit:
                if spec is None:
                    y = step(mx.array(ids[-1:], dtype=mx.int32))
                else:
                    logits, prime = spec.first(ids[-1], tail, ids)
                    y = sample(logits[None, -1])
                mx.eval(y, [c.state for c in cache])  # the first token ends the prefill timing
                fed += 1
                if len(ids) in checkpoints:
                    checkpoint(cache)
                if spec is not None and max_tokens > 1:
                    prime(int(y.item()))
    except KeyboardInterrupt:
        guard.hit, y = True, None
        fed = cache_offset(cache) - start
    t_prefill = time.perf_counter() - t0
    if y is None:
        yield from finish("interrupted", fed)
        return
    t_first = time.perf_counter()

    def emit(tok: int) -> list[Event]:
        generated.append(tok)
        events: list[Event] = []
        if tok in control:
            detok.finalize()
            events += router.push(detok.last_segment)
            text = tokenizer.decode([tok])
            if tok == tokenizer.end_think_id and router.reasoning:
                events += router.end_reasoning()
        else:
            detok.add_token(tok)
            text = detok.last_segment
            events += router.push(text)
        return [Token(tok, text)] + events

    def stop_reason(tok: int) -> str | None:
        if tok in eos or router.matched is not None:
            return "stop"
        if guard.hit:
            return "interrupted"
        if len(generated) >= max_tokens:
            return "length"
        return None

    if spec is not None:
        yield from _speculative_decode(spec, int(y.item()), max_tokens, generated, guard, emit, stop_reason,
                                       detok, router, finish, len(ids), cache, start)
        return

    # -- decode, one step ahead: token n+1 is computed while token n is handed out
    reason = None
    while True:
        try:
            with guard:
                nxt = None
                if len(generated) + 1 < max_tokens:
                    nxt = step(y)  # feeds y
                    mx.async_eval(nxt)
                tok = int(y.item())
        except KeyboardInterrupt:
            # A raw interrupt (off the main thread, or raised inside the model): if the step
            # had already fed y, record it so the ids match what the cache holds.
            if cache_offset(cache) > start + len(ids) + len(generated):
                generated.append(int(y.item()))
            reason = "interrupted"
            break
        yield from emit(tok)
        reason = stop_reason(tok)
        if reason is not None:
            break
        y = nxt
    detok.finalize()
    yield from router.push(detok.last_segment)
    yield from router.flush()
    yield from finish(reason, len(ids))


def _speculative_decode(spec: Speculator, y: int, max_tokens: int, generated: list[int], guard, emit, stop_reason,
                        detok, router, finish, n_prompt: int, cache, start: int) -> Iterator[Event]:
    """The decode loop with drafts: each step emits the pending token and the accepted drafts.
    The cache keeps what plain decoding would hold: every emitted token, except the last one
    when the run ends on max_tokens."""
    reason = None
    while reason is None:
        room = max_tokens - len(generated)
        batch = [y]
        try:
            with guard:
                if room > 1:
                    batch = spec.step(y, room)
        except KeyboardInterrupt:
            spec.abandon()
            reason = "interrupted"
            break
        before = len(generated)
        try:
            for tok in batch:
                yield from emit(tok)
                reason = stop_reason(tok)
                if reason is not None:
                    break
        finally:  # also when the caller closes the generator mid-step: keep what was handed out
            if room > 1:
                emitted = len(generated) - before
                keep = emitted - (1 if reason == "length" else 0)
                with guard:
                    y = spec.commit(keep, more=reason is None and emitted == len(batch))
    detok.finalize()
    yield from router.push(detok.last_segment)
    yield from router.flush()
    yield from finish(reason, n_prompt)


def generate(model, tokenizer, prompt: str | list[int], **kwargs) -> str:
    """The answer text of :func:`stream_generate` (reasoning, if any, is left out)."""
    return "".join(e.text for e in stream_generate(model, tokenizer, prompt, **kwargs) if isinstance(e, Answer))
