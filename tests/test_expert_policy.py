"""Eviction policies of the expert store: which expert each one gives up."""

from __future__ import annotations

import pytest

from mlx_v4.expert_policy import PolicyError, make_policy


def test_policies_choose_their_victims():
    lru, lfu = make_policy("lru"), make_policy("lfu")
    for p in (lru, lfu):
        for key in ("a", "b", "c"):
            p.touch(key)
            p.insert(key)
        for _ in range(3):
            p.touch("a")  # a: popular but not recent
        p.touch("b")
        p.touch("c")
    assert next(iter(lru.victims())) == "a"  # least recently used
    assert next(iter(lfu.victims())) == "b"  # least often used (b, c tie on count: older first)
    lfu.remove("b")
    assert list(lfu.victims())[:2] == ["c", "a"]
    with pytest.raises(PolicyError, match="choose one of lru, lfu"):
        make_policy("fifo")


def test_lfu_ages_out_experts_that_were_hot_long_ago():
    lfu = make_policy("lfu")
    lfu.touch("old")
    lfu.insert("old")
    for _ in range(4):
        lfu.touch("old")  # 5 requests, long ago
    evicted = []
    for i in range(10):  # a stream of new experts, each asked once, one slot to spare
        key = f"new{i}"
        lfu.touch(key)
        lfu.insert(key)
        victim = next(iter(lfu.victims()))
        lfu.remove(victim)
        evicted.append(victim)
        if victim == "old":
            break
    # without aging "old" (5 requests) would outlive every new expert (1 request each)
    assert evicted[-1] == "old" and len(evicted) <= 6
    assert evicted[:-1] == [f"new{i}" for i in range(len(evicted) - 1)]
