"""Imported before every test module: mlx_v4 first, so its BLAS preload runs before any test
module imports mlx.core (otherwise the suite's float32 results would depend on which module
pytest collects first; see mlx_v4/platform.py)."""

import mlx_v4  # noqa: F401
