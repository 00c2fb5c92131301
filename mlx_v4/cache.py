"""The V4 KV cache at its real size: one small class per layer kind.

* :class:`WindowCache` (ratio 0): the last ``sliding_window - 1`` KV entries.
* :class:`HCACache` (ratio 128, or any ratio other than 0 and 4): the window, every compressed
  entry, and the compressor's open window (constant size).
* :class:`CSACache` (ratio 4): the same plus the lightning indexer's keys and its compressor.

Entries are stored in the form the model already rounded them to (paper §2.3.4; official
``act_quant``/``fp4_act_quant``): main KV as FP8 e4m3 codes for the non-RoPE dims with one
E8M0 byte per 64, plus the RoPE dims in bf16 (583 bytes for head_dim 512); index keys as
packed FP4 e2m1 with one E8M0 byte per 32 (68 bytes for 128 dims). With ``fake_quant`` off
(exact comparison against transformers) the same classes keep unrounded values.

Compressed entries and index keys are append-only, so rewinding only needs the small
constant state (window + open compressor windows), which :meth:`checkpoint` snapshots by
reference (MLX arrays are immutable, so a snapshot costs no copy).

Speculative decoding feeds several guessed tokens at once and keeps only a prefix of them:
:meth:`~WindowCache.speculate` snapshots the state and records what the next chunks add (their
window rows and projected compressor rows), and :meth:`~WindowCache.accept` keeps any prefix of
them, rebuilding the window and compressor state at that position exactly, without a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .cache_file import (  # noqa: F401  (CACHE_FORMAT_VERSION, CacheFileError: the public names)
    CACHE_FORMAT_VERSION,
    CHECKSUM_PLACEHOLDER,
    CacheFileError,
    CacheMismatchError,
    digest,
    expected_arrays,
    meta_int,
    meta_json,
    read_cache_header,
)
from .entry_store import EntryStore
from .formats import dequantize_kv_entry
from .layers.compressor import CompressorState


@dataclass
class _Snapshot:
    offset: int
    window: list[mx.array]
    compressor: CompressorState | None
    index_compressor: CompressorState | None
    n_entries: int
    n_index: int


@dataclass
class _Speculation:
    """What the chunks fed since :meth:`WindowCache.speculate` added, to keep any prefix."""
    start: _Snapshot
    window: list[mx.array] | None = None  # window rows of the fed positions [B, n, ...] per part
    rows: dict[str, tuple[mx.array, mx.array]] | None = None  # compressor name -> (kv, score) rows


def _cat(old: mx.array | None, new: mx.array) -> mx.array:
    return new if old is None else mx.concatenate([old, new], axis=1)


def _state_nbytes(state: CompressorState | None) -> int:
    return 0 if state is None else sum(a.nbytes for a in state.arrays())


class WindowCache:
    """Sliding-window KV for window-only layers (and the window part of the others)."""

    kind = "window"

    def __init__(self, window: int, rope_dim: int, packed: bool):
        self.window, self.rope_dim, self.packed = window, rope_dim, packed
        self.offset = 0
        self.window_parts: list[mx.array] = []  # [B, <= window-1, ...] per part
        self.checkpoints: dict[int, _Snapshot] = {}
        self._spec: _Speculation | None = None

    # ---- views for attention -------------------------------------------------------------
    def _decode_entries(self, parts: list[mx.array], dtype) -> mx.array:
        return dequantize_kv_entry(*parts, dtype=dtype) if self.packed else parts[0].astype(dtype)

    def window_values(self, dtype) -> mx.array | None:
        """The kept window entries [B, P, head_dim] (P <= window - 1), or None."""
        return self._decode_entries(self.window_parts, dtype) if self.window_parts else None

    def push_window(self, parts: tuple[mx.array, ...]) -> None:
        """Append this chunk's entries and keep the last window - 1 (all a later query needs)."""
        if self._spec is not None:
            w = self._spec.window
            self._spec.window = list(parts) if w is None else [_cat(o, p) for o, p in zip(w, parts)]
        keep = self.window - 1
        if self.window_parts:
            parts = [mx.concatenate([old, new], axis=1) for old, new in zip(self.window_parts, parts)]
        # contiguous copies: a slice view would keep the whole chunk's buffer alive
        self.window_parts = [mx.contiguous(p[:, -keep:] if keep > 0 else p[:, :0]) for p in parts]

    # ---- bookkeeping ---------------------------------------------------------------------
    def _extra_snapshot(self) -> dict:
        return dict(compressor=None, index_compressor=None, n_entries=0, n_index=0)

    def checkpoint(self) -> int:
        self.checkpoints[self.offset] = self.snapshot()
        return self.offset

    def snapshot(self) -> _Snapshot:
        """The constant-size state (by reference, no copy); :meth:`restore` undoes any step since."""
        return _Snapshot(self.offset, list(self.window_parts), **self._extra_snapshot())

    def restore(self, snap: _Snapshot) -> None:
        self._restore(snap)

    # ---- speculation: feed guesses, keep a prefix ------------------------------------------
    @property
    def speculating(self) -> bool:
        return self._spec is not None

    def speculate(self) -> int:
        """Start recording: the positions fed from here on can be dropped by :meth:`accept`."""
        if self._spec is not None:
            raise RuntimeError("speculate() called twice without accept()")
        self._spec = _Speculation(self.snapshot())
        return self.offset

    def abandon(self) -> None:
        """Drop everything fed since :meth:`speculate` (no-op when not speculating)."""
        if self._spec is not None:
            self.accept(self._spec.start.offset)

    def record_rows(self, name: str, state: CompressorState) -> None:
        """Called by attention after a compressor ran on a recorded chunk (``name`` is the
        attribute holding that compressor's state)."""
        if self._spec is None or state.rows is None:
            return
        rows = self._spec.rows = self._spec.rows or {}
        old = rows.get(name)
        kv, score = state.rows
        rows[name] = (kv, score) if old is None else (_cat(old[0], kv), _cat(old[1], score))
        state.rows = None

    def accept(self, offset: int) -> None:
        """Stop recording and keep the fed positions before ``offset`` (between the position
        where :meth:`speculate` was called and the current one): afterwards the cache equals one
        that was only ever fed those positions."""
        spec, self._spec = self._spec, None
        if spec is None:
            raise RuntimeError("accept() without speculate()")
        start = spec.start.offset
        if not start <= offset <= self.offset:
            raise ValueError(f"cannot keep positions up to {offset}: speculation fed {start}..{self.offset}")
        if offset == self.offset:
            return
        keep = offset - start
        self._restore(spec.start)
        if keep and spec.window is not None:
            self.push_window(tuple(p[:, :keep] for p in spec.window))
        self._replay(spec, keep)
        self.offset = offset
        self.checkpoints = {k: v for k, v in self.checkpoints.items() if k <= offset}

    def _replay(self, spec: _Speculation, keep: int) -> None:
        """Rebuild the compressor states for ``keep`` recorded positions (none here)."""

    def rewind(self, offset: int) -> None:
        if offset == self.offset:
            return
        snap = self.checkpoints.get(offset)
        if snap is None:
            raise ValueError(
                f"cannot rewind to position {offset}: checkpoints exist at {sorted(self.checkpoints)}")
        self._restore(snap)
        self.checkpoints = {k: v for k, v in self.checkpoints.items() if k <= offset}

    def _restore(self, snap: _Snapshot) -> None:
        self.offset = snap.offset
        self.window_parts = list(snap.window)

    @property
    def state(self) -> list[mx.array]:
        """Every array this cache holds (for mx.eval after a chunk)."""
        return list(self.window_parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.window_parts)

    def breakdown(self) -> dict[str, int]:
        return {"window": sum(p.nbytes for p in self.window_parts)}


class HCACache(WindowCache):
    """Window plus compressed entries (ratio 128 or another non-overlapping ratio; base of the
    ratio-4 cache)."""

    kind = "hca"
    ratio = 128

    def __init__(self, window: int, rope_dim: int, packed: bool, ratio: int = 128):
        super().__init__(window, rope_dim, packed)
        self.ratio = ratio  # positions per compressed entry
        self.entries = EntryStore()
        self.compressor = CompressorState()

    def entry_values(self, dtype, end: int | None = None) -> mx.array | None:
        """Compressed entries [B, N, head_dim] (decoded)."""
        if self.entries.length == 0:
            return None
        return self._decode_entries(self.entries.view(end), dtype)

    def gather_entries(self, indices: mx.array, dtype) -> mx.array:
        """Rows at ``indices`` [B, k] (clamped to >= 0 by the caller) -> [B, k, head_dim]."""
        parts = [mx.take_along_axis(p, indices.reshape(*indices.shape, *([1] * (p.ndim - 2))), axis=1)
                 for p in self.entries.view()]
        return self._decode_entries(parts, dtype)

    def _extra_snapshot(self) -> dict:
        return dict(compressor=self.compressor, index_compressor=None,
                    n_entries=self.entries.length, n_index=0)

    def _restore(self, snap: _Snapshot) -> None:
        super()._restore(snap)
        self.compressor = snap.compressor
        self.entries.truncate(snap.n_entries)

    #: compressor-state attribute -> the store its closed windows append to
    _COMPRESSORS = {"compressor": "entries"}

    def _replay(self, spec: _Speculation, keep: int) -> None:
        if not keep or not spec.rows:
            return
        for name, store in self._COMPRESSORS.items():
            kv, score = spec.rows[name]
            half = kv.shape[-1] // 2 if self.ratio == 4 else None
            new, closed = getattr(self, name).advance(kv[:, :keep], score[:, :keep], self.ratio, half)
            setattr(self, name, new)
            # the kept windows' entries are still in the store's rows, written when they closed
            getattr(self, store).length += closed

    @property
    def state(self) -> list[mx.array]:
        return super().state + self.entries.view() + self.compressor.arrays()

    @property
    def nbytes(self) -> int:
        return sum(self.breakdown().values())

    def breakdown(self) -> dict[str, int]:
        return super().breakdown() | {"compressed": self.entries.nbytes,
                                      "compressor_state": _state_nbytes(self.compressor)}


class CSACache(HCACache):
    """Window, compressed entries, and the lightning indexer's keys (ratio 4)."""

    kind = "csa"
    ratio = 4
    _COMPRESSORS = {"compressor": "entries", "index_compressor": "index_keys"}

    def __init__(self, window: int, rope_dim: int, packed: bool, ratio: int = 4):
        super().__init__(window, rope_dim, packed, ratio)
        self.index_keys = EntryStore()
        self.index_compressor = CompressorState()

    def index_key_parts(self) -> tuple[mx.array, ...] | None:
        """What the indexer scores against: packed (codes, scales) or (values,); None if empty."""
        if self.index_keys.length == 0:
            return None
        return tuple(self.index_keys.view())

    def _extra_snapshot(self) -> dict:
        return dict(compressor=self.compressor, index_compressor=self.index_compressor,
                    n_entries=self.entries.length, n_index=self.index_keys.length)

    def _restore(self, snap: _Snapshot) -> None:
        super()._restore(snap)
        self.index_compressor = snap.index_compressor
        self.index_keys.truncate(snap.n_index)

    @property
    def state(self) -> list[mx.array]:
        return super().state + self.index_keys.view() + self.index_compressor.arrays()

    def breakdown(self) -> dict[str, int]:
        return super().breakdown() | {"index_keys": self.index_keys.nbytes,
                                      "index_compressor_state": _state_nbytes(self.index_compressor)}


LAYER_CACHES = {"window": WindowCache, "hca": HCACache, "csa": CSACache}


def make_cache(args, packed: bool | None = None) -> list[WindowCache]:
    """One cache per layer, of the class its compression ratio calls for. Entries are packed
    (FP8/FP4) whenever the model rounds them (``fake_quant``); ``packed=False`` keeps the
    rounded values unpacked instead (for testing that packing loses nothing)."""
    packed = args.fake_quant if packed is None else packed
    if packed and not args.fake_quant:
        raise ValueError("a packed cache needs fake_quant=True: unrounded values do not fit FP8/FP4")
    out = []
    for i in range(args.num_hidden_layers):
        kind = args.layer_kind(i)
        extra = {"ratio": args.compress_ratios[i]} if kind != "window" else {}
        out.append(LAYER_CACHES[kind](args.sliding_window, args.qk_rope_head_dim, packed, **extra))
    return out


# ---- whole-model helpers (the surface the generator, chat, server and CLI use) -------------

def reserve(cache: list[WindowCache], tokens: int, batch: int = 1) -> None:
    """Preallocate room for ``tokens`` positions, so a known-length generation never regrows
    (and ``nbytes`` equals the planned size)."""
    for c in cache:
        if not isinstance(c, HCACache):
            continue
        ratio = c.ratio
        stores = [c.entries] + ([c.index_keys] if isinstance(c, CSACache) else [])
        for store in stores:
            if store.parts is None:
                store.planned = tokens // ratio  # row layout unknown until the first entry
            else:
                store.reserve(tokens // ratio, store.parts)


def cache_offset(cache: list[WindowCache]) -> int:
    return cache[0].offset if cache else 0


def checkpoint(cache: list[WindowCache]) -> int:
    for c in cache:
        c.checkpoint()
    return cache_offset(cache)


def rewind(cache: list[WindowCache], offset: int) -> None:
    for c in cache:
        c.rewind(offset)


def speculate(cache: list[WindowCache]) -> int:
    """Every layer starts recording (see :meth:`WindowCache.speculate`); returns the offset."""
    for c in cache:
        c.speculate()
    return cache_offset(cache)


def accept(cache: list[WindowCache], offset: int) -> None:
    """Every layer keeps the recorded positions before ``offset`` and stops recording."""
    for c in cache:
        c.accept(offset)


def cache_nbytes(cache: list[WindowCache]) -> int:
    return sum(c.nbytes for c in cache)


def cache_breakdown(cache: list[WindowCache]) -> dict[str, int]:
    """Bytes per storage kind summed over layers (window, compressed, index_keys, ...)."""
    out: dict[str, int] = {}
    for c in cache:
        for k, v in c.breakdown().items():
            out[k] = out.get(k, 0) + v
    return out


# ---- persistence -----------------------------------------------------------------------------

_STATE_FIELDS = ("kv", "score", "prev_kv", "prev_score")
#: Checkpoints kept in a saved file (the newest ones): each costs one window + compressor state.
SAVED_CHECKPOINTS = 8
def _state_arrays(prefix: str, window: list[mx.array], comp: CompressorState | None,
                  index_comp: CompressorState | None) -> dict[str, mx.array]:
    out = {f"{prefix}window.{k}": p for k, p in enumerate(window)}
    for name, state in (("compressor", comp), ("index_compressor", index_comp)):
        if state is not None:
            out |= {f"{prefix}{name}.{k}": getattr(state, k) for k in _STATE_FIELDS if getattr(state, k) is not None}
    return out


def _layer_arrays(i: int, c: WindowCache) -> dict[str, mx.array]:
    out = _state_arrays(f"{i}.", c.window_parts, getattr(c, "compressor", None),
                        getattr(c, "index_compressor", None))
    if isinstance(c, HCACache):
        out |= {f"{i}.entries.{k}": p for k, p in enumerate(c.entries.view())}
    if isinstance(c, CSACache):
        out |= {f"{i}.index.{k}": p for k, p in enumerate(c.index_keys.view())}
    for off in sorted(o for o in c.checkpoints if o != c.offset)[-SAVED_CHECKPOINTS:]:
        snap = c.checkpoints[off]
        out |= _state_arrays(f"{i}.ckpt{off}.", snap.window, snap.compressor, snap.index_compressor)
    return out


def save_cache(path, cache: list[WindowCache], *, tokens: list[int], fingerprint: str,
               meta: dict | None = None) -> None:
    """Write the cache, the token ids it covers and the model fingerprint to one safetensors
    file, atomically (temp file, fsync, rename), with a checksum of its contents."""
    if hasattr(cache, "engram_history"):  # DeepSeek V4.1: its own layout (mlx_v4/v41/cache.py)
        from .v41.cache import save_v41_cache

        return save_v41_cache(path, cache, tokens=tokens, fingerprint=fingerprint, meta=meta)
    import json
    import os
    import struct
    from pathlib import Path

    path = Path(path)
    if len(tokens) != cache_offset(cache):
        raise ValueError(f"{len(tokens)} token ids given for a cache holding {cache_offset(cache)} positions")
    arrays: dict[str, mx.array] = {"tokens": mx.array(tokens, dtype=mx.int32)} if tokens else {}
    for i, c in enumerate(cache):
        arrays |= _layer_arrays(i, c)
    metadata = {
        "format": "mlx-v4-cache", "format_version": str(CACHE_FORMAT_VERSION), "fingerprint": fingerprint,
        "offset": str(cache_offset(cache)), "kinds": ",".join(c.kind for c in cache),
        "packed": str(bool(cache and cache[0].packed)), "meta": json.dumps(meta or {}),
        "checkpoints": json.dumps([{str(off): [c.checkpoints[off].n_entries, c.checkpoints[off].n_index]
                                    for off in sorted(o for o in c.checkpoints if o != c.offset)[-SAVED_CHECKPOINTS:]}
                                   for c in cache]),
        "checksum": CHECKSUM_PLACEHOLDER,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        with open(tmp, "rb+") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = f.read(n)
            at = header.find(CHECKSUM_PLACEHOLDER.encode())
            digest_ = digest(f, header, 8 + n)
            f.seek(8 + at)
            f.write(digest_.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_cache(path, model) -> tuple[list[WindowCache], list[int], dict]:
    """Read a file written by :func:`save_cache` for ``model``; returns (cache, tokens, meta).
    Refuses (CacheMismatchError) a file from another model, quantization or format version, and
    (CacheFileError, naming the file and field) a damaged or crafted one: checksum, header,
    metadata, and every array's name, dtype and shape are checked before anything is used."""
    if str(getattr(model, "model_type", "")).startswith("deepseek_v41"):  # mlx_v4/v41/cache.py
        from .v41.cache import load_v41_cache

        return load_v41_cache(path, model)
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise CacheFileError(f"{path}: no such cache file")
    metadata, tensors = read_cache_header(path)
    if metadata.get("fingerprint") != model.fingerprint:
        raise CacheMismatchError(
            f"{path}: made by a different model or quantization (fingerprint {metadata.get('fingerprint')}, "
            f"this model {model.fingerprint})")
    cache = model.make_cache()
    kinds = ",".join(c.kind for c in cache)
    if metadata.get("kinds") != kinds or metadata.get("packed") != str(bool(cache and cache[0].packed)):
        raise CacheMismatchError(f"{path}: layer layout does not match this model")
    args = model.args
    offset = meta_int(path, metadata, "offset")
    if offset > args.max_position_embeddings:
        raise CacheFileError(f"{path}: metadata field 'offset' ({offset}) exceeds the model's context")
    meta = meta_json(path, metadata, "meta", dict, "{}")
    saved_checkpoints = meta_json(path, metadata, "checkpoints", list, "[]") or [{} for _ in cache]
    if len(saved_checkpoints) != len(cache) or not all(isinstance(d, dict) for d in saved_checkpoints):
        raise CacheFileError(f"{path}: metadata field 'checkpoints' must list one object per layer")

    expected = {"tokens": (("I32",), (offset,), offset > 0)}
    checkpoints = []
    for i, c in enumerate(cache):
        expected |= expected_arrays(args, c, i, f"{i}.", offset, None, None)
        layer = {}
        for off, counts in saved_checkpoints[i].items():
            ok = off.isdigit() and isinstance(counts, list) and len(counts) == 2
            o = int(off) if ok else -1
            ratio = getattr(c, "ratio", 0)
            if not ok or not o < offset or counts != [o // ratio if ratio else 0, o // 4 if c.kind == "csa" else 0]:
                raise CacheFileError(f"{path}: metadata field 'checkpoints' has a bad entry {off!r}: {counts!r} "
                                     f"(layer {i})")
            expected |= expected_arrays(args, c, i, f"{i}.ckpt{o}.", o, *counts)
            layer[o] = counts
        checkpoints.append(layer)
    for name, (dtype, shape) in tensors.items():
        if name not in expected:
            raise CacheFileError(f"{path}: unexpected tensor '{name}'")
        dtypes, want, _ = expected[name]
        if dtype not in dtypes or shape != want:
            raise CacheFileError(f"{path}: tensor '{name}' is {dtype} {list(shape)}, expected "
                                 f"{'/'.join(dtypes)} {list(want)}")
    missing = [name for name, (_, _, required) in expected.items() if required and name not in tensors]
    if missing:
        raise CacheFileError(f"{path}: missing tensor '{missing[0]}'")
    try:
        arrays = mx.load(str(path), format="safetensors")
    except Exception as e:  # mlx raises RuntimeError/ValueError for unreadable files
        raise CacheFileError(f"{path}: not a readable safetensors cache file ({e})") from None
    tokens = arrays["tokens"].tolist() if "tokens" in arrays else []
    if tokens and not 0 <= min(tokens) <= max(tokens) < args.vocab_size:
        raise CacheFileError(f"{path}: tensor 'tokens' holds ids outside the vocabulary")

    def parts(prefix: str) -> list[mx.array]:
        out, k = [], 0
        while f"{prefix}.{k}" in arrays:
            out.append(arrays[f"{prefix}.{k}"])
            k += 1
        return out

    def state(prefix: str) -> CompressorState:
        return CompressorState(*(arrays.get(f"{prefix}.{k}") for k in _STATE_FIELDS))

    for i, c in enumerate(cache):
        c.offset = offset
        c.window_parts = parts(f"{i}.window")
        if isinstance(c, HCACache):
            if entries := parts(f"{i}.entries"):
                c.entries.append(tuple(entries))
            c.compressor = state(f"{i}.compressor")
        if isinstance(c, CSACache):
            if keys := parts(f"{i}.index"):
                c.index_keys.append(tuple(keys))
            c.index_compressor = state(f"{i}.index_compressor")
        for off, (n_entries, n_index) in checkpoints[i].items():
            p = f"{i}.ckpt{off}"
            c.checkpoints[off] = _Snapshot(
                off, parts(f"{p}.window"),
                state(f"{p}.compressor") if isinstance(c, HCACache) else None,
                state(f"{p}.index_compressor") if isinstance(c, CSACache) else None, n_entries, n_index)
        c.checkpoint()
    return cache, tokens, meta


# ---- arithmetic for planners ------------------------------------------------------------------

def entry_nbytes(args) -> tuple[int, int]:
    """Bytes of one main KV entry and one index key as this cache stores them."""
    if not args.fake_quant:
        return 4 * args.head_dim, 4 * args.index_head_dim  # unrounded float32
    nope = args.head_dim - args.qk_rope_head_dim
    main = nope + nope // 64 + 2 * args.qk_rope_head_dim
    index = args.index_head_dim // 2 + args.index_head_dim // 32
    return main, index


def planned_nbytes(args, tokens: int, batch: int = 1, layers=None) -> int:
    """Cache bytes after ``tokens`` positions (filled rows, fp32 compressor state), no slack.
    ``layers``: only these layer indices (a pipeline rank's share); default all."""
    main, index = entry_nbytes(args)
    total = 0
    for i in (range(args.num_hidden_layers) if layers is None else layers):
        kind, r = args.layer_kind(i), args.compress_ratios[i]
        total += min(tokens, args.sliding_window - 1) * main
        if kind == "hca":
            total += (tokens // r) * main + 2 * 4 * (tokens % r) * args.head_dim
        elif kind == "csa":
            total += (tokens // 4) * (main + index)
            # open windows (<= 3 rows of 2 series) and the previous window's first half, fp32
            total += 2 * 4 * ((tokens % 4) * 2 * args.head_dim + (4 * args.head_dim if tokens >= 4 else 0))
            total += 2 * 4 * ((tokens % 4) * 2 * args.index_head_dim + (4 * args.index_head_dim if tokens >= 4 else 0))
    return total * batch


def bytes_per_token(args) -> float:
    """Asymptotic growth of the cache per token (the compressed entries and index keys)."""
    main, index = entry_nbytes(args)
    per = 0.0
    for i in range(args.num_hidden_layers):
        kind, r = args.layer_kind(i), args.compress_ratios[i]
        per += (main + index) / 4 if kind == "csa" else (main / r if kind == "hca" else 0.0)
    return per
