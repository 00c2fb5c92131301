"""Chat with a DeepSeek V4.1 model: deepseek-recipe's V4.1 encoding, and image inputs refused."""

from pathlib import Path

import mlx.core as mx
import pytest

import mlx_v4
from mlx_v4.chat import ChatSession, model_version, render_prompt

MODEL = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"


@pytest.fixture(scope="module")
def loaded():
    return mlx_v4.load(MODEL, dtype=mx.float32)


def test_session_renders_the_v41_encoding(loaded):
    model, tokenizer = loaded
    assert model_version(model) == "v41"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    # V4.1 tags the system prompt; V4 does not
    assert render_prompt(conversation, thinking=False, version="v41") == (
        "<｜begin▁of▁sentence｜><｜System｜>Be brief.<｜User｜>hi<｜Assistant｜></think>")
    assert render_prompt(conversation, thinking=False) == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>hi<｜Assistant｜></think>"
    assert render_prompt(conversation[1:], version="v41").startswith(
        "<｜begin▁of▁sentence｜><｜System｜>Reasoning Effort: 75 (range 1-100")
    # The fixture has no tokenizer.json, so the bundled V4 one (no <｜System｜> token) stands in;
    # a session without a system prompt in non-thinking mode needs none.
    session = ChatSession(model, tokenizer, thinking=False)
    ids = session.render([{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids) == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>"


def test_image_inputs_are_refused(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    with pytest.raises(ValueError, match=r"image inputs are not supported: mlx-v4 runs the text model only"):
        list(session.send(image))


def test_token_outside_the_vocabulary_is_named(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="token id 600 is outside the model's vocabulary of 512"):
        model(mx.array([[1, 600]]))


def test_session_save_and_resume(loaded, tmp_path):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, thinking=False, max_tokens=3, temperature=0)
    session.cache, session._tokens = model.make_cache(), []
    ids = session.render([{"role": "user", "content": "hi"}])
    model(mx.array([[i % model.args.vocab_size for i in ids]]), session.cache)  # the tiny vocabulary
    session._tokens = list(ids)
    session.messages = [{"role": "user", "content": "hi"}]
    session.save(tmp_path / "s.safetensors")
    resumed = ChatSession.load(tmp_path / "s.safetensors", model, tokenizer)
    assert resumed.tokens == list(ids) and resumed.messages == session.messages
    assert resumed.cache.offset == len(ids)
    step = mx.array([[7]])
    assert (model(step, resumed.cache) == model(step, session.cache)).all()


def test_server_renders_v41_requests_with_the_v41_encoding(tmp_path):
    """`mlx-v4 serve` with a V4.1 model converts requests for ModelVersion.DeepseekV41Flash.
    The bundled V4 tokenizer has no <｜System｜> token, so one is added for the test."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    from mlx_v4.server.protocols import PROTOCOLS, ApiError, conversion_options, prepare
    from mlx_v4.tokenizer import Tokenizer, bundled_tokenizer_path

    body = json.dumps({"model": "m", "thinking": {"type": "disabled"},
                       "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]})
    with pytest.raises(ApiError, match="<｜System｜>"):  # V4.1's system tag, absent from V4's tokenizer
        prepare(PROTOCOLS["chat"], body.encode(), tokenizer=Tokenizer(bundled_tokenizer_path()),
                options=conversion_options(["m"], 4096, "v41"), context=4096, default_max_tokens=16)
    hf = HFTokenizer.from_file(str(bundled_tokenizer_path()))
    hf.add_special_tokens(["<｜System｜>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path / "tokenizer.json")
    for version, want in (("v41", "<｜begin▁of▁sentence｜><｜System｜>Be brief.<｜User｜>hi<｜Assistant｜></think>"),
                          ("v4", "<｜begin▁of▁sentence｜>Be brief.<｜User｜>hi<｜Assistant｜></think>")):
        p = prepare(PROTOCOLS["chat"], body.encode(), tokenizer=tokenizer,
                    options=conversion_options(["m"], 4096, version), context=4096, default_max_tokens=16)
        assert tokenizer.decode(p.ids) == want
