#!/usr/bin/env bash
# gpu-bundle.sh DIR [PROGRAM... | all]: packs programs of build/ (or $MOETRAIN_BUILD_DIR) for a GPU machine that has
# the torch wheel but none of our Debian libraries: by default those the GPU check runs (moetrain,
# moetrain_unit_tests, bench_gpu: each links all of moetrain statically, about 3 MB apiece, and all thirteen would
# take the bundle past the 64 MiB a device run carries). DIR/bin (the programs, stripped, and Open MPI's
# mpirun/orted/ompi_info),
# DIR/lib (every shared library they and Open MPI's, PMIx's and hwloc's plug-ins need, except the glibc family,
# libstdc++/libgcc_s and what the torch wheel or the NVIDIA driver provide), the plug-ins, Open MPI's and PMIx's
# help files, and DIR/run.sh, which runs a program of the bundle against the machine's own LibTorch.
# Builds only when bin/moetrain is missing. Needs ldd, readelf, strip and patchelf (scripts/setup.sh installs it).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${MOETRAIN_BUILD_DIR:-$root/build}
default_programs=(moetrain moetrain_unit_tests bench_gpu)

usage() {
  cat <<EOF
Usage: scripts/gpu-bundle.sh DIR [PROGRAM... | all]
Packs programs of $build_dir/bin (default: ${default_programs[*]}; all: every one) with the libraries a GPU
machine without our Debian packages lacks into DIR (created, or replaced if it holds an earlier bundle), and writes
DIR/run.sh:
  DIR/run.sh moetrain version            # bin/moetrain with the bundle's libraries and the machine's torch
  DIR/run.sh mpirun -np 2 moetrain ...   # the bundled Open MPI
run.sh takes LibTorch from \$MOETRAIN_TORCH_LIB (a torch/lib folder), else from the python3 on PATH, else from the
venv scripts/setup.sh makes. Environment: MOETRAIN_BUILD_DIR (default build/).
EOF
}
log() { printf 'gpu-bundle: %s\n' "$*" >&2; }
die() { printf 'gpu-bundle: error: %s\n' "$*" >&2; exit 1; }
case "${1:-}" in -h|--help) usage; exit 0 ;; "") usage >&2; exit 2 ;; esac
out=$1
shift
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${default_programs[@]}")
for tool in ldd readelf strip patchelf dpkg; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/setup.sh installs patchelf)"
done

# --- the build and the torch it was built against -----------------------------------------------------------------
[ -x "$build_dir/bin/moetrain" ] || MOETRAIN_BUILD_DIR=$build_dir "$root/scripts/build.sh"
if [ "${wanted[*]}" = all ]; then
  wanted=()
  for f in "$build_dir"/bin/*; do [ -f "$f" ] && [ -x "$f" ] && wanted+=("$(basename "$f")"); done
fi
for name in "${wanted[@]}"; do
  [ -f "$build_dir/bin/$name" ] && [ -x "$build_dir/bin/$name" ] ||
    die "no program $name in $build_dir/bin (there: $(ls "$build_dir/bin" | tr '\n' ' '))"
done
torch_python=$(sed -n 's/^MOETRAIN_TORCH_PYTHON:STRING=//p' "$build_dir/CMakeCache.txt")
[ -n "$torch_python" ] || die "no MOETRAIN_TORCH_PYTHON in $build_dir/CMakeCache.txt"
venv=$(readlink -f "$(dirname "$torch_python")/..")
torch_dir=$(ls -d "$venv"/lib/python3*/site-packages/torch 2>/dev/null | head -n 1 || true)
[ -f "$torch_dir/lib/libtorch.so" ] || die "no torch/lib/libtorch.so in the build's venv $venv"
torch_version=$(sed -n "s/^__version__ = '\(.*\)'.*/\1/p" "$torch_dir/version.py")
# Every file the wheel ships (torch/lib, nvidia/*/lib): a library of that name comes from the target's torch.
declare -A wheel_names=()
for f in "$torch_dir"/lib/*.so* "$(dirname "$torch_dir")"/nvidia/*/lib/*.so*; do
  [ -e "$f" ] && wheel_names[$(basename "$f")]=1
done

# --- where a library comes from at run time -------------------------------------------------------------------------
# system: glibc and the loader, and libstdc++/libgcc_s: the target is newer (Ubuntu 24.04: glibc 2.39, GCC 14's
#   libstdc++) and the torch wheel already relies on its libstdc++, so one copy serves both; a bundled older
#   libstdc++ would shadow the one torch and the driver's libraries were tested with.
# driver: the NVIDIA driver's user-space libraries, which must match the kernel module.
# wheel: the torch wheel's own libraries, also when ours link the toolkit's copy of one (libcudart.so.13).
origin() {  # origin NAME PATH -> system | driver | wheel | bundle
  local name=$1 path=$2
  case "$name" in
    linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libmvec.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|\
    libutil.so*|libanl.so*|libnsl.so*|libnss_*|libBrokenLocale.so*|libthread_db.so*|libstdc++.so*|libgcc_s.so*)
      echo system; return ;;
    libcuda.so*|libnvidia-*|libnvcuvid.so*) echo driver; return ;;
    libtorch*|libc10*) echo wheel; return ;;
  esac
  if [ -n "$path" ] && [[ $(readlink -f "$path") == "$venv"/* ]]; then echo wheel; return; fi
  if [ -n "${wheel_names[$name]:-}" ]; then echo wheel; return; fi
  echo bundle
}

declare -A bundled=()   # name -> source path
declare -A from_wheel=()  # name -> path here, for wheel libraries our programs found outside the venv
# deps FILE: prints "NAME PATH" for each library FILE needs (all levels), PATH empty when ldd does not find it.
deps() {
  env -u LD_LIBRARY_PATH ldd "$1" | awk '$2 == "=>" { print $1, ($3 == "not" ? "" : $3) }'
}
# has_runpath FILE: whether FILE's dynamic section has a RUNPATH or RPATH (read whole: no grep -q on a pipe,
# whose early exit would fail the pipeline under pipefail).
has_runpath() {
  local d
  d=$(readelf -d "$1" 2>/dev/null || true)
  [[ $d == *"(RUNPATH)"* || $d == *"(RPATH)"* ]]
}
# gather FILE: records FILE's libraries to bundle; dies on one that is missing here and is not the driver's.
declare -A gathered=()  # "name path" already classified (the programs share most of their libraries)
gather() {
  local name path
  while read -r name path; do
    [ -z "${gathered["$name $path"]:-}" ] || continue
    gathered["$name $path"]=1
    case $(origin "$name" "$path") in
      bundle)
        [ -n "$path" ] || die "$1 needs $name, which ldd does not find here"
        bundled[$name]=$path ;;
      wheel)
        if [ -n "$path" ] && [[ $(readlink -f "$path") != "$venv"/* ]]; then from_wheel[$name]=$path; fi ;;
    esac
  done < <(deps "$1")
}

# --- DIR -------------------------------------------------------------------------------------------------------------
marker=.moetrain-bundle
if [ -e "$out" ]; then
  [ -d "$out" ] || die "$out exists and is not a folder"
  if [ -e "$out/$marker" ]; then
    rm -rf "${out:?}"/{bin,lib,share,etc,run.sh,MANIFEST.txt,source_dir,"$marker"}
  elif [ -n "$(ls -A "$out")" ]; then
    die "$out is not empty and holds no earlier bundle; give a new or empty folder"
  fi
fi
mkdir -p "$out"/{bin,lib/openmpi3,lib/pmix,lib/hwloc,share,etc}
out=$(cd "$out" && pwd)
touch "$out/$marker"

# --- programs ----------------------------------------------------------------------------------------------------------
for name in "${wanted[@]}"; do
  f=$build_dir/bin/$name
  cp "$f" "$out/bin/"
  [ "$(head -c 4 "$f")" = $'\x7fELF' ] || continue  # a script: copied as it is
  strip --strip-unneeded "$out/bin/$(basename "$f")"
  gather "$f"
done

# --- Open MPI, PMIx and hwloc: plug-ins (dlopen'ed, so ldd of the programs misses them), launchers, help files ------
# The packages are those of the libmpi / libpmix our programs and plug-ins link.
owner() { dpkg -S "$(readlink -f "$1")" 2>/dev/null | head -n 1 | cut -d: -f1 || true; }
[ -n "${bundled[libmpi.so.40]:-}" ] || die "the programs do not link libmpi.so.40 (Open MPI 4.x); nothing to bundle"
ompi_pkg=$(owner "${bundled[libmpi.so.40]}")
[ -n "$ompi_pkg" ] || die "no Debian package owns ${bundled[libmpi.so.40]}"
# Fabric plug-ins (InfiniBand verbs, libfabric, UCX, PSM) and OpenSHMEM's are left out: one GPU machine talks over
# shared memory (btl vader/self) and TCP, and their libraries would load the target's own, mismatched providers.
skip_plugin='^(libibverbs|librdmacm|libfabric|libuc[pstm]|libpsm|libinfinipath|liboshmem)'
skipped=()
while read -r plugin; do
  if grep -Eq "$skip_plugin" <<<"$(deps "$plugin")"; then
    skipped+=("$(basename "$plugin" .so)"); continue
  fi
  cp "$plugin" "$out/lib/openmpi3/"
  gather "$plugin"
done < <(dpkg -L "$ompi_pkg" | grep -E '/openmpi3/[^/]+\.so$')
[ -n "$(ls "$out/lib/openmpi3")" ] || die "no Open MPI plug-ins found in $ompi_pkg"

pmix_pkg=""
[ -n "${bundled[libpmix.so.2]:-}" ] && pmix_pkg=$(owner "${bundled[libpmix.so.2]}")
if [ -n "$pmix_pkg" ]; then
  while read -r plugin; do
    cp "$plugin" "$out/lib/pmix/"
    gather "$plugin"
  done < <(dpkg -L "$pmix_pkg" | grep -E '/pmix/pmix_mca_[^/]+\.so$')
  pmix_share=$(dpkg -L "$pmix_pkg" | grep -E '/share/pmix$' | head -n 1 || true)
  [ -n "$pmix_share" ] && cp -rL "$pmix_share" "$out/share/pmix"
fi

# hwloc's PCI plug-in (device locality); its GL/OpenCL/libxml ones would drag in X11, OpenCL and ICU.
if dpkg-query -W -f='${Status}' libhwloc-plugins 2>/dev/null | grep -q 'install ok installed'; then
  hwloc_pci=$(dpkg -L libhwloc-plugins | grep -E '/hwloc_pci\.so$' | head -n 1 || true)
  if [ -n "$hwloc_pci" ]; then cp "$hwloc_pci" "$out/lib/hwloc/"; gather "$hwloc_pci"; fi
fi

# mpirun = orterun; orted starts the ranks on other hosts; ompi_info shows what the bundled Open MPI sees.
for prog in orterun orted ompi_info; do
  p=$(dpkg -L openmpi-bin 2>/dev/null | grep -E "/bin/$prog\$" | head -n 1 || true)
  [ -n "$p" ] || die "Open MPI's $prog not found (Debian package openmpi-bin)"
  cp "$p" "$out/bin/"
  gather "$p"
done
# Copies, not links (14 kB each): the bundle may travel through tools that drop symbolic links.
cp "$out/bin/orterun" "$out/bin/mpirun"
cp "$out/bin/orterun" "$out/bin/mpiexec"
# Help texts and default parameters (Debian's: the fabric components stay off, as they are here).
ompi_share=$(dpkg -L openmpi-common 2>/dev/null | grep -E '/share/openmpi$' | head -n 1 || true)
[ -n "$ompi_share" ] || die "Open MPI's help files not found (Debian package openmpi-common)"
cp -rL "$ompi_share" "$out/share/openmpi"
rm -f "$out"/share/openmpi/*-wrapper-data.txt  # the compiler wrappers' settings: no compilers in the bundle
for f in openmpi-mca-params.conf openmpi-default-hostfile; do
  [ -f "/etc/openmpi/$f" ] && cp "/etc/openmpi/$f" "$out/etc/"
done

# --- the libraries -----------------------------------------------------------------------------------------------------
for name in "${!bundled[@]}"; do
  cp -L "${bundled[$name]}" "$out/lib/$name"
done
# No RUNPATH into build/, the venv or /usr: LD_LIBRARY_PATH from run.sh decides, and a library the bundle lacks
# shows up here as an error instead of loading from this machine's /usr.
while read -r f; do
  chmod u+w "$f"
  if has_runpath "$f"; then patchelf --remove-rpath "$f"; fi
done < <(find "$out/bin" "$out/lib" -type f)

# Check: no symbolic links (they may not travel), and every library each file names is in lib/ or comes from the
# system, the driver or the wheel.
[ -z "$(find "$out" -type l)" ] || die "symbolic links in the bundle: $(find "$out" -type l | head -n 3)"
while read -r f; do
  if has_runpath "$f"; then die "$f still has a RUNPATH"; fi
  while read -r needed; do
    [ -e "$out/lib/$needed" ] || [ "$(origin "$needed" "")" != bundle ] || die "$f needs $needed, not in $out/lib"
  done < <(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
done < <(find "$out/bin" "$out/lib" -type f)

# --- run.sh ----------------------------------------------------------------------------------------------------------
{
  printf '#!/usr/bin/env bash\n'
  cat <<'EOF'
# run.sh COMMAND [ARGS...]: runs COMMAND (a bare name of a program in this bundle's bin/, else as given) with the
# bundle's libraries and Open MPI / PMIx plug-ins and help files, and the machine's own LibTorch, taken from
#   $MOETRAIN_TORCH_LIB (a torch/lib folder), else the torch of the python3 on PATH, else the venv
#   scripts/setup.sh makes (~/.cache/moetrain/torch-VERSION).
# Written by scripts/gpu-bundle.sh. `run.sh env` shows the environment a program gets.
set -euo pipefail
EOF
  printf 'built_torch=%q  # the torch wheel the bundle was built against\n' "$torch_version"
  cat <<'EOF'
here=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }
usage() {
  echo "Usage: $0 COMMAND [ARGS...]   e.g. $0 moetrain version; $0 mpirun -np 2 moetrain train ..."
  echo "programs: $(ls "$here/bin" | tr '\n' ' ')"
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac

# LibTorch: the first of these that has one.
torch_lib=""
tried=()
if [ -n "${MOETRAIN_TORCH_LIB:-}" ]; then
  [ -f "$MOETRAIN_TORCH_LIB/libtorch.so" ] || die "MOETRAIN_TORCH_LIB=$MOETRAIN_TORCH_LIB holds no libtorch.so"
  torch_lib=$(cd "$MOETRAIN_TORCH_LIB" && pwd)
else
  if command -v python3 >/dev/null; then
    tried+=("python3 on PATH ($(command -v python3))")
    # find_spec does not import torch (seconds, and CUDA initialisation).
    t=$(python3 -c 'import importlib.util as u; s = u.find_spec("torch"); print(s.submodule_search_locations[0] if s else "")' \
        2>/dev/null || true)
    [ -n "$t" ] && [ -f "$t/lib/libtorch.so" ] && torch_lib=$t/lib
  fi
  if [ -z "$torch_lib" ]; then
    venv=${MOETRAIN_CACHE:-${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/moetrain}/torch-${built_torch%%+*}
    tried+=("$venv")
    for t in "$venv"/lib/python3*/site-packages/torch/lib; do
      [ -f "$t/libtorch.so" ] && { torch_lib=$t; break; }
    done
  fi
fi
[ -n "$torch_lib" ] || die "no LibTorch found (looked at: $(printf '%s; ' "${tried[@]}")set MOETRAIN_TORCH_LIB \
to the torch/lib folder of a torch $built_torch wheel)"
# The programs use LibTorch's C++ ABI: another version fails with missing symbols or worse.
version=$(sed -n "s/^__version__ = '\(.*\)'.*/\1/p" "$torch_lib/../version.py" 2>/dev/null || true)
[ -z "$version" ] || [ "$version" = "$built_torch" ] ||
  die "the torch at $torch_lib is $version; this bundle was built against $built_torch (set MOETRAIN_TORCH_LIB)"

ld=$here/lib:$torch_lib
for d in "$torch_lib"/../../nvidia/*/lib; do
  [ -d "$d" ] && ld+=:$(cd "$d" && pwd)
done
export LD_LIBRARY_PATH=$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$here/bin:$PATH
# Open MPI and PMIx look for plug-ins, help texts and parameter files where Debian installed them; point them here.
export OPAL_PREFIX=$here OPAL_EXEC_PREFIX=$here OPAL_BINDIR=$here/bin OPAL_LIBDIR=$here/lib \
       OPAL_PKGLIBDIR=$here/lib/openmpi3 OPAL_DATAROOTDIR=$here/share OPAL_DATADIR=$here/share \
       OPAL_PKGDATADIR=$here/share/openmpi OPAL_SYSCONFDIR=$here/etc
export OMPI_MCA_mca_base_component_path=$here/lib/openmpi3
export PMIX_PREFIX=$here PMIX_LIBDIR=$here/lib PMIX_PKGLIBDIR=$here/lib/pmix PMIX_PKGDATADIR=$here/share/pmix \
       PMIX_SYSCONFDIR=$here/etc
export PMIX_MCA_mca_base_component_path=$here/lib/pmix
export HWLOC_PLUGINS_PATH=$here/lib/hwloc
# A process started without mpirun is an Open MPI singleton: isolated, it does not exec orted.
export OMPI_MCA_ess_singleton_isolated=${OMPI_MCA_ess_singleton_isolated:-1}
# mpirun's default launcher wants ssh or rsh on PATH even for ranks on this host; without either, launch locally.
if ! command -v ssh >/dev/null && ! command -v rsh >/dev/null && [ -z "${OMPI_MCA_plm:-}${OMPI_MCA_plm_rsh_agent:-}" ]
then
  export OMPI_MCA_plm=isolated
fi

cmd=$1; shift
if [[ $cmd != */* ]] && [ -x "$here/bin/$cmd" ]; then cmd=$here/bin/$cmd; fi
exec "$cmd" "$@"
EOF
} >"$out/run.sh"
chmod +x "$out/run.sh"

# --- manifest and size -------------------------------------------------------------------------------------------------
{
  echo "moetrain GPU bundle: $(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown), built against torch $torch_version"
  echo "programs: ${wanted[*]} orterun (mpirun, mpiexec) orted ompi_info"
  echo "libraries (lib/NAME <- source here):"
  for name in $(printf '%s\n' "${!bundled[@]}" | sort); do echo "  $name <- ${bundled[$name]}"; done
  echo "taken from the target's torch wheel although linked from outside the venv here:"
  for name in $(printf '%s\n' "${!from_wheel[@]}" | sort); do echo "  $name (here: ${from_wheel[$name]})"; done
  echo "Open MPI plug-ins left out (fabrics, OpenSHMEM): ${skipped[*]}"
} >"$out/MANIFEST.txt"
# The source folder the programs were built from: the unit tests read configs under it, and
# scripts/gpu-check.sh points that path at the clone it runs in when the path does not exist there.
sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$build_dir/CMakeCache.txt" >"$out/source_dir"
bytes=$(du -sb "$out" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
log "${#bundled[@]} libraries, $(ls "$out/lib/openmpi3" | wc -l) Open MPI and $(ls "$out/lib/pmix" | wc -l) PMIx plug-ins; manifest: $out/MANIFEST.txt"
echo "$out: $mib MiB ($bytes bytes)"
[ "$bytes" -lt $((64 * 1048576)) ] || log "warning: over 64 MiB, more than a device run can carry"
