"""The server's prefix cache: KV caches of earlier conversations, kept resident and reused.

An entry is a per-layer cache list (``model.make_cache()``) plus the token ids it holds and
checkpoints at turn boundaries (positions right after every ``<｜User｜>`` / ``<｜Assistant｜>``
tag fed, the end of each prompt and the end of each reply). A new prompt reuses the entry with
the longest usable prefix: the largest checkpoint inside the common prefix of the entry's ids
and the prompt's ids (at most ``len(prompt) - 1``, since the last prompt token must be fed to
get logits).

* A request that continues the entry's conversation (it diverges no earlier than where the
  entry's latest reply starts) *takes* the entry: it is removed from the pool, rewound, and
  extended, and goes back in when the request ends.
* A request that branches off earlier gets a *clone* at the checkpoint; the entry stays for the
  conversation it belongs to. Clones share the immutable MLX arrays up to that point and copy
  on the first append (``EntryStore`` grows by concatenation).

Memory is bounded by ``budget_bytes`` over the entries' ``cache_nbytes`` with LRU eviction.
With ``cache_dir`` an evicted (or, at shutdown, any changed) entry is written with
:func:`mlx_v4.cache.save_cache` (file name: a hash of its token ids; the model fingerprint
guards against another model's files) and stays in the index as a *cold* entry that is loaded
back when a prompt matches it. Because a loaded cache can only be rewound to its end, the
entry is also written at its latest turn start (where a thinking-mode conversation that drops
old reasoning diverges), so either continuation resumes without prefill.

Only the engine's worker thread calls into this class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_nbytes, cache_offset, rewind

MAX_MARKS = 12  # checkpoints kept per entry (each holds a window snapshot)
MAX_COLD = 256  # on-disk entries kept in the index
_OWN_FILE = re.compile(r"[0-9a-f]{32}\.safetensors")  # the names _save writes
log = logging.getLogger("mlx_v4.server")


@dataclass
class Entry:
    tokens: list[int]
    cache: list | None  # None: only on disk
    turn_mark: int  # where the latest reply starts (after its <｜Assistant｜> tag and mode token)
    nbytes: int = 0
    used: float = 0.0
    path: Path | None = None
    dirty: bool = True

    @property
    def marks(self) -> list[int]:
        if self.cache is None:
            return [len(self.tokens)]  # a loaded cache is checkpointed at its end only
        return sorted(self.cache[0].checkpoints)


@dataclass
class Lease:
    """A cache handed to one request: ``keep`` ids of ``ids`` are already in it."""
    cache: list
    keep: int
    source: str  # "new", "taken", "cloned" or "disk"
    path: Path | None = None  # the file a "disk" lease was loaded from


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # compare in blocks first: long agent contexts make a per-token Python loop the cost
    step = 256
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def clone_at(cache: list, offset: int) -> list:
    """A new cache list equal to ``cache`` rewound to checkpoint ``offset``, leaving
    ``cache`` itself untouched. Arrays are shared (MLX arrays are immutable; stores grow by
    concatenation, so neither side's appends reach the other)."""
    from ..cache import CSACache, HCACache, WindowCache

    if hasattr(cache, "clone_at"):  # DeepSeek V4.1: layers share stores (mlx_v4/v41/cache.py)
        return cache.clone_at(offset)
    out = []
    for c in cache:
        if not isinstance(c, WindowCache):  # test doubles: a plain deep copy, then rewind
            import copy

            d = copy.deepcopy(c)
            d.rewind(offset)
            out.append(d)
            continue
        snap = c.checkpoints.get(offset)
        if snap is None and offset != c.offset:
            raise ValueError(f"cannot clone at position {offset}: checkpoints exist at {sorted(c.checkpoints)}")
        n = type(c)(c.window, c.rope_dim, c.packed)
        n.offset = offset
        n.window_parts = list(snap.window if snap else c.window_parts)
        n.checkpoints = {k: v for k, v in c.checkpoints.items() if k <= offset}
        if isinstance(c, HCACache):
            n.compressor = snap.compressor if snap else c.compressor
            rows = snap.n_entries if snap else c.entries.length
            if c.entries.parts is not None:
                n.entries.parts = [p[:, :rows] for p in c.entries.parts]
                n.entries.length = rows
        if isinstance(c, CSACache):
            n.index_compressor = snap.index_compressor if snap else c.index_compressor
            rows = snap.n_index if snap else c.index_keys.length
            if c.index_keys.parts is not None:
                n.index_keys.parts = [p[:, :rows] for p in c.index_keys.parts]
                n.index_keys.length = rows
        out.append(n)
    return out


def prune_marks(cache: list, keep: int = MAX_MARKS) -> None:
    """Drop all but the latest ``keep`` checkpoints (each one pins a window snapshot)."""
    marks = sorted(cache[0].checkpoints)
    for m in marks[:-keep] if len(marks) > keep else []:
        for c in cache:
            c.checkpoints.pop(m, None)


def _token_hash(tokens: list[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:32]


def read_file_tokens(path: Path) -> tuple[list[int], dict]:
    """The token ids and metadata of a cache file, read from its safetensors header only.
    Raises ValueError for a file that is not one."""
    import numpy as np

    with open(path, "rb") as f:
        size = path.stat().st_size
        (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        if not 2 <= n <= size - 8:
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(f.read(n))
        meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict):
            raise ValueError("no safetensors header")
        t = header.get("tokens")
        if t is None:
            return [], meta
        begin, end = t["data_offsets"]
        if t.get("dtype") != "I32" or not 0 <= begin <= end <= size - 8 - n or (end - begin) % 4:
            raise ValueError("bad token array")
        f.seek(8 + n + begin)
        return np.frombuffer(f.read(end - begin), dtype="<i4").tolist(), meta


class PrefixCache:
    def __init__(self, model, budget_bytes: int = 8 << 30, cache_dir: str | Path | None = None):
        self.model = model
        self.budget = int(budget_bytes)
        self.dir = Path(cache_dir) if cache_dir else None
        self.entries: list[Entry] = []
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        if self.dir is not None:
            self._scan()

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries if e.cache is not None)

    def stats(self) -> dict:
        return {"entries": sum(e.cache is not None for e in self.entries),
                "disk_entries": sum(e.cache is None for e in self.entries),
                "resident_bytes": self.resident_bytes, "budget_bytes": self.budget,
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens}

    def _scan(self) -> None:
        fp = getattr(self.model, "fingerprint", None)
        for path in sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            try:
                tokens, meta = read_file_tokens(path)
                mtime = path.stat().st_mtime
            except Exception as e:  # anything at all: one bad file must not stop the server
                self._drop_file(path, e)
                continue
            if meta.get("format") != "mlx-v4-cache" or meta.get("fingerprint") != fp or not tokens:
                continue  # another model's (or program's) file: left alone
            self.entries.append(Entry(tokens, None, len(tokens), path=path, dirty=False, used=mtime - time.time()))
        self._trim_cold()

    def _drop_file(self, path: Path, why) -> None:
        """Skip an unusable cache file, and delete it when it is one of ours (by its name)."""
        own = _OWN_FILE.fullmatch(path.name) is not None and self.dir is not None and path.parent == self.dir
        log.warning("prefix cache: %s %s: %s", "removing" if own else "skipping", path,
                    f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else why)
        if own:
            try:
                path.unlink()
            except OSError:
                pass

    def discard(self, path: Path, why) -> None:
        """Forget the entry backed by ``path`` and remove the file (a request using it failed)."""
        self.entries = [e for e in self.entries if e.path != path]
        self._drop_file(path, why)

    def _trim_cold(self) -> None:
        cold = [e for e in self.entries if e.cache is None]
        for e in sorted(cold, key=lambda e: e.used)[:max(0, len(cold) - MAX_COLD)]:
            self.entries.remove(e)

    # ---- lookup --------------------------------------------------------------------------------
    def acquire(self, ids: list[int]) -> Lease:
        """A cache for prompt ``ids``: the best reusable prefix, or a fresh cache."""
        best, best_use = None, 0
        for e in self.entries:
            common = common_prefix(e.tokens, ids)
            usable = [m for m in e.marks if m <= min(common, len(ids) - 1)]
            use = max(usable) if usable else 0
            if use > best_use or (use == best_use and best is not None and use > 0 and e.used > best.used):
                best, best_use = e, use
        if best is None or best_use == 0:
            self.misses += 1
            return Lease(self.model.make_cache(), 0, "new")
        self.hits += 1
        self.reused_tokens += best_use
        if best.cache is None:
            from ..cache import load_cache

            try:
                cache, tokens, _ = load_cache(best.path, self.model)
                if tokens != best.tokens:
                    raise ValueError("its token ids changed since the server indexed it")
            except Exception as e:  # unreadable, corrupt or foreign: the file goes; try the next best
                self.entries.remove(best)
                self._drop_file(best.path, e)
                self.hits -= 1
                self.reused_tokens -= best_use
                return self.acquire(ids)
            best.used = time.monotonic()
            return Lease(cache, best_use, "disk", best.path)  # the file stays; the entry stays cold
        if best_use >= min(best.turn_mark, len(best.tokens)):
            self.entries.remove(best)
            rewind(best.cache, best_use)
            return Lease(best.cache, best_use, "taken")
        best.used = time.monotonic()
        return Lease(clone_at(best.cache, best_use), best_use, "cloned")

    def release(self, tokens: list[int], cache: list, turn_mark: int) -> None:
        """Put a request's cache (holding ``tokens``) back in the pool and evict to budget."""
        if cache_offset(cache) != len(tokens) or not tokens:
            return
        prune_marks(cache)
        # an entry whose ids are a prefix of these (and that is not on disk) is now redundant
        self.entries = [e for e in self.entries
                        if not (e.cache is not None and len(e.tokens) <= len(tokens)
                                and e.tokens == tokens[:len(e.tokens)])]
        self.entries.append(Entry(list(tokens), cache, turn_mark, nbytes=cache_nbytes(cache),
                                  used=time.monotonic()))
        self._evict()

    def _evict(self) -> None:
        while self.resident_bytes > self.budget:
            hot = [e for e in self.entries if e.cache is not None]
            if not hot:
                break
            victim = min(hot, key=lambda e: e.used)
            self._spill(victim)

    def _spill(self, e: Entry) -> None:
        """Write ``e`` to disk (when there is a cache dir) and drop it from memory."""
        if self.dir is not None:
            try:
                self._save(e)
            except Exception as err:  # a full disk: the entry is only lost
                log.warning("prefix cache: cannot write an entry to %s: %s", self.dir, err)
        self.entries.remove(e)
        self._trim_cold()

    def _save(self, e: Entry) -> None:
        from ..cache import save_cache

        fp = self.model.fingerprint
        points = {len(e.tokens)}
        if 0 < e.turn_mark < len(e.tokens) and e.turn_mark in e.cache[0].checkpoints:
            points.add(e.turn_mark)
        for p in sorted(points):
            tokens = e.tokens[:p]
            path = self.dir / f"{_token_hash(tokens)}.safetensors"
            if not path.exists():
                cache = e.cache if p == len(e.tokens) else clone_at(e.cache, p)
                save_cache(path, cache, tokens=tokens, fingerprint=fp, meta={"server": True})
            if not any(c.path == path for c in self.entries):
                self.entries.append(Entry(tokens, None, p, path=path, dirty=False, used=e.used))
        e.dirty = False

    def persist(self) -> int:
        """Write every resident entry to the cache dir (at shutdown); returns files written."""
        if self.dir is None:
            return 0
        n = 0
        for e in [e for e in self.entries if e.cache is not None and e.dirty]:
            try:
                self._save(e)
                n += 1
            except Exception as err:
                log.warning("prefix cache: cannot write an entry to %s: %s", self.dir, err)
        return n

    def clear(self) -> None:
        self.entries = [e for e in self.entries if e.cache is None]
