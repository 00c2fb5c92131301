"""Continuous batching: many sequences advance together, one :meth:`Model.step_batch` per step.

A :class:`BatchGenerator` holds the active :class:`Sequence` objects. Each :meth:`step` runs
the next token of every decoding sequence plus prompt chunks of the prefilling ones, shortest
remaining prompt first (a short request is not stuck behind a long prompt), within a token
budget (``step_tokens``) that bounds how long one step can stall the decoding streams. The
chunks of one prompt do not depend on what else runs (a chunk is ``prefill_step`` ids, or
fewer where a checkpoint mark or the prompt ends; a chunk is never cut to fit the budget, it
waits for the next step instead), so a sequence's computation is the same alone or in any batch.

Every sequence samples with its own settings and its own random key (``seed``), reports
log-probabilities if asked, and ends on its own EOS or ``max_tokens``. An exception in a step
undoes the step on every cache, then the rows run one by one so only the failing sequence
ends (with ``finish_reason == "error"``).

Cache contract (as stream_generate's): a sequence's cache holds exactly the ids fed to it,
the prompt ids prefilled so far then every generated id except a final one that was sampled
but never fed; :meth:`Sequence.cache_ids` lists them.

With ``draft`` (as stream_generate's), each decoding sequence drafts and verifies its own
guesses inside the shared step (mlx_v4/batch_draft.py): one step may then give a sequence
several tokens, each its own :class:`StepOutput`, in order (the last one carries ``finish``).

``batch_generate`` is the scripting front end: prompts in, one :class:`BatchResult` each.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import mlx.core as mx

from .batch import restore_caches, snapshot_caches
from .batch_draft import BatchDrafting
from .cache import checkpoint
from .generation import V4_GENERATION_DEFAULTS, _TextRouter, check_context


@dataclass
class SamplingParams:
    """Per-sequence sampling. ``None`` values fall back to the model's generation defaults.
    ``temperature`` 0 is greedy. ``seed`` fixes this sequence's own random stream, whatever
    runs beside it. ``logprobs``: report the log-probability (of the model's distribution,
    before temperature and filters) of each sampled token, and ``top_logprobs`` alternatives."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def resolved(self, defaults: dict | None) -> SamplingParams:
        d = dict(defaults or V4_GENERATION_DEFAULTS)

        def value(given, key, fallback):
            return given if given is not None else (d[key] if d.get(key) is not None else fallback)

        out = SamplingParams(float(value(self.temperature, "temperature", 1.0)), float(value(self.top_p, "top_p", 1.0)),
                             int(value(self.top_k, "top_k", 0) or 0), float(value(self.min_p, "min_p", 0.0)),
                             self.seed, self.logprobs, int(self.top_logprobs or 0))
        if out.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {out.temperature}")
        if not 0 <= out.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {out.top_logprobs}")
        return out


class Sequence:
    """One prompt being prefilled and then decoded against its own cache.

    ``start``: ids of ``ids`` already in ``cache`` (a reused prefix). ``marks``: positions
    within ``ids`` after which the cache takes a checkpoint. ``tag``: anything the caller
    wants back with this sequence's outputs."""

    def __init__(self, ids: list[int], cache, *, max_tokens: int, sampling: SamplingParams | None = None,
                 start: int = 0, marks: Iterable[int] = (), eos: Iterable[int] = (), tag=None):
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= start < len(ids):
            raise ValueError(f"start={start}: at least the last of the {len(ids)} prompt ids must be fed")
        self.ids, self.cache, self.max_tokens = list(ids), cache, max_tokens
        self.sampling = sampling or SamplingParams()
        self.pos = start  # prompt ids in the cache
        self.marks = sorted(m for m in set(marks) if start < m <= len(ids))
        self.eos = set(eos)
        self.tag = tag
        self.generated: list[int] = []
        self.fed = 0  # generated ids in the cache
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.draft = None  # its drafting state (batch_draft.RowDraft) when the generator drafts
        self._key = None

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.ids)

    def cache_ids(self) -> list[int]:
        """The ids the cache holds, in order."""
        return self.ids[:self.pos] + self.generated[:self.fed]

    def _next_chunk(self, step: int) -> int:
        end = min(self.pos + step, len(self.ids))
        return min([end] + [m for m in self.marks if m > self.pos])


@dataclass
class StepOutput:
    """What one step produced for one sequence: a sampled token (``token`` None when the step
    only prefilled, or when it failed), its log-probability and alternatives if asked, and
    ``finish`` ("stop", "length" or "error") when the sequence has ended."""
    seq: Sequence
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish: str | None = None


class BatchGenerator:
    """``draft``/``draft_tokens``: speculative decoding per sequence, as stream_generate's
    (raises DraftError for a drafter this model cannot run; "auto" then decodes plainly).
    A drafting row counts k+1 tokens against ``step_tokens``."""

    def __init__(self, model, *, prefill_step: int = 512, step_tokens: int = 512, draft: str | None = None,
                 draft_tokens: int | None = None):
        if prefill_step < 1 or step_tokens < 1:
            raise ValueError(f"prefill_step and step_tokens must be >= 1, got {prefill_step}, {step_tokens}")
        self.model = model
        self.prefill_step, self.step_tokens = prefill_step, step_tokens
        self.defaults = getattr(model, "generation_defaults", None)
        self.active: list[Sequence] = []
        drafting = BatchDrafting(model, draft, draft_tokens) if draft is not None else None
        self.drafting = drafting if drafting is not None and drafting.enabled else None

    # ---- membership -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence:
        """Admit ``seq`` (raises ContextLengthError/ValueError before any work if it cannot run)."""
        check_context(self.model, seq.pos, len(seq.ids) - seq.pos, seq.max_tokens)
        seq.sampling = seq.sampling.resolved(self.defaults)
        seed = seq.sampling.seed
        if seed is None:
            seed = random.getrandbits(63)
        seq._key = mx.random.key(seed % (1 << 64))
        if self.drafting is not None:
            self.drafting.attach(seq)
        if seq.pos == 0 and 0 in seq.marks:
            checkpoint(seq.cache)
        self.active.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Drop ``seq`` (finished elsewhere, or cancelled); its cache stays consistent."""
        if seq in self.active:
            self.active.remove(seq)

    # ---- one step ---------------------------------------------------------------------------
    def plan(self) -> list[tuple[Sequence, list[int]]]:
        """The rows of the next step: every decoding sequence's pending id (and its drafts),
        then prompt chunks, shortest remaining prompt first, while they fit ``step_tokens`` (at
        least one chunk)."""
        decoding = [s for s in self.active if not s.prefilling]
        rows = list(zip(decoding, self.drafting.decode_rows(decoding) if self.drafting is not None
                        else [[s.generated[-1]] for s in decoding]))
        budget = self.step_tokens - sum(len(ids) for _, ids in rows)
        took = False
        for s in sorted((s for s in self.active if s.prefilling), key=lambda s: len(s.ids) - s.pos):
            end = s._next_chunk(self.prefill_step)
            if took and end - s.pos > budget:
                continue
            rows.append((s, s.ids[s.pos:end]))
            budget -= end - s.pos
            took = True
        return rows

    def step(self) -> list[StepOutput]:
        """Run one step; returns an output for every sequence it touched."""
        rows = self.plan()
        if not rows:
            return []
        caches = [s.cache for s, _ in rows]
        snaps = snapshot_caches(caches)
        try:
            results = self._run(rows)
        except Exception:
            restore_caches(caches, snaps)
            if len(rows) == 1:
                return [self._fail(rows[0][0])]
            # isolate the failure: each row alone, from the state before the step
            results = []
            for row, snap in zip(rows, snaps):
                try:
                    results += self._run([row])
                except Exception:
                    restore_caches([row[0].cache], [snap])
                    results.append(self._fail(row[0]))
        return results

    def _fail(self, seq: Sequence) -> StepOutput:
        seq.error = sys.exc_info()[1]
        seq.finish_reason = "error"
        self.remove(seq)
        return StepOutput(seq, finish="error")

    def _run(self, rows) -> list[StepOutput]:
        """One model step over ``rows``. Nothing about a sequence changes until every row's
        result is in hand, so a raise anywhere leaves the sequences as they were (the caller
        restores the caches)."""
        emitted, keys = self.drafting.run(self, rows) if self.drafting is not None else self._plain(rows)
        # commit: bookkeeping only from here on
        out = []
        for r, (s, ids) in enumerate(rows):
            if s.prefilling:
                s.pos += len(ids)
                if s.pos in s.marks:
                    checkpoint(s.cache)
            else:
                s.fed += len(emitted.get(r, ()))  # the pending token, and the accepted drafts but the last
            if r not in emitted:
                out.append(StepOutput(s))
                continue
            s._key = keys.get(id(s), s._key)
            out += [self._emit(s, tok, lp) for tok, lp in emitted[r]]
        return out

    def _plain(self, rows) -> tuple[dict[int, list[tuple[int, mx.array | None]]], dict]:
        """The model step without drafts -> ({row: [(token, its logprobs row if asked)]}, the
        sampling rows' next random keys)."""
        seqs = [s for s, _ in rows]
        logits = self.model.step_batch([ids for _, ids in rows], [s.cache for s in seqs])  # [R, vocab]
        sampling = [r for r, (s, ids) in enumerate(rows) if not s.prefilling or s.pos + len(ids) == len(s.ids)]
        tokens, lp, keys = None, None, {}
        if sampling:
            logits = logits[mx.array(sampling)] if len(sampling) < len(rows) else logits
            tokens, lp, keys = self._sample(logits, [seqs[r] for r in sampling])
        extras = [lp] if lp is not None else []
        mx.eval(*([tokens] if tokens is not None else []), *extras, [c.state for s in seqs for c in s.cache])
        picked = tokens.tolist() if tokens is not None else []
        return {r: [(picked[i], lp[i] if seqs[r].sampling.logprobs else None)] for i, r in enumerate(sampling)}, keys

    def _emit(self, s: Sequence, tok: int, logprobs: mx.array | None) -> StepOutput:
        """Record ``tok`` as generated by ``s`` (``logprobs`` [vocab]: its row, when asked)."""
        o = StepOutput(s, tok)
        if logprobs is not None:
            o.logprob = logprobs[tok].item()
            if s.sampling.top_logprobs:
                top = mx.argpartition(-logprobs, kth=s.sampling.top_logprobs - 1)[:s.sampling.top_logprobs]
                o.top_logprobs = sorted(zip(top.tolist(), logprobs[top].tolist()), key=lambda kv: -kv[1])
        s.generated.append(tok)
        if tok in s.eos:
            o.finish = "stop"
        elif len(s.generated) >= s.max_tokens:
            o.finish = "length"
        if o.finish:
            s.finish_reason = o.finish
            self.remove(s)
        return o

    def _sample(self, logits: mx.array, seqs: list[Sequence]) -> tuple[mx.array, mx.array | None, dict]:
        """logits [R, vocab] -> (token ids [R], log-probabilities [R, vocab] if any row reports
        them, {id(seq): its next random key}). Greedy rows share one argmax; the others sample
        with their own filters and key."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        greedy = mx.argmax(logprobs, axis=-1)
        picks, keys = [], {}
        for r, s in enumerate(seqs):
            p = s.sampling
            if p.temperature == 0:
                picks.append(greedy[r])
                continue
            keys[id(s)], sub = mx.random.split(s._key)
            picks.append(_sample_row(logprobs[r:r + 1], p, sub)[0])
        tokens = greedy if all(s.sampling.temperature == 0 for s in seqs) else mx.stack(picks)
        return tokens.astype(mx.int32), (logprobs if any(s.sampling.logprobs for s in seqs) else None), keys


def _sample_row(logprobs: mx.array, p: SamplingParams, key: mx.array) -> mx.array:
    """mlx-lm's sampler chain (top-p, min-p, top-k, then temperature) on one row [1, vocab],
    drawing with ``key`` instead of the global random state."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if 0 < p.top_p < 1.0:
        logprobs = apply_top_p(logprobs, p.top_p)
    if p.min_p:
        logprobs = apply_min_p(logprobs, p.min_p)
    if p.top_k and p.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, p.top_k)
    return mx.random.categorical(logprobs * (1.0 / p.temperature), key=key)


# ---- scripting --------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """One prompt's generation: the answer text (reasoning, if the prompt opened thinking, is
    in ``reasoning``), the sampled ids, why it ended, and log-probabilities if asked."""
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" or "error"
    reasoning: str = ""
    stop_string: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_tokens: int = 0
    draft_tokens: int = 0  # draft tokens verified (speculative decoding)
    accepted_tokens: int = 0  # of those, accepted
    target_forwards: int = 0  # decode steps that verified drafts


class _Text:
    """Detokenizes one sequence and watches its stop strings (generation.py's router)."""

    def __init__(self, tokenizer, stop, reasoning: bool):
        self.tokenizer, self.detok = tokenizer, tokenizer.detokenizer()
        self.router = _TextRouter(stop, reasoning)
        self.answer, self.reasoning = [], []
        self.control = set(getattr(tokenizer, "eos_token_ids", {tokenizer.eos_id})) | {
            tokenizer.think_id, tokenizer.end_think_id, tokenizer.bos_id}

    def _take(self, events) -> None:
        for e in events:
            (self.reasoning if type(e).__name__ == "Reasoning" else self.answer).append(e.text)

    def push(self, tok: int) -> bool:
        """Add a token; True once a stop string has matched."""
        if tok in self.control:
            self.detok.finalize()
            self._take(self.router.push(self.detok.last_segment))
            if tok == self.tokenizer.end_think_id and self.router.reasoning:
                self._take(self.router.end_reasoning())
        else:
            self.detok.add_token(tok)
            self._take(self.router.push(self.detok.last_segment))
        return self.router.matched is not None

    def close(self) -> None:
        self.detok.finalize()
        self._take(self.router.push(self.detok.last_segment))
        self._take(self.router.flush())


def batch_generate(model, tokenizer, prompts: list[str | list[int]], *, max_tokens: int | list[int] = 256,
                   temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                   min_p: float | None = None, seed: int | list[int | None] | None = None,
                   stop: str | list[str] | None = None, logprobs: bool = False, top_logprobs: int = 0,
                   max_batch: int = 16, prefill_step_size: int = 512, step_tokens: int = 512,
                   thinking: bool | None = None, draft: str | None = None,
                   draft_tokens: int | None = None) -> list[BatchResult]:
    """Generate from every prompt (text, encoded without BOS, or ids) at once; one
    :class:`BatchResult` per prompt, in order. Up to ``max_batch`` run together; the others
    join as those finish. ``seed`` (one, or one per prompt) gives each prompt its own random
    stream: its output does not depend on the other prompts. ``thinking``: as in
    :func:`mlx_v4.stream_generate` (None: from each prompt's last token). ``draft``,
    ``draft_tokens``: speculative decoding per prompt, as in stream_generate."""
    n = len(prompts)
    per = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
    seeds, limits = per(seed), per(max_tokens)
    if len(seeds) != n or len(limits) != n:
        raise ValueError(f"seed and max_tokens lists need one value per prompt ({n})")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    eos = set(getattr(tokenizer, "eos_token_ids", {tokenizer.eos_id})) | {int(model.args.eos_token_id)}
    encoded = [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    gen = BatchGenerator(model, prefill_step=prefill_step_size, step_tokens=step_tokens, draft=draft,
                         draft_tokens=draft_tokens)
    seqs = []
    for i, ids in enumerate(encoded):
        sampling = SamplingParams(temperature, top_p, top_k, min_p, seeds[i], logprobs, top_logprobs)
        think = (ids[-1] == tokenizer.think_id) if thinking is None and ids else bool(thinking)
        s = Sequence(ids, model.make_cache(), max_tokens=limits[i], sampling=sampling, eos=eos,
                     tag=(i, _Text(tokenizer, stops, think)))
        check_context(model, 0, len(ids), limits[i])
        seqs.append(s)
    results: list[BatchResult | None] = [None] * n
    waiting = list(seqs)
    while waiting or gen.active:
        while waiting and len(gen.active) < max_batch:
            gen.add(waiting.pop(0))
        for o in gen.step():
            s = o.seq
            i, text = s.tag
            res = results[i] = results[i] or BatchResult("", [], "", prompt_tokens=len(s.ids))
            if res.finish_reason:  # a stop string ended it earlier in this step (drafts give several tokens)
                continue
            if o.token is not None:
                res.tokens.append(o.token)
                if o.logprob is not None:
                    res.logprobs.append(o.logprob)
                    res.top_logprobs.append(o.top_logprobs or [])
                if text.push(o.token) and o.finish is None:
                    o.finish = "stop"
                    gen.remove(s)
            if o.finish:
                text.close()
                res.finish_reason = o.finish
                res.text, res.reasoning = "".join(text.answer), "".join(text.reasoning)
                res.stop_string = text.router.matched
                if s.draft is not None:
                    c = s.draft.counts
                    res.draft_tokens, res.accepted_tokens, res.target_forwards = c.drafted, c.accepted, c.steps
                if o.finish == "error":
                    raise RuntimeError(f"prompt {i}: generation failed: {s.error}") from s.error
    return results
