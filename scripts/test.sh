#!/usr/bin/env bash
# README command 2 (and CI): install what is missing, build, and run the whole test suite.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/build.sh"
ctest --test-dir "${MOETRAIN_BUILD_DIR:-$root/build}" --output-on-failure -j "${MOETRAIN_JOBS:-$(nproc)}" "$@"
