// The FP8 quantization of precision/fp8.cpp fused into one CUDA kernel each, for tensors on a CUDA device (CUDA
// builds only; fp8.cpp calls them). Each reads its input once (a weight block twice, the second time from the
// cache) and writes the E4M3 bytes and the scales, where the ATen ops make five passes over the data. They
// compute exactly what those ATen ops compute — the same FP32 operations (amax, amax / 448 or 1 where amax is not
// positive, a true division by the scale, NaN propagated as amax does) and c10's E4M3 conversion — so their results
// are bit-identical to the ATen ops on the GPU, and for finite inputs to the CPU's too
// (Cuda.FusedFp8QuantizationIsBitIdentical; the CPU's NaN of inf/inf has its sign bit set, the GPU's not).
// Plain pointers and sizes: no LibTorch header is compiled by nvcc beyond c10's scalar types.
#pragma once

#include <cstdint>

namespace moetrain::precision::cuda {

enum class Dtype { kFloat, kBFloat16, kHalf };

// Whether this build has the kernels for the CUDA device `device` (compiled for its architecture); asked once per
// device.
bool kernels_available(int device);

// x [rows, cols] (rows `ld` elements apart, columns contiguous) → q [rows, cols] E4M3 bytes, contiguous, and
// scale [rows, ⌈cols/128⌉]: one scale per 1×128 tile of each row (a partial last tile scaled on its own).
void quantize_tiles(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t ld, void* q, float* scale,
                    void* stream);

// w [rows, cols] (contiguous) → q [rows, cols] and q_t [cols, rows], E4M3 bytes, contiguous, with one scale per
// 128×128 block: scale [⌈rows/128⌉, ⌈cols/128⌉] and its transpose scale_t (the weights' forward and dgrad operands;
// partial blocks at the edges scaled on their own). ⌈rows/128⌉ must be ≤ 65535.
void quantize_blocks(const void* w, Dtype dtype, int64_t rows, int64_t cols, void* q, void* q_t, float* scale,
                     float* scale_t, void* stream);

// q [rows, cols] E4M3 (contiguous) with tile scales [rows, ⌈cols/128⌉] → dequantized, zero-padded to
// rows_p = ⌈rows/128⌉·128 rows, transposed and quantized in tiles along the former rows: out [cols, rows_p] and
// out_scale [cols, rows_p/128] (the wgrad operands' 128×1 tiles along the tokens). rows_p/128 must be ≤ 65535.
void requantize_transposed(const void* q, const float* scale, int64_t rows, int64_t cols, void* out,
                           float* out_scale, void* stream);

}  // namespace moetrain::precision::cuda
