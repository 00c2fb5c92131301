"""Static address-space check of captured Metal source with clang's C++-for-OpenCL mode.

No Metal front end runs on Linux. Clang's ``-x clcpp`` with the generic address space
disabled has the same address-space rules as MSL once ``device``/``threadgroup``/``constant``/
``thread`` map to ``__global``/``__local``/``__constant``/``__private`` (shim/msl_opencl.h).
The kernel is made a plain ``__kernel`` function: its template parameters become ``using`` /
``constexpr`` lines with the captured values, attribute parameters stay as ``uint``/``uint3``
arguments. This catches address-space misuse and most type errors; it does not prove that
Apple's compiler accepts every construct (see README.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from .emu import SHIM, Capture, EmulatorError

CLANG = os.environ.get("EMU_CLANG", "clang")


def have_clang() -> bool:
    return shutil.which(CLANG) is not None


def to_opencl(cap: Capture, mutate=None) -> str:
    src = cap.source if mutate is None else mutate(cap.source)
    inst = re.search(r"\ntemplate \[\[host_name\(.*?\)\]\] \[\[kernel\]\] decltype\((\w+)(<(.*?)>)?\).*?;\n", src, re.S)
    if not inst:
        raise EmulatorError("explicit instantiation not found")
    src = src[: inst.start()] + "\n"
    values = [v.strip() for v in (inst.group(3) or "").split(",") if v.strip()]
    tmpl = re.search(r"template <(.*?)>\n(?=\[\[kernel\]\])", src)
    if tmpl:
        lines = []
        for decl, value in zip(tmpl.group(1).split(","), values, strict=True):
            kind, name = decl.split()
            lines.append(f"using {name} = {value};" if kind == "typename" else f"constexpr {kind} {name} = {value};")
        src = src[: tmpl.start()] + "\n".join(lines) + "\n" + src[tmpl.end():]
    src = src.replace(f"[[kernel]] void {cap.name}(", f"__kernel void {cap.name}(")
    src = re.sub(r"\s*\[\[\w+(\(\d+\))?\]\]", "", src)
    return '#include "msl_opencl.h"\n#line 1 "kernel.metal"\n' + src


def check(cap: Capture, mutate=None) -> None:
    """Raise EmulatorError with clang's diagnostics if the source is rejected."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.clcpp")
        with open(path, "w") as f:
            f.write(to_opencl(cap, mutate))
        r = subprocess.run(
            [CLANG, "-cc1", "-triple", "spir64-unknown-unknown", "-x", "clcpp", "-cl-std=clc++2021", "-finclude-default-header", "-fsyntax-only",
             "-cl-ext=-__opencl_c_generic_address_space,-__opencl_c_pipes,-__opencl_c_device_enqueue",
             "-Wno-unknown-attributes", "-I", str(SHIM), path],
            capture_output=True, text=True)
        if r.returncode:
            raise EmulatorError(f"clang (C++ for OpenCL) rejected {cap.name}:\n{r.stderr[-6000:]}")
