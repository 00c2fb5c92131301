"""The V4 tokenizer wrapper: ids from the architecture notes, streaming detokenization."""

import shutil

import pytest

from mlx_v4.tokenizer import (
    ASSISTANT_ID,
    BOS_ID,
    END_THINK_ID,
    EOS_ID,
    THINK_ID,
    USER_ID,
    TokenizerError,
    bundled_tokenizer_path,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.think_id, tok.end_think_id) == (
        0, 1, 128803, 128804, 128821, 128822)
    assert (BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID, THINK_ID, END_THINK_ID) == (0, 1, 128803, 128804, 128821, 128822)
    assert tok.token_to_id("｜DSML｜") == 128825
    assert tok.is_special(USER_ID) and not tok.is_special(30594)


def test_architecture_doc_example(tok):
    text = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
    ids = tok.encode(text)
    assert ids == [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "你好推理答案"


def test_no_bos_added(tok):
    assert tok.encode("hi")[0] != BOS_ID


@pytest.mark.parametrize("text", ["héllo 😀 世界", "naïve café — ok", "🇫🇷🧑‍💻 done", "plain ascii text\n"])
def test_streaming_detokenizer_matches_full_decode(tok, text):
    ids = tok.encode(text)
    d = tok.detokenizer()
    pieces = []
    for i in ids:
        d.add_token(i)
        seg = d.last_segment
        assert "\ufffd" not in seg
        pieces.append(seg)
    d.finalize()
    pieces.append(d.last_segment)
    assert "".join(pieces) == text == d.text


def test_model_dir_tokenizer_preferred(tmp_path):
    shutil.copy(bundled_tokenizer_path(), tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).path == tmp_path / "tokenizer.json"
    assert load_tokenizer(tmp_path / "nowhere").path == bundled_tokenizer_path()


def test_not_a_v4_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
