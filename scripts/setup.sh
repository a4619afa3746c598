#!/usr/bin/env bash
# Installs what moetrain needs and is missing; idempotent (a second run installs nothing).
#   apt: OpenMPI, parallel HDF5, yaml-cpp, GoogleTest, SentencePiece, CLI11, nlohmann-json, fmt, xxHash,
#        ninja, ccache, hdf5-tools
#   PyPI: torch==2.11.0 (LibTorch) in a virtual environment in a cache directory outside the clone, shared by
#         every clone on this machine.
# Prints what it installed and, last, the environment the build scripts use.
set -euo pipefail

TORCH_VERSION="${MOETRAIN_TORCH_VERSION:-2.11.0}"
CACHE_DIR="${MOETRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moetrain}"
VENV="$CACHE_DIR/torch-$TORCH_VERSION"

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev hdf5-tools
  libyaml-cpp-dev
  libgtest-dev libgmock-dev
  libsentencepiece-dev sentencepiece
  libcli11-dev nlohmann-json3-dev libfmt-dev libxxhash-dev
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

if ((${#installed[@]})); then
  for i in "${installed[@]}"; do log "installed $i"; done
else
  log "everything present, nothing installed"
fi

# The build scripts read these lines.
echo "MOETRAIN_TORCH_PYTHON=$VENV/bin/python"
