"""Where mlx-v4 runs: the Linux BLAS preload, Metal availability, memory queries.

The Linux ``mlx[cpu]`` wheel links the reference netlib BLAS (about 4 GFLOP/s for a float32
matmul here). Loading an optimized BLAS into the process *before* ``mlx.core`` makes MLX's
``cblas_*``/``sgemm_`` calls resolve to it instead (about 130-245 GFLOP/s, identical results).
:func:`preload_blas` does that; ``mlx_v4/__init__.py`` calls it first thing. Without an
optimized BLAS installed nothing changes: MLX keeps the reference BLAS (slow, correct).

``MLX_V4_BLAS`` overrides the choice: a library path or name to load, or ``none`` to skip.

Reproducibility: the BLAS decides float32 accumulation order, so the optimized and reference
BLAS differ in the last bits (and, with FP8 roundings on, a value may round to a neighbouring
code). Which one MLX uses depends only on whether the preload ran before ``mlx.core`` was
first imported: Python loads extensions with RTLD_NOW, so MLX's BLAS symbols are bound then
and a later load changes nothing. Importing torch or numpy first, or the thread count, does not
change it (measured; tests/test_platform.py). When mlx.core came first and an optimized BLAS
was available, :func:`preload_blas` warns once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

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
    if not sys.platform.startswith("linux") or choice.lower() == "none":
        return None
    if "mlx.core" in sys.modules:
        _warn_if_bound_to_reference_blas(choice)
        return None
    for name in ([choice] if choice else _CANDIDATES):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded_blas = name
        return name
    return None


def _global_blas() -> str | None:
    """The library that provides ``cblas_sgemm`` to everything loaded (None: only MLX's own)."""
    try:
        addr = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    info = DlInfo()
    if not ctypes.CDLL(None).dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.fname:
        return "an unknown library"
    return os.path.basename(info.fname.decode())


def _warn_if_bound_to_reference_blas(choice: str) -> None:
    """mlx.core was imported first: say so once if an optimized BLAS would have been used."""
    if _global_blas() is not None:  # already in the global scope (LD_PRELOAD, an earlier load)
        return
    wanted = choice or next((n for n in ("openblas", "mkl_rt") if ctypes.util.find_library(n)), None)
    if wanted:
        warnings.warn(
            f"mlx.core was imported before mlx_v4, so MLX keeps its reference BLAS instead of {wanted}: "
            "float32 matmuls are much slower and differ in the last bits from a process that imports "
            "mlx_v4 first (with FP8 roundings on, some values round differently). Import mlx_v4 before "
            "mlx (and before mlx_lm), or set MLX_V4_BLAS=none to use the reference BLAS everywhere.",
            RuntimeWarning, stacklevel=3)


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
