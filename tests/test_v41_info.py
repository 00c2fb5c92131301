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
