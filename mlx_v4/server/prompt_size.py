"""Refusing a prompt that cannot fit the context before encoding it in full.

Encoding a 50 MB prompt takes tens of seconds and gigabytes, all to learn that it is too long.
:func:`tokens_beyond` answers first, from the rendered prompt:

1. Each token is at least one byte, so a prompt of at most ``limit`` UTF-8 bytes fits: the
   answer for every ordinary request, at the cost of one length.
2. No token is longer than the vocabulary's longest spelling (128 bytes for V4), so a prompt
   of more than ``128 * limit`` bytes cannot fit.
3. Otherwise the text between special tokens is tokenized in 64K-character pieces, stopping
   as soon as the count passes ``limit``: the work is bounded by the context, not the body.

Pieces are cut where the V4 pre-tokenizer always splits (after a newline that precedes a
non-space, or before a space between two letters), so their counts add up to the count of the
whole; a piece with no such place is cut anywhere and the count is lowered by ``SLACK`` per such
cut. Special-token spellings inside plain text count as one token here and several when
encoded, so the count only errs low: a prompt is refused only when it cannot fit.
"""

from __future__ import annotations

import re

CHUNK = 1 << 16  # characters per piece
SLACK = 8  # tokens a cut inside a pre-tokenizer word may add
_CUT = re.compile(r"\n(?=\S)|(?<=[^\W\d_]) (?=[^\W\d_])")


def longest_token_bytes(tokenizer) -> int:
    """The longest spelling in ``tokenizer``'s vocabulary, in UTF-8 bytes (computed once)."""
    n = getattr(tokenizer, "_longest_token_bytes", None)
    if n is None:
        size = getattr(tokenizer, "vocab_size", None) or len(tokenizer._tok.get_vocab())
        n = max(len(tokenizer.decode([i]).encode("utf-8", "surrogatepass")) for i in range(size))
        n = max(n, 1)
        tokenizer._longest_token_bytes = n
    return n


def _pieces(text: str):
    """``text`` in pieces of about CHUNK characters: (piece, whether its end is a clean cut)."""
    start = 0
    while len(text) - start > 2 * CHUNK:
        m = _CUT.search(text, start + CHUNK, start + 2 * CHUNK)
        if m is None:
            yield text[start:start + CHUNK], False
            start += CHUNK
        else:
            cut = m.end() if m.group() == "\n" else m.start()
            yield text[start:cut], True
            start = cut
    yield text[start:], True


def tokens_beyond(prompt: str, special_ranges, tokenizer, limit: int) -> int | None:
    """A count ``n > limit`` of tokens that ``prompt`` (rendered, with ``special_ranges`` as
    code-point ranges of special tokens) certainly holds, or None when it may fit."""
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return None
    if size // longest_token_bytes(tokenizer) > limit:
        return size // longest_token_bytes(tokenizer)
    count, loose, pos = len(special_ranges), 0, 0
    for start, end in [*special_ranges, (len(prompt), len(prompt))]:
        for piece, clean in _pieces(prompt[pos:start]):
            count += len(tokenizer.encode(piece))
            loose += not clean
            if count - SLACK * loose > limit:
                return count - SLACK * loose
        pos = end
    return None
