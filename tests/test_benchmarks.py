"""benchmarks/: the comparison script runs each engine in a process of its own."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "vs_transformers.py"


def test_vs_transformers_orchestrator_imports_no_engine():
    """The parent process only spawns and compares: neither torch nor MLX is loaded in it."""
    code = (f"import runpy, sys; runpy.run_path({str(SCRIPT)!r}, run_name='not_main'); "
            "print(sorted(m for m in ('torch', 'mlx', 'mlx.core', 'mlx_v4') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_vs_transformers_mlx_engine_alone(tmp_path):
    """The mlx engine, in its own process, on transformers-format files (the tiny fixture)."""
    (tmp_path / "ids.json").write_text(json.dumps([[5, 17, 300, 42, 7, 99, 1000, 3]]))
    subprocess.run([sys.executable, str(SCRIPT), "--engine", "mlx", "--model-dir", str(ROOT / "tests/fixtures/tiny_hf"),
                    "--ids", str(tmp_path / "ids.json"), "--out", str(tmp_path / "r.json"), "--decode", "3",
                    "--chunk", "4"], check=True, timeout=300)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["engine"] == "mlx-v4" and r["prefill"] > 0 and r["decode"] > 0
    assert len(r["tokens"]) == 4 and len(r["last_logits"]) == 1024
