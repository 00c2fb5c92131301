"""`mlx-v4 convert`: maps flags onto mlx_v4.quantize.convert()."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import UserError, user_errors

#: convert's recipes (mlx_v4.quantize.recipes.RECIPE_NAMES; spelled out so that `--help` needs no
#: MLX import, and checked against it by tests/test_cli.py).
RECIPE_LIST = "native, mxfp4, mxfp8, 4bit, 8bit, mixed-4-8, bf16, 3bit-experts, 2bit-experts"
RECIPE_HELP = ("native (lossless: every tensor keeps its source format), mxfp4 (experts mxfp4, the rest "
               "mxfp8), mxfp8, 4bit, 8bit, mixed-4-8 (experts 4-bit, the rest 8-bit), bf16, or 3bit-experts / "
               "2bit-experts (calibrated low-bit experts for streaming them from SSD on small Macs). "
               "`mlx-v4 info --recipe` sizes the same names.")


@user_errors
def convert(
    src: Annotated[str, typer.Argument(help="Source checkpoint: a directory, a Hugging Face repo id, or demo "
                                            "(the bundled tiny model).")],
    dst: Annotated[str, typer.Argument(help="Output directory (new, or a conversion to resume).")],
    recipe: Annotated[str, typer.Option(help=RECIPE_HELP)] = "native",
    group_size: Annotated[int, typer.Option(help="Group size of the affine formats: 32, 64 or 128.")] = 64,
    shard_size: Annotated[float, typer.Option(help="Largest output shard, in GB.")] = 5.0,
    force: Annotated[bool, typer.Option("--force", help="Redo a finished conversion in DST.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Compare with the source model: mean KL, top-1 agreement.")] = False,
    upload_repo: Annotated[str | None, typer.Option(help="Upload the result to this Hugging Face repo.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the upload repo as private.")] = False,
    calibration: Annotated[str | None, typer.Option(help="Text file to calibrate 2bit-/3bit-experts on "
                                                         "(default: a built-in text).")] = None,
    no_calibration: Annotated[bool, typer.Option("--no-calibration", help="2bit-/3bit-experts with plain "
                                                                          "rounding.")] = False,
):
    try:
        from mlx_v4.quantize import convert as _convert
    except ImportError:
        raise UserError("conversion is not available in this build (mlx_v4.quantize.convert is missing)",
                        "install a release of mlx-v4 that includes the quantize package") from None
    import logging

    from .ui import UI

    if src == "demo":
        import mlx_v4

        src = str(mlx_v4.DEMO_MODEL_PATH)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # plain progress when not a terminal
    ui = UI()
    if calibration is not None and no_calibration:
        raise UserError("give --calibration FILE or --no-calibration, not both")
    extra = {"calibration": False} if no_calibration else ({"calibration": calibration} if calibration else {})
    result = _convert(src, dst, recipe=recipe, group_size=group_size, max_shard_bytes=int(shard_size * 1e9),
                      force=force, verify=verify, upload_repo=upload_repo, private=private, **extra)
    if getattr(result, "noop", False):
        ui.notice(f"{dst} is already converted (use --force to redo it)")
    else:
        ui.notice(f"wrote {result or dst}")
    if getattr(result, "verify", None) is not None:
        print(f"quality vs source: {result.verify}")
    if getattr(result, "url", None):
        ui.notice(f"uploaded: {result.url}")
