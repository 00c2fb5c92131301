"""Run the kernels for real on an NVIDIA GPU and compare them with their pure-MLX references.

Each kernel body is the Metal-dialect source of mlx_v4/kernels, mapped to CUDA by the prelude
in its header. Two ways to launch it, chosen in this order:

* ``mx.fast.cuda_kernel`` (an MLX build with the CUDA backend, ``pip install mlx[cuda13]``);
* CuPy (``cupy.RawKernel``, NVRTC): the source is assembled as ``mx.fast.cuda_kernel``
  assembles it (tests/metal_emu/nvrtc.py), the grid is counted in threads as in MLX, and
  outputs are poisoned with 0xFF bytes (NaN) so an unwritten element fails. MLX itself then
  runs on the CPU and computes the references. This is what a machine that cannot install the
  90 MB mlx-cuda wheel uses (the lent H200 has CuPy but no package registry).

The shapes are the emulator tests' ragged ones plus Flash/Pro sizes. Not run in CI (no GPU).

    python scripts/cuda_check.py [--runner mlx|cupy]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_v4.kernels import hyper_mix as hm  # noqa: E402
from mlx_v4.kernels import indexer_topk as ik  # noqa: E402
from mlx_v4.kernels import sparse_decode as sd  # noqa: E402
from mlx_v4.kernels import sparse_prefill as sp  # noqa: E402

_KERNELS: dict = {}
#: With --time, the CuPy runner times every launch (20 repeats) and appends a line here.
TIMINGS: list[str] | None = None


def mlx_cuda_runner(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
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
    mx.random.seed(0)
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
        print(f"indexer_topk {case} splits={splits}: {'ok' if ok else 'FAIL'}", flush=True)
    return failures


# bf16 has no numpy dtype: it travels as its uint16 bits.
_NP = {mx.float32: np.float32, mx.int32: np.int32, mx.uint8: np.uint8, mx.uint16: np.uint16,
       mx.bfloat16: np.uint16, mx.float16: np.float16}


def cupy_runner(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
    import cupy as cp  # noqa: PLC0415
    from metal_emu import nvrtc  # noqa: PLC0415

    src = nvrtc.source(spec, inputs, output_dtypes, template, toolkit=True)
    kernel = _KERNELS.get(src)
    if kernel is None:
        kernel = _KERNELS[src] = cp.RawKernel(src, spec.name, options=(
            "-std=c++17", "--device-as-default-execution-space"), backend="nvrtc")
    args = []
    for x in inputs:
        host = np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)
        args.append(cp.asarray(np.ascontiguousarray(host)))
    outs = []
    for shape, dtype in zip(output_shapes, output_dtypes, strict=True):
        out = cp.empty(tuple(shape), dtype=_NP[dtype])
        out.view(cp.uint8).fill(0xFF)  # poison: an element the kernel never writes reads as NaN
        outs.append(out)
    blocks = tuple(-(-g // t) for g, t in zip(grid, threadgroup, strict=True))  # grid counts threads
    kernel(blocks, tuple(threadgroup), tuple(args + outs))
    cp.cuda.runtime.deviceSynchronize()
    if TIMINGS is not None:  # the CUDA twin's time, not a Metal number
        start, stop, reps = cp.cuda.Event(), cp.cuda.Event(), 20
        start.record()
        for _ in range(reps):
            kernel(blocks, tuple(threadgroup), tuple(args + outs))
        stop.record()
        stop.synchronize()
        us = cp.cuda.get_elapsed_time(start, stop) * 1000 / reps
        moved = sum(a.nbytes for a in args) + sum(o.nbytes for o in outs)
        TIMINGS.append(f"  {spec.name} grid {tuple(grid)} tg {tuple(threadgroup)}: {us:8.1f} us/launch, "
                       f"{moved / 1e6:8.2f} MB in+out buffers, {moved / us / 1e3:7.1f} GB/s")
    result = []
    for out, dtype in zip(outs, output_dtypes, strict=True):
        a = mx.array(cp.asnumpy(out))
        result.append(a.view(mx.bfloat16) if dtype == mx.bfloat16 else a)
    return result


def report(name: str, err: float, tol: float) -> bool:
    ok = err <= tol  # NaN (an unwritten element) fails
    print(f"{name}: max err {err:.2e} (tol {tol:.1e}) {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def check_sparse_decode(runner: Callable) -> int:
    from test_kernels_sparse_decode import CASES, call, make_inputs  # noqa: PLC0415

    failures = 0
    for case in CASES + [(1, 64, 512, 64, 128, 2048, 512, 2), (1, 128, 512, 64, 128, 4096, 1024, 4)]:
        B, H, D, rope, W, N, K, splits = case
        for dtype in (mx.float32, mx.bfloat16):
            x, _ = make_inputs(1, B, H, D, rope, W, N, K, dtype=dtype)
            x32 = dict(x, q=x["q"].astype(mx.float32), window=x["window"].astype(mx.float32))
            ref = call(sd.sparse_decode_reference, x32, scale=D**-0.5)
            out = call(sd.sparse_decode_kernel, x, scale=D**-0.5, splits=splits, runner=runner)
            err = float(mx.abs(out.astype(mx.float32) - ref).max())
            # Relative to the outputs' size: float32 sums up to 1,152 keys in another order
            # (split-K merge, FMA contraction); bf16 rounds the output.
            tol = (1e-5 if dtype == mx.float32 else 3e-2) * max(1.0, float(mx.abs(ref).max()))
            failures += not report(f"sparse_decode {case} {dtype}", err, tol)
    return failures


def check_sparse_prefill(runner: Callable, cases=None) -> int:
    """``cases`` overrides the emulator-test shapes plus the Flash-size chunks."""
    from test_kernels_sparse_prefill import CASES, call, make_inputs  # noqa: PLC0415

    failures = 0
    big = [(1, 256, 64, 512, 64, 128, 4096, 512, 8192, 128, 4),  # Flash CSA chunk
           (1, 256, 64, 512, 64, 128, 64, 0, 8192, 128, 128)]  # Flash HCA chunk (all visible)
    for case in (CASES + big) if cases is None else cases:
        B, L, H, D, rope, P, N, K, offset, window_len, ratio = case
        for dtype in (mx.float32, mx.bfloat16):
            x, _ = make_inputs(1, B, L, H, D, rope, P, N, K, dtype=dtype)
            kw = dict(scale=D**-0.5, offset=offset, sliding_window=window_len, ratio=ratio, n_entries=N)
            x32 = dict(x, q=x["q"].astype(mx.float32), window=x["window"].astype(mx.float32))
            ref = call(sp.sparse_prefill_reference, x32, **kw)
            out = call(sp.sparse_prefill_kernel, x, runner=runner, **kw)
            err = float(mx.abs(out.astype(mx.float32) - ref).max())
            tol = (1e-5 if dtype == mx.float32 else 3e-2) * max(1.0, float(mx.abs(ref).max()))
            failures += not report(f"sparse_prefill {case} {dtype}", err, tol)
    return failures


def check_hyper_mix(runner: Callable) -> int:
    mx.random.seed(0)
    mixes = mx.random.normal((3, 70, 24))
    base, scale = 0.5 * mx.random.normal((24,)), 1 + 0.3 * mx.random.normal((3,))
    want = hm.hyper_mix_reference(mixes, base, scale, hc=4, iters=20, eps=1e-6)
    got = hm.hyper_mix_kernel(mixes, base, scale, hc=4, iters=20, eps=1e-6, runner=runner)
    err = max(float(mx.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    return int(not report("hyper_mix (3, 70)", err, 1e-5))


CHECKS = [check_sparse_decode, check_sparse_prefill, check_indexer, check_hyper_mix]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runner", choices=("mlx", "cupy"), help="default: mlx if its CUDA backend is there")
    p.add_argument("--time", action="store_true", help="CuPy runner: time each launch (CUDA, not Metal)")
    opts = p.parse_args()
    choice = opts.runner
    if choice is None:
        choice = "mlx" if mx.cuda.is_available() else "cupy"
    if choice == "mlx" and not mx.cuda.is_available():
        print("no CUDA backend in this MLX build (pip install mlx[cuda13]), or use --runner cupy")
        return 2
    if choice == "cupy":
        try:
            import cupy  # noqa: F401, PLC0415
        except ImportError:
            print("CuPy is not installed (pip install cupy-cuda13x)")
            return 2
        mx.set_default_device(mx.cpu)  # MLX computes the references; CuPy owns the GPU
    runner = mlx_cuda_runner if choice == "mlx" else cupy_runner
    print(f"runner: {choice}")
    global TIMINGS
    TIMINGS = [] if opts.time and choice == "cupy" else None
    failures = sum(check(runner) for check in CHECKS)
    if TIMINGS:
        print("CUDA twin timings (whole buffers counted: an upper bound on the bytes a gather touches):")
        print("\n".join(TIMINGS))
    print("all kernels match their references" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
