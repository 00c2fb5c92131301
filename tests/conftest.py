"""Imported before every test module, so the in-process tests run on one BLAS whatever module
pytest collects first: MLX's reference BLAS (MLX_V4_BLAS=none while mlx_v4 is first imported).

That is what they ran on before, by accident (the first test module imported mlx.core before
mlx_v4, which leaves MLX on its reference BLAS; see mlx_v4/platform.py), and some tolerances
of FP8-rounding tests were set there: with OpenBLAS, chunked and one-shot prefill in
test_generate.py differ by one FP8 rounding flip (3e-4), above its 1e-4 bound. Subprocesses
(ranks, CLI, servers) still import mlx_v4 first and use the optimized BLAS, as users do.
"""

import os

_saved = os.environ.get("MLX_V4_BLAS")
os.environ["MLX_V4_BLAS"] = "none"
import mlx_v4  # noqa: E402, F401

if _saved is None:
    del os.environ["MLX_V4_BLAS"]
else:
    os.environ["MLX_V4_BLAS"] = _saved
