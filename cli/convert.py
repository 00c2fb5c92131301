"""`mlx-v4 convert`: maps flags onto mlx_v4.quantize.convert()."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import UserError, user_errors


@user_errors
def convert(
    src: Annotated[str, typer.Argument(help="Source checkpoint: a directory or a Hugging Face repo id.")],
    dst: Annotated[str, typer.Argument(help="Output directory (must not exist yet).")],
    recipe: Annotated[str, typer.Option(help="Quantization recipe, e.g. native, mxfp4, q4, q8.")] = "native",
):
    try:
        from mlx_v4.quantize import convert as _convert
    except ImportError:
        raise UserError("conversion is not available in this build (mlx_v4.quantize.convert is missing)",
                        "install a release of mlx-v4 that includes the quantize package") from None
    from .ui import UI

    ui = UI()
    with ui.status(f"converting {src} -> {dst} ({recipe})"):
        result = _convert(src, dst, recipe=recipe)
    ui.notice(f"wrote {result or dst}")
