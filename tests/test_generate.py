"""Generation loop: prefill chunking, stopping, reasoning/answer split, interrupts, limits."""

import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
from _fake_model import ScriptedModel

from mlx_v4.cache import cache_offset
from mlx_v4.generation import (
    Answer,
    ContextLengthError,
    Finish,
    Reasoning,
    Stats,
    Token,
    generate,
    load_generation_defaults,
    prefill,
    stream_generate,
)
from mlx_v4.tokenizer import ASSISTANT_ID, END_THINK_ID, EOS_ID, THINK_ID, USER_ID, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _prompt(tok, text="hi", think=True):
    return [0, USER_ID, *tok.encode(text), ASSISTANT_ID, THINK_ID if think else END_THINK_ID]


def _run(model, tok, prompt, **kw):
    kw.setdefault("temperature", 0.0)
    return list(stream_generate(model, tok, prompt, **kw))


def _text(events, kind):
    return "".join(e.text for e in events if isinstance(e, kind))


def test_reasoning_answer_split_and_eos(tok):
    reply = tok.encode("Let me think.") + [END_THINK_ID] + tok.encode("The answer is 42.") + [EOS_ID]
    model = ScriptedModel([reply])
    events = _run(model, tok, _prompt(tok))
    assert _text(events, Reasoning) == "Let me think."
    assert _text(events, Answer) == "The answer is 42."
    assert [e.id for e in events if isinstance(e, Token)] == reply
    fin = events[-1]
    assert isinstance(fin, Finish) and fin.reason == "stop" and fin.generated == reply
    assert isinstance(events[-2], Stats) and events[-2].generation_tokens == len(reply)
    # EOS was fed back: the cache holds the prompt and every generated id
    assert fin.cache_offset == len(_prompt(tok)) + len(reply)
    assert generate(ScriptedModel([reply]), tok, _prompt(tok), temperature=0.0) == "The answer is 42."


def test_chat_mode_prompt_is_all_answer(tok):
    reply = tok.encode("Direct answer.") + [EOS_ID]
    events = _run(ScriptedModel([reply]), tok, _prompt(tok, think=False))
    assert _text(events, Reasoning) == "" and _text(events, Answer) == "Direct answer."
    events = _run(ScriptedModel([reply]), tok, _prompt(tok, think=False), thinking=True)
    assert _text(events, Reasoning) == "Direct answer."


def test_max_tokens_gives_length(tok):
    reply = tok.encode("one two three four five six seven") + [EOS_ID]
    events = _run(ScriptedModel([reply]), tok, _prompt(tok, think=False), max_tokens=3)
    fin = events[-1]
    assert fin.reason == "length" and fin.generation_tokens == 3
    # the last sampled token is never fed
    assert fin.cache_offset == len(_prompt(tok, think=False)) + 2
    assert _text(events, Answer) == tok.decode(reply[:3])


@pytest.mark.parametrize("stop", ["three", "o th", ["zzz", "four"]])
def test_stop_strings(tok, stop):
    reply = tok.encode("one two three four five") + [EOS_ID]
    events = _run(ScriptedModel([reply]), tok, _prompt(tok, think=False), stop=stop)
    fin = events[-1]
    first = stop if isinstance(stop, str) else "four"
    assert fin.reason == "stop" and fin.stop_string == first
    full = "one two three four five"
    assert _text(events, Answer) == full[: full.index(first)]


def test_stop_string_prefix_is_released_when_it_does_not_match(tok):
    reply = tok.encode("a thr b") + [EOS_ID]
    events = _run(ScriptedModel([reply]), tok, _prompt(tok, think=False), stop="three")
    assert _text(events, Answer) == "a thr b" and events[-1].stop_string is None


def test_chunked_prefill_feeds_the_same_ids(tok):
    prompt = _prompt(tok, "a fairly long prompt " * 20)
    reply = tok.encode("ok") + [EOS_ID]
    runs = []
    for step in (1, 7, 512):
        model = ScriptedModel([reply])
        cache = model.make_cache()
        events = _run(model, tok, prompt, cache=cache, prefill_step_size=step)
        sizes = [len(x) for x in model.fed_log[: -len(reply)]]
        assert max(sizes[:-1] or [0]) <= step
        runs.append((cache[0].tokens, [e.id for e in events if isinstance(e, Token)]))
    assert runs[0] == runs[1] == runs[2]


def test_chunked_prefill_equals_one_shot_on_the_tiny_model():
    from mlx_v4.cache import cache_offset as off
    from mlx_v4.testing.tiny import random_model, tiny_args

    model = random_model(tiny_args(), seed=3)
    ids = np.random.default_rng(0).integers(2, 1024, 300).tolist()
    one = model.make_cache()
    ref = model(mx.array([ids]), cache=one)[:, -1]
    chunked = model.make_cache()
    assert prefill(model, ids[:-1], chunked, step_size=64) == len(ids) - 1
    got = model(mx.array([ids[-1:]]), cache=chunked)[:, -1]
    assert off(chunked) == off(one) == len(ids)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-4, atol=1e-4)


def test_greedy_generation_independent_of_prefill_chunks_on_tiny_model(tok):
    from mlx_v4.testing.tiny import random_model, tiny_args

    model = random_model(tiny_args(), seed=3)
    ids = np.random.default_rng(1).integers(2, 1024, 150).tolist()
    outs = []
    for step in (16, 1000):
        events = _run(model, tok, ids, prefill_step_size=step, max_tokens=8, eos_token_ids={-1})
        outs.append([e.id for e in events if isinstance(e, Token)])
    assert outs[0] == outs[1] and len(outs[0]) >= 1


def test_prompt_too_long_error(tok):
    model = ScriptedModel([[EOS_ID]], max_positions=100)
    with pytest.raises(ContextLengthError, match=r"needs 110 positions.*max_position_embeddings\) is 100.*at most 90"):
        next(stream_generate(model, tok, list(range(2, 12)), max_tokens=100))
    assert model.calls == 0
    cache = model.make_cache()
    _run(model, tok, list(range(2, 62)), cache=cache, max_tokens=1)
    with pytest.raises(ContextLengthError, match="60 tokens already in the cache.*start a new conversation"):
        next(stream_generate(model, tok, list(range(2, 50)), cache=cache, max_tokens=1))


def test_raw_keyboard_interrupt_during_decode(tok):
    reply = tok.encode("one two three four five six") + [EOS_ID]
    prompt = _prompt(tok, think=False)
    model = ScriptedModel([reply], interrupt_at_call=4)  # prefill, step1, step2, step3 raises
    cache = model.make_cache()
    events = _run(model, tok, prompt, cache=cache, prefill_step_size=512)
    fin = events[-1]
    assert fin.reason == "interrupted"
    assert cache_offset(cache) == fin.cache_offset == model.fed
    assert cache[0].tokens == (prompt + fin.generated)[: fin.cache_offset]


def test_sigint_is_deferred_to_a_token_boundary(tok):
    reply = tok.encode("one two three four five six seven eight") + [EOS_ID]
    prompt = _prompt(tok, think=False)

    def on_call(m):
        if m.calls == 5:
            os.kill(os.getpid(), signal.SIGINT)

    model = ScriptedModel([reply], on_call=on_call)
    cache = model.make_cache()
    events = _run(model, tok, prompt, cache=cache)
    fin = events[-1]
    assert fin.reason == "interrupted" and 0 < fin.generation_tokens < len(reply)
    assert cache[0].tokens == (prompt + fin.generated)[: fin.cache_offset]
    assert all(c.offset == fin.cache_offset for c in cache)
    # the handler is restored afterwards
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_during_prefill(tok):
    model = ScriptedModel([[EOS_ID]], interrupt_at_call=3)
    cache = model.make_cache()
    events = _run(model, tok, list(range(2, 40)), cache=cache, prefill_step_size=10)
    fin = events[-1]
    assert fin.reason == "interrupted" and fin.generation_tokens == 0
    assert fin.prompt_tokens == fin.cache_offset == 20


def test_generation_defaults(tmp_path):
    assert load_generation_defaults(None) == {"temperature": 1.0, "top_p": 1.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    assert load_generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def test_seeded_sampling_is_reproducible(tok):
    from mlx_v4.testing.tiny import random_model, tiny_args

    model = random_model(tiny_args(), seed=5)
    ids = list(range(2, 40))
    a = [e.id for e in stream_generate(model, tok, ids, max_tokens=6, seed=1, eos_token_ids={-1}) if isinstance(e, Token)]
    b = [e.id for e in stream_generate(model, tok, ids, max_tokens=6, seed=1, eos_token_ids={-1}) if isinstance(e, Token)]
    assert a == b
