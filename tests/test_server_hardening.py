"""`mlx-v4 serve` under hostile and careless input (issue 15): empty keys, bodies over the cap
however they are sent, deep JSON, foreign content types, hosts and origins, an unkeyed health
endpoint, broken prefix-cache files and failing requests, and prompts far beyond the context.
Every refusal is a 4xx in the protocol's own error shape; the server stays up."""

from __future__ import annotations

import httpx
import pytest
from _fake_model import ScriptedModel

from mlx_v4.server import ServerConfig, create_app
from mlx_v4.server.background import running
from mlx_v4.tokenizer import load_tokenizer

NO_THINK = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# ---- 1: an empty key is no key ---------------------------------------------------------------------

def test_empty_api_key_is_refused_off_loopback(monkeypatch):
    import mlx_v4.cli.serve as cli_serve
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    def load_model(*a, **k):  # reaching this means the server would start without a key
        raise AssertionError("serve went on to load the model")

    monkeypatch.setattr(cli_serve, "load_model", load_model)
    for args, env in ((["--api-key", ""], {}), (["--api-key", "  "], {}), ([], {"MLX_V4_API_KEY": ""})):
        r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", *args], env=env)
        assert r.exit_code == 1, (args, env, r.output)
        assert "binding 0.0.0.0 (beyond loopback) needs --api-key" in " ".join(r.output.split()), r.output


def test_empty_api_key_is_refused_by_the_library():
    for key in ("", "   "):
        with pytest.raises(ValueError, match="api_key is empty"):
            ServerConfig(api_key=key)
    assert ServerConfig(api_key="k").api_key == "k" and ServerConfig().api_key is None


# ---- servers for the HTTP checks ------------------------------------------------------------------

CAP = 1 << 20
PATHS = ("/v1/chat/completions", "/v1/messages", "/v1/responses")


def _body(path: str, text: str = "hi") -> dict:
    msg = [{"role": "user", "content": text}]
    return {"/v1/chat/completions": {"model": "s", "messages": msg, "max_tokens": 3, **NO_THINK},
            "/v1/messages": {"model": "s", "messages": msg, "max_tokens": 3, **NO_THINK},
            "/v1/responses": {"model": "s", "input": msg, "max_output_tokens": 3,
                              "reasoning": {"effort": "none"}}}[path]


def _shaped(path: str, r, status: int) -> str:
    """The error message, after checking the status and the protocol's error shape."""
    assert r.status_code == status, (path, r.status_code, r.text[:300])
    err = r.json()
    if path == "/v1/messages":
        assert err["type"] == "error" and set(err["error"]) == {"type", "message"}, err
        return err["error"]["message"]
    assert set(err["error"]) == {"message", "type", "param", "code"}, err
    return err["error"]["message"]


@pytest.fixture(scope="module")
def open_server(tokenizer):
    """No key: loopback names only (plus box.local); a 1 MiB body cap."""
    model = ScriptedModel([tokenizer.encode("Hi there.")], max_positions=2048)
    app = create_app(model, tokenizer, ServerConfig(model_name="s", default_max_tokens=8, max_body_bytes=CAP,
                                                    allowed_hosts=["Box.local"]))
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def keyed_server(tokenizer):
    model = ScriptedModel([tokenizer.encode("Hi there.")], max_positions=2048)
    app = create_app(model, tokenizer, ServerConfig(model_name="s", default_max_tokens=8, api_key="sekrit"))
    with running(app) as url:
        yield url, app


# ---- 3: the body cap holds for chunked bodies ------------------------------------------------------

def test_body_cap_holds_for_chunked_bodies(open_server):
    url, app = open_server
    import json

    for path in PATHS:
        big = json.dumps(_body(path, "x" * (3 * CAP))).encode()

        def chunks(data=big):
            for i in range(0, len(data), 64 << 10):
                yield data[i:i + 64 << 10]

        try:
            r = httpx.post(url + path, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
        except httpx.TransportError:  # the server may hang up before the client sent everything
            pytest.fail("the server closed the connection without answering 413")
        assert "transfer-encoding" in r.request.headers and "content-length" not in r.request.headers
        assert "over the limit of 1048576 bytes" in _shaped(path, r, 413)
        # with a length header it is refused before any of it is read
        r = httpx.post(url + path, content=big, headers={"content-type": "application/json"}, timeout=30)
        assert f"({len(big)} bytes; the limit is 1048576)" in _shaped(path, r, 413)
        # a chunked body under the cap is served
        small = json.dumps(_body(path)).encode()
        r = httpx.post(url + path, content=iter([small[:10], small[10:]]),
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 200, r.text


def test_read_body_stops_reading_past_the_cap():
    import asyncio

    from mlx_v4.server.guards import read_body
    from mlx_v4.server.protocols import ApiError

    class Chunked:
        headers: dict = {}
        pulled = 0

        async def stream(self):
            while True:  # an endless body
                self.pulled += 1
                yield b"x" * 1000

    req = Chunked()
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(req, 10_500))
    assert e.value.status == 413 and req.pulled == 11


# ---- 5: JSON nesting depth ---------------------------------------------------------------------------

def test_deep_json_is_400_on_every_endpoint(open_server):
    url, app = open_server
    import json

    for path in PATHS:
        for deep in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
            body = b'{"model": "s", "messages": ' + deep + b', "input": "x"}'
            r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
            assert _shaped(path, r, 400) == "request body nests arrays and objects deeper than 64 levels"
        # brackets inside strings are text, not nesting
        r = httpx.post(url + path, json=_body(path, "[{" * 300 + "\\\\\"[" * 100), timeout=30)
        assert r.status_code == 200, r.text
    assert json.loads(httpx.get(f"{url}/health").text)["engine"]["failed"] == 0


def test_json_depth_scan_matches_the_parsed_depth():
    import json
    import random

    from mlx_v4.server.guards import json_depth_exceeds

    def depth(x):
        if isinstance(x, (list, dict)):
            return 1 + max([depth(v) for v in (x.values() if isinstance(x, dict) else x)] or [0])
        return 0

    rng = random.Random(0)
    alphabet = '[]{}"\\ab\n'

    def gen(d):
        r = rng.random()
        if d > 12 or r < 0.3:
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        if r < 0.65:
            return [gen(d + 1) for _ in range(rng.randint(0, 3))]
        return {"".join(rng.choice(alphabet) for _ in range(3)): gen(d + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(400):
        x = gen(0)
        body, true = json.dumps(x).encode(), depth(x)
        for limit in {0, 1, max(0, true - 1), true, true + 1}:
            for step in (1, 3, 7, 1 << 20):  # chunk boundaries anywhere
                assert json_depth_exceeds(body, limit, step) == (true > limit), (body, limit, step)


# ---- 6: content type, Host and Origin ----------------------------------------------------------------

def test_only_json_content_type(open_server):
    url, _ = open_server
    import json

    for path in PATHS:
        raw = json.dumps(_body(path)).encode()
        for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = httpx.post(url + path, content=raw, headers={"content-type": ct})
            assert _shaped(path, r, 415) == f"Content-Type must be application/json, not {ct!r}"
        r = httpx.post(url + path, content=raw, headers={"content-type": ""})
        assert _shaped(path, r, 415) == "Content-Type must be application/json"
        r = httpx.post(url + path, content=raw, headers={"content-type": "Application/JSON; charset=utf-8"})
        assert r.status_code == 200, r.text


def test_unkeyed_server_answers_only_loopback_hosts_and_origins(open_server, keyed_server):
    url, _ = open_server
    port = url.rsplit(":", 1)[1]
    for path in PATHS:
        h = {"content-type": "application/json"}
        for host in ("evil.example", f"evil.example:{port}", "192.168.1.5", "localhost.evil.example"):
            r = httpx.post(url + path, json=_body(path), headers={**h, "host": host})
            assert _shaped(path, r, 403).startswith(f"host {host.split(':')[0]!r} is not allowed")
        for origin in ("http://evil.example", f"http://evil.example:{port}", "null", "file://"):
            r = httpx.post(url + path, json=_body(path), headers={**h, "origin": origin})
            assert _shaped(path, r, 403) == f"cross-origin requests from {origin!r} are not allowed"
        for host in (f"localhost:{port}", "LOCALHOST", f"127.0.0.1:{port}", f"[::1]:{port}", "box.local:9"):
            r = httpx.post(url + path, json=_body(path), headers={**h, "host": host})
            assert r.status_code == 200, (host, r.text)
        r = httpx.post(url + path, json=_body(path), headers={**h, "origin": "http://localhost:3000"})
        assert r.status_code == 200, r.text
    for get in ("/v1/models", "/health"):
        assert httpx.get(url + get, headers={"host": "evil.example"}).status_code == 403
        r = httpx.get(url + get, headers={"host": "evil.example", "anthropic-version": "2023-06-01"})
        assert r.json()["error"]["type"] == "permission_error"
        assert httpx.get(url + get, headers={"host": f"localhost:{port}"}).status_code == 200
    # a keyed server is reached by any name (the key is the guard)
    kurl, _ = keyed_server
    r = httpx.post(kurl + PATHS[0], json=_body(PATHS[0]),
                   headers={"host": "box.example", "authorization": "Bearer sekrit"})
    assert r.status_code == 200, r.text


def test_host_names():
    from mlx_v4.server.guards import host_name, normalize_hosts

    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:80") == "[::1]"
    assert host_name("[::1]") == "[::1]" and host_name("127.0.0.1") == "127.0.0.1"
    assert normalize_hosts(["::1", "Box.local:8000", " ", "*"]) == {"[::1]", "box.local", "*"}


def test_allowed_hosts_flag(monkeypatch):
    import mlx_v4.cli.serve as cli_serve
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    seen = {}

    def create_app(model, tok, config, engine=None):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(cli_serve, "load_model", lambda ui, model, expert_budget=None: (None, None, "demo"))
    monkeypatch.setattr("mlx_v4.server.create_app", create_app)
    r = CliRunner().invoke(app, ["serve", "--allowed-hosts", "box.local, 10.0.0.5,"])
    assert r.exit_code == 0, r.output
    assert seen["config"].allowed_hosts == ["box.local", "10.0.0.5"]


# ---- 9: /health wants the key ------------------------------------------------------------------------

def test_health_requires_the_key(keyed_server, open_server):
    url, _ = keyed_server
    r = httpx.get(f"{url}/health")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "engine" not in r.text and "prefix_cache" not in r.text
    r = httpx.get(f"{url}/health", headers={"anthropic-version": "2023-06-01", "x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{url}/health", headers={"authorization": "Bearer sekrit"})
    assert r.status_code == 200 and r.json()["status"] == "ok" and "served" in r.json()["engine"]
    assert httpx.get(f"{open_server[0]}/health").json()["status"] == "ok"


# ---- 4: one failing request, a dead engine, a mis-shaped cache file ----------------------------------

def test_one_failing_request_leaves_the_engine_serving(open_server):
    url, app = open_server
    pool = app.state.server.pool
    real, calls = pool.acquire, []

    def acquire(ids):
        calls.append(ids)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(ids)

    pool.acquire = acquire
    try:
        failed = app.state.server.engine.stats()["failed"]
        for path in PATHS:
            calls.clear()
            r = httpx.post(url + path, json=_body(path), timeout=30)
            assert _shaped(path, r, 500) == "cannot start the response: RuntimeError: boom"
            r = httpx.post(url + path, json=_body(path), timeout=30)
            assert r.status_code == 200, r.text
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["engine"]["failed"] == failed + 3
    finally:
        del pool.acquire


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the point of the test
def test_health_and_requests_see_a_dead_engine(tokenizer):
    model = ScriptedModel([tokenizer.encode("Hi there.")], max_positions=2048, interrupt_at_call=1)
    app = create_app(model, tokenizer, ServerConfig(model_name="s", default_max_tokens=8))
    with running(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        # KeyboardInterrupt is no Exception: it ends the worker thread
        r = httpx.post(f"{url}/v1/messages", json=_body("/v1/messages"), timeout=30)
        assert _shaped("/v1/messages", r, 503) == "the engine has stopped; see the server log"
        app.state.server.engine.thread.join(10)
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "engine stopped"
        r = httpx.post(f"{url}/v1/chat/completions", json=_body("/v1/chat/completions"), timeout=30)
        assert _shaped("/v1/chat/completions", r, 503).startswith("the engine has stopped")


def test_mis_shaped_cache_file_is_refused_at_load_and_removed(tokenizer, tmp_path):
    """A file whose tensors have the wrong shape is refused by load_cache (every array's shape is
    checked against the model's layout, mlx_v4/cache_file.py) before the forward pass sees it:
    the file is removed with a log line and the request is answered from a fresh prefill."""
    import mlx.core as mx

    from mlx_v4.testing.tiny import random_model, tiny_args

    model = random_model(tiny_args(vocab_size=129280))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 3,
            "temperature": 0, **NO_THINK}
    config = ServerConfig(model_name="tiny", cache_dir=str(tmp_path))
    with running(create_app(model, tokenizer, config)) as url:
        want = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2  # the end of the exchange and its turn start (written at shutdown)
    for f in files:
        arrays, meta = mx.load(str(f), return_metadata=True)
        arrays["0.window.0"] = mx.zeros((1, 3, 5))
        mx.save_safetensors(str(f), arrays, metadata=meta)
    app = create_app(model, tokenizer, config)
    with running(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0] == want
        assert not files[0].exists() or not files[1].exists()  # the file it tried is gone
        assert app.state.server.engine.stats()["failed"] == 0


# ---- 2: prompts far beyond the context ------------------------------------------------------------------

class _Watched:
    """The tokenizer, with its prompt encoding and plain encode watched: ``encoded`` counts whole
    conversations encoded; ``chars`` the characters given to ``encode``. ``meet``: a barrier every
    conversation encode waits at (to prove two run at once)."""

    def __init__(self, tokenizer, meet=None):
        from mlx_v4.server.protocols import prompt_encoding

        self._inner, self.encoded, self.chars, self.meet = tokenizer, 0, 0, meet
        real, watched = prompt_encoding(tokenizer), self

        class Encoding:
            def render_conversation(self, conv):
                return real.render_conversation(conv)

            def encode(self, conv):
                watched.encoded += 1
                if watched.meet is not None:
                    watched.meet.wait()
                return real.encode(conv)

        self._recipe_v4_encoding = Encoding()

    def encode(self, text):
        self.chars += len(text)
        return self._inner.encode(text)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _prepare(tok, text: str, context: int, protocol: str = "chat"):
    import json

    from mlx_v4.server.protocols import PROTOCOLS, conversion_options, prepare

    body = json.dumps({"model": "s", "messages": [{"role": "user", "content": text}], "max_tokens": 4,
                       **NO_THINK}).encode()
    return prepare(PROTOCOLS[protocol], body, tokenizer=tok, options=conversion_options(["s"], context),
                   context=context, default_max_tokens=4)


def test_huge_prompt_is_refused_before_it_is_encoded(tokenizer):
    from mlx_v4.server import prompt_size
    from mlx_v4.server.protocols import ApiError

    text = "All work and no play makes Jack a dull boy.\n" * 50_000  # 2.2 MB, ~550K tokens
    for context, cheap in ((2048, True), (100_000, False)):  # over 128 bytes a token, or counted
        tok = _Watched(tokenizer)
        with pytest.raises(ApiError) as e:
            _prepare(tok, text, context)
        assert e.value.status == 400 and e.value.kind == "context_length_exceeded"
        assert e.value.message.startswith(f"This model's maximum context length is {context} tokens. "
                                          "However, your messages hold at least ")
        assert tok.encoded == 0  # the conversation was never encoded whole
        if cheap:
            assert tok.chars == 0
        else:  # counted in pieces until past the context: a fraction of the text
            assert 0 < tok.chars < 100_000 * 16 < len(text)
            assert int(e.value.message.split("at least ")[1].split()[0]) > context
    # a prompt that fits is encoded once, exactly as before
    tok = _Watched(tokenizer)
    prep = _prepare(tok, "Hello there", 2048)
    assert tok.encoded == 1 and prep.ids == _prepare(tokenizer, "Hello there", 2048).ids
    assert prompt_size.CHUNK == 1 << 16


def test_encoding_runs_outside_any_global_lock(tokenizer):
    """Two requests encode at once (each waits for the other inside the encoder): a large
    prompt does not hold up a small one."""
    import threading

    tok = _Watched(tokenizer, meet=threading.Barrier(2, timeout=30))
    out = {}

    def one(i):
        try:
            out[i] = _prepare(tok, f"Hello number {i}", 2048).ids
        except Exception as e:  # recorded, asserted below
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(v, list) for v in out.values()) and len(out) == 2, out
    assert out[0] == _prepare(tokenizer, "Hello number 0", 2048).ids


def test_prompt_count_only_errs_low(tokenizer, monkeypatch):
    """``tokens_beyond`` against the exact encoding on mixed text (CJK, digits, emoji, special
    spellings, long runs) cut into small pieces: it never counts more tokens than the prompt
    holds, and on text with clean cuts it counts exactly."""
    import random

    import deepseek_recipe as r

    from mlx_v4.server import prompt_size
    from mlx_v4.server.protocols import prompt_encoding

    monkeypatch.setattr(prompt_size, "CHUNK", 40)
    enc, rng = prompt_encoding(tokenizer), random.Random(1)
    words = ["hello", "world", "Ünïcødé", "漢字かな", "1234567", "  ", "\n", "\n\n", " \n", "...", "{[(", "tab\t",
             "é", "x" * 30, "----", "naïve", "🙂", "'s", "<｜User｜>", "<think>", "-=" * 40, "1" * 90]
    exact = 0
    for trial in range(120):
        text = "".join(rng.choice(words) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 150)))
        conv = r.Conversation([r.SystemMessage("Be brief."), r.UserMessage(text)], thinking_mode=bool(trial % 2))
        rendered = enc.render_conversation(conv)
        true = len(enc.encode(conv))
        for limit in (true - 1, true // 2, true // 5):
            got = prompt_size.tokens_beyond(rendered.prompt, rendered.special_ranges, tokenizer, limit)
            assert got is None or limit < got <= true, (got, limit, true, text)
        assert prompt_size.tokens_beyond(rendered.prompt, rendered.special_ranges, tokenizer, true) is None
    for _ in range(40):  # words and newlines only: every cut is clean
        text = "".join(rng.choice(["hello", "world", "naïve", "漢字"]) + rng.choice([" ", "\n"])
                       for _ in range(rng.randint(30, 150)))
        conv = r.Conversation([r.UserMessage(text)], thinking_mode=False)
        rendered = enc.render_conversation(conv)
        true = len(enc.encode(conv))
        exact += prompt_size.tokens_beyond(rendered.prompt, rendered.special_ranges, tokenizer, true - 1) == true
    assert exact == 40


def test_huge_prompt_over_http_is_a_fast_4xx(keyed_server):
    url, app = keyed_server
    h = {"authorization": "Bearer sekrit", "anthropic-version": "2023-06-01"}
    text = "word " * 4_000_000  # 20 MB
    for path in PATHS:
        body = _body(path, text)
        r = httpx.post(url + path, json=body, headers=h, timeout=120)
        assert "This model's maximum context length is 2048 tokens" in _shaped(path, r, 400)
        if path != "/v1/messages":
            assert r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(url + PATHS[0], json=_body(PATHS[0]), headers=h, timeout=30).status_code == 200
