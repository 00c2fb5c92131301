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
