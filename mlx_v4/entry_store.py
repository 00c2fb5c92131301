"""Append-only rows kept in parallel arrays: the compressed entries and index keys of the KV
caches (mlx_v4/cache.py, mlx_v4/v41/cache.py). Its own module so that both caches use it
without importing each other."""

from __future__ import annotations

import math

import mlx.core as mx

_GROW = 256  # minimum entries added to an append-only store when it fills
_GROW_FACTOR = 0.25  # ...or this fraction of its size, so copies stay O(n) overall


class EntryStore:
    """Append-only rows [B, n, ...] kept in one or more parallel arrays (the packed parts)."""

    def __init__(self):
        self.parts: list[mx.array] | None = None
        self.length = 0
        self.planned = 0  # rows to allocate at the first append (see reserve())

    @property
    def capacity(self) -> int:
        return 0 if self.parts is None else self.parts[0].shape[1]

    def reserve(self, capacity: int, like: tuple[mx.array, ...]) -> None:
        """Grow to hold ``capacity`` rows shaped like ``like`` (one row each)."""
        if capacity <= self.capacity:
            return
        grow = capacity - self.capacity
        fresh = [mx.zeros((p.shape[0], grow, *p.shape[2:]), dtype=p.dtype) for p in like]
        self.parts = fresh if self.parts is None else [
            mx.concatenate([old, new], axis=1) for old, new in zip(self.parts, fresh)]

    def append(self, parts: tuple[mx.array, ...]) -> None:
        n = parts[0].shape[1]
        if n == 0:
            return
        if self.parts is None and self.planned >= n:
            self.reserve(self.planned, parts)
        elif self.length + n > self.capacity:
            need = self.length + n - self.capacity
            step = max(_GROW, int(self.capacity * _GROW_FACTOR))
            self.reserve(self.capacity + step * math.ceil(need / step), parts)
        for buf, p in zip(self.parts, parts):
            buf[:, self.length: self.length + n] = p
        self.length += n

    def view(self, end: int | None = None) -> list[mx.array]:
        end = self.length if end is None else end
        return [] if self.parts is None else [p[:, :end] for p in self.parts]

    def truncate(self, length: int) -> None:
        if length > self.length:
            raise ValueError(f"cannot truncate {self.length} entries to {length}")
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the filled rows)."""
        return 0 if self.parts is None else sum(p.nbytes for p in self.parts)
