"""The first implementation of :func:`mlx_v4.v41.engram_hash.compressed_token_map`, kept as the
reference the lean one is tested against (bit for bit) and benchmarked beside: every id decoded
in one batch, normalised, the lookup a tuple of Python ints. Same normaliser chain as the
official ``build_compressed_token_map`` (V4.1 ``inference/engram.py``)."""

from __future__ import annotations


def reference_compressed_token_map(tokenizer_file: str) -> tuple[tuple[int, ...], int]:
    from tokenizers import Regex, Tokenizer, normalizers

    sentinel = "\ue000"  # keeps a lone space from stripping to "" and merging with others
    normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), sentinel),
        normalizers.Strip(), normalizers.Replace(sentinel, " "),
    ])
    tok = Tokenizer.from_file(tokenizer_file)
    key_to_new: dict[str, int] = {}
    lookup = []
    n = tok.get_vocab_size(with_added_tokens=True)
    texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    for token_id, text in enumerate(texts):
        if "\ufffd" in text:
            key = tok.id_to_token(token_id)
        else:
            normalized = normalizer.normalize_str(text)
            key = normalized if normalized else text
        lookup.append(key_to_new.setdefault(key, len(key_to_new)))
    return tuple(lookup), len(key_to_new)
