"""Speculative decoding inside continuous batching (the drafting rows of a :class:`BatchGenerator`).

Each sequence keeps its own drafter (for the MTP: the block's window cache). A decoding
sequence's row in the shared step is ``[pending, d1..dk]`` instead of ``[pending]``: the
drafts ride in the same stacked forward (mlx_v4/batch.py) as the other rows, prefill chunks
included. The target's logits at all k+1 positions are verified per row with
:func:`~mlx_v4.draft.speculative.verify` (the sequence's own sampling settings and random key),
and each row's cache keeps exactly its accepted prefix (``speculate`` before the step,
``accept`` after it). Then the drafters are taught teacher-forced what each row kept, the MTP
block running once over all rows (:meth:`MTPDrafter.observe_rows`); its guesses for all rows
come from one forward per chained guess (:meth:`MTPDrafter.draft_rows`).

A DSpark drafter reads inner target layers: the shared step then also returns every row's taps
(:func:`~mlx_v4.batch.tapped_stacked_streams`, the same function as
:meth:`Model.tapped_streams` for one sequence); the drafters observe their rows' kept
positions' taps in one forward of the DSpark stages over all rows' blocks
(:meth:`DSparkDrafter.observe_rows`); each walks its block with the Markov head, with its row's
own sampling settings and random stream, all walks read back at once
(:meth:`DSparkDrafter.draft_rows`); a sampled row's proposal q goes to that row's verification.
A model has one drafter, so rows never mix kinds.

So greedy output is, token for token, each sequence's output alone without drafts, and
sampled output follows the same distribution. As in :class:`~mlx_v4.draft.speculative.Speculator`:
at most ``room`` tokens are emitted per step (k <= room - 1, room = what max_tokens still
allows), the cache holds every emitted token but the last (pending) one, or up to the EOS that
ended the run, and a prefilling sequence keeps the streams of its last ``reach`` prompt
positions to prime its drafter once its first token is sampled.
"""

from __future__ import annotations

import mlx.core as mx

from .batch import head_logits, tapped_stacked_streams
from .cache import accept, speculate
from .draft.speculative import DraftCounts, MTPDrafter, Sampling, make_drafter, verify


class RowDraft:
    """One sequence's drafting state."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.counts = DraftCounts()
        self.tail: mx.array | None = None  # what the drafter reads at the last reach prompt positions [1, n, ...]
        self.primed = False  # the drafter has seen the sequence (it can draft)
        self.planned: tuple[int, list[int], mx.array | None] | None = None  # (len(generated), guesses, proposal q)
        self.key: mx.array | None = None  # the drafter's own random stream (sampled drafts)


class BatchDrafting:
    """The drafting side of a :class:`~mlx_v4.batch_generation.BatchGenerator`: ``draft`` and
    ``tokens`` as stream_generate's ``draft``/``draft_tokens``. Raises DraftError for a spec this
    model cannot serve ("auto" quietly turns drafting off: then :attr:`enabled` is False)."""

    def __init__(self, model, draft: str | None, tokens: int | None):
        self.model, self.draft, self.tokens = model, draft, tokens
        self.distributed = getattr(type(model), "distributed", False)
        drafter = self._drafter()
        self.enabled = drafter is not None
        self.taps = tuple(drafter.taps) if drafter is not None else ()  # what the step captures for it

    def _drafter(self):
        return make_drafter(self.model, self.draft, self.tokens, custom_sampler=False, distributed=self.distributed)

    def attach(self, seq) -> None:
        """Give ``seq`` its drafter; its random stream is split off the sequence's own key."""
        seq.draft = RowDraft(self._drafter()) if self.enabled else None
        if seq.draft is not None:
            seq._key, seq.draft.key = mx.random.split(seq._key)

    def decode_rows(self, seqs) -> list[list[int]]:
        """The rows of the decoding sequences ``seqs``: each one's pending token, then up to k
        guesses (fewer when max_tokens leaves less room: a step never emits past it). The MTP
        guesses of all rows come from one argmax, and one forward of the block per chained guess."""
        need = []  # (sequence, guesses wanted) not planned yet; plan() may run twice before a step
        for s in seqs:
            rd = s.draft
            if rd is None or not rd.primed or (rd.planned is not None and rd.planned[0] == len(s.generated)):
                continue
            n = min(rd.drafter.tokens, s.max_tokens - len(s.generated) - 1)
            if n < 1:
                rd.planned = (len(s.generated), [], None)
            else:
                need.append((s, n))
        mtp = [(s, n) for s, n in need if isinstance(s.draft.drafter, MTPDrafter)]
        if mtp:
            guesses = MTPDrafter.draft_rows([s.draft.drafter for s, _ in mtp], [n for _, n in mtp])
            for (s, _), g in zip(mtp, guesses):
                s.draft.planned = (len(s.generated), g, None)
        rest = [(s, n) for s, n in need if not isinstance(s.draft.drafter, MTPDrafter)]
        if rest:  # DSpark: each row walks its block with its own settings and random stream
            samplings, keys = [_sampling(s.sampling, self.model.args.vocab_size) for s, _ in rest], []
            for (s, _), sampling in zip(rest, samplings):
                key = None
                if not sampling.greedy:
                    s.draft.key, key = mx.random.split(s.draft.key)
                keys.append(key)
            drafters = [s.draft.drafter for s, _ in rest]
            guesses = type(drafters[0]).draft_rows(drafters, [n for _, n in rest], samplings, keys)
            for (s, _), d, g in zip(rest, drafters, guesses):
                s.draft.planned = (len(s.generated), g, d.proposal if g else None)
        return [[s.generated[-1]] + (s.draft.planned[1] if s.draft is not None and s.draft.primed else [])
                for s in seqs]

    # ---- one step ---------------------------------------------------------------------------
    def run(self, gen, rows) -> tuple[dict[int, list[tuple[int, mx.array | None]]], dict]:
        """BatchGenerator._plain with drafting rows: the model step -> ({row: [(token, its
        logprobs row if asked)]}, the sampling rows' next random keys); each drafting row's cache
        keeps its accepted prefix and the drafters are taught. A raise leaves the caches
        speculating on nothing (the caller restores them)."""
        starts = {r: speculate(s.cache) for r, (s, ids) in enumerate(rows) if not s.prefilling and len(ids) > 1}
        try:
            return self._run(gen, rows, starts)
        except BaseException:
            for r in starts:
                for c in rows[r][0].cache:
                    c.abandon()
            raise

    def _run(self, gen, rows, starts: dict[int, int]):
        seqs = [s for s, _ in rows]
        x, tapped, bounds = tapped_stacked_streams(self.model, [ids for _, ids in rows], [s.cache for s in seqs],
                                                   self.taps)
        # the positions whose logits are needed: every fed position of a decoding row, the last
        # one of a prompt's final chunk
        index, at = [], {}
        for r, ((s, ids), (b0, b1)) in enumerate(zip(rows, bounds)):
            if s.prefilling and s.pos + len(ids) < len(s.ids):
                continue
            first = b1 - 1 if s.prefilling else b0
            at[r] = (len(index), b1 - first)
            index += range(first, b1)
        logits = head_logits(self.model, x, index) if index else None  # [N, V]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if index else None
        plain = [r for r in at if r not in starts]
        tokens, plain_lp, keys = None, None, {}
        if plain:
            tokens, plain_lp, keys = gen._sample(logits[mx.array([at[r][0] for r in plain])],
                                                 [seqs[r] for r in plain])
        mx.eval(*([tokens] if tokens is not None else []), *([logprobs] if logprobs is not None else []))
        emitted = dict(zip(plain, ([t] for t in tokens.tolist()) if tokens is not None else []))
        verified = {}
        for r in starts:
            s, o, n = seqs[r], *at[r]
            guesses = rows[r][1][1:]
            planned = s.draft.planned
            if planned is None or planned[0] != len(s.generated) or planned[1] != guesses:
                raise RuntimeError(f"row {r}: its drafts are not the ones planned for it")
            sub = None
            if s.sampling.temperature > 0:
                keys[id(s)], sub = mx.random.split(s._key)
            a, nxt = verify(logprobs[o:o + n], guesses, _sampling(s.sampling, logprobs.shape[-1]),
                            proposal=planned[2], key=sub)
            out = _until_end(s, guesses[:a] + [nxt])
            emitted[r], verified[r] = out, (len(guesses), a)
            accept(s.cache, starts[r] + len(out))  # the pending token and every emitted one but the last
        self._observe(rows, bounds, x if tapped is None else tapped, emitted, starts)
        mx.eval([c.state for s in seqs for c in s.cache])
        for r, (drafted, accepted) in verified.items():
            counts = seqs[r].draft.counts
            counts.drafted += drafted
            counts.accepted += accepted
            counts.steps += 1
        out = {}
        for r, toks in emitted.items():
            rows_lp = None
            if seqs[r].sampling.logprobs:
                rows_lp = ([logprobs[at[r][0] + i] for i in range(len(toks))] if r in verified
                           else [plain_lp[plain.index(r)]])
            out[r] = [(t, rows_lp[i] if rows_lp else None) for i, t in enumerate(toks)]
        return out, keys

    def _observe(self, rows, bounds, x: mx.array, emitted: dict[int, list[int]], starts: dict[int, int]) -> None:
        """Teach each drafter what its row kept (pairs of what it reads at a position, x
        [1, T, ...]: the target's last streams or its taps, and the token one later); a
        prefilling row keeps its tail of those until its first token."""
        feeds: list[tuple[RowDraft, tuple]] = []
        tails = []
        for r, ((s, _), (b0, b1)) in enumerate(zip(rows, bounds)):
            rd = s.draft
            if rd is None:
                continue
            toks = emitted.get(r, [])
            more = toks and toks[-1] not in s.eos and len(s.generated) + len(toks) < s.max_tokens - 1
            if r in starts:  # streams at the pending token and the kept drafts, paired with what followed each
                if more:
                    feeds.append((rd, (x[:, b0:b0 + len(toks)], toks, starts[r])))
                continue
            if not s.prefilling:
                continue
            tail = x[:, b0:b1] if rd.tail is None else mx.concatenate([rd.tail, x[:, b0:b1]], axis=1)
            rd.tail = mx.contiguous(tail[:, -rd.drafter.reach:])
            tails.append(rd.tail)
            if toks:  # the prompt's last chunk: the first token is sampled
                tail, rd.tail = rd.tail, None
                if more:
                    n = tail.shape[1]
                    feeds.append((rd, (tail, (s.ids + toks)[-n:], s.cache[0].offset - n)))
        if not feeds:
            mx.eval(tails)
            return
        # a model has one drafter: every row's is of one kind, taught in one batched forward
        type(feeds[0][0].drafter).observe_rows([rd.drafter for rd, _ in feeds], [f for _, f in feeds])
        mx.eval([rd.drafter.logits for rd, _ in feeds], tails)
        for rd, _ in feeds:
            rd.primed = True


def _sampling(p, vocab: int) -> Sampling:
    """A sequence's resolved SamplingParams -> the verifier's (and the drafter's) Sampling."""
    return Sampling(p.temperature, p.top_p, p.min_p, p.top_k if p.top_k < vocab else 0)


def _until_end(seq, tokens: list[int]) -> list[int]:
    """``tokens`` up to and including the first one that ends ``seq`` (EOS, or max_tokens)."""
    room = seq.max_tokens - len(seq.generated)
    for i, tok in enumerate(tokens[:room]):
        if tok in seq.eos:
            return tokens[:i + 1]
    return tokens[:room]
