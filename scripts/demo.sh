#!/usr/bin/env bash
# README command 1: install what is missing, build, and run the main job: the tiny config trained on the built-in
# synthetic corpus under mpirun on 4 ranks (pp 2 × dp 2, ep 2), after checking the config on the launched ranks
# and printing its plan. The run directory is runs/tiny (config.yaml, metrics.jsonl); a rerun replaces it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/build.sh"
bin=${MOETRAIN_BUILD_DIR:-$root/build}/bin/moetrain
cd "$root"
"$root/launch/mpirun.sh" -np 4 -- "$bin" config check configs/tiny.yaml
"$bin" plan configs/tiny.yaml
"$root/launch/mpirun.sh" -np 4 -- "$bin" train --config configs/tiny.yaml --overwrite "$@"
