"""`mlx-v4 serve` end to end: the real openai and anthropic clients against the server on
loopback, with a tiny random model (real vocabulary and tokenizer) and a scripted model whose
replies (DSML tool calls included) are forced token by token."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")

from _fake_model import ScriptedModel  # noqa: E402

from mlx_v4.server import ServerConfig, create_app  # noqa: E402
from mlx_v4.server.background import running  # noqa: E402
from mlx_v4.tokenizer import load_tokenizer  # noqa: E402

NO_THINK = {"thinking": {"type": "disabled"}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
DSML_CALL = ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
             "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
             "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from mlx_v4.testing.tiny import random_model, tiny_args

    model = random_model(tiny_args(vocab_size=129280))
    app = create_app(model, tokenizer, ServerConfig(model_name="tiny", default_max_tokens=8))
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def scripted(tokenizer):
    replies = [tokenizer.encode("Let me check." + DSML_CALL), tokenizer.encode("It is sunny in Paris. Bye.")]
    model = ScriptedModel(replies, max_positions=2048)
    app = create_app(model, tokenizer, ServerConfig(model_name="scripted", default_max_tokens=64, api_key="sekrit"))
    with running(app) as url:
        yield url, app, model


def oai(url, key="x"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def ant(url, key="x"):
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=60)


# ---- plain chat on the tiny model ---------------------------------------------------------------

def test_chat_plain_stream_and_prefix_reuse(tiny):
    url, app = tiny
    c = oai(url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, extra_body=NO_THINK)
    choice = first.choices[0]
    assert choice.finish_reason == "length" and choice.message.content
    assert first.usage.completion_tokens == 6 and first.usage.prompt_tokens > 5
    # the same prompt again reuses all but its last id, and greedy output is unchanged
    again = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, extra_body=NO_THINK)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    # streamed: same text, usage on the last chunk
    parts, usage, reason = [], None, None
    for ch in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                        extra_body=NO_THINK, stream=True):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            reason = ch.choices[0].finish_reason or reason
        usage = ch.usage or usage
    assert "".join(parts) == choice.message.content and reason == "length"
    assert usage.completion_tokens == 6
    # next turn: the earlier conversation's cache is reused (cached > 0) and gives the same
    # greedy reply as a server that never saw it would (checked against a cold pool)
    msgs2 = msgs + [{"role": "assistant", "content": choice.message.content}, {"role": "user", "content": "More"}]
    warm = c.chat.completions.create(model="tiny", messages=msgs2, max_tokens=5, temperature=0, extra_body=NO_THINK)
    assert warm.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    app.state.server.engine.call(app.state.server.pool.clear)
    cold = c.chat.completions.create(model="tiny", messages=msgs2, max_tokens=5, temperature=0, extra_body=NO_THINK)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == warm.choices[0].message.content


def test_messages_and_responses(tiny):
    url, _ = tiny
    a = ant(url)
    m = a.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "Hi"}],
                          thinking={"type": "disabled"}, extra_body={"temperature": 0})
    assert m.stop_reason == "max_tokens" and m.content[0].type == "text" and m.usage.output_tokens == 5
    c = oai(url)
    r = c.responses.create(model="tiny", input="Hi", max_output_tokens=4)
    assert r.status == "incomplete" and r.usage.output_tokens == 4
    assert r.output[0].type == "reasoning"
    # same thinking-mode prompt as the Responses request: its cache is reused
    with a.messages.stream(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]) as st:
        final = st.get_final_message()
    assert final.content[0].type == "thinking" and final.usage.cache_read_input_tokens > 0
    events = [e.type for e in c.responses.create(model="tiny", input="Hi", max_output_tokens=4, stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.incomplete"
    models = c.models.list()
    assert [x.id for x in models.data][0] == "tiny"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


# ---- forced output: tool calls and stop sequences -----------------------------------------------

def test_openai_tool_call_round_trip(scripted):
    url, _, _ = scripted
    c = oai(url, "sekrit")
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER], extra_body=NO_THINK)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check."
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    msgs += [ch.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
    r2 = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER], extra_body=NO_THINK)
    assert r2.choices[0].message.content == "It is sunny in Paris. Bye." and r2.choices[0].finish_reason == "stop"
    assert r2.usage.prompt_tokens_details.cached_tokens > r.usage.prompt_tokens // 2
    # streamed tool call deltas assemble into the same call
    args, name = "", None
    for chunk in c.chat.completions.create(model="scripted", messages=msgs[:1], tools=[WEATHER], stream=True,
                                           extra_body=NO_THINK):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
    assert name == "get_weather" and json.loads(args) == {"city": "Paris"}


def test_anthropic_tool_use_round_trip(scripted):
    url, _, _ = scripted
    a = ant(url, "sekrit")
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER["function"]["parameters"]}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    m = a.messages.create(model="scripted", max_tokens=200, messages=msgs, tools=tools, thinking={"type": "disabled"})
    assert m.stop_reason == "tool_use"
    use = [b for b in m.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    with a.messages.stream(model="scripted", max_tokens=200, messages=msgs, tools=tools,
                           thinking={"type": "disabled"}) as st:
        final = st.get_final_message()
    assert final.content[-1].text == "It is sunny in Paris. Bye." and final.stop_reason == "end_turn"
    # Responses: the call comes back as a function_call item
    r = oai(url, "sekrit").responses.create(model="scripted", input="Weather in Paris?", reasoning={"effort": "none"},
                                            tools=[{"type": "function", **WEATHER["function"]}])
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}


def test_stop_sequence(scripted):
    url, _, _ = scripted
    c = oai(url, "sekrit")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, stop=["sunny"], extra_body=NO_THINK)
    assert r.choices[0].message.content == "It is " and r.choices[0].finish_reason == "stop"
    m = ant(url, "sekrit").messages.create(model="scripted", max_tokens=50, messages=msgs, stop_sequences=["Paris"],
                                           thinking={"type": "disabled"})
    assert m.stop_reason == "stop_sequence" and m.content[0].text == "It is sunny in "


# ---- errors ---------------------------------------------------------------------------------------

def test_errors_in_each_protocols_shape(scripted):
    url, _, _ = scripted
    h = {"Authorization": "Bearer sekrit", "content-type": "application/json"}
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/messages", content=b"[1, 2]", headers={**h, "anthropic-version": "2023-06-01"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    with pytest.raises(openai.NotFoundError):
        oai(url, "sekrit").chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        oai(url, "wrong").chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.AuthenticationError):
        ant(url, "wrong").messages.create(model="scripted", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai(url, "sekrit").chat.completions.create(model="scripted", temperature=7,
                                                   messages=[{"role": "user", "content": "x"}], extra_body=NO_THINK)
    long = "word " * 2500  # beyond the scripted model's 2048 positions
    with pytest.raises(openai.BadRequestError) as e:
        oai(url, "sekrit").chat.completions.create(model="scripted", messages=[{"role": "user", "content": long}])
    assert e.value.status_code == 400
    with pytest.raises(anthropic.BadRequestError):
        ant(url, "sekrit").messages.create(model="scripted", max_tokens=10, messages=[{"role": "user", "content": long}])
    with pytest.raises(openai.BadRequestError):
        oai(url, "sekrit").responses.create(model="scripted", input=long)
    assert httpx.get(f"{url}/health", headers=h).json()["engine"]["failed"] == 0


# ---- disconnects ----------------------------------------------------------------------------------

def test_disconnect_stops_generation(tokenizer):
    model = ScriptedModel([tokenizer.encode("tick " * 400)], max_positions=4096,
                          on_call=lambda m: time.sleep(0.01))
    app = create_app(model, tokenizer, ServerConfig(model_name="s", default_max_tokens=400))
    engine = app.state.server.engine
    with running(app) as url:
        body = {"model": "s", "messages": [{"role": "user", "content": "go"}], "stream": True, **NO_THINK}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 5:
                    break
        t0 = time.monotonic()
        while engine.stats()["active"] and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert engine.stats()["active"] == 0 and engine.stats()["cancelled"] == 1
        assert model.calls < 200  # stopped long before 400 tokens
        # the slot is free: a new request is answered
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---- the command ----------------------------------------------------------------------------------

def test_cli_serve_flags():
    from mlx_v4.cli.app import app
    from mlx_v4.cli.serve import is_loopback, parse_bytes
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "--api-key" in r.output
    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512mb") == 512 << 20 and parse_bytes("100") == 100
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
