"""Offline conversion: a DeepSeek V4 checkpoint -> an mlx-v4 model directory.

    from mlx_v4.quantize import convert
    convert("deepseek-ai/DeepSeek-V4-Flash", "flash-mixed", recipe="mixed-4-8")

Depends on mlx_v4 (its readers in weights.py), never the reverse.
"""

import mlx_v4  # noqa: F401  (first: its BLAS preload must run before .convert imports mlx.core)

from .convert import ConvertResult, convert
from .marker import MANIFEST, MARKER, is_complete
from .recipes import (
                      MXFP4,
                      MXFP8,
                      QUANTIZABLE,
                      RECIPE_NAMES,
                      ConvertError,
                      Quant,
                      Recipe,
                      classify,
                      get_recipe,
)

__all__ = ["convert", "ConvertResult", "ConvertError", "is_complete", "Quant", "Recipe", "get_recipe",
           "classify", "RECIPE_NAMES", "QUANTIZABLE", "MXFP4", "MXFP8", "MARKER", "MANIFEST"]
