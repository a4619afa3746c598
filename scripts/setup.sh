#!/usr/bin/env bash
# Installs what moetrain needs and is missing; idempotent (a second run installs nothing).
#   apt: OpenMPI, parallel HDF5, yaml-cpp, GoogleTest, SentencePiece, CLI11, nlohmann-json, fmt, xxHash,
#        ninja, ccache, hdf5-tools, patchelf (scripts/gpu-bundle.sh); Slurm (slurm-wlm: slurmctld, slurmd, sbatch)
#        with munge and OpenMPI's PMIx plugin, for the test that starts a private single-node Slurm
#        (tests/launch/slurm_test.sh)
#   PyPI: torch==2.11.0 (LibTorch) in a virtual environment in a cache directory outside the clone, shared by
#         every clone on this machine; transformers and tensorboard (pinned) in the same venv, for bench/gpu_peer.py
#         and for reading training logs.
# Prints what it installed and, last, the environment the build scripts use.
set -euo pipefail

TORCH_VERSION="${MOETRAIN_TORCH_VERSION:-2.11.0}"
CACHE_DIR="${MOETRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moetrain}"
VENV="$CACHE_DIR/torch-$TORCH_VERSION"
TRANSFORMERS_VERSION="${MOETRAIN_TRANSFORMERS_VERSION:-5.17.0}"
TENSORBOARD_VERSION="${MOETRAIN_TENSORBOARD_VERSION:-2.21.0}"

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev hdf5-tools
  libyaml-cpp-dev
  libgtest-dev libgmock-dev
  libsentencepiece-dev sentencepiece
  libcli11-dev nlohmann-json3-dev libfmt-dev libxxhash-dev
  patchelf
  slurm-wlm munge
)

installed=()
log() { printf 'setup: %s\n' "$*" >&2; }

# --- apt ---------------------------------------------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "apt: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  installed+=("apt: ${missing[*]}")
fi

# --- LibTorch from the PyPI wheel ----------------------------------------------------------------------------------
PYTHON="${MOETRAIN_PYTHON:-python3}"
have_torch() {
  [ -x "$VENV/bin/python" ] &&
    [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)" \
      = "$TORCH_VERSION" ]
}
if ! have_torch; then
  log "pip: installing torch==$TORCH_VERSION into $VENV (a few GB, once per machine)"
  mkdir -p "$CACHE_DIR"
  # A lock so two clones setting up at once do not install into the same venv concurrently.
  exec 9>"$CACHE_DIR/.lock"
  flock 9
  if ! have_torch; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --progress-bar off "torch==$TORCH_VERSION"
    installed+=("pip: torch==$TORCH_VERSION in $VENV")
  fi
  flock -u 9
fi

# --- transformers and tensorboard into the same venv (torch held at its pin) ----------------------------------------
have_pip() {  # have_pip NAME VERSION
  [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" = "$2" ]
}
missing_pip() {
  pip_missing=()
  have_pip transformers "$TRANSFORMERS_VERSION" || pip_missing+=("transformers==$TRANSFORMERS_VERSION")
  have_pip tensorboard "$TENSORBOARD_VERSION" || pip_missing+=("tensorboard==$TENSORBOARD_VERSION")
  ((${#pip_missing[@]}))
}
if missing_pip; then
  log "pip: installing ${pip_missing[*]} into $VENV"
  mkdir -p "$CACHE_DIR"
  exec 9>"$CACHE_DIR/.lock"
  flock 9
  if missing_pip; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --progress-bar off \
      "torch==$TORCH_VERSION" "${pip_missing[@]}"
    installed+=("pip: ${pip_missing[*]} in $VENV")
  fi
  flock -u 9
fi

if ((${#installed[@]})); then
  for i in "${installed[@]}"; do log "installed $i"; done
else
  log "everything present, nothing installed"
fi

# The build scripts read these lines.
echo "MOETRAIN_TORCH_PYTHON=$VENV/bin/python"
