"""Eviction policies of the expert store (mlx_v4/experts.py): which resident expert to drop.

A policy sees ``touch(key)`` for every expert a layer asks for, ``insert(key)`` when one becomes
resident and ``remove(key)`` when it is evicted; ``victims()`` yields resident keys, the best
to evict first (the store skips pinned ones and stops at the first it takes).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator

POLICIES = ("lru", "lfu")
#: The policy benchmarks/expert_stream.py measured best (see BENCHMARKS.md).
DEFAULT_POLICY = "lfu"


class PolicyError(ValueError):
    """An unknown policy name."""


class _LRU:
    name = "lru"

    def __init__(self):
        self.order: OrderedDict = OrderedDict()

    def touch(self, key) -> None:
        if key in self.order:
            self.order.move_to_end(key)

    def insert(self, key) -> None:
        self.order[key] = None

    def remove(self, key) -> None:
        self.order.pop(key, None)

    def victims(self) -> Iterator:
        yield from self.order  # least recent first (the caller stops before it evicts)


class _LFU:
    """Frequency with dynamic aging (LFU-DA): priority = age + requests, where ``age`` is the
    priority of the last victim, so experts hot long ago fade. Request counts are kept for
    experts that are not resident too (seeding a returning expert with its history)."""

    name = "lfu"

    def __init__(self):
        self.count: dict = {}
        self.prio: dict = {}
        self.heap: list = []
        self.age = 0.0
        self.tick = 0

    def touch(self, key) -> None:
        self.tick += 1
        self.count[key] = self.count.get(key, 0) + 1
        if key in self.prio:
            self._push(key)

    def insert(self, key) -> None:
        self._push(key)

    def _push(self, key) -> None:
        self.prio[key] = (self.age + self.count.get(key, 1), self.tick)
        heapq.heappush(self.heap, (*self.prio[key], key))

    def remove(self, key) -> None:
        if key in self.prio:
            self.age = max(self.age, self.prio.pop(key)[0])

    def victims(self) -> Iterator:
        skipped = []
        try:
            while self.heap:
                p, t, key = heapq.heappop(self.heap)
                if self.prio.get(key) != (p, t):
                    continue  # stale entry
                skipped.append((p, t, key))
                yield key
        finally:  # runs when the caller stops: what was looked at stays queued
            for item in skipped:
                heapq.heappush(self.heap, item)


def make_policy(name: str):
    if name == "lru":
        return _LRU()
    if name == "lfu":
        return _LFU()
    raise PolicyError(f"expert policy {name!r}: choose one of {', '.join(POLICIES)}")
