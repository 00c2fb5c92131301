"""The server under bad input and load (loopback only, bounded): a hypothesis fuzz over the
three request schemas never gets a 5xx; many concurrent clients, streaming and not, all get
complete answers, the server stays up and its memory comes back to where it was."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from _fake_model import ScriptedModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_v4.server import ServerConfig, create_app
from mlx_v4.server.background import running
from mlx_v4.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def server():
    tok = load_tokenizer()
    model = ScriptedModel([tok.encode("Hello from the scripted model."), tok.encode("Second turn.")],
                          max_positions=1024)
    app = create_app(model, tok, ServerConfig(model_name="s", default_max_tokens=16, cache_budget_bytes=1 << 20))
    with running(app) as url:
        yield url, app


# ---- fuzz ------------------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=8)
roles = st.sampled_from(["user", "assistant", "system", "tool", "developer", "bogus", 3, None])
content = st.one_of(st.text(max_size=40), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_result", "tool_use", "thinking", "x"]),
     "text": st.text(max_size=10)}), max_size=2), anything)
message = st.fixed_dictionaries({"role": roles, "content": content},
                                optional={"tool_calls": anything, "name": st.text(max_size=5), "tool_call_id": anything})
common = {
    "model": st.sampled_from(["s", "DeepSeek-V4-Pro", "nope", "", None, 5]),
    "stream": st.one_of(st.booleans(), anything),
    "temperature": st.one_of(st.floats(-5, 5), anything),
    "top_p": st.one_of(st.floats(-1, 2), anything),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5), anything),
    "tools": st.one_of(st.lists(anything, max_size=2), anything),
    "thinking": st.one_of(st.sampled_from([{"type": "disabled"}, {"type": "enabled", "budget_tokens": 1024}]),
                          anything),
}
bodies = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=3)},
        optional={**common, "max_tokens": st.one_of(st.integers(-5, 10**7), anything),
                  "seed": anything, "n": anything, "response_format": anything, "reasoning_effort": anything}),
    "/v1/messages": st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=3), "max_tokens": st.one_of(st.integers(-5, 10**7), anything)},
        optional={**common, "system": anything, "top_k": anything, "stop_sequences": anything,
                  "tool_choice": anything}),
    "/v1/responses": st.fixed_dictionaries(
        {"input": st.one_of(st.text(max_size=30), st.lists(message, max_size=2), anything)},
        optional={**common, "max_output_tokens": st.one_of(st.integers(-5, 10**7), anything),
                  "instructions": anything, "reasoning": anything, "text": anything}),
}
requests = st.one_of(*[st.tuples(st.just(path), body) for path, body in bodies.items()],
                     st.tuples(st.sampled_from(list(bodies)), st.binary(max_size=40)),
                     st.tuples(st.sampled_from(list(bodies)), anything))


def test_fuzz_never_5xx(server):
    url, app = server
    client = httpx.Client(base_url=url, timeout=60)

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(requests)
    def check(req):
        path, body = req
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, (r.status_code, r.text[:300], raw[:300])
        if r.status_code >= 400:
            err = r.json()
            assert ("error" in err) if path != "/v1/messages" else (err["type"] == "error")

    check()
    assert client.get("/health").json()["engine"]["failed"] == 0


# ---- load --------------------------------------------------------------------------------------------

def _one(url, i, results):
    kinds = ["/v1/chat/completions", "/v1/messages", "/v1/responses"]
    path = kinds[i % 3]
    stream = i % 2 == 0
    msg = [{"role": "user", "content": f"client {i % 5} says hi"}]
    body = {"/v1/chat/completions": {"model": "s", "messages": msg, "thinking": {"type": "disabled"}},
            "/v1/messages": {"model": "s", "messages": msg, "max_tokens": 32, "thinking": {"type": "disabled"}},
            "/v1/responses": {"model": "s", "input": msg, "reasoning": {"effort": "none"}}}[path]
    body["stream"] = stream
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            if stream:
                with c.stream("POST", path, json=body) as r:
                    text = "".join(r.iter_text())
                ok = r.status_code == 200 and ("[DONE]" in text or "message_stop" in text
                                               or "response.completed" in text)
            else:
                r = c.post(path, json=body)
                ok = r.status_code == 200 and "Hello from the scripted model." in r.text
        results[i] = ok
    except Exception as e:  # recorded as a lost request
        results[i] = repr(e)


def test_load_many_clients(server):
    import mlx.core as mx

    url, app = server
    engine = app.state.server.engine

    def wave(n):
        results: dict[int, object] = {}
        threads = [threading.Thread(target=_one, args=(url, i, results)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        return results

    wave(6)  # warm up: the pool and MLX's buffers reach their steady state
    engine.call(lambda: None)
    base = mx.get_active_memory()
    served = engine.stats()["served"]
    results = wave(30)
    assert all(v is True for v in results.values()) and len(results) == 30, results
    engine.call(lambda: None)  # the worker counts a request just after its reply went out
    assert engine.stats()["served"] - served == 30  # no request lost
    st_ = engine.stats()
    assert st_["active"] == 0 and st_["queued"] == 0 and st_["failed"] == 0
    assert app.state.server.pool.resident_bytes <= app.state.server.pool.budget
    # memory back to the baseline (the pool is bounded; nothing leaks per request)
    assert mx.get_active_memory() <= base + (2 << 20), (base, mx.get_active_memory())
    assert httpx.get(f"{url}/health").status_code == 200
