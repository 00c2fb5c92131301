"""Compile a kernel body as CUDA with NVRTC from pip (``nvidia-cuda-nvrtc-cu12``), no GPU needed.

The source is assembled the way ``mx.fast.cuda_kernel`` does it: the spec's header (whose
CUDA prelude maps the Metal dialect), then a ``__global__`` function taking the inputs as
``const T*`` and outputs as ``T*``, with the template arguments as ``using``/``constexpr``
lines at the top of the body. Only float/integer dtypes: the bf16/half headers come with the
CUDA toolkit, not the NVRTC wheel.
"""

from __future__ import annotations

import ctypes
import glob
import os

import mlx.core as mx

_C = {mx.float32: "float", mx.int32: "int32_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t"}
_lib = None


def load():
    """The NVRTC library, or None (then tests skip)."""
    global _lib
    if _lib is None:
        try:
            import nvidia.cuda_nvrtc as pkg  # noqa: PLC0415
            libs = sorted(glob.glob(os.path.join(list(pkg.__path__)[0], "lib", "libnvrtc.so*")))
            _lib = ctypes.CDLL(libs[0])
        except (ImportError, IndexError, OSError):
            _lib = False
    return _lib or None


def source(spec, inputs, output_dtypes, template) -> str:
    params = [f"const {_C[x.dtype]}* {n}" for n, x in zip(spec.input_names, inputs, strict=True)]
    params += [f"{_C[d]}* {n}" for n, d in zip(spec.output_names, output_dtypes, strict=True)]
    lines = []
    for name, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"using {name} = {_C[value]};")
        elif isinstance(value, bool):
            lines.append(f"constexpr bool {name} = {'true' if value else 'false'};")
        else:
            lines.append(f"constexpr int {name} = {value};")
    return (f"{spec.header}\nextern \"C\" __global__ void {spec.name}({', '.join(params)}) {{\n"
            + "\n".join(lines) + "\n" + spec.source + "\n}\n")


def compile_ptx(src: str, arch: str = "compute_90") -> str:
    """Return PTX, or raise RuntimeError with NVRTC's log."""
    lib = load()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--device-as-default-execution-space"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        raise RuntimeError(f"NVRTC failed:\n{log.value.decode(errors='replace')}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


def nvrtc_runner(log: list):
    """A runner that compiles each launch for CUDA (outputs are zeros)."""

    def run(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
        log.append(compile_ptx(source(spec, inputs, output_dtypes, template)))
        return [mx.zeros(s, dtype=t) for s, t in zip(output_shapes, output_dtypes, strict=True)]

    return run
