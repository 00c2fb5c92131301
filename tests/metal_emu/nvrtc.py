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
#: With the CUDA toolkit's headers (a real GPU machine), half types too.
_C_TOOLKIT = _C | {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"}
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


def source(spec, inputs, output_dtypes, template, toolkit: bool = False) -> str:
    """``toolkit``: the CUDA toolkit's headers are available (bf16/half dtypes allowed)."""
    c = _C_TOOLKIT if toolkit else _C
    params = [f"const {c[x.dtype]}* {n}" for n, x in zip(spec.input_names, inputs, strict=True)]
    params += [f"{c[d]}* {n}" for n, d in zip(spec.output_names, output_dtypes, strict=True)]
    lines = []
    for name, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"using {name} = {c[value]};")
        elif isinstance(value, bool):
            lines.append(f"constexpr bool {name} = {'true' if value else 'false'};")
        else:
            lines.append(f"constexpr int {name} = {value};")
    includes = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n" if toolkit else ""
    return (f"{includes}{spec.header}\nextern \"C\" __global__ void {spec.name}({', '.join(params)}) {{\n"
            + "\n".join(lines) + "\n" + spec.source + "\n}\n")


def toolkit_include() -> str | None:
    """A CUDA toolkit include folder holding cuda_bf16.h ($CUDA_HOME or /usr/local/cuda*), or None."""
    roots = [os.environ.get("CUDA_HOME", ""), *sorted(glob.glob("/usr/local/cuda*"), reverse=True)]
    for root in roots:
        if root and os.path.exists(os.path.join(root, "include", "cuda_bf16.h")):
            return os.path.join(root, "include")
    return None


def compile_ptx(src: str, arch: str = "compute_90", include: str | None = None) -> str:
    """Return PTX, or raise RuntimeError with NVRTC's log. ``include``: a toolkit include folder."""
    lib = load()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--device-as-default-execution-space"]
    if include:
        opts.append(f"-I{include}".encode())
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


def nvrtc_runner(log: list, include: str | None = None):
    """A runner that compiles each launch for CUDA (outputs are zeros). With a toolkit
    ``include`` folder, bf16/half launches compile too."""

    def run(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
        toolkit = include is not None
        log.append(compile_ptx(source(spec, inputs, output_dtypes, template, toolkit), include=include))
        return [mx.zeros(s, dtype=t) for s, t in zip(output_shapes, output_dtypes, strict=True)]

    return run
