#include "precision/fp8_cuda.h"

#include "precision/fp8_format.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <atomic>
#include <stdexcept>
#include <string>

namespace moetrain::precision::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block
static_assert(kTile == 4 * 32, "a warp holds a tile as 4 values per lane");

// max that propagates NaN, as ATen's amax does (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// fp8.cpp's scales_from: amax / 448 where amax > 0 (NaN is not), else 1.
__device__ __forceinline__ float scale_of(float amax) {
  return amax > 0.f ? amax / static_cast<float>(kE4M3Max) : 1.f;  // a float division, as ATen's on FP32 amax
}

__device__ __forceinline__ uint8_t to_e4m3(float v) { return c10::Float8_e4m3fn(v).x; }

// One warp per 1×128 tile: lane i holds columns i, i+32, i+64, i+96 of it.
template <typename T>
__global__ void quantize_tiles_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t ld,
                                      uint8_t* __restrict__ q, float* __restrict__ scale) {
  const int64_t tiles_per_row = (cols + kTile - 1) / kTile;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (tile >= rows * tiles_per_row) return;  // the whole warp
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t r = tile / tiles_per_row, c0 = (tile % tiles_per_row) * kTile;
  float v[4];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = c0 + lane + 32 * j;
    v[j] = c < cols ? static_cast<float>(x[r * ld + c]) : 0.f;  // the padding ATen adds: zeros
    amax = max_nan(amax, fabsf(v[j]));
  }
  const float s = scale_of(warp_max(amax));
  if (lane == 0) scale[tile] = s;  // [rows, tiles_per_row] row-major: index r · tiles_per_row + c0 / 128
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = c0 + lane + 32 * j;
    if (c < cols) q[r * cols + c] = to_e4m3(v[j] / s);
  }
}

// One block per 128 rows × 32 columns of the input: the patch dequantized into shared memory (coalesced reads along
// the columns), then each warp quantizes whole columns of it as 128-element tiles of the transposed output.
__global__ void requantize_transposed_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale,
                                             int64_t rows, int64_t cols, uint8_t* __restrict__ out,
                                             float* __restrict__ out_scale) {
  __shared__ float patch[kTile][33];  // 33: a column's 128 values fall in 32 different banks
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * 32, m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t in_tiles = (cols + kTile - 1) / kTile, rows_p = (rows + kTile - 1) / kTile * kTile;
  for (int i = static_cast<int>(threadIdx.x); i < kTile * 32; i += static_cast<int>(blockDim.x)) {
    const int mm = i / 32, kk = i % 32;
    const int64_t m = m0 + mm, k = k0 + kk;
    float v = 0.f;  // the zero rows of the padding
    if (m < rows && k < cols)
      v = static_cast<float>(c10::Float8_e4m3fn(q[m * cols + k], c10::Float8_e4m3fn::from_bits())) *
          scale[m * in_tiles + k / kTile];
    patch[mm][kk] = v;
  }
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  for (int kk = warp; kk < 32; kk += static_cast<int>(blockDim.x / 32)) {
    const int64_t k = k0 + kk;
    if (k >= cols) break;  // the whole warp
    float v[4];
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[j] = patch[lane + 32 * j][kk];
      amax = max_nan(amax, fabsf(v[j]));
    }
    const float s = scale_of(warp_max(amax));
    if (lane == 0) out_scale[k * (rows_p / kTile) + blockIdx.y] = s;
#pragma unroll
    for (int j = 0; j < 4; ++j) out[k * rows_p + m0 + lane + 32 * j] = to_e4m3(v[j] / s);
  }
}

// One block per 128×128 block of w: its amax (a block-wide reduction), then each value quantized, written to q
// along the rows (coalesced) and staged in shared memory, from which the block's transpose is written to q_t along
// its rows (coalesced too). The second read of w hits the cache: the block is 32 KB in BF16.
template <typename T>
__global__ void quantize_blocks_kernel(const T* __restrict__ w, int64_t rows, int64_t cols, uint8_t* __restrict__ q,
                                       uint8_t* __restrict__ q_t, float* __restrict__ scale,
                                       float* __restrict__ scale_t) {
  __shared__ uint8_t staged[kTile][kTile + 4];  // rows 33 words apart: a column's bytes in 32 different banks
  __shared__ float warp_amax[kWarps];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile, r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int threads = static_cast<int>(blockDim.x), t0 = static_cast<int>(threadIdx.x);
  const auto value = [&](int rr, int cc) {  // the padding ATen adds: zeros
    const int64_t r = r0 + rr, c = c0 + cc;
    return r < rows && c < cols ? static_cast<float>(w[r * cols + c]) : 0.f;
  };
  float amax = 0.f;
  for (int i = t0; i < kTile * kTile; i += threads) amax = max_nan(amax, fabsf(value(i / kTile, i % kTile)));
  amax = warp_max(amax);
  const int warp = t0 / 32, lane = t0 % 32;
  if (lane == 0) warp_amax[warp] = amax;
  __syncthreads();
  amax = lane < threads / 32 ? warp_amax[lane] : 0.f;
  const float s = scale_of(warp_max(amax));  // every warp reduces the same values: one s for the block
  if (t0 == 0) {
    scale[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = s;
    scale_t[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = s;
  }
  for (int i = t0; i < kTile * kTile; i += threads) {
    const int rr = i / kTile, cc = i % kTile;
    const uint8_t b = to_e4m3(value(rr, cc) / s);
    staged[rr][cc] = b;
    if (r0 + rr < rows && c0 + cc < cols) q[(r0 + rr) * cols + c0 + cc] = b;
  }
  __syncthreads();
  for (int i = t0; i < kTile * kTile; i += threads) {
    const int cc = i / kTile, rr = i % kTile;
    if (r0 + rr < rows && c0 + cc < cols) q_t[(c0 + cc) * rows + r0 + rr] = staged[rr][cc];
  }
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace

bool kernels_available(int device) {
  static std::atomic<int> known[64];  // 0: not asked yet, 1: yes, 2: no
  if (device < 0 || device >= 64) return false;
  int k = known[device].load();
  if (k == 0) {
    int current = 0;
    cudaFuncAttributes attributes;
    bool ok = cudaGetDevice(&current) == cudaSuccess && cudaSetDevice(device) == cudaSuccess &&
              cudaFuncGetAttributes(&attributes, quantize_tiles_kernel<float>) == cudaSuccess &&
              cudaFuncGetAttributes(&attributes, requantize_transposed_kernel) == cudaSuccess &&
              cudaFuncGetAttributes(&attributes, quantize_blocks_kernel<float>) == cudaSuccess;
    cudaGetLastError();  // "no kernel image for this device" is an answer, not an error to keep
    ok = cudaSetDevice(current) == cudaSuccess && ok;
    k = ok ? 1 : 2;
    known[device].store(k);
  }
  return k == 1;
}

void quantize_tiles(const void* x, Dtype dtype, int64_t rows, int64_t cols, int64_t ld, void* q, float* scale,
                    void* stream) {
  const int64_t tiles = rows * ((cols + kTile - 1) / kTile);
  if (tiles == 0) return;
  const dim3 grid(static_cast<unsigned>((tiles + kWarps - 1) / kWarps)), block(kWarps * 32);
  const auto s = static_cast<cudaStream_t>(stream);
  auto* qb = static_cast<uint8_t*>(q);
  switch (dtype) {
    case Dtype::kFloat:
      quantize_tiles_kernel<<<grid, block, 0, s>>>(static_cast<const float*>(x), rows, cols, ld, qb, scale);
      break;
    case Dtype::kBFloat16:
      quantize_tiles_kernel<<<grid, block, 0, s>>>(static_cast<const c10::BFloat16*>(x), rows, cols, ld, qb, scale);
      break;
    case Dtype::kHalf:
      quantize_tiles_kernel<<<grid, block, 0, s>>>(static_cast<const c10::Half*>(x), rows, cols, ld, qb, scale);
      break;
  }
  check_launch("FP8 tile quantization kernel");
}

void quantize_blocks(const void* w, Dtype dtype, int64_t rows, int64_t cols, void* q, void* q_t, float* scale,
                     float* scale_t, void* stream) {
  const int64_t row_blocks = (rows + kTile - 1) / kTile, col_blocks = (cols + kTile - 1) / kTile;
  if (row_blocks == 0 || col_blocks == 0) return;
  if (row_blocks > 65535) throw std::invalid_argument("quantize_blocks: more than 65535 blocks of 128 rows");
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks)), block(kWarps * 32);
  const auto st = static_cast<cudaStream_t>(stream);
  auto *qb = static_cast<uint8_t*>(q), *qtb = static_cast<uint8_t*>(q_t);
  switch (dtype) {
    case Dtype::kFloat:
      quantize_blocks_kernel<<<grid, block, 0, st>>>(static_cast<const float*>(w), rows, cols, qb, qtb, scale, scale_t);
      break;
    case Dtype::kBFloat16:
      quantize_blocks_kernel<<<grid, block, 0, st>>>(static_cast<const c10::BFloat16*>(w), rows, cols, qb, qtb, scale,
                                                     scale_t);
      break;
    case Dtype::kHalf:
      quantize_blocks_kernel<<<grid, block, 0, st>>>(static_cast<const c10::Half*>(w), rows, cols, qb, qtb, scale,
                                                     scale_t);
      break;
  }
  check_launch("FP8 block quantization kernel");
}

void requantize_transposed(const void* q, const float* scale, int64_t rows, int64_t cols, void* out,
                           float* out_scale, void* stream) {
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  if (row_tiles == 0 || cols == 0) return;
  if (row_tiles > 65535) throw std::invalid_argument("requantize_transposed: more than 65535 tiles of 128 rows");
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>(row_tiles)), block(kWarps * 32);
  requantize_transposed_kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(q), scale, rows, cols, static_cast<uint8_t*>(out), out_scale);
  check_launch("FP8 transposed re-quantization kernel");
}

}  // namespace moetrain::precision::cuda
