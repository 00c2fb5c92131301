"""`mlx-v4 info` for DeepSeek V4.1: the preset and a checkpoint directory."""

from pathlib import Path

from mlx_v4.cli.info import plan

from mlx_v4.v41.cache import bytes_per_token
from mlx_v4.v41.config import preset


def test_v41_flash_plan():
    p = plan("v41-flash", recipe=None, bits=None, context=1 << 20)
    assert p.name == "DeepSeek V4.1 Flash"
    assert p.cache_bytes == 890 * (1 << 20) + bytes_per_token(preset("v41-flash"))["window_constant"]
    # resident weights: 384 FP4 experts x 40 layers dominate; the Engram tables are not counted
    assert 540e9 < p.params < 560e9 and 290e9 < p.weights_bytes < 310e9
    assert any("Engram tables: 197B parameters" in n for n in p.notes)


def test_v41_checkpoint_plan():
    p = plan(str(Path(__file__).parent / "fixtures" / "tiny_v41" / "model"), recipe=None, bits=None, context=64)
    assert p.params > 0 and p.cache_bytes == 64 * (36 / 2 + 36 + 17 / 2 + 17) + 8 * 15 * (64 + 2)
    assert p.drafter is None  # the fixture has no drafter


def test_v41_plan_counts_the_drafter_apart(tmp_path):
    import json

    from mlx_v4.testing.dspark_v41 import write_tiny_v41_dspark_checkpoint

    model = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"
    write_tiny_v41_dspark_checkpoint(tmp_path, json.loads((model / "config.json").read_text()), seed=3)
    without = plan(str(model), recipe=None, bits=None, context=64)
    p = plan(str(tmp_path), recipe=None, bits=None, context=64)
    d = p.drafter
    assert (d.kind, d.moe_layers, d.n_experts, d.top_k) == ("DSpark", 2, 4, 3)
    assert p.params == without.params and p.weights_bytes == without.weights_bytes + d.nbytes
    assert 0 < d.expert_bytes < d.nbytes and "Drafter (DSpark, for speculative decoding)" in p.notes[0]
    preset_plan = plan("v41-flash", recipe=None, bits=None, context=64)
    assert preset_plan.drafter.kind == "DSpark" and 14e9 < preset_plan.drafter.params < 15e9


def test_v41_memory_plan_budget_covers_experts_then_engram():
    from mlx_v4.cli.info_v41 import stream_plan_v41
    from mlx_v4.cli.stream_plan import FIXED_OVERHEAD, GPU_FRACTION

    args = preset("v41-flash")
    name, rows, notes = stream_plan_v41("v41-flash", 256, context=65536, ssd_gbps=5, sizes_gb=[128, 256, 512])
    assert name == "DeepSeek V4.1 Flash" and [r.memory_gb for r in rows] == [128, 256, 512]
    # the backbone's experts and the DSpark drafter's (3 stages x 128), which stream in the same budget
    n_experts = args.num_hidden_layers * args.n_routed_experts + args.dspark_stages * args.dspark_n_routed_experts
    experts = n_experts * 3 * args.hidden_size * args.moe_intermediate_size
    by_gb = {r.memory_gb: r.choice for r in rows}
    assert by_gb[256].expert_bytes == experts * 4.25 / 8  # the release's FP4 + one E8M0 per 32
    assert not by_gb[256].resident and 0 < by_gb[256].budget < by_gb[256].expert_bytes
    assert by_gb[512].resident
    kv = 890 * 65536 + bytes_per_token(args)["window_constant"]
    other = (GPU_FRACTION * 256 * 2**30 - by_gb[256].budget * 1.03 - kv - FIXED_OVERHEAD) / 1.03
    assert 8e9 < other < 12e9  # attention, shared experts, embeddings and head at FP8/BF16
    rows_per_token = (args.engram_max_ngram_size - 1) * args.engram_n_heads * 2
    assert rows_per_token == 48 and "Each token reads 48 Engram rows" in notes[0]
    # a ~101 GB table never fits after every expert (296 GB of them with the drafter's) on these Macs
    smallest = min(args.engram_num_embeddings) * args.engram_head_dim * 33 / 32
    left_512 = GPU_FRACTION * 512 * 2**30 - other * 1.03 - kv - FIXED_OVERHEAD - by_gb[512].expert_bytes * 1.03
    assert 0 < left_512 < smallest and "(on none of these Macs)" in notes[0]
    assert "Included above: the DSpark drafter" in notes[-1] and "top-3 on 3 layer(s)" in notes[-1]


def test_v41_memory_cli():
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner(env={"COLUMNS": "160"}).invoke(app, ["info", "v41-flash", "--memory", "256GB"])
    assert r.exit_code == 0, r.output
    assert "DeepSeek V4.1 Flash: recipe and expert budget per Mac" in r.stdout
    assert "256 GB: run the release's weights as they are, with --expert-budget 188GB." in r.stdout
    assert "PROJECTION" in r.stdout and "Engram tables: 202.76 GB on disk, in the same budget" in r.stdout
