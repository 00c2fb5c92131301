"""`python -m mlx_v4.cli` runs the `mlx-v4` command."""

from .app import main

main()
