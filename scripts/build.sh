#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), configures once and builds moetrain into build/ (or
# $MOETRAIN_BUILD_DIR). A second run with nothing changed is a no-op build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
eval "$("$root/scripts/setup.sh")"  # -> MOETRAIN_TORCH_PYTHON
build_dir=${MOETRAIN_BUILD_DIR:-$root/build}

if [ ! -f "$build_dir/build.ninja" ] || ! grep -q "^MOETRAIN_TORCH_PYTHON:STRING=$MOETRAIN_TORCH_PYTHON\$" \
    "$build_dir/CMakeCache.txt" 2>/dev/null; then
  # CMake finds LibTorch through the wheel's torch.utils.cmake_prefix_path.
  prefix=$("$MOETRAIN_TORCH_PYTHON" -W ignore -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' \
           2>/dev/null | tail -n 1)
  cmake -S "$root" -B "$build_dir" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
        -DMOETRAIN_TORCH_PYTHON:STRING="$MOETRAIN_TORCH_PYTHON" ${MOETRAIN_CMAKE_ARGS:-}
fi
cmake --build "$build_dir" -j "${MOETRAIN_JOBS:-$(nproc)}"
