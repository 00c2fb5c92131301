#!/usr/bin/env bash
# Fresh-machine set-up: system libraries (Linux), a virtual environment in .venv, the package
# with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
    # libopenblas0-pthread: MLX's CPU backend runs its float32 matmuls ~30x faster with it
    # (mlx_v4/platform.py preloads it); without it everything still works, slowly.
    # tmux: the interactive chat test drives a real terminal.
    # g++, clang, libclang-rt-14-dev: the Metal kernel emulator (tests/metal_emu) builds captured
    # kernels as C++ with sanitizers; clang also runs the static address-space check.
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    if ! dpkg -s libopenblas0-pthread tmux g++ clang libclang-rt-14-dev >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread tmux g++ clang libclang-rt-14-dev >/dev/null
    fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "mlx-v4 installed in .venv"
