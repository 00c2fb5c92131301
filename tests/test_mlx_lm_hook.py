"""mlx_v4.mlx_lm_hook: a conversion opens in the real mlx-lm. mlx_lm.load builds the very model
mlx_v4.load builds (same parameters and dtypes), greedy tokens agree, the chat template renders
exactly as deepseek-recipe's DeepseekV4Encoding (render_prompt), mlx_lm.server answers, and a
missing mlx-v4 install is one clear error. On the demo and on a synthetic official-format
checkpoint, both converted with the lossless ``native`` recipe."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_v4.quantize import convert

import mlx_v4
from mlx_v4.chat import render_prompt
from mlx_v4.generation import Token, stream_generate
from mlx_v4.mlx_lm_hook import HOOK_FILE
from mlx_v4.testing import official
from mlx_v4.testing.tiny import TINY_CONFIG


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"demo": conversion of the bundled demo, "official": of a tiny FP8/FP4 release}."""
    root = tmp_path_factory.mktemp("mlx_lm")
    raw = official.random_official_weights(TINY_CONFIG, seed=5)
    official.write_official_checkpoint(root / "src", TINY_CONFIG, raw, max_shard_bytes=1 << 19)
    return {"demo": convert(mlx_v4.DEMO_MODEL_PATH, root / "demo", recipe="native", progress=False).path,
            "official": convert(root / "src", root / "official", recipe="native", progress=False).path}


@pytest.fixture(scope="module")
def loaded(dirs):
    cache = {}

    def get(which):
        if which not in cache:
            cache[which] = mlx_lm.load(str(dirs[which]), trust_remote_code=True), mlx_v4.load(dirs[which])
        return cache[which]
    return get


KINDS = ["demo", "official"]


# ---- the directory -------------------------------------------------------------------------------
@pytest.mark.parametrize("which", KINDS)
def test_directory_is_complete(dirs, which):
    d = dirs[which]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_file"] == HOOK_FILE and (d / HOOK_FILE).is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"):
        assert (d / name).is_file(), name
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert "chat_template" not in tc and tc["add_bos_token"] is False
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    if which == "official":  # the source's own tokenizer_config is kept (here: none, so the bundled one)
        assert tc["model_max_length"] == 1048576
    card = (d / "README.md").read_text()
    assert "from mlx_lm import load" in card and "trust_remote_code=True" in card and "mlx_v4.load" in card
    assert "--trust-remote-code" in card


def test_needs_trust_remote_code(dirs):
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(dirs["demo"]))


def test_hook_without_mlx_v4_says_how_to_install(dirs):
    code = ("import sys, runpy; sys.modules['mlx_v4'] = None; "
            f"runpy.run_path({str(dirs['demo'] / HOOK_FILE)!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "needs the mlx-v4 package" in r.stderr and "-m pip install -e ." in r.stderr, r.stderr[-800:]


# ---- the model mlx-lm builds -----------------------------------------------------------------------
@pytest.mark.parametrize("which", KINDS)
def test_mlx_lm_builds_mlx_v4s_model(loaded, which):
    (m, _), (ours, _) = loaded(which)
    got, want = dict(tree_flatten(m.parameters())), dict(tree_flatten(ours.parameters()))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]), k
    x = mx.array([[0, 128803, 1234, 5, 128804]]) if which == "demo" else mx.array([[0, 5, 17, 300, 9]])
    assert mx.array_equal(m(x), ours(x))


@pytest.mark.parametrize("which", KINDS)
def test_greedy_tokens_match(loaded, which):
    (m, tok), (ours, our_tok) = loaded(which)
    messages = [{"role": "user", "content": "What is a list?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    if which == "official":  # random weights over a 1024-token vocabulary: feed ids it has
        ids = [i % TINY_CONFIG["vocab_size"] for i in ids]
    theirs = [r.token for r in mlx_lm.stream_generate(m, tok, ids, max_tokens=10)]  # greedy by default
    mine = [e.id for e in stream_generate(ours, our_tok, ids, max_tokens=10, temperature=0.0)
            if isinstance(e, Token)]
    assert len(theirs) >= 3 and theirs == mine[:len(theirs)]


# ---- the chat template -----------------------------------------------------------------------------
def _u(t):
    return {"role": "user", "content": t}


def _a(t, r=None):
    return {"role": "assistant", "content": t} | ({"reasoning_content": r} if r is not None else {})


CONVERSATIONS = [
    [_u("Hello")],
    [{"role": "system", "content": "Be brief."}, _u("Hi"), _a("Hello!", "greet"), _u("What is 2+2?")],
    [_u("a"), _a("b", "think b"), _u("c"), _a("d"), _u("e")],
    [{"role": "system", "content": "S1"}, _u("x"), {"role": "system", "content": "S2"}, _u(""), _u("y")],
    [_u("q"), {"role": "latest_reminder", "content": "be terse"}, _u("again")],
]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("effort", [None, "low", "high", "xhigh", "max"])
def test_template_equals_render_prompt(loaded, thinking, effort):
    (_, tok), (_, our_tok) = loaded("demo")
    for conv in CONVERSATIONS:
        want = render_prompt(conv, thinking=thinking, reasoning_effort=effort)
        got = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, enable_thinking=thinking,
                                      reasoning_effort=effort)
        assert got == want, conv
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=thinking,
                                      reasoning_effort=effort)
        assert ids == render_prompt(conv, thinking=thinking, reasoning_effort=effort, tokenizer=our_tok)


def test_template_defaults_and_errors(loaded):
    (_, tok), _ = loaded("demo")
    conv = CONVERSATIONS[1]
    # mlx-lm passes enable_thinking=True itself (the vocabulary has <think>): thinking is the default
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == render_prompt(conv)
    no_prompt = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False, enable_thinking=False)
    assert no_prompt + "<｜Assistant｜></think>" == render_prompt(conv, thinking=False)
    for bad, match in (([{"role": "developer", "content": "d"}], "developer"),
                       ([{"role": "wizard", "content": "d"}], "unknown message role")):
        with pytest.raises(Exception, match=match):
            tok.apply_chat_template(bad, tokenize=False, add_generation_prompt=True)
    with pytest.raises(Exception, match="reasoning_effort"):
        tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, reasoning_effort="medium")
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    with pytest.raises(Exception, match="arguments must be an object"):
        tok.apply_chat_template([_u("q"), call], tokenize=False, add_generation_prompt=True)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city (é)",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "f"}}]
TEXTS = ["hi", "é ü", "x\ny", "", "<b>", "a  b", "数学", "0"]
VALUES = ["s", "", 1, 2.5, True, None, [1, "a"], {"k": "v", "n": [1]}, "é"]


def _random_conversation(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(render_prompt's messages, the same in OpenAI form with dict arguments, as mlx_lm.server
    passes them): systems anywhere, reminders, multi-turn, reasoning None/empty/text, parallel
    tool calls with ids past 9 (the recipe orders calls by id) answered in shuffled order."""
    ours, oai, n = [], [], 0

    def add(m, o=None):
        ours.append(m)
        oai.append(m if o is None else o)

    def text():
        return rng.choice(TEXTS) + rng.choice(TEXTS)

    for _ in range(rng.randint(0, 2)):
        add({"role": "system", "content": text()})
    for turn in range(rng.randint(1, 4)):
        if rng.random() < 0.15:
            add({"role": "latest_reminder", "content": text()})
        add(_u(text()))
        if rng.random() < 0.1:
            add({"role": "system", "content": text()})
        if turn == 3 or rng.random() < 0.2:
            break
        for _ in range(rng.randint(1, 2)):
            calls = []
            if rng.random() < 0.5:
                for _ in range(rng.randint(1, 3)):
                    n += 1
                    calls.append((f"call_{n}", rng.choice(["f", "get_weather"]),
                                  {f"p{i}": rng.choice(VALUES) for i in range(rng.randint(0, 3))}))
            m = _a(text(), rng.choice([None, "", "think " + text()]))
            o = dict(m)
            if calls:
                m["tool_calls"] = [{"id": i, "name": f, "arguments": json.dumps(a)} for i, f, a in calls]
                o["tool_calls"] = [{"id": i, "type": "function", "function": {"name": f, "arguments": a}}
                                   for i, f, a in calls]
            add(m, o)
            if not calls:
                break
            for i, _, _ in rng.sample(calls, len(calls)):
                add({"role": "tool", "content": text(), "tool_call_id": i})
            if rng.random() < 0.3:
                add(_u(text()))
    return ours, oai


def test_template_equals_render_prompt_random_conversations_with_tools(loaded):
    (_, tok), _ = loaded("demo")
    for seed in range(250):
        rng = random.Random(seed)
        ours, oai = _random_conversation(rng)
        thinking, effort = rng.random() < 0.5, rng.choice([None, "low", "high", "xhigh", "max"])
        tools = TOOLS if rng.random() < 0.5 else None
        want = render_prompt(ours, thinking=thinking, reasoning_effort=effort, tools=tools)
        got = tok.apply_chat_template(oai, tokenize=False, add_generation_prompt=True, enable_thinking=thinking,
                                      reasoning_effort=effort, tools=tools)
        assert got == want, f"seed {seed}"


# ---- mlx_lm.server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


@pytest.mark.slow
def test_mlx_lm_server_answers_a_chat_completion(dirs, loaded, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(dirs["demo"]),
                             "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlx_lm.server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        messages = [{"role": "user", "content": "What is a list?"}]
        status, body = _post(f"http://127.0.0.1:{port}/v1/chat/completions",
                             {"messages": messages, "max_tokens": 6, "temperature": 0.0,
                              "chat_template_kwargs": {"enable_thinking": False}}, timeout=120)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    (m, tok), _ = loaded("demo")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert body["usage"]["prompt_tokens"] == len(ids)
    want = "".join(r.text for r in mlx_lm.stream_generate(m, tok, ids, max_tokens=6))
    assert body["choices"][0]["message"]["content"] == want


@pytest.mark.slow
def test_mlx_lm_generate_command(dirs, loaded):
    messages = [{"role": "user", "content": "What is a list?"}]
    r = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(dirs["demo"]),
                        "--trust-remote-code", "--prompt", messages[0]["content"], "--max-tokens", "6",
                        "--chat-template-config", '{"enable_thinking": false}'],
                       capture_output=True, text=True, timeout=180, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    (m, tok), _ = loaded("demo")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    want = "".join(x.text for x in mlx_lm.stream_generate(m, tok, ids, max_tokens=6))
    assert r.stdout.split("==========")[1].strip() == want.strip()
    assert f"Prompt: {len(ids)} tokens" in r.stdout
