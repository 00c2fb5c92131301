"""The Linux BLAS preload: used when present, harmless when absent or refused."""

import subprocess
import sys

import pytest

PROBE = """
import sys, mlx_v4
from mlx_v4 import platform
maps = open('/proc/self/maps').read()
print(platform.loaded_blas, 'openblas' in maps or 'mkl' in maps)
import mlx.core as mx
a = mx.ones((64, 64))
print(float((a @ a).sum()))
"""


def _run(env_value):
    import os

    env = dict(os.environ)
    env.pop("MLX_V4_BLAS", None)
    if env_value is not None:
        env["MLX_V4_BLAS"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split("\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is Linux-only")
def test_preload_is_used_when_installed():
    import ctypes.util

    if not (ctypes.util.find_library("openblas") or ctypes.util.find_library("mkl_rt")):
        pytest.skip("no optimized BLAS installed on this machine (scripts/install.sh installs one)")
    loaded, result = _run(None)[:2]
    assert loaded.split()[1] == "True" and loaded.split()[0] != "None"
    assert result == "262144.0"


def test_preload_is_harmless_when_absent_or_disabled():
    for value in ("none", "libdoes-not-exist.so.7"):
        loaded, result = _run(value)[:2]
        assert loaded.split()[0] == "None"
        assert result == "262144.0"  # same answer from the reference BLAS


def test_preload_after_mlx_is_a_no_op():
    code = "import mlx.core, mlx_v4; print(mlx_v4.platform.loaded_blas)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


# ---- reproducibility: what the process imported first ------------------------------------------

LAYER_PROBE = """
import hashlib, os, sys
{first}
import mlx_v4
import mlx.core as mx
import numpy as np
from mlx_v4.testing.tiny import random_model, tiny_args
args = tiny_args(q_lora_rank=128, moe_intermediate_size=128, num_hidden_layers=2, compress_ratios=[0, 4])
model = random_model(args, seed=3)
x = mx.random.normal((1, 160, args.hidden_size), key=mx.random.key(1))  # 40 CSA entries > index_topk
out = model.layers[1].attn(x, model.make_cache()[1])  # a CSA layer: indexer, FP8 KV, act_quant
print(args.act_quant, hashlib.sha256(np.array(out).tobytes()).hexdigest())
"""

_FIRSTS = {
    "mlx_v4 first": "",
    "numpy first": "import numpy",
    # what a framework that puts a BLAS in the global scope first (as torch's loader may) does
    "a BLAS loaded globally first": "import ctypes; ctypes.CDLL('libopenblas.so.0', mode=ctypes.RTLD_GLOBAL)",
    "mlx.core first": "import mlx.core",
}


def _layer_run(first: str, **env_overrides) -> tuple[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLX_V4_BLAS"} | env_overrides
    out = subprocess.run([sys.executable, "-c", LAYER_PROBE.format(first=first)], capture_output=True, text=True,
                         env=env, check=True)
    return out.stdout.strip(), out.stderr


def _optimized_blas() -> bool:
    import ctypes.util

    return sys.platform.startswith("linux") and bool(ctypes.util.find_library("openblas"))


@pytest.mark.skipif(not _optimized_blas(), reason="needs libopenblas (scripts/install.sh installs it)")
def test_layer_output_does_not_depend_on_what_was_imported_first():
    """numpy, another global BLAS, the thread count: one attention layer's output is bit-identical.
    mlx.core imported before mlx_v4 cannot be fixed (MLX's BLAS symbols are bound at its import)
    and gives other bits: that case warns once, and the others stay silent."""
    want, err = _layer_run("")
    assert want.startswith("True ") and "RuntimeWarning" not in err
    for name in ("numpy first", "a BLAS loaded globally first"):
        got, err = _layer_run(_FIRSTS[name])
        assert got == want and "RuntimeWarning" not in err, name
    got, err = _layer_run("", OPENBLAS_NUM_THREADS="1")
    assert got == want
    try:
        import importlib.util

        has_torch = importlib.util.find_spec("torch") is not None
    except ValueError:
        has_torch = False
    if has_torch:
        got, err = _layer_run("import torch")
        assert got == want and "RuntimeWarning" not in err
    got, err = _layer_run(_FIRSTS["mlx.core first"])
    assert err.count("RuntimeWarning: mlx.core was imported before mlx_v4") == 1
    assert got != want  # the reference BLAS: why the warning exists


def test_reference_blas_is_also_independent_of_import_order():
    """MLX_V4_BLAS=none: the reference BLAS whatever comes first, no warning, same bits."""
    want, err = _layer_run("", MLX_V4_BLAS="none")
    assert not err
    for first in _FIRSTS.values():
        if "libopenblas" in first:
            continue  # a global BLAS loaded by someone else is used by MLX: not the reference BLAS
        got, err = _layer_run(first, MLX_V4_BLAS="none")
        assert got == want and "RuntimeWarning" not in err, first
