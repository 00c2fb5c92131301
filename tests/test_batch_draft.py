"""Drafts inside continuous batching (mlx_v4/batch_draft.py), with the MTP and with DSpark: every
request's greedy output is its output alone without drafts, token for token, with rejections
rewound per row across the 4- and 128-position compression boundaries, requests joining and
leaving, EOS, stop strings and max_tokens inside accepted runs; sampled rows follow the target
distribution and seeded ones are reproducible whatever runs beside them."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_v4
from mlx_v4.batch import tapped_stacked_streams
from mlx_v4.batch_generation import BatchGenerator, SamplingParams, Sequence, batch_generate
from mlx_v4.config import ModelArgs
from mlx_v4.draft.speculative import DraftError, DSparkDrafter, MTPDrafter, Sampling
from mlx_v4.generation import Finish, stream_generate
from mlx_v4.testing.dspark import teach_markov, tiny_dspark_config
from mlx_v4.testing.tiny import random_model, tiny_args
from mlx_v4.tokenizer import load_tokenizer

TEXT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
        "The Python list type is a mutable sequence. Lists may be constructed in several ways: using a pair of "
        "square brackets to denote the empty list, using square brackets and separating items with commas, "
        "using a list comprehension, or using the type constructor list(). ") * 4


@pytest.fixture(scope="module")
def demo():
    return mlx_v4.load()


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_args(), seed=3, mtp=True)


_PLAIN: dict = {}


def _plain(model, tok, ids, max_tokens):
    """stream_generate without drafts (greedy) -> its Finish (computed once per model and prompt)."""
    key = (id(model), tuple(ids), max_tokens)
    if key not in _PLAIN:
        events = list(stream_generate(model, tok, ids, max_tokens=max_tokens, temperature=0.0))
        _PLAIN[key] = [e for e in events if isinstance(e, Finish)][0]
    return _PLAIN[key]


def _run(model, prompts, limits, *, draft="mtp", k=1, max_batch=8, eos=(), sampling=None, prefill_step=64):
    """BatchGenerator over ``prompts`` (id lists), at most ``max_batch`` at once, the others
    joining as those finish -> the sequences, in order."""
    gen = BatchGenerator(model, prefill_step=prefill_step, draft=draft, draft_tokens=k)
    seqs = [Sequence(p, model.make_cache(), max_tokens=n, eos=eos,
                     sampling=(sampling[i] if sampling else SamplingParams(temperature=0)))
            for i, (p, n) in enumerate(zip(prompts, limits))]
    waiting = list(seqs)
    while waiting or gen.active:
        while waiting and len(gen.active) < max_batch:
            gen.add(waiting.pop(0))
        gen.step()
    return seqs


def _counts(seqs):
    return sum(s.draft.counts.drafted for s in seqs), sum(s.draft.counts.accepted for s in seqs)


def _same_cache(model, seq, plain_ids):
    """``seq``'s cache holds what a plain run fed, and continues like a cache fed only those."""
    ref = model.make_cache()
    model(mx.array([plain_ids]), cache=ref)
    assert seq.cache_ids() == plain_ids and seq.cache[0].offset == len(plain_ids)
    assert not any(c.speculating for c in seq.cache)
    probe = mx.array([[seq.generated[-1]]])
    np.testing.assert_allclose(np.array(model(probe, cache=seq.cache)), np.array(model(probe, cache=ref)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_drafted_batch_matches_each_prompt_alone(demo, k):
    """The demo's trained MTP: some drafts accepted, some rejected. Four prompts (3 to 250
    tokens; one decodes across position 128), at most three at once, different max_tokens."""
    model, tok = demo
    ids = tok.encode(TEXT)
    prompts = [ids[:3], ids[:61], ids[:122], ids[:250]]
    limits = [14, 9, 16, 12]
    seqs = _run(model, prompts, limits, k=k, max_batch=3, eos={tok.eos_id, int(model.args.eos_token_id)})
    for p, n, s in zip(prompts, limits, seqs):
        fin = _plain(model, tok, p, n)
        assert s.generated == fin.generated and s.finish_reason == fin.reason
        assert s.cache[0].offset == fin.cache_offset
    drafted, accepted = _counts(seqs)
    assert 0 < accepted < drafted  # drafts accepted and drafts rejected
    assert all(s.draft.counts.drafted <= k * s.draft.counts.steps for s in seqs)


def test_random_mtp_rejects_and_caches_rewind_per_row(tiny):
    """Random MTP weights: nearly every draft is rejected, every row rewinds in every step;
    each cache ends holding exactly the plain run's ids, across the 4/128 boundaries."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 1024, n).tolist() for n in (2, 7, 123, 40)]
    limits = [12, 6, 10, 3]
    seqs = _run(tiny, prompts, limits, k=2, max_batch=4, prefill_step=32)
    plain = _run(tiny, prompts, limits, draft=None)
    for s, p in zip(seqs, plain):
        assert s.generated == p.generated
        _same_cache(tiny, s, p.cache_ids())
    drafted, accepted = _counts(seqs)
    assert drafted > 0 and accepted < drafted


def _oracle(monkeypatch, wrong_every=0):
    """Drafters guess their sequence's plain output (``drafter.oracle``: prompt + output),
    wrong at every position divisible by ``wrong_every``."""
    def draft(self, n):
        start = self.cache.offset + 1  # the pending token sits at cache.offset
        out = []
        for pos in range(start, start + n):
            t = self.oracle[pos] if pos < len(self.oracle) else 5
            out.append((t + 1) % 1024 if wrong_every and pos % wrong_every == 0 else t)
        return out
    monkeypatch.setattr(MTPDrafter, "draft", draft)
    monkeypatch.setattr(MTPDrafter, "draft_rows", staticmethod(lambda ds, ns: [d.draft(n) for d, n in zip(ds, ns)]))


def _with_oracles(model, prompts, limits, oracles, *, k, eos=(), max_batch=8):
    gen = BatchGenerator(model, prefill_step=32, draft="mtp", draft_tokens=k)
    seqs = [Sequence(p, model.make_cache(), max_tokens=n, eos=eos, sampling=SamplingParams(temperature=0))
            for p, n in zip(prompts, limits)]
    waiting = list(seqs)
    while waiting or gen.active:
        while waiting and len(gen.active) < max_batch:
            s = gen.add(waiting.pop(0))
            s.draft.drafter.oracle = oracles[seqs.index(s)]
        gen.step()
    return seqs


@pytest.mark.parametrize("k,wrong_every", [(3, 0), (2, 5), (3, 5)])
def test_right_and_partly_right_drafts(tiny, monkeypatch, k, wrong_every):
    """Drafts forced right are all accepted (k+1 tokens a step); drafts wrong at some positions
    are cut there; output and caches match plain decoding either way, and no step emits past
    max_tokens (rows draft fewer when max_tokens leaves less room)."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, 1024, n).tolist() for n in (3, 125, 9)]
    limits = [16, 11, 7]
    plain = _run(tiny, prompts, limits, draft=None)
    _oracle(monkeypatch, wrong_every)
    seqs = _with_oracles(tiny, prompts, limits, [p + s.generated for p, s in zip(prompts, plain)], k=k, max_batch=2)
    for s, p, n in zip(seqs, plain, limits):
        assert s.generated == p.generated and len(s.generated) == n and s.finish_reason == "length"
        _same_cache(tiny, s, p.cache_ids())
        c = s.draft.counts
        if not wrong_every:
            assert c.accepted == c.drafted and c.steps == math.ceil((n - 1) / (k + 1))  # the last token is never fed
    if wrong_every:
        drafted, accepted = _counts(seqs)
        assert 0 < accepted < drafted


def test_eos_inside_an_accepted_run(tiny, monkeypatch):
    """EOS among accepted drafts: the sequence stops there; its cache holds the emitted tokens
    but the EOS, as plain decoding leaves it; the other row goes on."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(2, 1024, n).tolist() for n in (20, 6)]
    plain = _run(tiny, prompts, [12, 12], draft=None)
    eos = plain[0].generated[5]
    want = _run(tiny, prompts, [12, 12], draft=None, eos={eos})
    _oracle(monkeypatch)
    seqs = _with_oracles(tiny, prompts, [12, 12], [p + s.generated for p, s in zip(prompts, plain)], k=3, eos={eos})
    for s, w in zip(seqs, want):
        assert s.generated == w.generated and s.finish_reason == w.finish_reason
        _same_cache(tiny, s, w.cache_ids())
    assert seqs[0].generated[-1] == eos and seqs[0].finish_reason == "stop"


def test_stop_strings_logprobs_and_counts_with_drafts(demo):
    """batch_generate with drafts: the same texts, tokens, stop strings and log-probabilities
    (of every emitted token, accepted drafts included) as without; the counts are reported."""
    model, tok = demo
    ids = tok.encode(TEXT)
    prompts = [ids[:40], ids[:7], ids[:130]]
    plain = batch_generate(model, tok, prompts, max_tokens=20, temperature=0, logprobs=True, top_logprobs=3)
    stop = tok.decode(plain[0].tokens[6:9]).strip()[:4]
    kw = dict(max_tokens=20, temperature=0, logprobs=True, top_logprobs=3, stop=[stop])
    want = batch_generate(model, tok, prompts, **kw)
    got = batch_generate(model, tok, prompts, draft="mtp", draft_tokens=3, **kw)
    assert want[0].stop_string == stop
    for w, g in zip(want, got):
        assert (g.text, g.tokens, g.finish_reason, g.stop_string) == (w.text, w.tokens, w.finish_reason, w.stop_string)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        assert [[t for t, _ in top] for top in g.top_logprobs] == [[t for t, _ in top] for top in w.top_logprobs]
        assert w.draft_tokens == 0 and g.draft_tokens > 0 and g.target_forwards > 0
    assert sum(g.accepted_tokens for g in got) > 0


def test_seeded_sampling_with_drafts_is_reproducible(demo):
    """Each sampling row draws from its own key: alone or beside others, the same tokens."""
    model, tok = demo
    ids = tok.encode(TEXT)
    prompts = [ids[:30], ids[:5], ids[:90], ids[:30]]
    settings = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0),
                SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=2), SamplingParams(temperature=0.8, seed=7)]
    together = _run(model, prompts, [12] * 4, k=2, sampling=settings)
    for i in (0, 2):
        alone = _run(model, [prompts[i]], [12], k=2, sampling=[settings[i]])[0]
        assert alone.generated == together[i].generated
    assert together[0].generated != together[3].generated  # same prompt, another seed
    assert sum(s.draft.counts.accepted for s in together) > 0


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (Wilson-Hilferty; within 1% for dof >= 3)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi_square(observed: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """-> (statistic, degrees of freedom), cells expected below 5 pooled into one."""
    assert observed[expected == 0].sum() == 0, "a token of probability 0 was emitted"
    big = expected >= 5
    exp = np.append(expected[big], expected[~big].sum())
    obs = np.append(observed[big], observed[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def _vocab8_model(drafter: str):
    """One layer, vocabulary of 8 (fast), with an MTP block or a one-stage DSpark drafter (block 2)."""
    if drafter == "mtp":
        return random_model(tiny_args(vocab_size=8, num_hidden_layers=1, compress_ratios=[4, 0], num_hash_layers=0),
                            seed=5, mtp=True)
    cfg = tiny_dspark_config(vocab_size=8, num_hidden_layers=1, compress_ratios=[4, 0], num_hash_layers=0,
                             dspark_target_layer_ids=[0], dspark_noise_token_id=7, dspark_block_size=2)
    return random_model(ModelArgs.from_dict(cfg), seed=5, dspark=True)


@pytest.mark.parametrize("drafter", ["mtp", "dspark"])
def test_sampled_rows_follow_the_target_distribution(drafter):
    """Many seeded requests in one batch: the pair (first token, second token) follows
    p(t1) p(t2 | t1) of the filtered target, though the second comes out of a drafting row (the
    MTP's argmax draft kept with probability p(draft), DSpark's sampled draft with min(1, p/q);
    else the residual is drawn)."""
    model = _vocab8_model(drafter)
    model.head.weight = model.head.weight * 2.5  # sharper distributions: a wrong one shows sooner
    prompt, n = [1, 2, 3, 4, 5], 600
    settings = Sampling(1.5, top_p=0.95)
    logits = model(mx.array([prompt + [t] for t in range(8)]))
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    p = np.array(mx.softmax(settings.filtered(lp), axis=-1, precise=True))
    joint = p[0, 4][:, None] * p[:, 5]  # [t1, t2]
    gen = BatchGenerator(model, prefill_step=8, step_tokens=4096, draft=drafter)
    seqs = [gen.add(Sequence(prompt, model.make_cache(), max_tokens=3,
                             sampling=SamplingParams(temperature=1.5, top_p=0.95, seed=i))) for i in range(n)]
    while gen.active:
        gen.step()
    counts = np.zeros((8, 8))
    for s in seqs:
        counts[s.generated[0], s.generated[1]] += 1
    drafted, accepted = _counts(seqs)
    assert drafted == n and 0 < accepted < drafted  # one draft each (max_tokens leaves room for one)
    for observed, expected in ((counts.reshape(-1), joint.reshape(-1) * n), (counts.sum(0), joint.sum(0) * n)):
        stat, dof = _chi_square(observed, expected)
        assert stat < _chi2_critical(dof), (stat, dof)


def test_budget_counts_drafting_rows(tiny):
    """A drafting row takes k+1 of ``step_tokens``: with two rows drafting 3 each, only one of
    two 4-id prompt chunks fits a budget of 12 (without drafts both would)."""
    gen = BatchGenerator(tiny, prefill_step=4, step_tokens=12, draft="mtp", draft_tokens=3)
    for p in ([5, 6], [7, 8, 9]):
        gen.add(Sequence(p, tiny.make_cache(), max_tokens=20, sampling=SamplingParams(temperature=0)))
    while any(s.prefilling for s in gen.active):
        gen.step()
    for p in (list(range(10, 18)), list(range(20, 28))):
        gen.add(Sequence(p, tiny.make_cache(), max_tokens=20, sampling=SamplingParams(temperature=0)))
    assert [len(ids) for _, ids in gen.plan()] == [4, 4, 4]
    assert gen.plan() == gen.plan()  # planning twice drafts once
    gen.step()
    assert [len(ids) for _, ids in gen.plan()][:2] == [4, 4]


def test_drafts_end_where_max_tokens_leaves_no_room(tiny, monkeypatch):
    _oracle(monkeypatch)
    prompt = [9, 8, 7]
    plain = _run(tiny, [prompt], [3], draft=None)[0]
    gen = BatchGenerator(tiny, draft="mtp", draft_tokens=4)
    s = gen.add(Sequence(prompt, tiny.make_cache(), max_tokens=3, sampling=SamplingParams(temperature=0)))
    gen.step()  # the first token
    s.draft.drafter.oracle = prompt + plain.generated
    assert [len(ids) for _, ids in gen.plan()] == [2]  # room for 2 more tokens: one draft
    outs = gen.step()
    assert [o.token for o in outs] == plain.generated[1:] and outs[-1].finish == "length" and outs[0].finish is None
    assert s.cache_ids() == plain.cache_ids()


def test_a_failing_row_ends_alone_and_leaves_no_speculation(tiny, monkeypatch):
    import mlx_v4.batch_draft as bd

    real = bd.verify

    def flaky(rows, drafts, sampling, **kw):
        if sampling.temperature == 0.125:
            raise ValueError("bad verify")
        return real(rows, drafts, sampling, **kw)

    monkeypatch.setattr(bd, "verify", flaky)
    prompts = [[5, 6, 7, 8], [5, 9, 7], list(range(10, 60))]
    settings = [SamplingParams(temperature=0), SamplingParams(temperature=0.125), SamplingParams(temperature=0.7, seed=3)]
    seqs = _run(tiny, prompts, [8] * 3, k=2, sampling=settings)
    assert seqs[1].finish_reason == "error" and str(seqs[1].error) == "bad verify"
    assert not any(c.speculating for s in seqs for c in s.cache)
    for i in (0, 2):
        alone = _run(tiny, [prompts[i]], [8], k=2, sampling=[settings[i]])[0]
        assert seqs[i].generated == alone.generated and seqs[i].finish_reason == "length"
        assert seqs[i].cache_ids() == alone.cache_ids()


def test_draft_specs():
    plain_model = random_model(tiny_args(), seed=3)
    with pytest.raises(DraftError, match=r"this checkpoint has no MTP block \(no mtp\.0\.\* weights\)"):
        BatchGenerator(plain_model, draft="mtp")
    with pytest.raises(DraftError, match="draft_tokens must be >= 1, got 0"):
        BatchGenerator(plain_model, draft="auto", draft_tokens=0)
    assert BatchGenerator(plain_model, draft="auto").drafting is None
    gen = BatchGenerator(plain_model, draft="auto")
    s = gen.add(Sequence([3, 4], plain_model.make_cache(), max_tokens=3, sampling=SamplingParams(temperature=0)))
    while gen.active:
        gen.step()
    assert s.draft is None and len(s.generated) == 3


def test_a_stop_string_inside_an_accepted_run(tiny, monkeypatch):
    """batch_generate, drafts forced right (k=3): a stop string completes mid-step; the result
    ends there as without drafts, the step's later tokens left out."""
    from mlx_v4.batch_draft import BatchDrafting
    from mlx_v4.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(2, 1000, n).tolist() for n in (12, 5)]
    plain = batch_generate(tiny, tok, prompts, max_tokens=14, temperature=0)
    stop = tok.decode(plain[0].tokens[5:7])
    want = batch_generate(tiny, tok, prompts, max_tokens=14, temperature=0, stop=[stop])
    assert want[0].stop_string == stop and len(want[0].tokens) < 14
    oracles = {tuple(p): p + r.tokens for p, r in zip(prompts, plain)}
    real_attach = BatchDrafting.attach

    def attach(self, seq):
        real_attach(self, seq)
        seq.draft.drafter.oracle = oracles[tuple(seq.ids)]

    monkeypatch.setattr(BatchDrafting, "attach", attach)
    _oracle(monkeypatch)
    got = batch_generate(tiny, tok, prompts, max_tokens=14, temperature=0, stop=[stop], draft="mtp", draft_tokens=3)
    for w, g in zip(want, got):
        assert (g.text, g.tokens, g.finish_reason, g.stop_string) == (w.text, w.tokens, w.finish_reason, w.stop_string)
    assert got[0].accepted_tokens == got[0].draft_tokens > 0


# ---- DSpark (V4-Flash-0731): a drafter reading inner target layers -------------------------------

@pytest.fixture(scope="module")
def flash0731():
    """A tiny Flash-0731-style model (DSpark reads the input streams of layers 1-3) whose Markov
    head knows 64 bigrams (rank 64): taught the plain outputs, its drafts are right often."""
    return random_model(ModelArgs.from_dict(tiny_dspark_config(dspark_markov_rank=64)), seed=5, dspark=True)


def test_the_stacked_step_taps_each_row_like_the_model(flash0731):
    """tapped_stacked_streams (the stacked fast path) against Model.tapped_streams row by row
    (the reference), ragged rows on caches at different offsets; no taps: none captured."""
    model, taps = flash0731, (1, 2, 3)
    rng = np.random.default_rng(7)
    caches, refs, rows = [], [], []
    for start, n in ((0, 5), (126, 3), (7, 1)):
        ids = rng.integers(2, 1024, start + n).tolist()
        c, ref = model.make_cache(), model.make_cache()
        if start:
            model(mx.array([ids[:start]]), cache=c)
            model(mx.array([ids[:start]]), cache=ref)
        caches.append(c)
        refs.append(model.tapped_streams(mx.array([ids[start:]]), ref, taps))
        rows.append(ids[start:])
    x, tapped, bounds = tapped_stacked_streams(model, rows, caches, taps)
    assert tapped.shape == (1, 9, 3 * model.args.hidden_size)
    for (b0, b1), (want_x, want_taps) in zip(bounds, refs):
        np.testing.assert_allclose(np.array(x[:, b0:b1]), np.array(want_x), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.array(tapped[:, b0:b1]), np.array(want_taps), atol=1e-4, rtol=0)
    assert tapped_stacked_streams(model, [[3]], [model.make_cache()], ())[1] is None


@pytest.mark.parametrize("k", [None, 2])
def test_dspark_greedy_batch_matches_each_prompt_alone(flash0731, k):
    """draft="dspark": three requests (2, 123 and 9 prompt tokens: decoding across positions 4,
    8, .. and 128), at most two at once (the third joins as the first leaves), different
    max_tokens; drafts kept and rejected. Each output and cache is the plain run's alone."""
    model, tok = flash0731, load_tokenizer(None)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 1024, n).tolist() for n in (2, 123, 9)]
    limits = [14, 12, 9]
    plain = [_plain(model, tok, p, n) for p, n in zip(prompts, limits)]
    teach_markov(model.dspark, [t for p, f in zip(prompts, plain) for t in p[-1:] + f.generated], wrong_every=4)
    seqs = _run(model, prompts, limits, draft="dspark", k=k, max_batch=2, prefill_step=32)
    for p, fin, s in zip(prompts, plain, seqs):
        assert s.generated == fin.generated and s.finish_reason == fin.reason == "length"
        _same_cache(model, s, p + fin.generated[:-1])
        assert isinstance(s.draft.drafter, DSparkDrafter) and s.draft.drafter.tokens == (k or 5)
        assert s.draft.counts.steps < len(s.generated) - 1  # accepted drafts saved target forwards
    drafted, accepted = _counts(seqs)
    assert 0 < accepted < drafted  # drafts accepted and drafts rejected


def test_dspark_seeded_rows_reproduce_and_verify_their_own_proposal(flash0731, monkeypatch):
    """Sampled DSpark rows draw their drafts from their own stream: alone or beside others, the
    same tokens. Each sampled row's drafts reach verify with the q rows they were drawn from
    (filtered like the row's target: top_k 20), a greedy row's with none."""
    import mlx_v4.batch_draft as bd

    seen, drawn = [], {}
    real_verify, real_draft_rows = bd.verify, DSparkDrafter.draft_rows

    def verify_spy(rows, drafts, sampling, proposal=None, *, key=None):
        seen.append((sampling, drafts, None if proposal is None else np.array(proposal)))
        return real_verify(rows, drafts, sampling, proposal, key=key)

    def draft_rows_spy(drafters, ns, samplings, keys):
        out = real_draft_rows(drafters, ns, samplings, keys)
        for d, g in zip(drafters, out):
            drawn.setdefault(tuple(g), []).append(None if d.proposal is None else np.array(d.proposal))
        return out

    monkeypatch.setattr(bd, "verify", verify_spy)
    monkeypatch.setattr(DSparkDrafter, "draft_rows", staticmethod(draft_rows_spy))
    model = flash0731
    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, 1024, n).tolist() for n in (30, 5, 90, 30)]
    settings = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0),
                SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=2), SamplingParams(temperature=0.8, seed=7)]
    together = _run(model, prompts, [10] * 4, draft="dspark", k=3, sampling=settings)
    for sampling, drafts, q in seen:
        if sampling.greedy:
            assert q is None
            continue
        assert any(q.shape == d.shape and np.array_equal(q, d) for d in drawn[tuple(drafts)] if d is not None)
        assert q.shape == (len(drafts), model.args.vocab_size) and (q[np.arange(len(drafts)), drafts] > 0).all()
        np.testing.assert_allclose(q.sum(-1), 1, atol=1e-5)
        if sampling.top_k:
            assert ((q > 0).sum(-1) <= 20).all()
    assert {s.greedy for s, _, _ in seen} == {True, False}
    for i in (0, 2):
        alone = _run(model, [prompts[i]], [10], draft="dspark", k=3, sampling=[settings[i]])[0]
        assert alone.generated == together[i].generated
    assert together[0].generated != together[3].generated  # same prompt, another seed
