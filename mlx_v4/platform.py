"""Where mlx-v4 runs: the Linux BLAS preload, Metal availability, memory queries.

The Linux ``mlx[cpu]`` wheel links the reference netlib BLAS (about 4 GFLOP/s for a float32
matmul here). Loading an optimized BLAS into the process *before* ``mlx.core`` makes MLX's
``cblas_*``/``sgemm_`` calls resolve to it instead (about 130-245 GFLOP/s, identical results).
:func:`preload_blas` does that; ``mlx_v4/__init__.py`` calls it first thing. Without an
optimized BLAS installed nothing changes: MLX keeps the reference BLAS (slow, correct).

``MLX_V4_BLAS`` overrides the choice: a library path or name to load, or ``none`` to skip.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "libopenblas.so.0",  # Debian/Ubuntu libopenblas0-pthread / -openmp
    "libopenblas.so",
    "libmkl_rt.so.2",
    "libmkl_rt.so",
)

#: The library preload_blas() loaded, or None.
loaded_blas: str | None = None


def preload_blas() -> str | None:
    """Load an optimized BLAS globally before mlx.core on Linux; return its name or None.

    Harmless when none is installed, on macOS (MLX uses Accelerate/Metal), or when mlx.core
    is already imported (too late to interpose; then it does nothing)."""
    global loaded_blas
    if loaded_blas is not None:
        return loaded_blas
    choice = os.environ.get("MLX_V4_BLAS", "")
    if not sys.platform.startswith("linux") or choice.lower() == "none" or "mlx.core" in sys.modules:
        return None
    for name in ([choice] if choice else _CANDIDATES):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded_blas = name
        return name
    return None


def metal_available() -> bool:
    import mlx.core as mx

    return mx.metal.is_available()


def default_dtype():
    """float32 on the CPU backend (bf16 matmuls never use BLAS there), bf16 on Metal."""
    import mlx.core as mx

    return mx.bfloat16 if metal_available() else mx.float32


def total_memory_bytes() -> int:
    """Physical memory of this machine (unified memory on a Mac)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
