"""The DeepSeek V4.1 KV cache, laid out as the model shares it.

* every layer: its sliding window (the last ``sliding_window - 1`` entries; the current chunk
  supplies the rest), FP8 e4m3 codes + one E8M0 byte per 32 (528 bytes at head_dim 512);
* each kv source (only those): its compressed entries, FP4 e2m1 + one e4m3 byte per 16
  (288 bytes), the open ratio-2 group (constant size), and, on index-key owners, the index
  keys, FP4 + one E8M0 byte per 32 (68 bytes at 128 dims). Consumer layers hold a reference to
  their source's store and no entries of their own (cross-layer KV sharing);
* the model: the Engram history, the last ``engram_max_ngram_size - 1`` compressed token ids
  of each sequence.

Entries are stored in the form the model rounded them to (lossless); with ``fake_quant`` off the
same stores keep unrounded values. Entry stores are append-only, so :func:`checkpoint` snapshots
only the small state (windows, open groups, Engram history) by reference and :func:`rewind`
truncates the stores. Speculation (:meth:`LayerCache.speculate` / :meth:`~LayerCache.accept`, as
V4's caches do it in mlx_v4/cache.py) records what a step feeds (window entries, ratio-2 rows,
compressed token ids) so that any prefix of it can be kept exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..entry_store import EntryStore
from .quant import dequantize_entry, dequantize_index, dequantize_window


@dataclass
class GroupState:
    """Rows of a ratio-2 compressor's open group: projected kv and gate scores [B, m, d] fp32."""

    kv: mx.array | None = None
    score: mx.array | None = None

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.kv, self.score) if a is not None]


class SourceStore:
    """What one kv source layer owns: compressed entries, its open group, maybe index keys."""

    def __init__(self, packed: bool, owns_keys: bool, ratio: int = 1):
        self.packed, self.ratio = packed, ratio
        self.entries = EntryStore()
        self.index_keys = EntryStore() if owns_keys else None
        self.group = GroupState()

    def entry_values(self, dtype) -> mx.array | None:
        if self.entries.length == 0:
            return None
        parts = self.entries.view()
        return dequantize_entry(*parts, dtype) if self.packed else parts[0].astype(dtype)

    def gather_entries(self, idx: mx.array, dtype) -> mx.array:
        """Rows ``idx`` [B, M] (valid ids) of the entries, decoded -> [B, M, d]."""
        parts = [mx.take_along_axis(p, idx.reshape(*idx.shape, *([1] * (p.ndim - 2))), axis=1)
                 for p in self.entries.view()]
        return dequantize_entry(*parts, dtype) if self.packed else parts[0].astype(dtype)

    def key_parts(self) -> list[mx.array]:
        """The index keys as stored: [packed FP4 uint8 [B, N, d/2], E8M0 [B, N, d/32]] or [values]."""
        return self.index_keys.view() if self.index_keys is not None else []

    def key_values(self) -> mx.array | None:
        if self.index_keys is None or self.index_keys.length == 0:
            return None
        parts = self.index_keys.view()
        return dequantize_index(*parts) if self.packed else parts[0].astype(mx.float32)

    def nbytes(self) -> int:
        n = self.entries.nbytes + sum(a.nbytes for a in self.group.arrays())
        return n + (self.index_keys.nbytes if self.index_keys is not None else 0)


@dataclass
class _Speculation:
    offset: int  # where recording started
    state: tuple  # LayerCache._state() there
    window: tuple | None = None  # window parts pushed since (before trimming)
    rows: tuple | None = None  # a ratio-2 source's projected (kv, score) rows since


def _cat(a: mx.array | None, b: mx.array) -> mx.array:
    return b if a is None else mx.concatenate([a, b], axis=1)


def _cat_parts(old: tuple | None, new: tuple) -> tuple:
    return tuple(new) if old is None else tuple(_cat(a, b) for a, b in zip(old, new))


def _kept_history(start: np.ndarray | None, fed: list | None, keep: int, now: np.ndarray | None) -> np.ndarray | None:
    """The Engram history after ``keep`` of the compressed ids ``fed`` since ``start``."""
    if now is None or not keep:
        return None if start is None else start.copy()
    if start is None:  # nothing was fed before: the history was all -1
        start = np.full_like(now, -1)
    seq = np.concatenate([start] + list(fed or []), axis=1)
    h = start.shape[1]
    return seq[:, : h + keep][:, -h:].copy() if h else seq[:, :0].copy()


class LayerCache:
    """One layer's view: its own window, and (compressed layers) the source store it reads."""

    def __deepcopy__(self, memo):
        raise TypeError("a V4.1 layer cache shares its source's store: copy the whole cache with "
                        "V41Cache.clone_at(offset)")

    def __init__(self, window: int, packed: bool, own: SourceStore | None = None):
        self.window, self.packed = window, packed
        self.offset = 0
        self.window_parts: list[mx.array] | None = None
        self.own = own  # set on kv sources
        self.source: SourceStore | None = None  # the store this layer reads (its own on a source)
        self.keys: SourceStore | None = None  # index sources: the store holding their index keys
        self.model_cache: V41Cache | None = None  # set on layer 0, which snapshots the Engram history
        self._snapshots: dict[int, tuple] = {}
        self._spec: _Speculation | None = None

    def window_values(self, dtype) -> mx.array | None:
        if self.window_parts is None:
            return None
        return dequantize_window(*self.window_parts, dtype) if self.packed else self.window_parts[0].astype(dtype)

    def push_window(self, parts: tuple[mx.array, ...]) -> None:
        if self._spec is not None:
            self._spec.window = _cat_parts(self._spec.window, parts)
        keep = self.window - 1
        if self.window_parts is not None:
            parts = tuple(mx.concatenate([old, new], axis=1) for old, new in zip(self.window_parts, parts))
        self.window_parts = [mx.contiguous(p[:, -keep:]) for p in parts] if keep > 0 else None

    def _state(self) -> tuple:
        """(window parts, (open group, entries, index keys) on sources, Engram history on layer 0)."""
        own = None
        if self.own is not None:
            keys = self.own.index_keys
            own = (GroupState(self.own.group.kv, self.own.group.score), self.own.entries.length,
                   None if keys is None else keys.length)
        history = None
        if self.model_cache is not None and self.model_cache.engram_history is not None:
            history = self.model_cache.engram_history.copy()
        return self.window_parts, own, history

    def checkpoint(self) -> int:
        """Remember this position (by reference: no copies); see :meth:`rewind`."""
        self._snapshots[self.offset] = self._state()
        return self.offset

    # ---- speculation: feed guesses, keep a prefix ------------------------------------------
    @property
    def speculating(self) -> bool:
        return self._spec is not None

    def speculate(self) -> int:
        """Start recording: the positions fed from here on can be dropped by :meth:`accept`."""
        if self._spec is not None:
            raise RuntimeError("speculate() called twice without accept()")
        self._spec = _Speculation(self.offset, self._state())
        if self.model_cache is not None:
            self.model_cache.engram_fed = []
        return self.offset

    def record_rows(self, kv: mx.array, score: mx.array) -> None:
        """A ratio-2 compressor's projected rows [B, L, d] of the chunk just fed (while recording)."""
        if self._spec is not None:
            old = self._spec.rows
            self._spec.rows = (kv, score) if old is None else (_cat(old[0], kv), _cat(old[1], score))

    def abandon(self) -> None:
        """Drop everything fed since :meth:`speculate` (no-op when not speculating)."""
        if self._spec is not None:
            self.accept(self._spec.offset)

    def accept(self, offset: int) -> None:
        """Stop recording and keep the positions before ``offset`` fed since :meth:`speculate`:
        afterwards this cache equals one only ever fed those positions."""
        spec, self._spec = self._spec, None
        if spec is None:
            raise RuntimeError("accept() without speculate()")
        if not spec.offset <= offset <= self.offset:
            raise ValueError(f"cannot keep positions up to {offset}: speculation fed {spec.offset}..{self.offset}")
        fed = None
        if self.model_cache is not None:
            fed, self.model_cache.engram_fed = self.model_cache.engram_fed, None
        if offset == self.offset:
            return
        keep = offset - spec.offset
        self.window_parts, own, history = spec.state
        if keep and spec.window is not None:
            self.push_window(tuple(p[:, :keep] for p in spec.window))
        if own is not None:
            self._keep_source(own, spec.rows, keep)
        if self.model_cache is not None:
            self.model_cache.engram_history = _kept_history(history, fed, keep, self.model_cache.engram_history)
        self.offset = offset
        self._snapshots = {o: v for o, v in self._snapshots.items() if o <= offset}

    def _keep_source(self, own: tuple, rows: tuple | None, keep: int) -> None:
        """Entries, index keys and the open group of a source after ``keep`` recorded positions:
        ``(m + keep) // ratio`` more groups closed, the rest of them open (m: rows open at the start)."""
        group, n, k = own
        r, m = self.own.ratio, 0 if group.kv is None else group.kv.shape[1]
        closed = (m + keep) // r
        self.own.entries.truncate(n + closed)
        if k is not None:
            self.own.index_keys.truncate(k + closed)
        open_rows = (m + keep) % r
        if not open_rows:
            self.own.group = GroupState()
            return
        kv, score = rows
        kv, score = _cat(group.kv, kv)[:, closed * r: m + keep], _cat(group.score, score)[:, closed * r: m + keep]
        self.own.group = GroupState(mx.contiguous(kv), mx.contiguous(score))

    def rewind(self, offset: int) -> None:
        """Return to a position saved by :meth:`checkpoint` (later checkpoints are dropped)."""
        if offset == self.offset:
            return
        if offset not in self._snapshots:
            raise ValueError(f"cannot rewind to {offset}: checkpoints exist at {sorted(self._snapshots)}")
        self.window_parts, own, history = self._snapshots[offset]
        if own is not None:
            group, n, k = own
            self.own.group = GroupState(group.kv, group.score)
            self.own.entries.truncate(n)
            if k is not None:
                self.own.index_keys.truncate(k)
        if self.model_cache is not None:
            self.model_cache.engram_history = None if history is None else history.copy()
        self.offset = offset
        self._snapshots = {o: v for o, v in self._snapshots.items() if o <= offset}

    @property
    def checkpoints(self) -> dict[int, tuple]:
        """Positions :meth:`rewind` can return to (as V4's caches expose them)."""
        return self._snapshots

    def breakdown(self) -> dict[str, int]:
        out = {"window": sum(p.nbytes for p in self.window_parts or [])}
        if self.own is not None:
            out["compressed"] = self.own.entries.nbytes
            out["index_keys"] = 0 if self.own.index_keys is None else self.own.index_keys.nbytes
            out["compressor"] = sum(a.nbytes for a in self.own.group.arrays())
        return out

    @property
    def state(self) -> list[mx.array]:
        out = list(self.window_parts or [])
        if self.own is not None:
            out += self.own.entries.view() if self.own.entries.length else []
            out += self.own.index_keys.view() if self.own.index_keys is not None and self.own.index_keys.length else []
            out += self.own.group.arrays()
        return out

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.window_parts or []) + (self.own.nbytes() if self.own is not None else 0)


class V41Cache(list):
    """The per-layer caches (``cache[i]``, as mlx-lm's loop and mlx_v4.generation expect: each
    has ``offset``, ``state``, ``checkpoint()``, ``rewind()``) plus the Engram history, which
    layer 0's cache snapshots."""

    def __init__(self, layers: list[LayerCache], engram_history: np.ndarray | None = None):
        super().__init__(layers)
        self.engram_history = engram_history
        # while layer 0 speculates: the compressed ids [B, L] of each chunk fed (see record_engram)
        self.engram_fed: list[np.ndarray] | None = None
        if layers:
            layers[0].model_cache = self

    @property
    def offset(self) -> int:
        return self[0].offset

    def sources(self) -> list[SourceStore]:
        return [c.own for c in self if c.own is not None]

    @property
    def nbytes(self) -> int:
        hist = 0 if self.engram_history is None else self.engram_history.nbytes
        return sum(c.nbytes for c in self) + hist

    def checkpoint(self) -> int:
        for c in self:
            c.checkpoint()
        return self.offset

    def record_engram(self, compressed_ids: np.ndarray) -> None:
        """The model fed tokens whose compressed ids are [B, L]: kept while speculating."""
        if self.engram_fed is not None:
            self.engram_fed.append(compressed_ids)

    def clone_at(self, offset: int) -> V41Cache:
        """A new cache equal to this one rewound to checkpoint ``offset``; this one is untouched.
        Arrays are shared (immutable); entry stores are sliced, so appends never reach the other."""
        if offset != self.offset and offset not in self[0].checkpoints:
            raise ValueError(f"cannot clone at position {offset}: checkpoints exist at {sorted(self[0].checkpoints)}")
        stores: dict[int, SourceStore] = {}
        layers = []
        for c in self:
            windows, own, history = c.checkpoints.get(offset, (c.window_parts, None, None))
            n = LayerCache(c.window, c.packed)
            n.offset, n.window_parts = offset, windows
            n._snapshots = {k: v for k, v in c.checkpoints.items() if k <= offset}
            if c.own is not None:
                s = SourceStore(c.packed, c.own.index_keys is not None, c.own.ratio)
                group, rows, keys = own if own is not None else (c.own.group, c.own.entries.length,
                                                                 None if c.own.index_keys is None else c.own.index_keys.length)
                s.group = GroupState(group.kv, group.score)
                for src, dst, length in ((c.own.entries, s.entries, rows), (c.own.index_keys, s.index_keys, keys)):
                    if src is not None and src.parts is not None:
                        dst.parts, dst.length = [p[:, :length] for p in src.parts], length
                n.own = stores[id(c.own)] = s
            layers.append(n)
        for c, n in zip(self, layers):
            n.source = None if c.source is None else stores[id(c.source)]
            n.keys = None if c.keys is None else stores[id(c.keys)]
        snap = self[0].checkpoints.get(offset)
        history = self.engram_history if snap is None else snap[2]
        return V41Cache(layers, None if history is None else history.copy())

    def __deepcopy__(self, memo):
        raise TypeError("a V4.1 cache shares stores between layers: copy it with clone_at(offset)")

    def rewind(self, offset: int) -> None:
        for c in self:
            c.rewind(offset)


def make_cache(args, packed: bool | None = None) -> V41Cache:
    """Caches wired for sharing: each compressed layer reads its kv source's store."""
    packed = args.fake_quant if packed is None else packed
    owns_keys = set(args.kv_source_layer_ids) & set(args.index_source_layer_ids)
    layers = []
    for i in range(args.num_hidden_layers):
        own = SourceStore(packed, i in owns_keys, args.compress_ratios[i]) if i in args.kv_source_layer_ids else None
        layers.append(LayerCache(args.sliding_window, packed, own))
    for i, c in enumerate(layers):
        src = args.kv_source(i)
        if src is not None:
            c.source = layers[src].own
        if i in args.index_source_layer_ids:
            c.keys = layers[args.key_owner(i)].own
    return V41Cache(layers)


@dataclass
class SharedState:
    """What layers hand down the stack within one forward (the reference's ``shared_attn``):
    each index source's selection, the candidate source's block mask."""

    picks: dict[int, mx.array | None] = field(default_factory=dict)
    candidates: mx.array | None = None


def bytes_per_token(args) -> dict[str, float]:
    """Packed bytes each token adds at long context (windows are a constant on top)."""
    hd, dI = args.head_dim, args.index_head_dim
    entry = hd // 2 + hd // 16
    key = dI // 2 + dI // 32
    owners = set(args.kv_source_layer_ids) & set(args.index_source_layer_ids)
    comp = sum(entry / args.compress_ratios[s] for s in args.kv_source_layer_ids)
    keys = sum(key / args.compress_ratios[s] for s in owners)
    return {"compressed": comp, "index_keys": keys, "total": comp + keys,
            "window_constant": args.num_hidden_layers * (args.sliding_window - 1) * (hd + hd // 32)}


# ---- files -------------------------------------------------------------------------------------
FORMAT = "mlx-v4/deepseek_v41-cache/1"


def used_nbytes(cache: V41Cache) -> int:
    """Bytes of the rows in use (entry stores grow in steps; ``nbytes`` counts their capacity)."""
    total = 0
    for c in cache:
        total += sum(p.nbytes for p in c.window_parts or [])
        if c.own is not None:
            for store in (c.own.entries, c.own.index_keys):
                if store is not None and store.length:
                    total += sum(p.nbytes // p.shape[1] * store.length for p in store.parts)
            total += sum(a.nbytes for a in c.own.group.arrays())
    return total


def save_v41_cache(path, cache: V41Cache, *, tokens: list[int], fingerprint: str, meta: dict | None = None) -> None:
    """Write ``cache`` (and the tokens it holds) to ``path``: temp name, fsync, rename. The same
    call shape as :func:`mlx_v4.cache.save_cache`; ``meta`` is kept as JSON."""
    import json
    import os
    from pathlib import Path

    arrays: dict[str, mx.array] = {}
    for i, c in enumerate(cache):
        for j, p in enumerate(c.window_parts or []):
            arrays[f"layers.{i}.window.{j}"] = p
        if c.own is None:
            continue
        for kind, store in (("entries", c.own.entries), ("index_keys", c.own.index_keys)):
            if store is not None and store.length:
                for j, p in enumerate(store.view()):
                    arrays[f"layers.{i}.{kind}.{j}"] = p
        if c.own.group.kv is not None:
            arrays[f"layers.{i}.group.kv"], arrays[f"layers.{i}.group.score"] = c.own.group.kv, c.own.group.score
    if cache.engram_history is not None:
        arrays["engram_history"] = mx.array(cache.engram_history.astype(np.int32))
    meta = {"format": FORMAT, "fingerprint": fingerprint, "offset": str(cache.offset),
            "packed": str(int(cache[0].packed)), "tokens": json.dumps([int(t) for t in tokens]),
            "meta": json.dumps(meta or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_v41_cache(path, model) -> tuple[V41Cache, list[int], dict]:
    """Read a file written by :func:`save_v41_cache` for this very model (same fingerprint):
    -> (cache checkpointed at its end, tokens, meta)."""
    import json

    from ..cache_file import CacheFileError

    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise CacheFileError(f"{path}: not a readable cache file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a DeepSeek V4.1 cache file (format {meta.get('format')!r})")
    if meta.get("fingerprint") != model.fingerprint:
        raise CacheFileError(f"{path}: saved for another model or quantization (fingerprint {meta.get('fingerprint')}, "
                             f"this model is {model.fingerprint})")
    cache = model.make_cache()
    if bool(int(meta["packed"])) != cache[0].packed:
        raise CacheFileError(f"{path}: saved with fake_quant={bool(int(meta['packed']))}, the model has the opposite")

    def parts(prefix: str) -> list[mx.array]:
        out, j = [], 0
        while f"{prefix}.{j}" in arrays:
            out.append(arrays[f"{prefix}.{j}"])
            j += 1
        return out

    offset = int(meta["offset"])
    for i, c in enumerate(cache):
        c.offset = offset
        c.window_parts = parts(f"layers.{i}.window") or None
        if c.own is None:
            continue
        for kind, store in (("entries", c.own.entries), ("index_keys", c.own.index_keys)):
            got = parts(f"layers.{i}.{kind}")
            if store is not None and got:
                store.append(tuple(got))
        if f"layers.{i}.group.kv" in arrays:
            c.own.group = GroupState(arrays[f"layers.{i}.group.kv"], arrays[f"layers.{i}.group.score"])
    if "engram_history" in arrays:
        cache.engram_history = np.array(arrays["engram_history"]).astype(np.int64)
    cache.checkpoint()
    return cache, json.loads(meta["tokens"]), json.loads(meta.get("meta", "{}"))
