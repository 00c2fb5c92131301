"""CPU emulator for the Metal kernels in mlx_v4/kernels (see README.md)."""
