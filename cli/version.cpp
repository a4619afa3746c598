#include "cli/version.h"

#include <CLI/Version.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <torch/version.h>
#include <xxhash.h>

#include "checkpoints/hdf5_info.h"
#include "moetrain/build_info.h"
#include "parallel/mpi_runtime.h"
#if MOETRAIN_WITH_CUDA
#include "parallel/nccl_info.h"
#endif

namespace moetrain::cli {

std::string version_report() {
  std::string out;
  auto line = [&](const char* what, const std::string& value) { out += fmt::format("{:<14}{}\n", what, value); };
  line("moetrain", fmt::format("{} (git {}), {} build", MOETRAIN_VERSION, MOETRAIN_GIT_REV, MOETRAIN_BUILD_KIND));
  line("LibTorch", fmt::format("{} (CUDA devices visible: {})", TORCH_VERSION,
                               torch::cuda::is_available() ? torch::cuda::device_count() : 0));
  line("MPI", parallel::MpiRuntime::library_version());
  line("HDF5", checkpoints::hdf5_version());
  line("yaml-cpp", MOETRAIN_YAML_CPP_VERSION);
#if MOETRAIN_WITH_CUDA
  line("CUDA runtime", parallel::cuda_runtime_version());
  line("NCCL", parallel::nccl_version());
#else
  line("CUDA", "not compiled in");
  line("NCCL", "not compiled in");
#endif
  line("CLI11", CLI11_VERSION);
  line("fmt", fmt::format("{}.{}.{}", FMT_VERSION / 10000, FMT_VERSION / 100 % 100, FMT_VERSION % 100));
  line("nlohmann-json", fmt::format("{}.{}.{}", NLOHMANN_JSON_VERSION_MAJOR, NLOHMANN_JSON_VERSION_MINOR,
                                    NLOHMANN_JSON_VERSION_PATCH));
  unsigned xxh = XXH_versionNumber();
  line("xxHash", fmt::format("{}.{}.{}", xxh / 10000, xxh / 100 % 100, xxh % 100));
  return out;
}

}  // namespace moetrain::cli
