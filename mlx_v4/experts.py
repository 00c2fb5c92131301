"""The routed-expert store: experts stay in their checkpoint files and are read on demand.

Of a V4 model's weights the routed experts are nearly all (Flash: 256 per layer, 6 used per
token), so a Mac smaller than the checkpoint can still run it when only the experts the router
picks are in memory. :class:`ExpertStore` keeps (layer, expert) slots whose bytes never exceed a
budget; a MoE layer (:class:`StreamedExperts`) asks it for the experts its tokens were routed to,
computes with the resident ones while the misses are read, then computes the misses.

* Reads are ``pread`` calls from a thread pool, straight into MLX-owned buffers (no mapping,
  whose pages would count against the budget, and no extra copy). The bytes of one expert that
  are adjacent in the file are one read: an mlx-v4 conversion writes each expert's matrices and
  scales together (one read per miss); the official release keeps each expert's six tensors
  adjacent too.
* The arrays are converted exactly as :mod:`mlx_v4.weights` converts a resident checkpoint and
  each routed pair is computed by the same code as the resident layer
  (``RoutedExperts.pair_outputs``), so logits are bit-identical to the fully resident model.
* Every expert a batch of tokens needs is read once for the batch (prefill reads each expert a
  chunk needs once), in groups that fit the budget when they do not all fit at once.
* Eviction policy: ``lru`` or ``lfu`` (frequency with dynamic aging, seeded by the request
  counts of experts not resident); benchmarks/expert_stream.py measures both.
* Other on-disk tables share the budget (DeepSeek V4.1's Engram, :meth:`ExpertStore.admit_tables`):
  whole tables, resident only beside every expert and never evicted; their row reads are in
  :meth:`ExpertStore.stats`. Where each expert lives is planned in :mod:`mlx_v4.expert_plan`.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .expert_plan import (  # noqa: F401 (Conversion and the planners are re-exported)
    _ITEM,
    _MX_DTYPE,
    Conversion,
    _LayerSpec,
    _Run,
    plan_expert_layers,
    plan_layers,
)
from .expert_policy import DEFAULT_POLICY, POLICIES, make_policy  # noqa: F401 (re-exported)
from .layers.moe import RoutedExperts
from .weights import TensorInfo, WeightsError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9,
          "T": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ExpertBudgetError(ValueError):
    """An expert budget that cannot work (unparseable, or below one layer's top-k experts)."""


class ExpertReadError(WeightsError):
    """An expert's bytes could not be read (the shard vanished, was truncated or failed)."""


def parse_budget(value) -> int | str | None:
    """None, "auto", an int (bytes) or a size string ("32GB", "512MiB", "1.5G") -> None, "auto" or bytes."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        if value is not None and value <= 0:
            raise ExpertBudgetError(f"expert budget must be positive, got {value}")
        return value
    s = str(value).strip()
    if s.lower() == "auto":
        return "auto"
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([A-Za-z]*)", s)
    unit = m and _UNITS.get(m.group(2).upper())
    if not m or unit is None or float(m.group(1)) <= 0:
        raise ExpertBudgetError(f"expert budget {value!r}: expected a size such as 32GB, 512MB or 1.5GiB, "
                                "a number of bytes, or 'auto'")
    return int(float(m.group(1)) * unit)


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


_SHARED: list[bool] = []


def shared_buffers() -> bool:
    """Whether bytes written through an evaluated MLX array's buffer are what MLX computes with
    (host or unified memory). Checked once; where not, reads go through a host copy."""
    if not _SHARED:
        a = mx.zeros((64,), mx.uint8)
        mx.eval(a)
        try:
            view = memoryview(a)
            view[3] = 7
            ok = not view.readonly and int(a.astype(mx.int32).sum().item()) == 7
        except (TypeError, ValueError, BufferError):
            ok = False
        _SHARED.append(ok)
    return _SHARED[0]


# ---- the store --------------------------------------------------------------------------------
@dataclass
class _Pending:
    future: Future
    buffers: list[mx.array]
    nbytes: int


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    reads: int = 0
    evictions: int = 0
    read_seconds: float = 0.0
    calls: int = 0


class ExpertStore:
    """(layer, expert) slots under a byte budget, filled from the checkpoint files on demand."""

    def __init__(self, specs: dict[int, _LayerSpec], convert: Conversion, budget: int, top_k: int | dict[int, int],
                 *, policy: str = DEFAULT_POLICY, threads: int = 4):
        """``top_k``: experts per token, one number or per layer (a drafter's MoE may differ)."""
        self.specs, self.convert, self.budget = specs, convert, int(budget)
        self.top_k = {layer: top_k[layer] if isinstance(top_k, dict) else top_k for layer in specs}
        need = {layer: self.top_k[layer] * s.slot_bytes for layer, s in specs.items()}
        self.minimum = max(need.values(), default=0)
        if self.budget < self.minimum:
            layer = max(need, key=need.get)
            raise ExpertBudgetError(
                f"expert budget {format_bytes(self.budget)} ({self.budget} bytes) is below the minimum "
                f"{format_bytes(self.minimum)} ({self.minimum} bytes): one layer's top-{self.top_k[layer]} experts "
                f"of {format_bytes(specs[layer].slot_bytes)} each must fit at once")
        self.policy = make_policy(policy)
        self.slots: dict[tuple[int, int], dict[str, mx.array]] = {}
        self.resident_bytes = 0
        self.reserved = 0
        self.pinned: set = set()
        self.pending: dict[tuple[int, int], _Pending] = {}
        self.tables: dict = {}  # name -> an on-disk table (V4.1 Engram) counted in this budget
        self.table_bytes = 0  # of those, the bytes held resident (never evicted)
        self._stats = _Stats()
        self._fds: dict[Path, int] = {}
        self._stale_fds: list[int] = []
        self._fd_lock = threading.Lock()
        self._lock = threading.RLock()  # one MoE layer at a time uses the store
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="mlx-v4-experts")

    # ---- public ------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """All routed experts as they would be resident."""
        return sum(s.slot_bytes * len(s.experts) for s in self.specs.values())

    @property
    def expert_budget(self) -> int:
        """The part of the budget expert slots may use (all of it but resident tables)."""
        return self.budget - self.table_bytes

    def stats(self) -> dict:
        """Expert hits/misses/reads; ``resident_bytes`` is everything held (experts and tables,
        always <= ``budget_bytes``); ``engram``, when tables are registered, their row reads."""
        s = self._stats
        asked = s.hits + s.misses
        out = {"hits": s.hits, "misses": s.misses, "hit_rate": s.hits / asked if asked else 0.0,
               "bytes_read": s.bytes_read, "reads": s.reads, "evictions": s.evictions,
               "read_seconds": round(s.read_seconds, 4), "resident_bytes": self.resident_bytes,
               "resident_experts": len(self.slots), "budget_bytes": self.budget, "minimum_bytes": self.minimum,
               "total_bytes": self.total_bytes, "policy": self.policy.name}
        if self.tables:
            rows = [t.stats() for t in self.tables.values()]
            hits, misses = sum(r["hits"] for r in rows), sum(r["misses"] for r in rows)
            out["engram"] = {
                "tables": len(rows), "resident_tables": sum(t.resident for t in self.tables.values()),
                "resident_bytes": self.table_bytes, "total_bytes": sum(t.nbytes for t in self.tables.values()),
                "requested": sum(r["requested"] for r in rows),
                "hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                "bytes_read": sum(r["bytes_read"] for r in rows), "reads": sum(r["reads"] for r in rows),
                "read_seconds": round(sum(r["read_seconds"] for r in rows), 4),
                "wait_seconds": round(sum(r["wait_seconds"] for r in rows), 4)}
        return out

    def reset_stats(self) -> None:
        self._stats = _Stats()
        for t in self.tables.values():
            t.reset_stats()

    def admit_tables(self, tables: dict) -> None:
        """Register on-disk tables (V4.1 Engram: ``nbytes``, ``resident``, ``make_resident()``,
        ``stats()``, ``reset_stats()``); in order, one is read into memory only if it fits in
        the budget beside every routed expert, else its rows stay on disk (pread per lookup).

        Why experts first, whole tables or nothing: per byte held, a resident expert saves about
        top-k / n_experts of its own size in reads per token (V4.1: 6/384), a resident Engram
        table a few rows of its hundreds of millions (~1e-8), so a byte of budget is worth far
        more to experts. Rows are a few hundred bytes at hashed, scattered offsets: the OS page
        cache already keeps the hot ones without counting against this budget, so a row cache
        here would only add bookkeeping to every lookup."""
        for name, table in tables.items():
            self.tables[name] = table
            if not table.resident and self.total_bytes + self.table_bytes + table.nbytes <= self.budget:
                with self._lock:  # every expert fits beside it: no slot ever has to go for it
                    table.make_resident()
                    self.table_bytes += table.nbytes
                    self.resident_bytes += table.nbytes

    def layout(self) -> list[tuple[str, tuple[int, ...], str]]:
        """The parameters the resident model would have for the routed experts (fingerprints)."""
        return [(f"{s.prefix}.{name}", (len(s.experts), *shape), str(dtype))
                for s in self.specs.values() for name, (shape, dtype) in s.arrays.items()]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._fd_lock:
            for fd in [*self._fds.values(), *self._stale_fds]:
                os.close(fd)
            self._fds.clear()
            self._stale_fds.clear()

    def stream(self, layer: int, needed) -> Iterator[tuple[list[int], list[dict[str, mx.array]]]]:
        """Yield (experts, their arrays) groups covering ``needed`` (expert ids of ``layer``):
        resident experts first, while the misses are being read. A group stays resident until
        the next one is asked for; the caller evaluates what it computed before that."""
        with self._lock:
            yield from self._stream(layer, [int(e) for e in needed])

    # ---- planning and reading ----------------------------------------------------------------
    def _groups(self, layer: int, needed: list[int]) -> list[list[int]]:
        spec = self.specs[layer]
        hits = [e for e in needed if (layer, e) in self.slots]
        misses = [e for e in needed if (layer, e) not in self.slots]
        capacity = self.expert_budget // spec.slot_bytes
        if len(needed) <= capacity:
            return [g for g in (hits, misses) if g]
        size = max(1, capacity // 2)  # one group computes while the next one is read
        return [g[i:i + size] for g in (hits, misses) for i in range(0, len(g), size)]

    def _stream(self, layer: int, needed: list[int]):
        self._stats.calls += 1
        for e in needed:
            self.policy.touch((layer, e))
        groups = self._groups(layer, needed)
        capacity = self.expert_budget // self.specs[layer].slot_bytes
        upcoming = {(layer, e) for e in needed}
        current: list = []
        try:
            if groups:
                self._start_reads(layer, groups[0], upcoming)
            for i, group in enumerate(groups):
                arrays = self._finish(layer, group, upcoming)
                current = [(layer, e) for e in group]
                self.pinned.update(current)
                upcoming.difference_update(current)
                if i + 1 < len(groups) and len(group) + len(groups[i + 1]) <= capacity:
                    self._start_reads(layer, groups[i + 1], upcoming)  # overlaps the caller's compute
                yield group, arrays
                self.pinned.difference_update(current)
                current = []
        finally:
            self.pinned.difference_update(current)
            self._drain()

    def _make_room(self, nbytes: int, keep: set) -> None:
        while self.resident_bytes + self.reserved + nbytes > self.budget:
            victim = None
            for allowed in (lambda k: k not in keep, lambda k: True):  # spare experts needed soon if possible
                for key in self.policy.victims():
                    if key in self.slots and key not in self.pinned and allowed(key):
                        victim = key
                        break
                if victim is not None:
                    break
            if victim is None:
                raise RuntimeError("expert store: no slot can be freed (internal error: groups exceed the budget)")
            self._evict(victim)

    def _evict(self, key) -> None:
        arrays = self.slots.pop(key)
        self.resident_bytes -= self.specs[key[0]].slot_bytes
        self.policy.remove(key)
        self._stats.evictions += 1
        del arrays

    def _start_reads(self, layer: int, group: list[int], keep: set) -> None:
        spec = self.specs[layer]
        for e in group:
            key = (layer, e)
            if key in self.slots or key in self.pending:
                continue
            self._make_room(spec.slot_bytes, keep)
            runs = spec.experts[e].runs
            if shared_buffers():
                buffers = [mx.zeros((r.nbytes,), mx.uint8) for r in runs]  # MLX-owned; pread fills them
                mx.eval(buffers)
            else:  # a backend whose arrays are not host memory: read, then copy into MLX
                buffers = [np.empty(r.nbytes, np.uint8) for r in runs]
            views = [memoryview(b) for b in buffers]
            self.reserved += spec.slot_bytes
            self.pending[key] = _Pending(self._pool.submit(self._read_runs, runs, views), buffers, spec.slot_bytes)

    def _finish(self, layer: int, group: list[int], keep: set) -> list[dict[str, mx.array]]:
        out = []
        for e in group:
            key = (layer, e)
            if key in self.slots:
                self._stats.hits += 1
                out.append(self.slots[key])
                continue
            if key not in self.pending:  # evicted since the plan was made: read it now
                self._start_reads(layer, [e], keep)
            p = self.pending.pop(key)
            try:
                seconds, reads = p.future.result()
            finally:
                self.reserved -= p.nbytes
            self._stats.misses += 1
            self._stats.reads += reads
            self._stats.bytes_read += sum(b.nbytes for b in p.buffers)
            self._stats.read_seconds += seconds
            buffers = p.buffers if shared_buffers() else [mx.array(b) for b in p.buffers]
            arrays = self._build(layer, e, buffers)
            self.slots[key] = arrays
            self.resident_bytes += self.specs[layer].slot_bytes
            self.policy.insert(key)
            out.append(arrays)
        return out

    def _drain(self) -> None:
        """Wait out reads nobody will use (after an error) and release their reservations."""
        for key in list(self.pending):
            p = self.pending.pop(key)
            try:
                p.future.result()
            except Exception:  # noqa: BLE001 - the first error is already on its way up
                pass
            self.reserved -= p.nbytes

    def _fd(self, path: Path) -> int:
        with self._fd_lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise ExpertReadError(f"{path}: shard file vanished while experts are read from it") from None
                except OSError as e:
                    raise ExpertReadError(f"{path}: cannot open shard file ({e.strerror})") from None
            return fd

    def _forget(self, path: Path) -> None:
        with self._fd_lock:  # closed in close(): another reader may still be using it
            fd = self._fds.pop(path, None)
            if fd is not None:
                self._stale_fds.append(fd)

    def _read_runs(self, runs: list[_Run], views: list[memoryview]) -> tuple[float, int]:
        """Worker thread: fill ``views`` from ``runs`` (pread, no mapping)."""
        t0, reads = time.perf_counter(), 0
        for run, view in zip(runs, views):
            fd = self._fd(run.file)
            if os.fstat(fd).st_nlink == 0:
                self._forget(run.file)  # a file put back at that path is opened afresh
                raise ExpertReadError(f"{run.file}: shard file vanished (deleted or replaced) while experts are "
                                      "read from it")
            got = 0
            while got < run.nbytes:
                try:
                    k = os.preadv(fd, [view[got:]], run.offset + got)
                except OSError as e:
                    raise ExpertReadError(f"{run.file}: reading {run.nbytes} bytes at offset {run.offset} failed "
                                          f"({e.strerror})") from None
                reads += 1
                if k == 0:
                    size = os.fstat(fd).st_size
                    raise ExpertReadError(f"{run.file}: truncated: an expert's bytes [{run.offset}, "
                                          f"{run.offset + run.nbytes}) end past the end of the file ({size} bytes)")
                got += k
        return time.perf_counter() - t0, reads

    def _build(self, layer: int, e: int, buffers: list[mx.array]) -> dict[str, mx.array]:
        """Read bytes -> the expert's arrays, converted as the loader converts them (views of the
        read buffers where the format passes through)."""
        src = self.specs[layer].experts[e]

        def get(info: TensorInfo) -> mx.array:
            n = _ITEM[info.dtype] * math.prod(info.shape)
            for run, buf in zip(src.runs, buffers):
                if run.file == info.file and run.offset <= info.offset and info.offset + n <= run.offset + run.nbytes:
                    rel = info.offset - run.offset
                    raw = buf[rel:rel + n]
                    if rel % 16:  # keep every view aligned for the kernels: copy the odd one
                        raw = mx.array(np.frombuffer(memoryview(buf), np.uint8, n, rel))
                    return raw.view(_MX_DTYPE[info.dtype]).reshape(info.shape)
            raise RuntimeError(f"expert store: tensor '{info.name}' is outside the runs read (internal error)")

        arrays = {}
        for w, entry in src.entries.items():
            converted, _ = self.convert(f"{self.specs[layer].prefix}.{w}.weight", entry, get)
            for k, a in converted.items():
                arrays[f"{w}.{k.rsplit('.', 1)[1]}"] = a
        mx.eval(arrays)
        return arrays


# ---- the MoE seam -----------------------------------------------------------------------------
class StreamedExperts(nn.Module):
    """Drop-in for ``RoutedExperts`` whose weights live in an :class:`ExpertStore`."""

    def __init__(self, store: ExpertStore, layer: int, like: RoutedExperts):
        super().__init__()
        # kept out of the parameter tree: per-call views of the store's slots go in here
        compute = RoutedExperts(like.w1.weight.shape[2], like.w1.weight.shape[1], 1, like.limit, like.grouped_dense,
                                 act_quant=like.act_quant)
        quant = store.specs[layer].quant
        if any(quant.values()):
            nn.quantize(compute, class_predicate=lambda path, m: quant.get(path) or False)
        object.__setattr__(self, "_compute", compute)
        object.__setattr__(self, "_store", store)
        self.layer = layer

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x [T, D], indices/weights [T, k] -> sum_k weights * expert_k(x) [T, D], exactly as
        RoutedExperts computes it: the same row ops per (token, expert) pair, one expert at a
        time over the rows routed to it."""
        comp: RoutedExperts = self._compute
        T, k = indices.shape
        flat = np.array(indices).reshape(-1)  # host sync: the router decides what to read
        path = comp.choose_path(flat.size)
        rows_of = {}
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(flat.max() + 2))
        for e in np.unique(flat):
            rows_of[int(e)] = order[bounds[e]:bounds[e + 1]]  # pair positions routed to e, ascending
        wflat = weights.reshape(-1)
        outs, positions = [], []
        groups = self._store.stream(self.layer, sorted(rows_of))
        try:
            for group, arrays in groups:
                part = []
                for e, slot in zip(group, arrays):
                    sel = rows_of[e]
                    for name, a in slot.items():
                        w, leaf = name.split(".")
                        comp[w][leaf] = mx.expand_dims(a, 0)  # a view: [1, ...]
                    sel_mx = mx.array(sel)
                    y = comp.pair_outputs(x[sel_mx // k], mx.zeros((sel.size, 1), mx.uint32),
                                          wflat[sel_mx].reshape(-1, 1), path)
                    part.append(y.reshape(sel.size, -1))
                    positions.append(sel)
                mx.eval(part)  # before the store may evict these slots
                outs.extend(part)
                _drop_views(comp)  # nothing outside the store may keep a slot alive
        finally:
            groups.close()  # releases the store (its lock, pins, reads in flight) on any exit
            _drop_views(comp)
        pos = np.concatenate(positions)
        y = mx.concatenate(outs, axis=0)
        if not np.array_equal(pos, np.arange(pos.size)):
            y = y[mx.array(np.argsort(pos))]  # back to [T*k] order
        return y.reshape(T, k, -1).astype(mx.float32).sum(axis=-2)


def _drop_views(comp: RoutedExperts) -> None:
    for linear in (comp.w1, comp.w2, comp.w3):
        for leaf in ("weight", "scales", "biases"):
            if isinstance(linear.get(leaf), mx.array):
                linear[leaf] = _EMPTY


_EMPTY = mx.zeros((1,))


def drafter_blocks(model) -> list[tuple[int, str, nn.Module]]:
    """The drafter's MoE blocks as (store layer, name, block): V4's MTP block (layer n, as it is
    built) or the DSpark stages (layers n + i), n the number of main layers."""
    n = len(model.layers)
    out = [(n + i, f"mtp.{i}", block) for i, block in enumerate(getattr(model, "mtp", None) or [])]
    dspark = getattr(model, "dspark", None)
    if dspark is not None:
        out += [(n + i, f"dspark.layers.{i}", stage) for i, stage in enumerate(dspark.layers)]
    return out


def attach(model, store: ExpertStore) -> list[str]:
    """Replace the routed experts of every MoE layer of ``model``, its drafter's included, by the
    store's -> the drafter blocks left resident (the store has no plan for them), which a
    RuntimeWarning names too: their bytes are outside the budget."""
    for i, layer in enumerate(model.layers):
        if i not in store.specs:
            raise WeightsError(f"the checkpoint has no routed experts for layer {i}")
        layer.ffn.experts = StreamedExperts(store, i, layer.ffn.experts)
    resident = []
    for i, name, block in drafter_blocks(model):
        if i in store.specs and store.specs[i].prefix == f"{name}.ffn.experts":
            block.ffn.experts = StreamedExperts(store, i, block.ffn.experts)
        else:
            resident.append(name)
    if resident:
        warnings.warn(f"expert store: the drafter's routed experts of {', '.join(resident)} stay resident, outside "
                      "the expert budget: their tensors are in a layout the store cannot read expert by expert",
                      RuntimeWarning, stacklevel=2)
    model.expert_store = store
    return resident


class StepGuard:
    """Rewind a cache to where it was when a model step fails while reading experts, so a
    conversation's cache never holds half a step."""

    def __init__(self, cache):
        self.cache = cache

    def __enter__(self):
        self.before = [(c.offset, c.checkpoints.get(c.offset)) for c in self.cache]
        for c in self.cache:
            c.checkpoint()
        return self

    def __exit__(self, exc_type, exc, tb):
        failed = exc_type is not None  # a read error, an interrupt, anything: no half step stays
        for c, (offset, snap) in zip(self.cache, self.before):
            if failed:
                c.rewind(offset)
            if snap is None:
                c.checkpoints.pop(offset, None)
            else:
                c.checkpoints[offset] = snap
        return False
