"""Capture the Metal source MLX generates for a kernel call, and run it on the CPU as C++.

``capture(spec, inputs, ...)`` records the ``CustomKernel`` primitive with
``mx.export_function`` (which never runs it, so this works without Metal) and returns the
exact MSL MLX would compile, with grid and threadgroup. ``to_cpp`` rewrites that source into a
C++ translation unit against ``shim/msl_emu.h``; ``build`` compiles it with a sanitizer
(``"asan"``: AddressSanitizer + UBSan, ``"tsan"``: ThreadSanitizer); ``execute`` feeds the
inputs, runs every thread of every threadgroup and returns the outputs. :func:`runner` wraps
all of it in the ``runner`` signature of ``mlx_v4.kernels._base`` so the real wrappers run on
the emulator. Binaries are cached by content hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_v4.kernels._base import KernelSpec, metal_runner

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim"
CACHE = Path(os.environ.get("EMU_CACHE", Path(tempfile.gettempdir()) / f"mlx_v4_metal_emu_{os.getuid()}"))

# MLX 0.32's CustomKernel argument layout (internal; asserted in capture()).
_ATTRS = (
    "thread_position_in_grid", "thread_position_in_threadgroup", "threadgroup_position_in_grid",
    "threads_per_threadgroup", "threads_per_grid", "threadgroups_per_grid", "grid_origin", "grid_size",
    "dispatch_threads_per_threadgroup", "thread_index_in_threadgroup", "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup", "threads_per_simdgroup",
    "thread_execution_width", "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup",
    "thread_index_in_quadgroup", "dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
)
_SUPPORTED_ATTRS = set(_ATTRS[:6]) | set(_ATTRS[9:15])

_CTYPES = {
    mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat16_t", mx.int32: "int32_t",
    mx.uint32: "uint32_t", mx.int16: "int16_t", mx.uint16: "uint16_t", mx.int8: "int8_t",
    mx.uint8: "uint8_t", mx.int64: "int64_t", mx.uint64: "uint64_t", mx.bool_: "bool",
}


class EmulatorError(RuntimeError):
    """The emulated kernel failed: a sanitizer report, divergence, deadlock, or a crash."""


@dataclass
class Capture:
    name: str
    source: str  # the full MSL MLX generated
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    in_shapes: list[tuple[int, ...]]
    in_dtypes: list
    out_shapes: list[tuple[int, ...]]
    out_dtypes: list


def capture(spec: KernelSpec, inputs, output_shapes, output_dtypes, grid, threadgroup, template) -> Capture:
    """The exact Metal source and launch geometry MLX would use for this call."""
    found = []

    def fn(*xs):
        return metal_runner(spec, xs, output_shapes, output_dtypes, grid, threadgroup, template)

    def callback(d):
        if d.get("type") == "primitive" and d.get("name") == "CustomKernel":
            found.append(d)

    mx.export_function(callback, fn, *inputs)
    if len(found) != 1:
        raise EmulatorError(f"expected one CustomKernel in the export, got {len(found)}")
    args = found[0]["arguments"]
    name, source = args[0], args[1]
    if not (isinstance(name, str) and isinstance(source, str) and name in source):
        raise EmulatorError("unexpected CustomKernel argument layout (mlx version changed?)")
    g, t = tuple(args[2:5]), tuple(args[5:8])
    return Capture(name, source, g, t, [tuple(x.shape) for x in inputs], [x.dtype for x in inputs],
                   [tuple(s) for s in output_shapes], list(output_dtypes))


_PARAM = re.compile(r"^\s*(const\s+)?(device|constant|threadgroup)?\s*([\w:<> ]+?)\s*([*&])?\s*(\w+)\s*(\[\[.*\]\])?\s*$")


def to_cpp(cap: Capture, mutate=None) -> str:
    """Rewrite MLX's generated MSL into a C++ translation unit with a ``main`` harness.

    ``mutate``: optional ``str -> str`` applied to the kernel source first (emulator tests)."""
    src = cap.source if mutate is None else mutate(cap.source)
    m = re.search(r"\[\[kernel\]\] void " + re.escape(cap.name) + r"\((.*?)\)\s*\{", src, re.S)
    if not m:
        raise EmulatorError("kernel signature not found")
    params, used_attrs = [], []
    for raw in m.group(1).split(",\n"):
        raw = raw.strip().rstrip(",")
        attr = re.search(r"\[\[(\w+)(?:\(\d+\))?\]\]", raw)
        if attr and attr.group(1) in _ATTRS:
            if attr.group(1) not in _SUPPORTED_ATTRS:
                raise EmulatorError(f"attribute {attr.group(1)} is not emulated")
            used_attrs.append(attr.group(1))
            continue
        params.append(re.sub(r"\s*\[\[buffer\(\d+\)\]\]", "", raw))
    head = src[: m.start()]
    body_start = m.end()
    inst = re.search(r"\ntemplate \[\[host_name\(.*?\)\]\] \[\[kernel\]\] decltype\((\w+)(<.*?>)?\).*?;\n", src, re.S)
    if not inst:
        raise EmulatorError("explicit instantiation not found")
    targs = inst.group(2) or ""
    body = src[body_start: inst.start()]
    body = _rewrite_threadgroup_decls(body)
    signature = f"void {cap.name}({', '.join(params)}) {{"
    kernel = head + signature + body

    n_in = len(cap.in_shapes)
    names = [_PARAM.match(p).group(5) for p in params]
    decls, call = [], []
    for i, p in enumerate(params):
        pm = _PARAM.match(p)
        ptr, name = pm.group(4), pm.group(5)
        if i < n_in:
            ctype = _CTYPES[cap.in_dtypes[i]]
            if ptr == "&":
                call.append(f"*reinterpret_cast<const {ctype}*>(bufs[{i}])")
            else:
                call.append(f"reinterpret_cast<const {ctype}*>(bufs[{i}])")
        elif name.endswith(("_shape", "_strides", "_ndim")):
            base, kind = name.rsplit("_", 1)
            k = names.index(base)
            shape = cap.in_shapes[k]
            if kind == "ndim":
                decls.append(f"static const int {name}_v = {len(shape)};")
                call.append(f"{name}_v")
            else:
                vals = list(shape) if kind == "shape" else [int(np.prod(shape[j + 1:])) for j in range(len(shape))]
                ct = "int" if kind == "shape" else "int64_t"
                decls.append(f"static const {ct} {name}_v[] = {{{', '.join(map(str, vals or [0]))}}};")
                call.append(f"{name}_v")
        else:
            o = i - n_in - sum(1 for q in names[n_in:i] if q.endswith(("_shape", "_strides", "_ndim")))
            call.append(f"reinterpret_cast<{_CTYPES[cap.out_dtypes[o]]}*>(bufs[{n_in + o}])")

    g, t = cap.grid, cap.threadgroup
    return f"""// generated by tests/metal_emu/emu.py from MLX's Metal source for {cap.name}
#include "msl_emu.h"
#define device
#define constant
#define threadgroup
#define thread
#define double emu_double_is_not_available_in_metal
namespace kern {{
EMU_KERNEL_SCOPE
#line 1 "kernel.metal"
{kernel}
}}  // namespace kern
#undef device
#undef constant
#undef threadgroup
#undef thread
#undef double
#include "emu_main.h"
static void** bufs;
{chr(10).join(decls)}
static void body(void*) {{ kern::{cap.name}{targs}({', '.join(call)}); }}
int main(int argc, char** argv) {{
  bufs = emu_load(argc, argv, {n_in}, {len(cap.out_shapes)});
  emu::run_grid(uint3{{{g[0]}, {g[1]}, {g[2]}}}, uint3{{{t[0]}, {t[1]}, {t[2]}}}, body, nullptr);
  emu_store(argc, argv, bufs, {n_in}, {len(cap.out_shapes)});
  return 0;
}}
"""


_TG_DECL = re.compile(r"^(\s*)threadgroup\s+([\w:<>]+(?:\s+[\w:<>]+)*?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;", re.M)


def _rewrite_threadgroup_decls(body: str) -> str:
    """``threadgroup T x[N][M];`` -> a reference to a per-group, poisoned, exact-size array."""
    counter = [0]

    def repl(m):
        counter[0] += 1
        indent, ty, name, dims = m.groups()
        return (f"{indent}using emu_tg_{name}_t = {ty}{dims}; "
                f"emu_tg_{name}_t& {name} = *emu::tg_alloc<emu_tg_{name}_t>({counter[0]});")

    return _TG_DECL.sub(repl, body)


SANITIZERS = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
    "none": [],
}


def _compile(args: list[str], what: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise EmulatorError(f"compile failed ({what}):\n{r.stderr[-6000:]}")


def _flags(sanitizer: str) -> list[str]:
    # -O0: compiling dominates the test time; the kernels are small
    return ["-std=c++20", "-O0", "-g", "-pthread", "-Wall", "-Wno-unused-variable",
            "-Wno-unused-but-set-variable", *SANITIZERS[sanitizer]]


def _runtime_object(cxx: str, sanitizer: str) -> Path:
    """The scheduler, compiled once per compiler/sanitizer/shim version."""
    flags = _flags(sanitizer)
    text = (SHIM / "emu_runtime.cpp").read_text() + (SHIM / "msl_emu.h").read_text()
    key = hashlib.sha256("\0".join([cxx, *flags, text]).encode()).hexdigest()[:20]
    obj = CACHE / f"runtime-{key}.o"
    if not obj.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as d:
            tmp = Path(d) / "runtime.o"
            _compile([cxx, *flags, "-I", str(SHIM), "-c", str(SHIM / "emu_runtime.cpp"), "-o", str(tmp)], "runtime")
            shutil.move(tmp, obj)
    return obj


def build(cpp: str, sanitizer: str = "asan") -> Path:
    """Compile (cached by content) and return the executable."""
    cxx = os.environ.get("CXX", "g++")
    flags = _flags(sanitizer)
    runtime = _runtime_object(cxx, sanitizer)
    shim = (SHIM / "msl_emu.h").read_text() + (SHIM / "emu_main.h").read_text()
    key = hashlib.sha256("\0".join([cxx, *flags, cpp, shim, runtime.name]).encode()).hexdigest()[:20]
    exe = CACHE / f"{key}.exe"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as d:
        cpp_path = Path(d) / "kernel.cpp"
        cpp_path.write_text(cpp)
        out = Path(d) / "a.out"
        _compile([cxx, *flags, "-I", str(SHIM), str(cpp_path), str(runtime), "-o", str(out)], "kernel")
        shutil.move(out, exe)
    return exe


def execute(exe: Path, cap: Capture, inputs, timeout: float = 300) -> list[mx.array]:
    """Run the emulated kernel on ``inputs``; raises EmulatorError on any report."""
    with tempfile.TemporaryDirectory() as d:
        for i, x in enumerate(inputs):
            _to_numpy_bytes(x).tofile(os.path.join(d, f"in{i}.bin"))
        for i, (shape, dt) in enumerate(zip(cap.out_shapes, cap.out_dtypes, strict=True)):
            with open(os.path.join(d, f"out{i}.size"), "w") as f:
                f.write(str(int(np.prod(shape)) * dt.size))
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0",
                   UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
                   TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0")
        r = subprocess.run([str(exe), d], capture_output=True, text=True, env=env, timeout=timeout)
        if r.returncode:
            raise EmulatorError(f"kernel {cap.name} exited with {r.returncode}:\n{r.stderr[-6000:]}")
        outs = []
        for i, (shape, dt) in enumerate(zip(cap.out_shapes, cap.out_dtypes, strict=True)):
            raw = np.fromfile(os.path.join(d, f"out{i}.bin"), dtype=np.uint8)
            outs.append(_from_bytes(raw, shape, dt))
        return outs


def _to_numpy_bytes(x: mx.array) -> np.ndarray:
    x = mx.contiguous(x)
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x)).view(np.uint8).reshape(-1)


def _from_bytes(raw: np.ndarray, shape, dt) -> mx.array:
    if dt == mx.bfloat16:
        return mx.array(raw.view(np.uint16).reshape(shape)).view(mx.bfloat16)
    npdt = {mx.float32: np.float32, mx.float16: np.float16, mx.int32: np.int32, mx.uint32: np.uint32,
            mx.uint8: np.uint8, mx.uint16: np.uint16, mx.int8: np.int8, mx.int16: np.int16,
            mx.int64: np.int64, mx.uint64: np.uint64, mx.bool_: np.bool_}[dt]
    return mx.array(raw.view(npdt).reshape(shape))


def runner(sanitizer: str = "asan", mutate=None, log: list | None = None):
    """A kernel runner (see mlx_v4.kernels._base) that emulates every launch on the CPU.
    ``log`` collects each launch's Capture."""

    def run(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
        inputs = [mx.contiguous(x) for x in inputs]
        mx.eval(inputs)
        cap = capture(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template)
        if log is not None:
            log.append(cap)
        exe = build(to_cpp(cap, mutate), sanitizer)
        return execute(exe, cap, inputs)

    return run


def have_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def capturing_runner(log: list):
    """A runner that only captures each launch (outputs are zeros): for static checks."""

    def run(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
        log.append(capture(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template))
        return [mx.zeros(s, dtype=t) for s, t in zip(output_shapes, output_dtypes, strict=True)]

    return run
