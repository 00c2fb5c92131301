"""Speculative decoding: a drafter guesses k tokens, one target forward verifies all k+1
positions, the cache keeps exactly the accepted prefix.

Verification (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", §2.3; Chen et al. 2023):

* greedy: keep drafts while each equals the target's argmax; the next token is the target's
  argmax after the last kept one, so the output is the non-speculative greedy output;
* sampling: the target distribution p at each row is exactly what the plain sampler draws from
  (the same top-p / min-p / top-k filters, then temperature). A draft d drawn from a proposal
  q is kept with probability min(1, p(d)/q(d)); on rejection the token is drawn from
  norm(max(p - q, 0)). Every emitted token then follows p. The MTP drafts its argmax, so its q
  is one-hot: keep with probability p(d), else draw from p with d removed. DSpark samples its
  drafts and hands q over (:attr:`DSparkDrafter.proposal`).

The cache is fed the guesses inside :func:`mlx_v4.cache.speculate` / :func:`~mlx_v4.cache.accept`,
which keep any prefix exactly (windows, compressor states, compressed entries, index keys); the
drafter is then fed what was kept.

A drafter has ``name``, ``tokens`` (drafts per step), ``reach`` (positions of history it needs
at the start), ``taps`` (target layers whose mean input streams it reads; empty: the last
streams), ``observe(features, next_ids, position)``, ``draft(n, sampling=None, key=None)``, ``logits``
(evaluated after each observe) and ``proposal`` (the q rows of the last draft, None: one-hot).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from ..batch import apply_head
from ..cache import accept, checkpoint, speculate
from .dspark import has_dspark
from .mtp import has_mtp

DRAFTS = ("auto", "mtp", "dspark")


class DraftError(ValueError):
    """A draft request this model or these settings cannot serve."""


# ---- the target distribution -----------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings (see generation.build_sampler); temperature 0 is greedy."""
    temperature: float
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filtered(self, logprobs: mx.array) -> mx.array:
        """logprobs [..., V] -> the scaled log-weights the plain sampler draws from: mlx-lm's own
        top-p, min-p and top-k filters in its order, then 1/temperature."""
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs * (1 / self.temperature)


def verify(rows: mx.array, drafts: list[int], sampling: Sampling, proposal: mx.array | None = None, *,
           key: mx.array | None = None) -> tuple[int, int]:
    """rows [k+1, V] target logprobs after each fed token, drafts [k] -> (accepted, next token).

    ``accepted`` drafts are kept; ``next`` is the token after them (the target's correction on
    a rejection, or its bonus token when every draft was kept). ``proposal`` [k, V]: the
    distributions the drafts were sampled from (None: each draft was certain, q one-hot).
    ``key``: draw from this random key (a sequence's own stream) instead of the global random
    state."""
    k = len(drafts)
    if sampling.greedy:
        best = mx.argmax(rows, axis=-1).tolist()
        a = 0
        while a < k and best[a] == drafts[a]:
            a += 1
        return a, best[a]
    logits = sampling.filtered(rows)
    p = mx.softmax(logits, axis=-1, precise=True)
    accept_key, draw_key = mx.random.split(key) if key is not None else (None, None)
    if k:
        d = mx.array(drafts, dtype=mx.int32)
        p_draft = mx.take_along_axis(p[:k], d[:, None], axis=-1)[:, 0]
        if proposal is not None:  # keep with probability min(1, p(d) / q(d))
            p_draft = p_draft / mx.take_along_axis(proposal[:k], d[:, None], axis=-1)[:, 0]
        kept = (mx.random.uniform(shape=(k,), key=accept_key) < p_draft).tolist()
    else:
        kept = []
    a = 0
    while a < k and kept[a]:
        a += 1
    if a == k:
        return a, int(mx.random.categorical(logits[k], key=draw_key).item())
    if proposal is None:
        residual = mx.where(mx.arange(p.shape[-1]) == drafts[a], 0.0, p[a])  # norm(max(p - onehot, 0))
    else:
        residual = mx.maximum(p[a] - proposal[a].astype(p.dtype), 0.0)
        residual = mx.where(residual.sum() > 0, residual, p[a])  # p == q: a rejection has probability 0
    return a, int(mx.random.categorical(mx.log(residual), key=draw_key).item())


# ---- the MTP drafter -------------------------------------------------------------------------

class MTPDrafter:
    """Drafts with the checkpoint's MTP block. Its window cache holds, at position i, the pair
    (main streams at i, token at i+1); :meth:`observe` feeds the pairs the target accepted."""

    name = "mtp"
    taps: tuple[int, ...] = ()  # reads the target's last streams
    proposal = None  # drafts are the argmax: q is one-hot

    def __init__(self, model, tokens: int = 1):
        if tokens < 1:
            raise DraftError(f"draft_tokens must be >= 1, got {tokens}")
        self.model, self.block, self.tokens = model, model.mtp[0], tokens
        self.cache = self.block.make_cache()
        self._out: mx.array | None = None  # block streams at the last fed position [1, 1, hc, D]
        self.logits: mx.array | None = None  # its logits [V]: the next draft is their argmax

    #: Positions of history the block can see (window-only attention).
    @property
    def reach(self) -> int:
        return self.cache.window

    def observe(self, streams: mx.array, next_ids: list[int], position: int) -> None:
        """Teacher-force pairs: streams [1, n, hc, D] of the target at ``position``.., and the
        n tokens one position later. The first call sets where the block's cache starts."""
        self._begin(position)
        ids = mx.array([next_ids], dtype=mx.int32)
        out = self.block(streams, ids, self.cache, self.model.embed)
        self._out = out[:, -1:]
        self.logits = self.block.logits(self._out, self.model.head)[0, 0]

    def _begin(self, position: int) -> None:
        self.cache.abandon()  # the chained guesses of the last draft()
        if self._out is None:
            self.cache.offset = position  # fresh cache: history before here is not needed or not known
        if self.cache.offset != position:
            raise RuntimeError(f"MTP cache at {self.cache.offset}, fed position {position}")

    @staticmethod
    def observe_rows(drafters: list[MTPDrafter], feeds: list[tuple[mx.array, list[int], int]]) -> None:
        """:meth:`observe` for several drafters of one model in one forward of the block (their
        rows stacked as mlx_v4/batch.py stacks sequences); ``feeds[r]``: observe's arguments."""
        for d, (_, _, position) in zip(drafters, feeds, strict=True):
            d._begin(position)
        lengths = [len(ids) for _, ids, _ in feeds]
        ends = [sum(lengths[:r + 1]) for r in range(len(lengths))]
        bounds = [(e - n, e) for n, e in zip(lengths, ends)]
        h = mx.concatenate([s for s, _, _ in feeds], axis=1)  # [1, T, hc, D]
        ids = mx.array([[t for _, row, _ in feeds for t in row]], dtype=mx.int32)  # [1, T]
        positions = mx.concatenate([mx.arange(p, p + n) for (_, _, p), n in zip(feeds, lengths)])
        first = drafters[0]
        out = first.block.call_rows(h, ids, [d.cache for d in drafters], bounds, positions, first.model.embed)
        last = out[:, mx.array([e - 1 for e in ends])]  # [1, R, hc, D]
        x = first.block.norm(first.block.hc_head(last)).astype(mx.float32)
        logits = apply_head(first.model.head, x).astype(mx.float32)[0]  # [R, V]: one GEMM (batch.py)
        for r, d in enumerate(drafters):
            d._out, d.logits = last[:, r:r + 1], logits[r]

    def draft(self, n: int, sampling: Sampling | None = None, key: mx.array | None = None) -> list[int]:
        """Up to ``n`` guesses for the positions after the pending token: the block's argmax
        (whatever ``sampling``; ``key`` is not used), chained on its own streams (those cache entries are dropped by
        the next observe)."""
        first = int(mx.argmax(self.logits).item())
        out = [first]
        if n > 1:
            self.cache.speculate()
            x = self._out
            for _ in range(n - 1):
                x = self.block(x, mx.array([[out[-1]]], dtype=mx.int32), self.cache, self.model.embed)
                out.append(int(mx.argmax(self.block.logits(x, self.model.head)[0, 0]).item()))
        return out

    @staticmethod
    def draft_rows(drafters: list[MTPDrafter], ns: list[int]) -> list[list[int]]:
        """:meth:`draft` for several drafters of one model (``ns[r]`` >= 1 guesses for
        drafter r): one argmax over all rows, then one forward of the block per chained guess."""
        out = [[t] for t in mx.argmax(mx.stack([d.logits for d in drafters]), axis=-1).tolist()]
        live = [r for r, n in enumerate(ns) if n > 1]
        xs = {r: drafters[r]._out for r in live}  # the block's streams at each row's last position
        for r in live:
            drafters[r].cache.speculate()
        first = drafters[0]
        while live:
            h = mx.concatenate([xs[r] for r in live], axis=1)  # [1, R', hc, D]: one position per row
            ids = mx.array([[out[r][-1] for r in live]], dtype=mx.int32)
            positions = mx.array([drafters[r].cache.offset for r in live])
            y = first.block.call_rows(h, ids, [drafters[r].cache for r in live], [(i, i + 1) for i in range(len(live))],
                                      positions, first.model.embed)
            x = first.block.norm(first.block.hc_head(y)).astype(mx.float32)
            guesses = mx.argmax(apply_head(first.model.head, x)[0], axis=-1).tolist()
            for i, r in enumerate(live):
                out[r].append(guesses[i])
                xs[r] = y[:, i:i + 1]
            live = [r for r in live if len(out[r]) < ns[r]]
        return out


class DSparkDrafter:
    """Drafts with the checkpoint's DSpark drafter (:mod:`.dspark`). Each stage keeps the KV of
    the last ``reach`` context positions (from the target hiddens :meth:`observe` is fed); one
    block forward gives the base logits of ``block_size`` rows, and :meth:`draft` walks them
    with the Markov head. Nothing is speculative on its side: it only ever sees accepted
    positions, and the block's own KV is never kept."""

    name = "dspark"

    def __init__(self, model, tokens: int | None = None):
        self.model, self.net = model, model.dspark
        block = self.net.block_size
        tokens = block if tokens is None else tokens
        if not 1 <= tokens <= block:
            raise DraftError(f"draft_tokens={tokens}: a DSpark block drafts 1 to {block} tokens (its block size)")
        self.tokens = tokens
        self.taps = tuple(model.args.dspark_target_layer_ids)
        self.reach = self.net.window
        self.contexts: list[mx.array | None] = [None] * len(self.net.layers)
        self.offset: int | None = None  # the next context position expected
        self.hidden: mx.array | None = None  # the block's normed hidden [block, D]
        self.logits: mx.array | None = None  # its base logits [block, V] (before the Markov bias)
        self.anchor: int | None = None
        self.proposal: mx.array | None = None

    def observe(self, hiddens: mx.array, next_ids: list[int], position: int) -> None:
        """Target hiddens [1, n, taps * D] at ``position``.., and the n tokens one position
        later: the context grows by n positions and the block is drafted after them, anchored on
        the last token (the pending one, at ``position + n``)."""
        self._check(position)
        n = hiddens.shape[1]
        self._grow(self.net.contexts(hiddens, mx.arange(position, position + n)), next_ids, position + n)
        self.hidden = self.net.hidden(self.anchor, self.offset, self.contexts, self.model.embed)
        self.logits = self.net.base_logits(self.hidden, self.model.head)

    def _check(self, position: int) -> None:
        if self.offset is not None and self.offset != position:
            raise RuntimeError(f"DSpark context at {self.offset}, fed position {position}")

    def _grow(self, new: list[mx.array], next_ids: list[int], end: int) -> None:
        """Append each stage's new context KV (the window keeps the last ``reach``); the block is
        next anchored on the last of ``next_ids``, at ``end``."""
        self.contexts = [(c if old is None else mx.concatenate([old, c], axis=1))[:, -self.reach:]
                         for old, c in zip(self.contexts, new, strict=True)]
        self.offset, self.anchor = end, int(next_ids[-1])

    @staticmethod
    def observe_rows(drafters: list[DSparkDrafter], feeds: list[tuple[mx.array, list[int], int]]) -> None:
        """:meth:`observe` for several drafters of one model (``feeds[r]``: observe's arguments):
        one ``main_proj`` over all fed positions, one forward of the stages over all blocks
        (:meth:`DSpark.hidden_rows`) and one head GEMM. A drafter without ``hidden_rows`` (V4.1's)
        observes one sequence at a time."""
        first = drafters[0]
        if not hasattr(first.net, "hidden_rows"):
            for d, f in zip(drafters, feeds, strict=True):
                d.observe(*f)
            return
        for d, (_, _, position) in zip(drafters, feeds, strict=True):
            d._check(position)
        lengths = [h.shape[1] for h, _, _ in feeds]
        h = mx.concatenate([h for h, _, _ in feeds], axis=1)  # [1, T, taps * D]
        new = first.net.contexts(h, mx.concatenate([mx.arange(p, p + n) for (_, _, p), n in zip(feeds, lengths)]))
        start = 0
        for d, (_, ids, p), n in zip(drafters, feeds, lengths):
            d._grow([c[:, start:start + n] for c in new], ids, p + n)
            start += n
        hidden = first.net.hidden_rows([d.anchor for d in drafters], [d.offset for d in drafters],
                                       [d.contexts for d in drafters], first.model.embed)  # [R, block, D]
        R, B, D = hidden.shape
        logits = apply_head(first.model.head, hidden.reshape(1, R * B, D).astype(mx.float32)).astype(mx.float32)
        logits = logits.reshape(R, B, -1)  # one GEMM for every block's rows (batch.py)
        for r, d in enumerate(drafters):
            d.hidden, d.logits = hidden[r], logits[r]

    def draft(self, n: int, sampling: Sampling | None = None, key: mx.array | None = None) -> list[int]:
        """Up to ``n`` guesses after the pending token, row by row: base logits plus the Markov
        bias of the previous token; argmax when greedy, else a sample from the row's tempered,
        filtered distribution (kept in :attr:`proposal` for verification), drawn with ``key``
        (a sequence's own stream) or the global random state."""
        return DSparkDrafter.draft_rows([self], [n], [sampling], [key])[0]

    def _walk(self, n: int, sampling: Sampling | None, key: mx.array | None) -> tuple[mx.array | None, mx.array | None]:
        """:meth:`draft` as one lazy graph -> (drafts [n] or None, proposal [n, V] or None)."""
        n = min(n, self.tokens)
        prev, out, rows = mx.array([self.anchor], dtype=mx.int32), [], []
        random = sampling is not None and not sampling.greedy
        keys = mx.random.split(key, n) if random and key is not None and n else [None] * n
        for j in range(n):
            step = self.logits[j] + self.net.markov_bias(prev)[0]
            if random:
                weights = sampling.filtered(step - mx.logsumexp(step))
                rows.append(mx.softmax(weights, precise=True))
                prev = mx.random.categorical(weights, key=keys[j])[None].astype(mx.int32)
            else:
                prev = mx.argmax(step)[None].astype(mx.int32)
            out.append(prev)
        return (mx.concatenate(out) if out else None), (mx.stack(rows) if rows else None)

    @staticmethod
    def draft_rows(drafters: list[DSparkDrafter], ns: list[int], samplings: list[Sampling | None],
                   keys: list[mx.array | None]) -> list[list[int]]:
        """:meth:`draft` for several drafters (each with its own n, sampling settings and key):
        every walk is one lazy graph, all read back at once."""
        walks = [d._walk(n, s, k) for d, n, s, k in zip(drafters, ns, samplings, keys, strict=True)]
        mx.eval([a for w in walks for a in w if a is not None])
        for d, (_, q) in zip(drafters, walks):
            d.proposal = q
        return [[] if t is None else t.tolist() for t, _ in walks]

    def acceptance(self, drafts: list[int]) -> mx.array:
        """The confidence head's estimate [len(drafts)] that each draft is accepted."""
        prev = mx.array([self.anchor] + drafts[:-1], dtype=mx.int32)
        return self.net.acceptance(self.hidden[: len(drafts)], prev)


def make_drafter(model, draft: str | None, tokens: int | None, *, custom_sampler: bool, distributed: bool = False):
    """The drafter for ``draft`` ("auto", "mtp", "dspark" or None) or None (plain decoding).
    "auto" picks the checkpoint's drafter (DSpark, else MTP) and quietly falls back to plain
    decoding where drafting cannot run. ``tokens``: drafts per step (None: the drafter's
    default, 1 for the MTP, the block size for DSpark)."""
    if draft is None:
        return None
    if draft not in DRAFTS:
        raise DraftError(f"draft={draft!r}: choose one of {', '.join(DRAFTS)} or None")
    if tokens is not None and tokens < 1:
        raise DraftError(f"draft_tokens must be >= 1, got {tokens}")
    auto = draft == "auto"
    if distributed:
        if auto:
            return None
        raise DraftError("speculative decoding does not run across several machines (pipeline or tensor "
                         "parallel) yet; use draft=None or 'auto', which turns it off there")
    if custom_sampler:
        if auto:
            return None
        raise DraftError("speculative decoding needs the sampling settings (temperature, top_p, top_k, min_p), "
                         "not a custom sampler function")
    if draft in ("auto", "dspark") and has_dspark(model):
        return DSparkDrafter(model, tokens)
    if draft == "dspark":
        raise DraftError("this checkpoint has no DSpark drafter (V4-Flash-0731's or V4.1's mtp.* with dspark_* "
                         "fields in config.json): --draft dspark needs one")
    if not has_mtp(model):
        if auto:
            return None
        raise DraftError("this checkpoint has no MTP block (no mtp.0.* weights): --draft mtp needs one")
    return MTPDrafter(model, 1 if tokens is None else tokens)


# ---- one speculative step ----------------------------------------------------------------------

@dataclass
class DraftCounts:
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of those, kept
    steps: int = 0  # target forwards in the decode phase


class Speculator:
    """Drives a drafter against the target ``model`` and its ``cache``.

    ``process(rows, prefixes)``: applies the caller's logits processors to row i with the
    generated-token prefix i (or returns rows unchanged)."""

    def __init__(self, model, cache, drafter: MTPDrafter | DSparkDrafter, sampling: Sampling,
                 process: Callable[[mx.array, int], mx.array] | None = None):
        self.model, self.cache, self.drafter, self.sampling = model, cache, drafter, sampling
        self.process = process
        self.counts = DraftCounts()
        self._pending: tuple | None = None

    def _forward(self, ids: list[int]) -> tuple[mx.array, mx.array]:
        """Feed ``ids`` -> (last streams [1, n, hc, D], what the drafter observes [1, n, ...]:
        the same streams, or the mean input streams of its target layers)."""
        streams, tapped = self.model.tapped_streams(mx.array([ids], dtype=mx.int32), self.cache, self.drafter.taps)
        return streams, (streams if tapped is None else tapped)

    # -- prefill: like generation.prefill, keeping the last streams for the drafter
    def prefill(self, ids: list[int], *, step_size: int, checkpoints=(), guard=None) -> tuple[int, mx.array | None]:
        """Feed ``ids`` as generation.prefill does (same chunks, same checkpoints); returns
        (ids fed, the drafter's features of the last ``drafter.reach`` fed positions or None)."""
        if step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {step_size}")
        marks = sorted(p for p in set(checkpoints) if 0 <= p <= len(ids))
        fed, tail = 0, None
        if marks and marks[0] == 0:
            checkpoint(self.cache)
        reach = self.drafter.reach
        prefetch = getattr(self.model, "prefetch", None)  # DeepSeek V4.1: the next chunk's Engram rows

        def chunk_end(start: int) -> int:
            return min([start + step_size, len(ids)] + [p for p in marks if p > start])

        while fed < len(ids):
            if guard is not None and guard.hit:
                break
            end = chunk_end(fed)
            _, feats = self._forward(ids[fed:end])
            if prefetch is not None and end < len(ids):  # read while this chunk computes
                prefetch([ids[end:chunk_end(end)]], self.cache)
            tail = feats if tail is None else mx.concatenate([tail, feats], axis=1)
            tail = mx.contiguous(tail[:, -reach:])
            mx.eval(tail, [c.state for c in self.cache])
            fed = end
            if fed in marks:
                checkpoint(self.cache)
        return fed, tail

    def first(self, last_id: int, tail: mx.array | None, prompt: list[int]) -> tuple[mx.array, Callable[[int], None]]:
        """Feed the prompt's last token -> (its logprobs row [V], start(first_token)) where
        ``start`` primes the drafter once the first token is sampled."""
        streams, feats = self._forward([last_id])
        tail = feats if tail is None else mx.concatenate([tail, feats], axis=1)
        tail = tail[:, -self.drafter.reach:]
        logits = self.model.logits(streams)[0]
        n = tail.shape[1]
        end = self.cache[0].offset  # positions end-n .. end-1 are in the tail

        def start(token: int) -> None:
            nxt = (list(prompt) + [token])[-n:]
            self.drafter.observe(tail, nxt, end - n)
            mx.eval(self.drafter.logits)

        return logits, start

    def step(self, y: int, room: int) -> list[int]:
        """Verify drafts after the pending token ``y``; ``room``: most tokens this step may
        emit (>= 2). Returns the tokens to emit, ``[y, accepted drafts...]``; the cache holds
        them all until :meth:`commit` says how many to keep."""
        drafts = self.drafter.draft(min(self.drafter.tokens, room - 1), self.sampling)
        start = speculate(self.cache)
        fed = [y] + drafts
        streams, feats = self._forward(fed)
        logits = self.model.logits(streams)[0]  # [k+1, V]
        if self.process is not None:
            logits = self.process(logits, fed)
        rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        a, nxt = verify(rows, drafts, self.sampling, self.drafter.proposal)
        self.counts.steps += 1
        self.counts.drafted += len(drafts)
        self.counts.accepted += a
        self._pending = (start, feats, fed[: a + 1], nxt)
        return fed[: a + 1]

    def commit(self, keep: int, more: bool) -> int | None:
        """Keep the first ``keep`` tokens :meth:`step` returned in the cache; with ``more``
        (the run goes on) also teach the drafter and return the next pending token."""
        start, feats, emitted, nxt = self._pending
        self._pending = None
        accept(self.cache, start + keep)
        if not more:
            return None
        self.drafter.observe(feats[:, :keep], (emitted[1:] + [nxt])[:keep], start)
        mx.eval(self.drafter.logits, [c.state for c in self.cache])
        return nxt

    def abandon(self) -> None:
        """Drop a step in progress (an interrupt): the cache returns to before it."""
        self._pending = None
        for c in self.cache:
            c.abandon()
