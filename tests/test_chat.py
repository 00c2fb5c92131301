"""Chat: recipe rendering, reply parsing, a session whose history stays in the cache."""

import json

import pytest
from _fake_model import ScriptedModel

from mlx_v4.chat import ChatSession, render_prompt
from mlx_v4.generation import Answer, ContextLengthError, Finish, Reasoning, ToolCall
from mlx_v4.tokenizer import ASSISTANT_ID, END_THINK_ID, EOS_ID, THINK_ID, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _text(events, kind):
    return "".join(e.text for e in events if isinstance(e, kind))


def test_render_prompt_layout(tok):
    msgs = [{"role": "user", "content": "你好"}]
    assert render_prompt(msgs, thinking=False) == "<｜begin▁of▁sentence｜><｜User｜>你好<｜Assistant｜></think>"
    assert render_prompt(msgs, thinking=False, tokenizer=tok) == [0, 128803, 30594, 128804, 128822]
    ids = render_prompt(msgs, thinking=True, tokenizer=tok)
    assert ids[0] == 0 and ids[-3:] == [30594, ASSISTANT_ID, THINK_ID]
    assert "Beyond maximum" in render_prompt(msgs, reasoning_effort="max")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    assert "## Tools" in render_prompt(msgs, tools=tools) and "get_weather" in render_prompt(msgs, tools=tools)
    with pytest.raises(ValueError, match="developer"):
        render_prompt([{"role": "developer", "content": "x"}])


def test_user_text_that_spells_a_special_token_stays_text(tok):
    ids = render_prompt([{"role": "user", "content": "<｜Assistant｜>"}], thinking=False, tokenizer=tok)
    assert ids.count(ASSISTANT_ID) == 1


def _check_cache(session):
    assert session.cache[0].tokens == session.tokens


def test_chat_mode_turns_feed_only_new_tokens(tok):
    replies = [tok.encode("Hello there.") + [EOS_ID], tok.encode("Second answer.") + [EOS_ID]]
    model = ScriptedModel(replies)
    s = ChatSession(model, tok, system="Be brief.", thinking=False, temperature=0.0)
    ev = list(s.send("hi"))
    assert _text(ev, Answer) == "Hello there." and _text(ev, Reasoning) == ""
    assert ev[-1].reason == "stop"
    _check_cache(s)
    assert s.messages[-1] == {"role": "assistant", "content": "Hello there."}
    before, fed_before = s.tokens, model.fed
    ev = list(s.send("again"))
    assert _text(ev, Answer) == "Second answer."
    full = s.render()[: len(s.tokens) - len(replies[1])]  # the turn-2 prompt
    assert full[: len(before)] == before  # what the cache held was a prefix: no rewind
    assert model.fed - fed_before == len(full) - len(before) + len(replies[1])
    assert s.last.fed_tokens == model.fed - fed_before
    _check_cache(s)


def test_thinking_mode_drops_old_reasoning_by_rewinding(tok):
    r1 = tok.encode("Think one.") + [END_THINK_ID] + tok.encode("Answer one.") + [EOS_ID]
    r2 = tok.encode("Think two.") + [END_THINK_ID] + tok.encode("Answer two.") + [EOS_ID]
    model = ScriptedModel([r1, r2])
    s = ChatSession(model, tok, thinking=True, temperature=0.0)
    ev = list(s.send("q1"))
    assert _text(ev, Reasoning) == "Think one." and _text(ev, Answer) == "Answer one."
    assert s.messages[-1]["reasoning_content"] == "Think one."
    tag = len(s.tokens) - len(r1) - 1  # the <think> after the assistant tag
    assert s.tokens[tag - 1] == ASSISTANT_ID and s.tokens[tag] == THINK_ID
    fed_before = model.fed
    ev = list(s.send("q2"))
    assert _text(ev, Answer) == "Answer two."
    prompt2 = s.tokens[: len(s.tokens) - len(r2)]
    # turn 1's reasoning is gone from the cache, exactly as the recipe renders the history
    assert tok.encode("Think one.")[0] not in prompt2[tag:]
    assert prompt2[tag - 1: tag + 1] == [ASSISTANT_ID, END_THINK_ID]
    # only what follows turn 1's assistant tag was refed
    assert model.fed - fed_before == len(prompt2) - tag + len(r2)
    _check_cache(s)


def test_tool_calls_are_parsed_and_results_continue(tok):
    call = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    r1 = tok.encode("Need weather.") + [END_THINK_ID] + tok.encode(call) + [EOS_ID]
    r2 = tok.encode("Done.") + [END_THINK_ID] + tok.encode("It is sunny.") + [EOS_ID]
    tools = [{"name": "get_weather", "description": "Weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    model = ScriptedModel([r1, r2])
    s = ChatSession(model, tok, tools=tools, temperature=0.0)
    ev = list(s.send("Weather in Paris?"))
    calls = [e for e in ev if isinstance(e, ToolCall)]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].parsed_arguments() == {"city": "Paris"}
    assert "DSML" not in _text(ev, Answer)
    assert s.messages[-1]["tool_calls"][0]["name"] == "get_weather"
    ev = list(s.send_tool_results({calls[0].id: "sunny, 21C"}))
    assert _text(ev, Answer) == "It is sunny."
    assert s.messages[-2] == {"role": "tool", "content": "sunny, 21C", "tool_call_id": calls[0].id}
    _check_cache(s)


def test_set_system_refeeds_from_the_first_difference(tok):
    model = ScriptedModel([tok.encode("A.") + [EOS_ID], tok.encode("B.") + [EOS_ID]])
    s = ChatSession(model, tok, system="one", thinking=False, temperature=0.0)
    list(s.send("hi"))
    s.set_system("two")
    fed = model.fed
    list(s.send("hi again"))
    assert model.fed - fed == len(s.tokens)  # everything refed from position 0
    _check_cache(s)


def test_stop_string_in_session(tok):
    model = ScriptedModel([tok.encode("alpha beta gamma") + [EOS_ID], tok.encode("ok") + [EOS_ID]])
    s = ChatSession(model, tok, thinking=False, temperature=0.0, stop="gamma")
    ev = list(s.send("x"))
    assert ev[-1].reason == "stop" and ev[-1].stop_string == "gamma"
    assert _text(ev, Answer).strip() == "alpha beta"
    list(s.send("y"))  # the cached reply differs from its rendering: rewound, still consistent
    _check_cache(s)


def test_interrupt_keeps_session_consistent(tok):
    reply = tok.encode("one two three four five six") + [EOS_ID]
    model = ScriptedModel([reply, tok.encode("fine") + [EOS_ID]], interrupt_at_call=4)
    s = ChatSession(model, tok, thinking=False, temperature=0.0)
    ev = list(s.send("count"))
    assert isinstance(ev[-1], Finish) and ev[-1].reason == "interrupted"
    _check_cache(s)
    assert s.messages[-1]["role"] == "assistant"
    ev = list(s.send("go on"))
    assert ev[-1].reason == "stop" and _text(ev, Answer) == "fine"
    _check_cache(s)


def test_session_context_error(tok):
    model = ScriptedModel([tok.encode("one two three four five six seven eight") + [EOS_ID]], max_positions=12)
    s = ChatSession(model, tok, thinking=False, max_tokens=100, temperature=0.0)
    ev = list(s.send("hi"))  # 5 prompt ids: the reply is clamped to the 7 positions left
    assert ev[-1].reason == "length" and ev[-1].generation_tokens == 7
    with pytest.raises(ContextLengthError, match="max_position_embeddings"):
        list(s.send("hello"))
    assert len(s.messages) == 2 and s.tokens == s.cache[0].tokens


def test_reset(tok):
    model = ScriptedModel([tok.encode("A.") + [EOS_ID]])
    s = ChatSession(model, tok, thinking=False, temperature=0.0)
    list(s.send("hi"))
    s.reset()
    assert s.tokens == [] and s.messages == [] and s.cache[0].tokens == []


def test_save_and_load_with_the_tiny_model(tok, tmp_path):
    from mlx_v4.testing.tiny import random_model, tiny_args

    model = random_model(tiny_args(vocab_size=129280), seed=11)  # room for the real token ids
    s = ChatSession(model, tok, system="sys", thinking=False, temperature=0.0, max_tokens=4)
    list(s.send("a"))
    side = s.save(tmp_path / "chat.safetensors")
    assert json.loads(side.read_text())["messages"] == s.messages
    t = ChatSession.load(tmp_path / "chat.safetensors", model, tok)
    assert t.tokens == s.tokens and t.messages == s.messages and t.system == "sys" and t.max_tokens == 4
    a = [e for e in s.send("b") if isinstance(e, Finish)][0]
    b = [e for e in t.send("b") if isinstance(e, Finish)][0]
    assert a.generated == b.generated and s.tokens == t.tokens


def test_rewinds_on_the_real_cache_match_a_fresh_prefill(tok):
    """Three thinking turns on the tiny model (its random replies never re-render the same, so
    every turn rewinds); the cache must then equal one built from its ids in one go."""
    import mlx.core as mx
    import numpy as np

    from mlx_v4.testing.tiny import random_model, tiny_args

    model = random_model(tiny_args(vocab_size=129280), seed=5)
    s = ChatSession(model, tok, thinking=True, temperature=0.0, max_tokens=5, prefill_step_size=16)
    for q in ("first question", "second", "third one"):
        list(s.send(q))
    prompt = render_prompt(s.conversation()[:-1], thinking=True, tokenizer=tok)  # the last turn's prompt
    assert s.tokens[: len(prompt)] == prompt  # earlier reasoning dropped, as the recipe renders it
    fresh = model.make_cache()
    model(mx.array([s.tokens]), cache=fresh)
    probe = mx.array([[42]])
    a = model(probe, cache=s.cache)
    b = model(probe, cache=fresh)
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)


def test_a_role_tag_ends_the_turn(tok):
    """A model that emits <｜Assistant｜> (or <｜User｜>) instead of EOS has ended its reply."""
    model = ScriptedModel([tok.encode("A class.") + [ASSISTANT_ID] + tok.encode("more text") + [EOS_ID]])
    s = ChatSession(model, tok, thinking=False, temperature=0.0)
    events = list(s.send("What is a class?"))
    answer = "".join(e.text for e in events if isinstance(e, Answer))
    finish = [e for e in events if isinstance(e, Finish)][-1]
    assert answer == "A class." and finish.reason == "stop"


# ---- damaged session files (issue 15, item 8) ---------------------------------------------------

def _good_state():
    return {"format": "mlx-v4-chat", "version": 1,
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "settings": {"system": "sys", "thinking": False, "reasoning_effort": None, "tools": [],
                         "max_tokens": 4, "prefill_step_size": 512, "sampling": {"temperature": 0.0}}}


def _with(path, value):
    state = _good_state()
    *parents, last = path
    node = state
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return state


@pytest.mark.parametrize("state, words", [
    ([1, 2], "not an mlx-v4 chat session file"),
    ("text", "not an mlx-v4 chat session file"),
    (_with(["version"], 7), "chat session version 7, this mlx-v4 reads 1"),
    (_with(["settings"], KeyError), "missing field 'settings'"),
    (_with(["messages"], KeyError), "missing field 'messages'"),
    (_with(["settings"], [1]), "field 'settings' must be an object, not list"),
    (_with(["settings", "max_tokens"], "4"), "field 'settings.max_tokens' must be int, not str"),
    (_with(["settings", "max_tokens"], True), "field 'settings.max_tokens' must be int, not bool"),
    (_with(["settings", "max_tokens"], 0), "field 'settings.max_tokens' must be positive, got 0"),
    (_with(["settings", "thinking"], "yes"), "field 'settings.thinking' must be bool, not str"),
    (_with(["settings", "colour"], "red"), "unknown field 'settings.colour'"),
    (_with(["settings", "sampling"], 3), "field 'settings.sampling' must be dict, not int"),
    (_with(["settings", "sampling", "temperature"], "hot"),
     "field 'settings.sampling.temperature' must be int or float or null, not str"),
    (_with(["settings", "sampling", "beam"], 2), "unknown field 'settings.sampling.beam'"),
    (_with(["settings", "tools"], [{"type": "function", "function": {}}]),
     "field 'settings.tools[0]': tool definition needs a function name"),
    (_with(["messages"], {"role": "user"}), "field 'messages' must be a list, not dict"),
    (_with(["messages"], ["hi"]), "field 'messages[0]' must be an object with a string 'role'"),
    (_with(["messages"], [{"role": "wizard", "content": "x"}]), "field 'messages[0]': unknown message role"),
    (_with(["messages"], [{"role": "user", "content": 5}]), "field 'messages[0].content' must be a string"),
    (_with(["messages"], [{"role": "assistant", "content": "x", "tool_calls": [{"id": 1}]}]),
     "field 'messages[0]': missing key 'name'"),
])
def test_damaged_session_file_is_one_clear_error(tmp_path, state, words):
    from mlx_v4.chat import SessionFileError

    (tmp_path / "s.json").write_text(json.dumps(state))
    with pytest.raises(SessionFileError) as err:
        ChatSession.load(tmp_path / "s.safetensors", None, None)  # refused before the model is used
    assert str(err.value).startswith(f"{tmp_path / 's.json'}: ") and words in str(err.value), str(err.value)


def test_unreadable_session_file(tmp_path):
    from mlx_v4.chat import SessionFileError, read_session_file

    (tmp_path / "s.json").write_text('{"format": "mlx-v4-chat", ')
    with pytest.raises(SessionFileError, match=r"s\.json: cannot read the chat session file"):
        read_session_file(tmp_path / "s.json")
    (tmp_path / "s.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SessionFileError, match=r"s\.json: cannot read the chat session file"):
        read_session_file(tmp_path / "s.json")
    with pytest.raises(SessionFileError, match=r"missing\.json: cannot read"):
        read_session_file(tmp_path / "missing.json")
    state = _good_state()
    (tmp_path / "s.json").write_text(json.dumps(state))
    settings, sampling, messages = read_session_file(tmp_path / "s.json")
    assert sampling == {"temperature": 0.0} and messages == state["messages"]
    assert settings == {k: v for k, v in state["settings"].items() if k != "sampling"}
