"""The batching engine behind `mlx-v4 serve`: concurrent requests share model steps, and each
request's reply is what it would be alone (greedy and seeded), with requests joining and
leaving mid-batch, a client disconnecting mid-batch, a request failing inside a batch,
prefix-cache hits, and logprobs checked against a direct computation.

Which requests share a step depends on timing, and with an optimized BLAS a stacked matmul may
round differently from a one-row one (tests/test_batch.py bounds it), so a near-tie could flip
a token in one run and not the next. The tests that compare outputs therefore run in one child
pytest process with MLX's reference BLAS (MLX_V4_BLAS=none), where a row's result does not
depend on what is stacked with it: there the equality is exact, whatever the timing."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the server tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server tests need the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx (the test extra)")

import mlx.core as mx  # noqa: E402

from mlx_v4.server import ServerConfig, create_app  # noqa: E402
from mlx_v4.server.background import running  # noqa: E402
from mlx_v4.server.batch_engine import BatchEngine  # noqa: E402
from mlx_v4.server.protocols import PROTOCOLS, prepare  # noqa: E402
from mlx_v4.testing.tiny import random_model, tiny_args  # noqa: E402
from mlx_v4.tokenizer import load_tokenizer  # noqa: E402

NO_THINK = {"thinking": {"type": "disabled"}}
REFERENCE_BLAS = os.environ.get("MLX_V4_BLAS") == "none"


@functools.cache
def _reference_outcomes(rootdir: str) -> tuple[dict, str]:
    """Run this module's exact tests once in a child pytest with the reference BLAS."""
    env = {**os.environ, "MLX_V4_BLAS": "none"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "exact",
                          os.path.relpath(__file__, rootdir)], cwd=rootdir, env=env, capture_output=True,
                         text=True, timeout=1200)
    outcomes = dict((name, status) for status, name in re.findall(r"^(PASSED|FAILED|ERROR) \S+::(\w+)",
                                                                   res.stdout, re.M))
    return outcomes, res.stdout[-6000:] + res.stderr[-3000:]


def _checked_under_reference_blas(request) -> bool:
    """Outside the child: assert the child's outcome for this test and return True."""
    if not sys.platform.startswith("linux"):
        pytest.skip("exact comparison needs MLX's reference BLAS, selectable on Linux only (MLX_V4_BLAS=none)")
    if REFERENCE_BLAS:
        return False
    outcomes, log = _reference_outcomes(str(request.config.rootpath))
    assert outcomes.get(request.node.name) == "PASSED", log
    return True


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(vocab_size=129280))


def _body(text, max_tokens, **kw):
    return {"model": "t", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, **NO_THINK, **kw}


def _chat(url, body):
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url, body, out: dict, key, started: threading.Event | None = None, stop_after: int | None = None):
    """Stream ``body``; store the content (or, with ``stop_after``, leave after that many chunks)."""
    text, n = "", 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            n += 1

            for ch in json.loads(line[6:]).get("choices") or []:
                text += (ch.get("delta") or {}).get("content") or ""
            if n == 2 and started is not None:
                started.set()
            if stop_after is not None and n >= stop_after:
                break
    out[key] = text


PROMPTS = ["Hello there", "Explain the KV cache " * 30, "x", "What is a sliding window? " * 8]


def test_exact_concurrent_greedy_replies_equal_alone_with_joins_leaves_and_a_disconnect(request, model, tok):
    """Alone first (one at a time), then together: two streams start, two more join once they
    decode, requests of different lengths leave at different steps, and one client leaves
    mid-batch. Zero cache budget: every request prefills its whole prompt either way."""
    if _checked_under_reference_blas(request):
        return
    limits = [24, 10, 30, 16]
    app = create_app(model, tok, ServerConfig(model_name="t", cache_budget_bytes=0))
    engine = app.state.server.engine
    assert isinstance(engine, BatchEngine)
    with running(app) as url:
        alone = [_chat(url, _body(p, n))["choices"][0]["message"]["content"] for p, n in zip(PROMPTS, limits)]
        got: dict = {}
        first = threading.Event()
        threads = [threading.Thread(target=_stream, args=(url, _body(PROMPTS[i], limits[i]), got, i, first if i == 0
                                                          else None)) for i in range(2)]
        threads.append(threading.Thread(target=_stream, args=(url, _body("leave early " * 5, 200), got, "gone"),
                                        kwargs={"stop_after": 4}))
        for t in threads:
            t.start()
        assert first.wait(60)
        for i in (2, 3):  # join while the first ones decode
            threads.append(threading.Thread(target=_stream, args=(url, _body(PROMPTS[i], limits[i]), got, i)))
            threads[-1].start()
        for t in threads:
            t.join(120)
        assert [got[i] for i in range(4)] == alone
        stats = engine.stats()
        assert stats["cancelled"] == 1 and stats["failed"] == 0 and stats["active"] == 0
        assert engine.max_rows > 1  # requests really shared steps
        # the server goes on
        assert _chat(url, _body("again", 3))["usage"]["completion_tokens"] == 3


def test_exact_seeded_sampling_is_the_same_alone_and_in_a_batch(request, model, tok):
    if _checked_under_reference_blas(request):
        return
    app = create_app(model, tok, ServerConfig(model_name="t", cache_budget_bytes=0))
    seeded = _body("Tell me a story", 12, temperature=0.9, top_p=0.95, seed=1234)
    with running(app) as url:
        alone = _chat(url, seeded)["choices"][0]["message"]["content"]
        got: dict = {}
        threads = [threading.Thread(target=_stream, args=(url, b, got, k)) for k, b in
                   (("seeded", seeded), ("greedy", _body("Another prompt", 12)),
                    ("other seed", {**seeded, "seed": 99, "temperature": 0.5}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got["seeded"] == alone


def test_prefix_cache_hits_report_cached_tokens_under_concurrency(model, tok):
    app = create_app(model, tok, ServerConfig(model_name="t"))
    convs = [[{"role": "user", "content": f"Conversation {i}: " + "words " * (20 + 10 * i)}] for i in range(3)]
    with running(app) as url:
        first = [_chat(url, {**_body("", 4), "messages": c}) for c in convs]
        results: dict = {}

        def follow_up(i):
            msgs = convs[i] + [{"role": "assistant", "content": first[i]["choices"][0]["message"]["content"]},
                               {"role": "user", "content": "and then?"}]
            results[i] = _chat(url, {**_body("", 4), "messages": msgs})

        threads = [threading.Thread(target=follow_up, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(3):
            cached = results[i]["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= first[i]["usage"]["prompt_tokens"] - 1, (i, cached)


def _direct_greedy(model, ids, n):
    """Greedy continuation of ``ids`` by the plain model call, with each step's log-probabilities."""
    cache, out, row = model.make_cache(), [], ids
    for _ in range(n):
        logits = model(mx.array([row], dtype=mx.int32), cache)[0, -1]
        lp = logits - mx.logsumexp(logits)
        tok_id = int(mx.argmax(lp).item())
        out.append((tok_id, lp))
        row = [tok_id]
    return out


def test_exact_logprobs_against_a_direct_computation(request, model, tok):
    if _checked_under_reference_blas(request):
        return
    app = create_app(model, tok, ServerConfig(model_name="t", cache_budget_bytes=0))
    state = app.state.server
    body = _body("What is 2 + 2?", 5, logprobs=True, top_logprobs=3)

    prep = prepare(PROTOCOLS["chat"], json.dumps(body).encode(), tokenizer=tok, options=state.options,
                   context=state.context, default_max_tokens=8)
    direct = _direct_greedy(model, prep.ids, 5)
    with running(app) as url:
        got: dict = {}
        other = threading.Thread(target=_stream, args=(url, _body("Something else entirely " * 4, 12), got, "o"))
        other.start()  # shares steps with the logprobs request
        r = _chat(url, body)
        other.join(120)
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == 5
        for entry, (tok_id, lp) in zip(content, direct):
            assert entry["token"] == tok.decode([tok_id])
            assert entry["logprob"] == pytest.approx(lp[tok_id].item(), abs=1e-4)
            top = mx.argsort(-lp)[:3].tolist()
            assert [t["token"] for t in entry["top_logprobs"]] == [tok.decode([t]) for t in top]
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([lp[t].item() for t in top], abs=1e-4)
        # Responses: output_text logprobs
        rbody = {"model": "t", "input": "What is 2 + 2?", "max_output_tokens": 4, "temperature": 0,
                 "top_logprobs": 2, "reasoning": {"effort": "none"}, "include": ["message.output_text.logprobs"]}
        rprep = prepare(PROTOCOLS["responses"], json.dumps(rbody).encode(), tokenizer=tok, options=state.options,
                        context=state.context, default_max_tokens=8)
        rdirect = _direct_greedy(model, rprep.ids, 4)
        resp = httpx.post(f"{url}/v1/responses", json=rbody, timeout=120).json()
        msg = [o for o in resp["output"] if o["type"] == "message"][0]
        lps = [x for part in msg["content"] for x in part.get("logprobs") or []]
        assert len(lps) == 4
        for entry, (tok_id, lp) in zip(lps, rdirect):
            assert entry["logprob"] == pytest.approx(lp[tok_id].item(), abs=1e-4)
            assert len(entry["top_logprobs"]) == 2


class _Poisoned:
    """The tiny model, except that a step whose rows hold ``poison`` fails (after updating the caches)."""

    def __init__(self, model, poison: int):
        self._model, self._poison = model, poison

    def __getattr__(self, name):
        return getattr(self._model, name)

    def step_batch(self, rows, caches):
        out = self._model.step_batch(rows, caches)
        if any(self._poison in [int(t) for t in r] for r in rows):
            raise RuntimeError("poisoned row")
        return out


def test_exact_one_failing_request_leaves_the_batch_alone(request, model, tok):
    if _checked_under_reference_blas(request):
        return
    poison = tok.encode(" zebra")[-1]
    sick = _Poisoned(model, poison)
    app = create_app(sick, tok, ServerConfig(model_name="t", cache_budget_bytes=0))
    engine = app.state.server.engine
    with running(app) as url:
        alone = _chat(url, _body("Hello there", 12))["choices"][0]["message"]["content"]
        got: dict = {}
        healthy = threading.Thread(target=_stream, args=(url, _body("Hello there", 12), got, "ok"))
        healthy.start()
        r = httpx.post(f"{url}/v1/chat/completions", json=_body("a zebra", 5), timeout=120)
        healthy.join(120)
        assert r.status_code == 500 and "poisoned row" in r.json()["error"]["message"]
        assert got["ok"] == alone
        assert engine.stats()["failed"] == 1 and engine.stats()["active"] == 0


def test_stop_sequences_differ_per_request_inside_a_batch(tok):
    from _fake_model import ScriptedModel

    model = ScriptedModel([tok.encode("It is sunny in Paris. Bye.")], on_call=lambda m: time.sleep(0.02))
    app = create_app(model, tok, ServerConfig(model_name="t"))
    engine = app.state.server.engine
    stops = {"a": ["sunny"], "b": ["Paris", "zzz"], "c": None}
    got: dict = {}

    def ask(key):
        body = {**_body("Weather?", 40), "temperature": 1.0, "seed": 3}
        if stops[key]:
            body["stop"] = stops[key]
        got[key] = _chat(url, body)["choices"][0]

    with running(app) as url:
        threads = [threading.Thread(target=ask, args=(k,)) for k in stops]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert engine.max_rows >= 2
    assert got["a"]["message"]["content"] == "It is " and got["a"]["finish_reason"] == "stop"
    assert got["b"]["message"]["content"] == "It is sunny in " and got["b"]["finish_reason"] == "stop"
    assert got["c"]["message"]["content"] == "It is sunny in Paris. Bye." and got["c"]["finish_reason"] == "stop"


def test_the_round_robin_engine_refuses_logprobs(model, tok):
    """Distributed serving keeps the round-robin engine, which computes no logprobs: a clear 400."""
    from mlx_v4.server.engine import Engine
    from mlx_v4.server.prefix_cache import PrefixCache

    engine = Engine(model, tok, PrefixCache(model, 0))
    app = create_app(model, tok, ServerConfig(model_name="t"), engine=engine)
    with running(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=_body("hi", 2, logprobs=True), timeout=60)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "logprobs are not supported by this server's engine (distributed serving)"
        assert _chat(url, _body("hi", 2))["usage"]["completion_tokens"] == 2


# ---- drafting inside the batching engine ------------------------------------------------------

@pytest.fixture(scope="module")
def drafting_model():
    return random_model(tiny_args(vocab_size=129280), seed=2, mtp=True)


def test_exact_drafted_replies_equal_plain_under_concurrency(request, drafting_model, tok):
    """With drafts (random MTP: rejected, every row rewinds every step) the batching engine's
    concurrent greedy replies are the replies without drafts."""
    if _checked_under_reference_blas(request):
        return
    limits = [16, 10, 20]
    replies, engine = {}, None
    for draft in (None, "mtp"):
        app = create_app(drafting_model, tok, ServerConfig(model_name="t", cache_budget_bytes=0, draft=draft,
                                                           draft_tokens=2))
        engine = app.state.server.engine
        assert isinstance(engine, BatchEngine)
        got: dict = {}
        with running(app) as url:
            threads = [threading.Thread(target=_stream, args=(url, _body(PROMPTS[i], limits[i]), got, i))
                       for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        replies[draft] = [got[i] for i in range(3)]
    assert replies["mtp"] == replies[None]
    stats = engine.stats()
    assert stats["drafting"]["draft_tokens"] > 0 and stats["failed"] == 0 and engine.max_rows > 1


def _events(url, path, body):
    """A streamed reply's SSE data objects, with their event names (None on OpenAI's)."""
    out, event = [], None
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: {"):
                out.append((event, json.loads(line[6:])))
    return out


def test_drafting_usage_in_streamed_and_whole_replies(drafting_model, tok):
    """usage.drafting: in the whole reply, in the final usage chunk of an OpenAI stream (with
    stream_options.include_usage), in Anthropic's final message_delta and in the Responses API's
    final event; the same counts for the same greedy request (no prefix cache: no reuse)."""
    app = create_app(drafting_model, tok, ServerConfig(model_name="t", cache_budget_bytes=0, draft="auto"))
    msgs = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
            **NO_THINK}
    with running(app) as url:
        whole = _chat(url, _body("hi", 8))
        d = whole["usage"]["drafting"]
        assert d["draft_tokens"] > 0 and d["target_forwards"] > 0
        assert d["acceptance_rate"] == round(d["accepted_tokens"] / d["draft_tokens"], 4)
        assert d["mean_accepted_length"] == round((d["accepted_tokens"] + d["target_forwards"]) / d["target_forwards"], 4)
        chunks = _events(url, "/v1/chat/completions", {**_body("hi", 8), "stream_options": {"include_usage": True}})
        usage = [c["usage"] for _, c in chunks if c.get("usage")]
        assert len(usage) == 1 and usage[0]["drafting"] == d and chunks[-1][1].get("usage")
        anthropic = _events(url, "/v1/messages", msgs)
        delta = [c for e, c in anthropic if e == "message_delta"]
        assert len(delta) == 1 and delta[0]["usage"]["drafting"] == d
        assert all("drafting" not in json.dumps(c) for e, c in anthropic if e != "message_delta")
        responses = _events(url, "/v1/responses", {"model": "t", "input": "hi", "max_output_tokens": 8,
                                                   "temperature": 0, "reasoning": {"effort": "none"}})
        final = responses[-1][1]
        assert final["type"] in ("response.completed", "response.incomplete")
        assert final["response"]["usage"]["drafting"]["draft_tokens"] > 0
        assert app.state.server.engine.stats()["drafting"]["draft_tokens"] >= 3 * d["draft_tokens"]
    plain = create_app(drafting_model, tok, ServerConfig(model_name="t", cache_budget_bytes=0))
    with running(plain) as url:
        assert "drafting" not in _chat(url, _body("hi", 8))["usage"]
        chunks = _events(url, "/v1/chat/completions", {**_body("hi", 8), "stream_options": {"include_usage": True}})
        assert [c["usage"] for _, c in chunks if c.get("usage")][0].get("drafting") is None


def test_a_stop_sequence_inside_accepted_drafts(drafting_model, tok, monkeypatch):
    """Drafts forced right (k=3): a stop sequence completes inside a step's accepted run; the
    reply ends there as without drafts (streamed and whole), nothing of the rest of the step is
    sent, and the engine goes on."""
    from mlx_v4.batch_draft import BatchDrafting
    from mlx_v4.batch_generation import BatchGenerator
    from mlx_v4.draft.speculative import MTPDrafter

    seen: dict = {}
    real_add = BatchGenerator.add

    def add(self, seq):
        seen[tuple(seq.ids)] = seq
        return real_add(self, seq)

    monkeypatch.setattr(BatchGenerator, "add", add)
    plain = create_app(drafting_model, tok, ServerConfig(model_name="t", cache_budget_bytes=0))
    with running(plain) as url:
        _chat(url, _body("hi", 16))
        (ids, seq), = seen.items()
        stop = tok.decode(seq.generated[5:7])
        want = _chat(url, _body("hi", 16, stop=[stop]))["choices"][0]
    assert want["finish_reason"] == "stop" and stop not in want["message"]["content"]
    oracle = list(ids) + seq.generated

    def draft(self, n):
        start = self.cache.offset + 1  # the pending token sits at cache.offset
        return [oracle[p] if p < len(oracle) else 5 for p in range(start, start + n)]

    monkeypatch.setattr(MTPDrafter, "draft", draft)
    monkeypatch.setattr(MTPDrafter, "draft_rows", staticmethod(lambda ds, ns: [d.draft(n) for d, n in zip(ds, ns)]))
    app = create_app(drafting_model, tok, ServerConfig(model_name="t", cache_budget_bytes=0, draft="mtp",
                                                       draft_tokens=3))
    assert isinstance(app.state.server.engine.batch.drafting, BatchDrafting)
    with running(app) as url:
        got = _chat(url, _body("hi", 16, stop=[stop]))
        streamed: dict = {}
        _stream(url, _body("hi", 16, stop=[stop]), streamed, "s")
        assert _chat(url, _body("again", 3))["usage"]["completion_tokens"] == 3
    assert got["choices"][0] == want and streamed["s"] == want["message"]["content"]
    d = got["usage"]["drafting"]
    assert d["accepted_tokens"] == d["draft_tokens"] > 0
    stats = app.state.server.engine.stats()
    assert stats["failed"] == 0 and stats["served"] == 3  # each reply ended once


def test_drafting_with_prefix_reuse_keeps_the_replies(drafting_model, tok):
    """A second turn resumes the first turn's cache (its drafter primed only from the fed
    suffix): the same replies with drafts as without, and the cache reuse is reported."""
    turns = {}
    for draft in (None, "mtp"):
        app = create_app(drafting_model, tok, ServerConfig(model_name="t", draft=draft, draft_tokens=2))
        with running(app) as url:
            first = _chat(url, _body("hello there", 10))
            reply = first["choices"][0]["message"]["content"]
            body = {**_body("", 10), "messages": [{"role": "user", "content": "hello there"},
                                                  {"role": "assistant", "content": reply},
                                                  {"role": "user", "content": "and then?"}]}
            second = _chat(url, body)
        turns[draft] = (reply, second["choices"][0]["message"]["content"],
                        second["usage"]["prompt_tokens_details"]["cached_tokens"], second["usage"].get("drafting"))
    assert turns["mtp"][:3] == turns[None][:3] and turns["mtp"][2] > 0
    assert turns["mtp"][3]["draft_tokens"] > 0 and turns[None][3] is None


def test_exact_dspark_drafted_replies_equal_plain(request, tok, monkeypatch):
    """serve --draft dspark on a tiny Flash-0731-style model (DSpark reading inner layers; its
    Markov head taught the plain replies' bigrams, so drafts are kept and rejected): three
    concurrent greedy replies equal the plain ones, and usage.drafting reports the drafts."""
    if _checked_under_reference_blas(request):
        return
    from mlx_v4.batch_generation import BatchGenerator
    from mlx_v4.config import ModelArgs
    from mlx_v4.draft.speculative import DSparkDrafter
    from mlx_v4.testing.dspark import teach_markov, tiny_dspark_config

    cfg = tiny_dspark_config(vocab_size=129280, dspark_noise_token_id=128799, dspark_markov_rank=64)
    model = random_model(ModelArgs.from_dict(cfg), seed=2, dspark=True)
    seen: list = []
    real_add = BatchGenerator.add

    def add(self, seq):
        seen.append(seq)
        return real_add(self, seq)

    monkeypatch.setattr(BatchGenerator, "add", add)
    limits = [16, 10, 20]
    replies, usage = {}, {}
    for draft in (None, "dspark"):
        app = create_app(model, tok, ServerConfig(model_name="t", cache_budget_bytes=0, draft=draft))
        engine = app.state.server.engine
        with running(app) as url:
            got: dict = {}
            threads = [threading.Thread(target=_stream, args=(url, _body(PROMPTS[i], limits[i]), got, i))
                       for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            whole = _chat(url, _body(PROMPTS[3], 12))
        replies[draft] = [got[i] for i in range(3)] + [whole["choices"][0]["message"]["content"]]
        usage[draft] = whole["usage"].get("drafting")
        if draft is None:  # teach the drafter the plain replies' bigrams
            teach_markov(model.dspark, [t for s in seen for t in s.ids[-1:] + s.generated], wrong_every=4)
    assert replies["dspark"] == replies[None] and usage[None] is None
    assert all(isinstance(s.draft.drafter, DSparkDrafter) for s in seen[4:])
    d = usage["dspark"]
    assert d["draft_tokens"] > 0 and d["acceptance_rate"] == round(d["accepted_tokens"] / d["draft_tokens"], 4)
    stats = engine.stats()
    assert 0 < stats["drafting"]["accepted_tokens"] < stats["drafting"]["draft_tokens"]
    assert stats["failed"] == 0 and engine.max_rows > 1
