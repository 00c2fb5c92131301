"""Speculative decoding (mlx_v4/draft/speculative.py): greedy output equals plain decoding,
sampled output follows the target distribution, caches end as plain decoding leaves them."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.draft.speculative import DraftError, MTPDrafter, Sampling, verify
from mlx_v4.generation import Stats, Token, stream_generate
from mlx_v4.testing.tiny import generate_ids, random_model, tiny_args
from mlx_v4.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(), seed=3, mtp=True)


def _ids(n, seed=1):
    return np.random.default_rng(seed).integers(2, 1024, n).tolist()


_run = generate_ids


def _oracle(monkeypatch, sequence, wrong_every=0):
    """Make the MTP draft the plain run's tokens (``sequence``: prompt + output, position 0
    first), wrong at every position divisible by ``wrong_every``."""
    def draft(self, n, sampling=None):
        start = self.cache.offset + 1  # the pending token sits at cache.offset
        out = []
        for pos in range(start, start + n):
            t = sequence[pos] if pos < len(sequence) else 5
            out.append((t + 1) % 1024 if wrong_every and pos % wrong_every == 0 else t)
        return out
    monkeypatch.setattr(MTPDrafter, "draft", draft)


@pytest.mark.parametrize("prompt_len,max_tokens", [(2, 14), (122, 14)])  # across 4/8/12.. and across 128
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_drafts_equals_plain(model, tok, prompt_len, max_tokens, k):
    """Random MTP weights: its drafts are rejected, every step rewinds the target cache."""
    ids = _ids(prompt_len)
    plain, _, pfin, pcache = _run(model, tok, ids, max_tokens=max_tokens)
    got, stats, fin, cache = _run(model, tok, ids, max_tokens=max_tokens, draft="mtp", draft_tokens=k)
    assert got == plain and fin.reason == pfin.reason == "length"
    assert stats.draft_tokens > 0 and stats.accepted_tokens < stats.draft_tokens  # rejections happened
    assert fin.cache_offset == pfin.cache_offset == prompt_len + max_tokens - 1
    nxt = mx.array([[plain[-1]]])
    np.testing.assert_allclose(np.array(model(nxt, cache)), np.array(model(nxt, pcache)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_len,k,wrong_every", [(2, 1, 0), (123, 3, 0), (2, 3, 0), (123, 1, 3), (2, 3, 4),
                                                      (123, 2, 5)])
def test_right_and_partly_right_drafts(model, tok, monkeypatch, prompt_len, k, wrong_every):
    """Drafts forced right are all accepted (fewer target forwards); drafts wrong at some
    positions are cut there; output and cache match plain decoding either way."""
    ids, n = _ids(prompt_len, seed=2), 16
    plain, _, _, pcache = _run(model, tok, ids, max_tokens=n)
    _oracle(monkeypatch, ids + plain, wrong_every)
    got, stats, fin, cache = _run(model, tok, ids, max_tokens=n, draft="mtp", draft_tokens=k)
    assert got == plain
    if not wrong_every:
        assert stats.accepted_tokens == stats.draft_tokens
        assert stats.target_forwards == math.ceil((n - 1) / (k + 1))  # the last token is never fed
    else:
        assert 0 < stats.accepted_tokens < stats.draft_tokens
    assert stats.mean_accepted == pytest.approx((stats.accepted_tokens + stats.target_forwards) / stats.target_forwards)
    assert fin.cache_offset == prompt_len + n - 1
    nxt = mx.array([[plain[-1]]])
    np.testing.assert_allclose(np.array(model(nxt, cache)), np.array(model(nxt, pcache)), atol=1e-4, rtol=0)


def test_stop_inside_an_accepted_run_trims_the_cache(model, tok, monkeypatch):
    """EOS in the middle of accepted drafts: the run stops there and the cache holds exactly
    the emitted tokens (as plain decoding leaves it)."""
    ids = _ids(20, seed=4)
    plain, _, _, _ = _run(model, tok, ids, max_tokens=12)
    eos = plain[5]
    want, _, pfin, _ = _run(model, tok, ids, max_tokens=12, eos_token_ids={eos})
    _oracle(monkeypatch, ids + plain)
    got, _, fin, _ = _run(model, tok, ids, max_tokens=12, eos_token_ids={eos}, draft="mtp", draft_tokens=3)
    assert got == want and got[-1] == eos and fin.reason == pfin.reason == "stop"
    assert fin.cache_offset == pfin.cache_offset == len(ids) + len(want)


def test_logits_processors_see_the_same_history(model, tok, monkeypatch):
    from mlx_lm.sample_utils import make_logits_processors

    ids = _ids(30, seed=6)
    procs = make_logits_processors(repetition_penalty=5.0, repetition_context_size=8)
    plain, _, _, _ = _run(model, tok, ids, max_tokens=12, logits_processors=procs)
    _oracle(monkeypatch, ids + plain, wrong_every=4)
    got, stats, _, _ = _run(model, tok, ids, max_tokens=12, logits_processors=procs, draft="mtp", draft_tokens=2)
    assert got == plain and stats.accepted_tokens > 0


def test_plain_stats_have_no_drafts(model, tok):
    _, stats, _, _ = _run(model, tok, _ids(5), max_tokens=3)
    assert isinstance(stats, Stats) and (stats.draft_tokens, stats.accepted_tokens, stats.target_forwards) == (0, 0, 0)
    assert stats.acceptance_rate == 0.0 and stats.mean_accepted == 0.0


def test_draft_errors_and_auto(model, tok):
    plain_model = random_model(tiny_args(), seed=3)
    with pytest.raises(DraftError, match=r"this checkpoint has no MTP block \(no mtp\.0\.\* weights\)"):
        _run(plain_model, tok, _ids(5), max_tokens=3, draft="mtp")
    _, stats, _, _ = _run(plain_model, tok, _ids(5), max_tokens=3, draft="auto")
    assert stats.draft_tokens == 0
    with pytest.raises(DraftError, match="not a custom sampler function"):
        _run(model, tok, _ids(5), max_tokens=3, draft="mtp", sampler=lambda x: mx.argmax(x, axis=-1))
    with pytest.raises(DraftError, match=r"draft='eagle': choose one of auto, mtp, dspark or None"):
        _run(model, tok, _ids(5), max_tokens=3, draft="eagle")
    with pytest.raises(DraftError, match="draft_tokens must be >= 1, got 0"):
        _run(model, tok, _ids(5), max_tokens=3, draft="mtp", draft_tokens=0)
    _, stats, _, _ = _run(model, tok, _ids(5), max_tokens=4, draft="auto")
    assert stats.draft_tokens > 0


def test_seeded_sampling_with_drafts_is_reproducible(model, tok):
    ids = _ids(10, seed=8)
    a = _run(model, tok, ids, max_tokens=8, temperature=1.0, top_p=0.9, seed=3, draft="mtp", draft_tokens=2)[0]
    b = _run(model, tok, ids, max_tokens=8, temperature=1.0, top_p=0.9, seed=3, draft="mtp", draft_tokens=2)[0]
    assert a == b and len(a) == 8


# ---- the sampling rule ---------------------------------------------------------------------------

def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# chi-square critical values at p = 0.001, by degrees of freedom
_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize("settings", [Sampling(1.0), Sampling(0.7, top_p=0.9), Sampling(1.3, top_k=4),
                                      Sampling(1.0, min_p=0.1)], ids=["t1", "top_p", "top_k", "min_p"])
def test_rejection_sampling_follows_the_target(settings):
    """Emitted tokens follow the target distribution whatever the draft: the first token is
    distributed as p0, and the second (after an accepted first draft) as p1."""
    V, n = 8, 6000
    rng = np.random.default_rng(0)
    rows = mx.array(np.log(rng.dirichlet(np.ones(V) * 0.8, size=3)).astype(np.float32))
    target = np.array(mx.softmax(settings.filtered(rows), axis=-1))
    drafts = [int(np.argsort(target[0])[-2]), int(np.argmax(target[1]))]  # a likely, not the likeliest
    mx.random.seed(7)
    first = np.zeros(V)
    second = np.zeros(V)
    for _ in range(n):
        a, nxt = verify(rows, drafts, settings)
        if a == 0:
            first[nxt] += 1
        else:
            first[drafts[0]] += 1
            second[drafts[1] if a == 2 else nxt] += 1
    dof = int((target[0] > 0).sum()) - 1
    assert _chi_square(first, target[0]) < _CRIT[dof]
    dof = int((target[1] > 0).sum()) - 1
    assert _chi_square(second, target[1]) < _CRIT[dof]
    # the acceptance rate of the first draft is its target probability
    assert abs(first[drafts[0]] / n - target[0][drafts[0]]) < 4 * math.sqrt(0.25 / n)


def test_greedy_verify_keeps_the_matching_prefix():
    rows = mx.log(mx.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    assert verify(rows, [1, 0], Sampling(0.0)) == (2, 2)
    assert verify(rows, [1, 2], Sampling(0.0)) == (1, 0)
    assert verify(rows, [0, 0], Sampling(0.0)) == (0, 1)
    assert verify(rows[:1], [], Sampling(0.0)) == (0, 1)


def test_closing_the_generator_mid_step_keeps_what_was_handed_out(model, tok, monkeypatch):
    """A server closes the generator after a stop sequence: the cache then holds exactly the
    tokens the caller saw (here: closed after the 2nd token of an accepted run of 4)."""
    ids = _ids(12, seed=9)
    plain, _, _, _ = _run(model, tok, ids, max_tokens=10)
    _oracle(monkeypatch, ids + plain)
    cache = model.make_cache()
    gen = stream_generate(model, tok, ids, cache=cache, max_tokens=10, temperature=0.0, eos_token_ids={-1},
                          draft="mtp", draft_tokens=3)
    seen = []
    for ev in gen:
        if isinstance(ev, Token):
            seen.append(ev.id)
            if len(seen) == 2:
                break
    gen.close()
    assert seen == plain[:2]
    assert cache[0].offset == len(ids) + 2 and not cache[0].speculating


def test_distributed_models_refuse_drafts(model, tok):
    class Distributed:  # what mlx_v4.distributed.DistributedModel declares
        distributed = True

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.__dict__["inner"], name)

        def __call__(self, *a, **k):
            return self.inner(*a, **k)

    wrapped = Distributed(model)
    with pytest.raises(DraftError, match="does not run across several machines"):
        _run(wrapped, tok, _ids(5), max_tokens=3, draft="mtp")
    _, stats, _, _ = _run(wrapped, tok, _ids(5), max_tokens=3, draft="auto")
    assert stats.draft_tokens == 0
    from mlx_v4.distributed import DistributedModel

    assert DistributedModel.distributed is True


def test_chat_turns_with_drafts_match_plain(tok):
    """Two chat turns (prefill with turn checkpoints, rewinds between turns): the same replies
    and the same cache with drafts as without."""
    from mlx_v4.chat import ChatSession

    model = random_model(tiny_args(vocab_size=129280), seed=4, mtp=True)
    sessions = []
    for draft in (None, "mtp"):
        s = ChatSession(model, tok, thinking=False, temperature=0.0, max_tokens=6, prefill_step_size=16)
        for q in ("first question", "second one"):
            list(s.send(q, draft=draft, draft_tokens=2))
        sessions.append(s)
    plain, drafted = sessions
    assert drafted.tokens == plain.tokens and drafted.conversation() == plain.conversation()
    probe = mx.array([[42]])
    np.testing.assert_allclose(np.array(model(probe, cache=drafted.cache)), np.array(model(probe, cache=plain.cache)),
                               atol=1e-4, rtol=0)


def test_observe_rows_matches_observe_per_drafter(model):
    """The batched observe (one forward of the MTP block over several drafters' ragged rows)
    against each drafter's own observe: the same logits and the same window caches, on a first
    observe (which places each cache) and on a later one."""
    rng = np.random.default_rng(11)
    D, hc = model.args.hidden_size, model.args.hc_mult

    def feed(n, position):
        streams = mx.array(rng.standard_normal((1, n, hc, D)).astype(np.float32))
        return streams, rng.integers(2, 1024, n).tolist(), position

    rounds = [[feed(5, 0), feed(1, 40), feed(130, 7)], [feed(2, 5), feed(3, 41), feed(1, 137)]]
    alone = [MTPDrafter(model) for _ in range(3)]
    together = [MTPDrafter(model) for _ in range(3)]
    for feeds in rounds:
        for d, f in zip(alone, feeds):
            d.observe(*f)
        MTPDrafter.observe_rows(together, feeds)
        for a, t in zip(alone, together):
            np.testing.assert_allclose(np.array(t.logits), np.array(a.logits), atol=1e-5, rtol=0)
            assert t.cache.offset == a.cache.offset
            for x, y in zip(t.cache.window_parts, a.cache.window_parts):
                np.testing.assert_allclose(np.array(x.astype(mx.float32)), np.array(y.astype(mx.float32)), atol=1e-5,
                                           rtol=0)
            assert t.draft(1) == a.draft(1)


@pytest.mark.parametrize("ns", [[1, 1, 1], [3, 1, 2]])
def test_draft_rows_matches_draft_per_drafter(model, ns):
    """The batched draft (one argmax over all rows, one block forward per chained guess) against
    each drafter's own draft, and the caches stay as each drafter's own draft leaves them."""
    rng = np.random.default_rng(12)
    D, hc = model.args.hidden_size, model.args.hc_mult
    feeds = [(mx.array(rng.standard_normal((1, n, hc, D)).astype(np.float32)), rng.integers(2, 1024, n).tolist(), p)
             for n, p in ((4, 0), (1, 60), (9, 130))]
    alone = [MTPDrafter(model) for _ in feeds]
    together = [MTPDrafter(model) for _ in feeds]
    for a, t, f in zip(alone, together, feeds):
        a.observe(*f)
        t.observe(*f)
    want = [d.draft(n) for d, n in zip(alone, ns)]
    assert MTPDrafter.draft_rows(together, ns) == want
    assert [len(g) for g in want] == ns
    for a, t in zip(alone, together):
        assert t.cache.offset == a.cache.offset and t.cache.speculating == a.cache.speculating
