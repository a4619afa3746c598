// NCCL and CUDA runtime facts for `moetrain version` (CUDA builds only).
#pragma once

#include <string>

namespace moetrain::parallel {

std::string nccl_version();          // the NCCL library loaded at run time, "2.28.9"
std::string cuda_runtime_version();  // the CUDA runtime, "13.0"; the driver's version or "no driver" after it

}  // namespace moetrain::parallel
