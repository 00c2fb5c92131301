"""BatchGenerator and batch_generate: each sequence's output is what it would be alone, with
mixed prompt lengths, sequences joining and leaving, mixed sampling settings, log-probabilities,
a failing sequence, stop strings, checkpoints and the per-step token budget."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from _fake_model import ScriptedModel

import mlx_v4
from mlx_v4.batch_generation import BatchGenerator, SamplingParams, Sequence, batch_generate
from mlx_v4.generation import Answer, ContextLengthError, Finish, stream_generate
from mlx_v4.testing.tiny import random_model, tiny_args
from mlx_v4.tokenizer import ASSISTANT_ID, END_THINK_ID, EOS_ID, THINK_ID, USER_ID, load_tokenizer

PROMPTS = ["def fibonacci(n):", "The Python list type", "import os\nimport sys\n" * 30, "x",
           "class Cache:\n    def rewind(self, offset):"]


@pytest.fixture(scope="module")
def demo():
    return mlx_v4.load()


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_args())


def _alone(model, tok, prompt, **kw):
    events = list(stream_generate(model, tok, prompt, **kw))
    fin = [e for e in events if isinstance(e, Finish)][0]
    return fin.generated, "".join(e.text for e in events if isinstance(e, Answer)), fin.reason


def test_greedy_batch_matches_each_prompt_alone(demo):
    """Five prompts (1 to ~300 tokens), at most three at once, different max_tokens: sequences
    leave at different steps and the waiting ones join mid-batch."""
    model, tok = demo
    limits = [12, 5, 20, 9, 16]
    results = batch_generate(model, tok, PROMPTS, max_tokens=limits, temperature=0, max_batch=3,
                             prefill_step_size=64)
    for prompt, limit, res in zip(PROMPTS, limits, results):
        tokens, text, reason = _alone(model, tok, prompt, max_tokens=limit, temperature=0)
        assert res.tokens == tokens
        assert res.text == text and res.finish_reason == reason
        assert res.prompt_tokens == len(tok.encode(prompt))


def test_mixed_sampling_settings_in_one_batch(demo):
    """Greedy and several seeded samplers share steps; each seeded sequence draws from its own
    random stream, so it samples the same tokens alone as in the batch."""
    model, tok = demo
    gen = BatchGenerator(model)
    settings = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
                SamplingParams(temperature=1.0, top_p=0.9, seed=2), SamplingParams(temperature=1.0, top_k=5, seed=3,
                                                                                   logprobs=True, top_logprobs=5),
                SamplingParams(temperature=1.0, min_p=0.1, seed=4), SamplingParams(temperature=0.7, seed=1)]
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(len(settings))]

    def run(indices):
        gen = BatchGenerator(model)
        seqs = [gen.add(Sequence(prompts[i], model.make_cache(), max_tokens=10, sampling=settings[i]))
                for i in indices]
        tops = []
        while gen.active:
            for o in gen.step():
                if o.top_logprobs:
                    tops.append((o.token, [t for t, _ in o.top_logprobs]))
        return [s.generated for s in seqs], tops

    together, tops = run(range(len(settings)))
    for i in range(len(settings)):
        assert run([i])[0][0] == together[i]
    # top_k=5: every draw is among the 5 most likely tokens
    assert len(tops) == 10 and all(t in top for t, top in tops)
    # the same seed and settings on another prompt: another stream of tokens; on the same prompt, the same
    assert together[1] != together[5] or prompts[1] == prompts[5]
    assert gen.active == []


def test_logprobs_match_a_direct_computation(demo):
    model, tok = demo
    results = batch_generate(model, tok, PROMPTS[:3], max_tokens=6, temperature=0, logprobs=True, top_logprobs=4)
    for prompt, res in zip(PROMPTS[:3], results):
        ids = tok.encode(prompt)
        logits = model(mx.array([ids + res.tokens[:-1]]))[0]  # every position in one call
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        assert len(res.logprobs) == len(res.tokens) == 6
        for j, token in enumerate(res.tokens):
            row = lp[len(ids) - 1 + j]
            assert res.logprobs[j] == pytest.approx(row[token].item(), abs=1e-4)
            want = np.argsort(-np.array(row))[:4].tolist()
            assert [t for t, _ in res.top_logprobs[j]] == want
            assert [v for _, v in res.top_logprobs[j]] == pytest.approx(np.array(row)[want].tolist(), abs=1e-4)
            assert res.top_logprobs[j][0][0] == token  # greedy: the top alternative is the token


class Poisoned:
    """The tiny model, except that a step whose rows hold id 999 fails after updating the caches."""

    def __init__(self, model):
        self.model, self.args = model, model.args

    def make_cache(self):
        return self.model.make_cache()

    def step_batch(self, rows, caches):
        out = self.model.step_batch(rows, caches)
        if any(999 in [int(t) for t in r] for r in rows):
            raise RuntimeError("poisoned row")
        return out


def test_a_failing_sequence_ends_alone(tiny):
    model = Poisoned(tiny)
    prompts = [[5, 6, 7, 8], [5, 999, 7], list(range(10, 60))]
    gen = BatchGenerator(model, prefill_step=16)
    seqs = [gen.add(Sequence(p, model.make_cache(), max_tokens=6, sampling=SamplingParams(temperature=0)))
            for p in prompts]
    finishes = {}
    while gen.active:
        for o in gen.step():
            if o.finish:
                finishes[id(o.seq)] = o.finish
    assert finishes[id(seqs[1])] == "error" and str(seqs[1].error) == "poisoned row"
    assert seqs[1].generated == [] and seqs[1].cache[0].offset == 0  # its step was undone
    for s in (seqs[0], seqs[2]):
        assert finishes[id(s)] == "length"
        alone = BatchGenerator(tiny, prefill_step=16)
        a = alone.add(Sequence(s.ids, tiny.make_cache(), max_tokens=6, sampling=SamplingParams(temperature=0)))
        while alone.active:
            alone.step()
        assert s.generated == a.generated
        assert s.cache_ids() == s.ids + s.generated[:-1] and s.cache[0].offset == len(s.cache_ids())


class Recorder:
    """The tiny model, recording each step's row lengths per sequence."""

    def __init__(self, model):
        self.model, self.args, self.steps = model, model.args, []

    def make_cache(self):
        return self.model.make_cache()

    def step_batch(self, rows, caches):
        self.steps.append([len(r) for r in rows])
        return self.model.step_batch(rows, caches)


def test_budget_shortest_first_chunks_and_checkpoints(tiny):
    model = Recorder(tiny)
    gen = BatchGenerator(model, prefill_step=16, step_tokens=32)
    long = gen.add(Sequence(list(range(2, 102)), model.make_cache(), max_tokens=3, marks=[40, 100],
                            sampling=SamplingParams(temperature=0)))
    short = gen.add(Sequence(list(range(2, 12)), model.make_cache(), max_tokens=3,
                             sampling=SamplingParams(temperature=0)))
    assert [(s is short, len(r)) for s, r in gen.plan()] == [(True, 10), (False, 16)]
    while gen.active:
        gen.step()
    # the long prompt's chunks end at multiples of 16 and at its marks, whatever ran beside it
    sizes = [row for step in model.steps for row in step]
    assert model.steps[0] == [10, 16]
    assert model.steps[1] == [1, 16] and model.steps[2] == [1, 8]  # short decodes; chunk to mark 40
    assert sizes.count(1) == 2 + 2  # two fed tokens each (the third is sampled, never fed)
    assert sorted(long.cache[0].checkpoints) == [40, 100]
    assert all(sum(step) <= 32 for step in model.steps)


def test_budget_lets_one_chunk_through(tiny):
    gen = BatchGenerator(tiny, prefill_step=16, step_tokens=4)
    dec = [gen.add(Sequence([3, 4], tiny.make_cache(), max_tokens=50)) for _ in range(4)]
    assert [len(r) for _, r in gen.plan()] == [2, 2]  # two prompts fit the budget of 4
    while any(s.prefilling for s in dec):
        gen.step()
    gen.add(Sequence(list(range(2, 50)), tiny.make_cache(), max_tokens=2))
    rows = gen.plan()
    assert [len(r) for _, r in rows] == [1, 1, 1, 1, 16]  # over budget, but never starved
    assert all(s in gen.active for s in dec)


def test_stop_strings_eos_and_reasoning():
    tok = load_tokenizer(None)
    replies = [tok.encode("Let me think.") + [END_THINK_ID] + tok.encode("It is sunny in Paris.") + [EOS_ID]]
    prompt = [0, USER_ID, *tok.encode("hi"), ASSISTANT_ID, THINK_ID]
    r = batch_generate(ScriptedModel(replies), tok, [prompt, prompt], stop=[None, "sunny"][1], temperature=0)
    assert r[0].text == "It is " and r[0].reasoning == "Let me think." and r[0].stop_string == "sunny"
    assert r[0].finish_reason == "stop"
    r = batch_generate(ScriptedModel(replies), tok, [prompt], temperature=0)
    assert r[0].text == "It is sunny in Paris." and r[0].tokens[-1] == EOS_ID and r[0].finish_reason == "stop"


def test_refusals(tiny):
    gen = BatchGenerator(tiny)
    with pytest.raises(ValueError, match="empty prompt"):
        Sequence([], tiny.make_cache(), max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        Sequence([1], tiny.make_cache(), max_tokens=0)
    with pytest.raises(ValueError, match="start=2: at least the last of the 2 prompt ids"):
        Sequence([1, 2], tiny.make_cache(), max_tokens=1, start=2)
    with pytest.raises(ContextLengthError, match="max_position_embeddings"):
        gen.add(Sequence([1, 2], tiny.make_cache(), max_tokens=tiny.args.max_position_embeddings))
    with pytest.raises(ValueError, match="top_logprobs must be in"):
        gen.add(Sequence([1], tiny.make_cache(), max_tokens=1, sampling=SamplingParams(logprobs=True, top_logprobs=21)))
    assert gen.active == []


def test_exported():
    assert mlx_v4.batch_generate is batch_generate


def test_a_failure_after_sampling_leaves_the_others_random_streams_alone(tiny, monkeypatch):
    """A row that fails while the step samples: the other rows are re-run alone from the state
    before the step, their random keys included, so a seeded sequence draws what it draws alone."""
    import mlx_v4.batch_generation as bg

    real = bg._sample_row

    def flaky(logprobs, p, key):
        if p.temperature == 0.125:
            raise ValueError("bad sampler")
        return real(logprobs, p, key)

    monkeypatch.setattr(bg, "_sample_row", flaky)
    seeded = SamplingParams(temperature=0.8, seed=5)

    def run(with_bad: bool):
        gen = BatchGenerator(tiny)
        s = gen.add(Sequence([5, 6, 7], tiny.make_cache(), max_tokens=6, sampling=seeded))
        bad = gen.add(Sequence([8, 9], tiny.make_cache(), max_tokens=6,
                               sampling=SamplingParams(temperature=0.125))) if with_bad else None
        while gen.active:
            gen.step()
        return s, bad

    s, bad = run(True)
    assert bad.finish_reason == "error" and str(bad.error) == "bad sampler"
    assert s.generated == run(False)[0].generated and len(s.generated) == 6
