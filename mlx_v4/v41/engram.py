"""Engram n-gram memory (DeepSeek V4.1, official ``Engram``), with its tables left on disk.

Before the block of an Engram layer, each position fetches ``n_cols`` rows (one per n-gram
size and hash head, see :mod:`engram_hash`) of ``head_dim`` from the layer's table; ``wkv``
turns their concatenation into one key per hyper-connection copy and one shared value, and each
copy adds ``gate * value`` with ``gate = sigmoid(signed_sqrt(dot))``, ``dot`` the normalised
(per token and copy, over ``dim``) product of stream, ``q_weight * k_weight`` and key.

The released tables are 384M rows x 256 FP8 (about 98 GB each), so :class:`EngramTable` does not
load one: it reads the rows a step needs with ``os.pread`` from the safetensors file (FP8 e4m3
codes + one E8M0 byte per 32 columns) and dequantises just those. A table is read into memory
only when the budget allows it: with ``expert_budget`` the expert store decides
(:meth:`mlx_v4.experts.ExpertStore.admit_tables`, which also reports these reads), without one
the loader's ``engram_budget_bytes`` (default 0: never).

Read-ahead: the rows depend only on the token ids and the n-gram history, never on an
activation, so the model requests every Engram layer's rows when a step starts
(:meth:`EngramTable.request`); the reads run on reader threads while the layers before each
Engram layer compute, and the layer waits only for what is still missing.
"""

from __future__ import annotations

import os
import threading
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..layers.fake_quant import gemm_input

#: Rows one reader thread fetches per task (at most); a lookup is spread over up to READ_THREADS
#: tasks of at least READ_MIN_SPAN rows, so a decode step's few rows are in flight together.
READ_BATCH = 256
READ_MIN_SPAN = 4
READ_THREADS = 16
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="engram-read")
    return _POOL


class EngramTableError(ValueError):
    """An Engram table whose tensors do not have the layout the config calls for."""


class EngramTable:
    """Rows of one FP8 table [rows, dim] + E8M0 scales [rows, dim / 32], read on demand."""

    #: Called after every row read from disk (benchmarks simulate a slower disk with it).
    read_hook = None

    def __init__(self, weight_info, scale_info, rows: int, dim: int):
        for info, width in ((weight_info, dim), (scale_info, dim // 32)):
            if info.dtype not in ("F8_E4M3", "F8_E8M0", "U8", "I8") or tuple(info.shape) != (rows, width):
                raise EngramTableError(f"{info.file}: tensor '{info.name}' is {info.dtype} {list(info.shape)}, "
                                       f"expected one byte per value, shape [{rows}, {width}]")
        self.path, self.rows, self.dim = weight_info.file, rows, dim
        self._weight_offset, self._scale_offset = weight_info.offset, scale_info.offset
        self._scale_path = scale_info.file
        self._fds: dict = {}
        self._lock = threading.Lock()
        self.reset_stats()
        self._resident: tuple[np.ndarray, np.ndarray] | None = None

    def reset_stats(self) -> None:
        self.rows_requested = 0  # rows looked up, repeats included (a step reads each distinct row once)
        self.rows_read = 0  # distinct rows per lookup read from disk (misses)
        self.rows_hit = 0  # ... served from the resident table
        self.reads = 0  # pread calls
        self.read_seconds = 0.0  # from the lookup's request to its last row
        self.wait_seconds = 0.0  # of those, the time the step waited for the rows

    def stats(self) -> dict:
        return {"requested": self.rows_requested, "hits": self.rows_hit, "misses": self.rows_read,
                "bytes_read": self.rows_read * self.row_bytes, "reads": self.reads,
                "read_seconds": self.read_seconds, "wait_seconds": self.wait_seconds}

    @property
    def row_bytes(self) -> int:
        return self.dim + self.dim // 32

    @property
    def nbytes(self) -> int:
        return self.rows * (self.dim + self.dim // 32)

    @property
    def resident(self) -> bool:
        return self._resident is not None

    def make_resident(self) -> None:
        """Read the whole table into memory (only where the budget allows: see load_v41)."""
        codes = np.empty((self.rows, self.dim), np.uint8)
        scales = np.empty((self.rows, self.dim // 32), np.uint8)
        for arr, path, offset in ((codes, self.path, self._weight_offset), (scales, self._scale_path, self._scale_offset)):
            view, done = memoryview(arr.reshape(-1)), 0
            while done < arr.nbytes:
                n = os.preadv(self._fd(path), [view[done:done + (1 << 30)]], offset + done)
                if n <= 0:
                    raise EngramTableError(f"{path}: truncated Engram table (read {done} of {arr.nbytes} bytes)")
                done += n
        self._resident = (codes, scales)

    def _fd(self, path) -> int:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise EngramTableError(f"{path}: cannot open the Engram table's file ({e.strerror})") from None
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def read(self, rows: np.ndarray) -> mx.array:
        """rows (int64, any shape) -> float32 values [..., dim]; each distinct row read once."""
        return self.request(rows, inline=True).result()

    def request(self, rows: np.ndarray, inline: bool = False) -> EngramRead:
        """Start reading ``rows`` (int64, any shape) on the reader threads and return at once;
        ``.result()`` waits for them. ``inline``: a lookup of at most READ_BATCH rows is read
        here instead (nothing to overlap it with)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise EngramTableError(f"{self.path}: Engram row {int(rows.max())} is outside the table's {self.rows} rows")
        unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
        pending = EngramRead(self, rows.shape, unique, inverse)
        if self._resident is not None:
            pending.codes, pending.scales = self._resident[0][unique], self._resident[1][unique]
            pending.from_memory = True
            return pending
        width = self.dim // 32
        pending.codes = np.empty((len(unique), self.dim), dtype=np.uint8)
        pending.scales = np.empty((len(unique), width), dtype=np.uint8)
        wfd, sfd = self._fd(self.path), self._fd(self._scale_path)
        ids = unique.tolist()

        def fetch(lo: int, hi: int) -> float:
            codes, scales = pending.codes, pending.scales
            for i in range(lo, hi):
                r = ids[i]
                code = os.pread(wfd, self.dim, self._weight_offset + r * self.dim)
                scale = os.pread(sfd, width, self._scale_offset + r * width)
                if len(code) != self.dim or len(scale) != width:
                    raise EngramTableError(f"{self.path}: truncated: Engram row {r} is past the end of the file")
                codes[i], scales[i] = np.frombuffer(code, np.uint8), np.frombuffer(scale, np.uint8)
                if self.read_hook is not None:
                    self.read_hook()
            return time.perf_counter()

        if inline and len(ids) <= READ_BATCH:  # the step waits for all of it
            pending.done_at = [fetch(0, len(ids))]
            pending.waited = pending.done_at[0] - pending.started
        else:  # pread releases the GIL: several reads in flight keep an SSD's queue busy
            span = min(READ_BATCH, max(READ_MIN_SPAN, -(-len(ids) // READ_THREADS)))
            spans = [(lo, min(len(ids), lo + span)) for lo in range(0, len(ids), span)]
            pending.futures = [_pool().submit(fetch, lo, hi) for lo, hi in spans]
        return pending


class EngramRead:
    """The rows of one lookup, being read from a table (:meth:`EngramTable.request`)."""

    def __init__(self, table: EngramTable, shape: tuple[int, ...], unique: np.ndarray, inverse: np.ndarray):
        self.table, self.shape, self.unique, self.inverse = table, shape, unique, inverse
        self.codes = self.scales = None
        self.from_memory = False
        self.futures: list = []
        self.done_at: list[float] = []
        self.started = time.perf_counter()
        self.waited = 0.0

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def result(self) -> mx.array:
        """Wait for the reads -> float32 values [*shape, dim] (the first read error is raised)."""
        table, n = self.table, len(self.unique)
        table.rows_requested += len(self.inverse)
        if self.from_memory:
            table.rows_hit += n
        else:
            t0 = time.perf_counter()
            for f in self.futures:  # every span finishes before an error is raised: no write after
                f.exception()
            self.done_at += [f.result() for f in self.futures]
            table.rows_read += n
            table.reads += 2 * n
            table.read_seconds += max(self.done_at, default=t0) - self.started
            table.wait_seconds += self.waited + time.perf_counter() - t0
        width = table.dim // 32
        values = mx.from_fp8(mx.array(self.codes), dtype=mx.float32).reshape(n, width, 32)
        exps = mx.array(self.scales).astype(mx.uint32)
        scale = mx.where(exps == 0, mx.array(2.0**-127, mx.float32), (exps << 23).view(mx.float32))
        values = (values * scale[..., None]).reshape(n, table.dim)
        return values[mx.array(self.inverse.astype(np.int32))].reshape(*self.shape, table.dim)


class Engram(nn.Module):
    def __init__(self, dim: int, hc_mult: int, n_cols: int, head_dim: int, eps: float, act_block: int = 0):
        super().__init__()
        self.dim, self.hc_mult, self.eps = dim, hc_mult, eps
        self.act_block = act_block  # wkv is an FP8 GEMM: its input rounded as official linear() does
        self.wkv = nn.Linear(n_cols * head_dim, dim * (hc_mult + 1), bias=False)
        self.q_weight = mx.ones((hc_mult, dim))
        self.k_weight = mx.ones((hc_mult, dim))
        self.table: EngramTable | None = None  # attached by the loader; not a parameter

    def __call__(self, x: mx.array, rows: np.ndarray | EngramRead) -> mx.array:
        """x [B, L, hc, D] streams; rows [B, L, n_cols] table rows, or their read already under
        way (``self.table.request(rows)``) -> new streams."""
        B, L, hc, D = x.shape
        if isinstance(rows, EngramRead):
            if not rows.done():  # compute the layers before this one while the disk works
                mx.async_eval(x)
            emb = rows.result().reshape(B, L, -1)
        else:
            emb = self.table.read(rows).reshape(B, L, -1)
        kv = self.wkv(gemm_input(emb.astype(x.dtype), self.act_block))
        key = kv[..., : hc * D].astype(mx.float32).reshape(B, L, hc, D)
        value = kv[..., hc * D:].astype(mx.float32)
        h = x.astype(mx.float32)
        w = self.q_weight.astype(mx.float32) * self.k_weight.astype(mx.float32)
        rstd = mx.rsqrt(mx.mean(h * h, axis=-1) + self.eps) * mx.rsqrt(mx.mean(key * key, axis=-1) + self.eps)
        dot = (h * w * key).sum(axis=-1) * rstd * D**-0.5
        root = mx.sqrt(mx.maximum(mx.abs(dot), 1e-6))
        gate = mx.sigmoid(mx.where(dot < 0, -root, root))
        return (h + gate[..., None] * value[:, :, None, :]).astype(x.dtype)
