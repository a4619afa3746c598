#include "parallel/nccl_info.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <nccl.h>

namespace moetrain::parallel {

std::string nccl_version() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unavailable";
  // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
  return fmt::format("{}.{}.{} (built against {}.{}.{})", v / 10000, (v % 10000) / 100, v % 100, NCCL_MAJOR,
                     NCCL_MINOR, NCCL_PATCH);
}

std::string cuda_runtime_version() {
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  std::string out = fmt::format("{}.{}", runtime / 1000, (runtime % 1000) / 10);
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0)
    out += fmt::format(", driver {}.{}", driver / 1000, (driver % 1000) / 10);
  else
    out += ", no CUDA driver on this machine";
  return out;
}

}  // namespace moetrain::parallel
