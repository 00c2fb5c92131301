"""Run the kernel tests for real on an NVIDIA GPU through mx.fast.cuda_kernel.

Needs an MLX build with the CUDA backend (pip install mlx[cuda12]). Each kernel body is the
Metal-dialect source of mlx_v4/kernels, mapped to CUDA by the prelude in its header; the
outputs are compared with the pure-MLX references on random shapes (the same ones the
emulator tests use). Not run in CI (no GPU there).

    python scripts/cuda_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mlx.core as mx  # noqa: E402

from mlx_v4.kernels import hyper_mix as hm  # noqa: E402
from mlx_v4.kernels import indexer_topk as ik  # noqa: E402
from mlx_v4.kernels import sparse_decode as sd  # noqa: E402

_KERNELS = {}


def cuda_runner(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
    kernel = _KERNELS.get(spec.name)
    if kernel is None:
        kernel = _KERNELS[spec.name] = mx.fast.cuda_kernel(
            name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names),
            source=spec.source, header=spec.header)
    return kernel(inputs=list(inputs), output_shapes=list(output_shapes), output_dtypes=list(output_dtypes),
                  grid=grid, threadgroup=threadgroup, template=list(template))


def check_indexer(runner, cases=None) -> int:
    """Indexer scoring + top-k through ``runner`` vs the reference (picked sets equal; random
    normal data, so distinct scores). The emulator-test shapes plus Flash decode at 64K and
    1M context (chunked select) and a Flash-size prefill chunk (``cases`` overrides). Returns
    the failure count. ``runner``: any kernel runner (mx.fast.cuda_kernel here; a CuPy one or
    the CPU emulator, tests/metal_emu, work the same way)."""
    from test_kernels_indexer import CASES, make_inputs, same_sets  # noqa: PLC0415

    failures = 0
    big = [(1, 1, 64, 128, 16384, 16640, 4 * 16384 - 1, 512, None),
           (1, 1, 64, 128, 262144, 262144, 4 * 262144 - 1, 512, None),
           (1, 1, 64, 128, 16384, 16384, 4 * 16384 - 1, 1024, None),
           (1, 64, 64, 128, 2048, 2048, 4 * 2048 - 64, 512, 1)]
    for case in (CASES + big) if cases is None else cases:
        B, L, H, D, N, cap, offset, k, splits = case
        q, w, p, s = make_inputs(1, B, L, H, D, N, cap)
        ref = ik.indexer_topk_reference(q, w, p, s, n_keys=N, offset=offset, k=k)
        if splits is None:
            splits = ik.default_select_splits(N, k, B * L)
        out = ik.indexer_topk_kernel(q, w, p, s, n_keys=N, offset=offset, k=k, splits=splits, runner=runner)
        ok = same_sets(out, ref)
        failures += not ok
        print(f"indexer_topk {case} splits={splits}: {'ok' if ok else 'FAIL'}")
    return failures


def main() -> int:
    if not mx.cuda.is_available():
        print("no CUDA backend in this MLX build")
        return 2
    from test_kernels_sparse_decode import CASES, call, make_inputs  # noqa: PLC0415

    failures = 0
    for case in CASES + [(1, 64, 512, 64, 128, 2048, 512, 2), (1, 128, 512, 64, 128, 4096, 1024, 4)]:
        B, H, D, rope, W, N, K, splits = case
        for dtype in (mx.float32, mx.bfloat16):
            x, _ = make_inputs(1, B, H, D, rope, W, N, K, dtype=dtype)
            x32 = dict(x, q=x["q"].astype(mx.float32), window=x["window"].astype(mx.float32))
            ref = call(sd.sparse_decode_reference, x32, scale=D**-0.5)
            out = call(sd.sparse_decode_kernel, x, scale=D**-0.5, splits=splits, runner=cuda_runner)
            err = float(mx.abs(out.astype(mx.float32) - ref).max())
            ok = err < (2e-5 if dtype == mx.float32 else 3e-2 * max(1.0, float(mx.abs(ref).max())))
            failures += not ok
            print(f"sparse_decode {case} {dtype}: max err {err:.2e} {'ok' if ok else 'FAIL'}")
    failures += check_indexer(cuda_runner)
    mixes = mx.random.normal((3, 70, 24))
    base, scale = 0.5 * mx.random.normal((24,)), 1 + 0.3 * mx.random.normal((3,))
    want = hm.hyper_mix_reference(mixes, base, scale, hc=4, iters=20, eps=1e-6)
    got = hm.hyper_mix_kernel(mixes, base, scale, hc=4, iters=20, eps=1e-6, runner=cuda_runner)
    err = max(float(mx.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    failures += err > 1e-5
    print(f"hyper_mix: max err {err:.2e} {'ok' if err <= 1e-5 else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
