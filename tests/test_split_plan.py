"""The multi-machine planner (mlx_v4/split_plan.py): layer balancing, per-rank shares, --layers
parsing and the splits that cannot be made."""

from __future__ import annotations

import random

import pytest

from mlx_v4 import split_plan
from mlx_v4.config import ModelArgs
from mlx_v4.parallel import SplitError, check_tensor_split
from mlx_v4.testing.tiny import TINY_CONFIG


def test_balance_by_bytes():
    assert split_plan.balance_layers([1.0] * 8, 2) == [(0, 4), (4, 8)]
    # heavy extras on the ends push layers toward the middle rank
    assert split_plan.balance_layers([1.0] * 5, 3, first_extra=2.0, last_extra=2.0) == [(0, 1), (1, 4), (4, 5)]
    # optimal against brute force on random costs
    import itertools

    rng = random.Random(0)
    for _ in range(20):
        costs = [rng.uniform(1, 5) for _ in range(7)]
        first, last = rng.uniform(0, 6), rng.uniform(0, 6)

        def worst(ranges, costs=costs, first=first, last=last):
            return max(sum(costs[s:e]) + (first if i == 0 else 0) + (last if i == len(ranges) - 1 else 0)
                       for i, (s, e) in enumerate(ranges))

        best = min(worst(list(zip((0, *cuts), (*cuts, 7)))) for cuts in itertools.combinations(range(1, 7), 2))
        assert abs(worst(split_plan.balance_layers(costs, 3, first, last)) - best) < 1e-9
    assert split_plan.balance_layers([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    ranges = split_plan.balance_layers([1.0] * 61, 4)
    assert [e - s for s, e in ranges] in ([16, 15, 15, 15], [15, 16, 15, 15], [15, 15, 16, 15], [15, 15, 15, 16])


def test_plan_real_configs():
    from mlx_v4 import config

    pro = config.preset("pro")
    split = split_plan.plan_split(pro, 4)
    assert split.ranges[0][0] == 0 and split.ranges[-1][1] == 61
    shares = split_plan.plan_ranks(pro, split, 65536)
    total = sum(s.weights_bytes for s in shares)
    assert 700e9 < total < 1000e9  # about 805 GiB as released
    assert max(s.weights_bytes for s in shares) < 1.1 * total / 4
    t = split_plan.plan_ranks(pro, split_plan.plan_split(pro, 8, "tensor"), 65536)
    assert t[0].weights_bytes < total / 6  # experts dominate and are split
    assert t[0].kv_bytes == split_plan.plan_ranks(pro, split_plan.plan_split(pro, 1), 65536)[0].kv_bytes


def test_layers_override_parsing():
    assert split_plan.parse_layers("0-20,21-42", 43, 2) == [(0, 21), (21, 43)]
    assert split_plan.parse_layers("0,1-2,3", 4, 3) == [(0, 1), (1, 3), (3, 4)]
    for spec, msg in [("0-20,22-42", "layer 21 is missing"), ("0-21,21-42", "given twice"),
                      ("0-20", "covers layers 0-20"), ("0-20,21-x", "not a layer range"),
                      ("5-3,4-42", "ends before it starts")]:
        with pytest.raises(SplitError, match=msg):
            split_plan.parse_layers(spec, 43, 2)
    with pytest.raises(SplitError, match="gives 2 ranges for 3 ranks"):
        split_plan.parse_layers("0-20,21-42", 43, 3)


def test_impossible_splits():
    args = ModelArgs.from_dict(TINY_CONFIG)  # 4 layers, 4 heads, 2 groups, 8 experts
    with pytest.raises(SplitError, match="cannot split 4 layers over 5 ranks"):
        split_plan.plan_split(args, 5)
    with pytest.raises(SplitError, match="o_groups=2"):
        check_tensor_split(args, 4)
    with pytest.raises(SplitError, match="num_attention_heads=4, o_groups=2, n_routed_experts=8"):
        split_plan.plan_split(args, 3, "tensor")
    with pytest.raises(SplitError, match="pipeline only"):
        split_plan.plan_split(args, 2, "tensor", "0-1,2-3")
    with pytest.raises(SplitError, match="unknown parallel mode"):
        split_plan.plan_split(args, 2, "data")
