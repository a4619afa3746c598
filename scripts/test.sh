#!/usr/bin/env bash
# README command 2 (and CI): install what is missing, build, and run the whole test suite.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/build.sh"
# One test more than the cores: several tests spend part of their time waiting (on Slurm's scheduler, on the
# timeouts they provoke), which a third test fills on 2 cores (ctest -j3: 540-565 s in four runs, -j2: 554-633 s).
ctest --test-dir "${MOETRAIN_BUILD_DIR:-$root/build}" --output-on-failure -j "${MOETRAIN_JOBS:-$(($(nproc) + 1))}" "$@"
