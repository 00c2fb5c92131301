"""Engram n-gram hashing (DeepSeek V4.1, official ``inference/engram.py``), on the host in numpy.

Each position is hashed as the 2-gram .. ``max_ngram_size``-gram ending there, over a
*compressed* token id space in which tokens that normalise alike (NFKC, NFD, accents stripped,
lower case, whitespace runs collapsed) share one id. Every (n-gram size, head) pair owns a
disjoint prime-sized bucket range of the layer's table: primes are drawn upwards from
``engram_vocab_size`` and never reused, across layers too. The (i+1)-gram hash is the running
XOR of ``token * multiplier`` over i look-backs (odd int64 multipliers from
``default_rng(10007 * layer)``, bounded so the product cannot overflow), taken modulo its prime
and offset to its range. Look-back stops at the sequence start, where the compressed pad token
(that of ``engram_pad_token_id``) fills in.

Everything here is exact integer arithmetic, so it is bit-identical to the reference.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


@dataclass(frozen=True)
class EngramLayout:
    """Bucket layout of the hash tables: ``primes[layer][ngram - 2][head]``."""

    layer_ids: tuple[int, ...]
    max_ngram_size: int
    n_heads: int
    head_dim: int
    primes: tuple[tuple[tuple[int, ...], ...], ...]

    @classmethod
    def build(cls, layer_ids, max_ngram_size: int, n_heads: int, head_dim: int, vocab_size: int) -> EngramLayout:
        primes, seen = [], set()
        for _ in layer_ids:
            per_ngram = []
            for _ in range(max_ngram_size - 1):
                sizes, current = [], vocab_size - 1
                for _ in range(n_heads):
                    current += 1
                    while not _is_prime(current) or current in seen:
                        current += 1
                    seen.add(current)
                    sizes.append(current)
                per_ngram.append(tuple(sizes))
            primes.append(tuple(per_ngram))
        return cls(tuple(layer_ids), max_ngram_size, n_heads, head_dim, tuple(primes))

    @property
    def n_cols(self) -> int:
        """Rows fetched per position and layer: (max_ngram_size - 1) * n_heads."""
        return (self.max_ngram_size - 1) * self.n_heads

    def table_rows(self) -> list[int]:
        """Rows each layer's table needs: the sum of its primes."""
        return [sum(p for per_ngram in layer for p in per_ngram) for layer in self.primes]


def hash_multipliers(layer_ids, max_ngram_size: int, compressed_vocab_size: int) -> np.ndarray:
    """[n_layers, max_ngram_size] odd int64 multipliers (the reference's RNG draws, exactly)."""
    bound = max(1, (np.iinfo(np.int64).max // compressed_vocab_size) // 2)
    rows = []
    for layer in layer_ids:
        rng = np.random.default_rng(10007 * layer)
        rows.append(rng.integers(low=0, high=bound, size=(max_ngram_size,), dtype=np.int64) * 2 + 1)
    return np.stack(rows)


#: Bump when the map's recipe changes: maps cached by another version are rebuilt.
TOKEN_MAP_VERSION = 1
#: Token ids decoded and normalised per batch while the map is built (bounds the transient memory).
TOKEN_MAP_CHUNK = 4096


@lru_cache(maxsize=4)
def compressed_token_map(tokenizer_file: str) -> tuple[np.ndarray, int]:
    """token id -> compressed id for every id of ``tokenizer.json`` (a read-only int32 array),
    and the compressed size.

    Built once per tokenizer file (:func:`build_compressed_token_map`) and kept in our cache
    directory, ``$MLX_V4_HOME/engram`` (default ``~/.cache/mlx-v4/engram``), keyed by the file's
    SHA-256 and the ``tokenizers`` version; later loads read 4 bytes per id from there instead
    of loading a second tokenizer and normalising every token (~80 MB and seconds). Nothing is
    written next to the model; a cache that cannot be written or read back is rebuilt."""
    path = _cached_map_path(tokenizer_file)
    found = _read_cached_map(path)
    if found is None:
        found = build_compressed_token_map(tokenizer_file)
        _write_cached_map(path, *found)
    lookup, size = found
    lookup.flags.writeable = False  # shared by every model built from this file
    return lookup, size


def build_compressed_token_map(tokenizer_file: str) -> tuple[np.ndarray, int]:
    """The map itself: the same normaliser chain as the reference (``build_compressed_token_map``),
    from the same ``tokenizers`` library; partial UTF-8 byte tokens are keyed by their raw form.
    Ids are decoded and normalised TOKEN_MAP_CHUNK at a time, into an int32 array."""
    from tokenizers import Regex, Tokenizer, normalizers

    sentinel = "\ue000"  # keeps a lone space from stripping to "" and merging with others
    normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), sentinel),
        normalizers.Strip(), normalizers.Replace(sentinel, " "),
    ])
    tok = Tokenizer.from_file(tokenizer_file)
    n = tok.get_vocab_size(with_added_tokens=True)
    lookup = np.empty(n, dtype=np.int32)
    key_to_new: dict[str, int] = {}
    for lo in range(0, n, TOKEN_MAP_CHUNK):
        texts = tok.decode_batch([[i] for i in range(lo, min(n, lo + TOKEN_MAP_CHUNK))], skip_special_tokens=False)
        for token_id, text in enumerate(texts, lo):
            if "\ufffd" in text:
                key = tok.id_to_token(token_id)
            else:
                normalized = normalizer.normalize_str(text)
                key = normalized if normalized else text
            lookup[token_id] = key_to_new.setdefault(key, len(key_to_new))
    return lookup, len(key_to_new)


def _cached_map_path(tokenizer_file: str) -> Path:
    from importlib.metadata import PackageNotFoundError, version

    sha = hashlib.sha256()
    with open(tokenizer_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # not the whole file at once
            sha.update(block)
    digest = sha.hexdigest()[:32]
    try:
        lib = version("tokenizers")  # its normalisers (Unicode tables) decide the map
    except PackageNotFoundError:
        lib = "unknown"
    home = os.environ.get("MLX_V4_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "mlx-v4"
    return root / "engram" / f"token_map-{digest}-tokenizers{lib}-v{TOKEN_MAP_VERSION}.npy"


def _read_cached_map(path: Path) -> tuple[np.ndarray, int] | None:
    """-> (lookup, size) from a cached map [n + 1] (the lookup, then the size), or None when it is
    missing or not a map (every id in [0, size), each compressed id used)."""
    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if stored.dtype != np.int32 or stored.ndim != 1 or len(stored) < 2:
        return None
    lookup, size = stored[:-1], int(stored[-1])
    if lookup.min() < 0 or lookup.max() + 1 != size or not np.bincount(lookup, minlength=size).all():
        return None
    return lookup, size


def _write_cached_map(path: Path, lookup: np.ndarray, size: int) -> None:
    """Temp name, fsync, rename: a crash never leaves half a map under the final name. Best
    effort: a cache directory that cannot be written only means the next load rebuilds."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, np.append(lookup, np.int32(size)).astype(np.int32), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


class NgramHasher:
    """Token ids -> table rows [B, L, n_layers, n_cols] (int64), given each sequence's last
    ``max_ngram_size - 1`` compressed ids (the history a cache carries across chunks)."""

    def __init__(self, layout: EngramLayout, token_map, compressed_vocab_size: int, pad_token_id: int):
        if len(token_map) <= pad_token_id:
            raise ValueError(f"engram_pad_token_id {pad_token_id} is outside the tokenizer ({len(token_map)} ids)")
        self.layout = layout
        self.token_map = np.asarray(token_map, dtype=np.int64)
        self.pad_id = int(self.token_map[pad_token_id])
        flat = [[p for per_ngram in layer for p in per_ngram] for layer in layout.primes]
        self.primes = np.asarray(layout.primes, dtype=np.int64)  # [n_layers, n-1, heads]
        self.offsets = np.asarray([np.cumsum([0, *f[:-1]]) for f in flat], dtype=np.int64)  # [n_layers, cols]
        self.multipliers = hash_multipliers(layout.layer_ids, layout.max_ngram_size, compressed_vocab_size)

    @property
    def history_len(self) -> int:
        return self.layout.max_ngram_size - 1

    def __call__(self, ids: np.ndarray, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids [B, L] token ids; history [B, h] compressed ids of the preceding tokens, -1 where
        the sequence had not started (h = max_ngram_size - 1). -> (rows [B, L, n_layers, cols],
        new history [B, h])."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.token_map)):
            raise ValueError(f"token id outside the tokenizer's {len(self.token_map)} ids")
        B, L = ids.shape
        h = self.history_len
        seq = np.concatenate([history.astype(np.int64), self.token_map[ids]], axis=1)  # [B, h + L]
        tokens, blocked = [], np.zeros((B, L), dtype=bool)
        for shift in range(self.layout.max_ngram_size):
            source = seq[:, h - shift: h - shift + L]
            blocked = blocked | (source < 0)  # before the sequence start
            tokens.append(np.where(blocked, self.pad_id, source))
        tokens = np.stack(tokens, axis=-1)  # [B, L, max_ngram]
        products = tokens[:, :, None, :] * self.multipliers  # [B, L, n_layers, max_ngram]
        rolling, hashes = products[..., 0], []
        for i in range(1, self.layout.max_ngram_size):
            rolling = np.bitwise_xor(rolling, products[..., i])
            hashes.append(rolling[..., None] % self.primes[:, i - 1])  # [B, L, n_layers, heads]
        rows = np.concatenate(hashes, axis=-1) + self.offsets
        return rows, seq[:, -h:] if h else seq[:, :0]
