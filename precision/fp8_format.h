// The FP8 format of precision/fp8.h, without LibTorch: E4M3's largest finite value and the scaling tile's length
// (1×128 activation tiles, 128×128 weight blocks). Shared by fp8.cpp and the CUDA kernels of fp8_cuda.cu.
#pragma once

#include <cstdint>

namespace moetrain::precision {

constexpr double kE4M3Max = 448.0;
constexpr int64_t kTile = 128;

}  // namespace moetrain::precision
