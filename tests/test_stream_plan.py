"""`mlx-v4 info flash --memory 64GB`: the recipe and expert budget per Mac, and the labelled
projection (arithmetic checked against cli/info.parameter_bytes, an independent count)."""

from __future__ import annotations

import pytest
from mlx_v4.cli import stream_plan as sp
from mlx_v4.cli.app import app
from mlx_v4.cli.memory_plan import parameter_bytes
from typer.testing import CliRunner

from mlx_v4.cache import planned_nbytes
from mlx_v4.config import preset


def test_hit_rate_interpolates_the_measured_points():
    assert sp.hit_rate(0) == 0 and sp.hit_rate(1) == 1 and sp.hit_rate(2) == 1
    for f, h in sp.MEASURED_HIT_RATES.items():
        assert sp.hit_rate(f) == pytest.approx(h)
    a, b = sorted(sp.MEASURED_HIT_RATES)[1:3]
    assert sp.hit_rate((a + b) / 2) == pytest.approx((sp.MEASURED_HIT_RATES[a] + sp.MEASURED_HIT_RATES[b]) / 2)


@pytest.fixture(scope="module")
def flash():
    args = preset("flash")
    return args, sp.stream_plan(args, context=32768, ssd_gbps=5.0)


def _bits(expert_bits: float, other_bits: float):
    """bits(name, shape) for parameter_bytes: routed experts, other matrices, 16-bit rest."""
    def bits(name, shape):
        if ".experts." in name and "shared" not in name:
            return expert_bits
        matrix = len(shape) >= 2 and not name.startswith("embed") and "tid2eid" not in name
        return other_bits if matrix else 16.0
    return bits


def _mtp_bytes(args, bits) -> float:
    """The MTP block's bytes (the release's mtp.0, which mlx-v4 loads), counted apart."""
    import math

    from mlx.utils import tree_flatten

    from mlx_v4.draft.mtp import MTPBlock

    return sum(math.prod(p.shape) * bits("mtp.0." + n, tuple(p.shape)) / 8
               for n, p in tree_flatten(MTPBlock(args, cpu=True, use_kernel=False).parameters()))


def test_flash_plan_arithmetic(flash):
    args, rows = flash
    assert [r.memory_gb for r in rows] == list(sp.MAC_SIZES_GB)
    kv = planned_nbytes(args, 32768)
    sizes = {}
    for recipe, (eb, ob) in sp.STREAM_RECIPES.items():  # the main model and its MTP block
        other = parameter_bytes(args, _bits(0.0, ob))[1] + _mtp_bytes(args, _bits(0.0, ob))
        sizes[recipe] = (parameter_bytes(args, _bits(eb, ob))[1] + _mtp_bytes(args, _bits(eb, ob)) - other, other)
    moe_layers = args.num_hidden_layers + 1  # the MTP block's experts stream with the rest
    for row in rows:
        for o in row.options:
            experts, other = sizes[o.recipe]
            assert o.expert_bytes == pytest.approx(experts)
            usable = 0.75 * row.memory_gb * 2**30
            fixed = other * 1.03 + kv + 2e9
            if o.resident:
                assert fixed + 1.03 * o.expert_bytes <= usable
                continue
            assert o.budget == pytest.approx(max(0.0, (usable - fixed) / 1.03))
            one = o.expert_bytes / (moe_layers * args.n_routed_experts)
            assert o.fits == (o.budget >= args.num_experts_per_tok * one)
            if o.fits:
                h = sp.hit_rate(o.budget / o.expert_bytes)
                read = (1 - h) * args.num_experts_per_tok * moe_layers * one
                assert o.hit == pytest.approx(h) and o.read_per_token == pytest.approx(read)
                assert o.tps == pytest.approx(5e9 / read)


def test_flash_plan_suggestions(flash):
    _, rows = flash
    assert all(r.choice is not None for r in rows)  # Flash runs on every size from 24 GB
    order = list(sp.STREAM_RECIPES)
    for r in rows:
        c = r.choice
        good = [o for o in r.options if o.fits and (o.resident or o.tps >= sp.DEFAULT_TARGET_TPS)]
        if good:  # the best quality that is resident or fast enough
            assert c is good[0] and all(order.index(c.recipe) <= order.index(o.recipe) for o in good)
        else:  # else the fastest
            assert c.tps == max(o.tps for o in r.options if o.fits)
    assert rows[-1].choice.resident and rows[-1].choice.recipe == "native"  # 256 GB holds the release as is
    assert not rows[0].choice.resident  # 24 GB streams


def test_info_memory_cli():
    runner = CliRunner(env={"COLUMNS": "160"})
    r = runner.invoke(app, ["info", "flash", "--memory", "64GB", "--ssd-gbps", "3"])
    assert r.exit_code == 0, r.output
    assert "64 GB: convert with --recipe" in r.stdout and "--expert-budget" in r.stdout
    assert "PROJECTION" in r.stdout and "real Flash routing pattern was not measured" in r.stdout
    for gb in sp.MAC_SIZES_GB:
        assert f"{gb} GB" in r.stdout
    assert "Included above: the MTP drafter (6.61B parameters). Its 256 routed experts (6.44B parameters) stream" \
        in " ".join(r.stdout.split())
    r = runner.invoke(app, ["info", "pro", "--memory", "80GB"])  # an odd size gets its own row
    assert r.exit_code == 0 and "80 GB: " in r.stdout
    for args, words in ((["info", "demo", "--memory", "64GB"], ["plans flash, pro or v41-flash"]),
                        (["info", "flash", "--memory", "64GB", "--ssd-gbps", "0"], ["--ssd-gbps"])):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert all(w in r.stderr for w in words), r.stderr
