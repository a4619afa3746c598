#include "precision/cpu_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOETRAIN_GEMM_X86 1
#endif

namespace moetrain::precision::cpu_gemm {
namespace {

// An MR × NR tile of C, its sums in vector registers across the whole k loop.
template <int MR, int NR>
inline __attribute__((always_inline)) void gemm_tile(const float* A, int64_t sai, int64_t sak, const float* B,
                                                     int64_t ldb, float* C, int64_t ldc, int64_t K, bool accumulate) {
  float acc[MR][NR];
  for (int i = 0; i < MR; ++i)
#pragma omp simd
    for (int j = 0; j < NR; ++j) acc[i][j] = accumulate ? C[i * ldc + j] : 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * sai + k * sak];
#pragma omp simd
      for (int j = 0; j < NR; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
#pragma omp simd
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = acc[i][j];
}

// Columns in strips of NR1, then NR2, then NR3 columns (then one at a time), each strip's rows in tiles of MR rows:
// tiles of 16 accumulator vectors with AVX-512's 32 registers, 8 with AVX2's or SSE's 16 (enough independent sums to
// keep the FMA units busy; more spill: measured here, AVX2 4×16 tiles ran 1.3–1.9× faster than 3×32 or 6×16 ones).
template <int MR, int NR>
inline __attribute__((always_inline)) void gemm_strip(const float* A, int64_t sai, int64_t sak, const float* B,
                                                      int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t K,
                                                      bool accumulate) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) gemm_tile<MR, NR>(A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, K, accumulate);
  for (; i < M; ++i) gemm_tile<1, NR>(A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, K, accumulate);
}

// The k loop in blocks of kDepthBlock: each block's products summed in registers, then added to C in block order. A
// two-level sum (rounding error growing with the block length plus the block count rather than with K, as a
// BLAS's k-blocking gives), and each block's strip of B stays in the cache across the strip's rows.
constexpr int64_t kDepthBlock = 128;

template <int MR1, int NR1, int MR2, int NR2, int MR3, int NR3>
inline __attribute__((always_inline)) void gemm_block(const float* A, int64_t sai, int64_t sak, const float* B,
                                                      int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N,
                                                      int64_t K, bool accumulate) {
  int64_t j = 0;
  for (; j + NR1 <= N; j += NR1) gemm_strip<MR1, NR1>(A, sai, sak, B + j, ldb, C + j, ldc, M, K, accumulate);
  for (; j + NR2 <= N; j += NR2) gemm_strip<MR2, NR2>(A, sai, sak, B + j, ldb, C + j, ldc, M, K, accumulate);
  for (; j + NR3 <= N; j += NR3) gemm_strip<MR3, NR3>(A, sai, sak, B + j, ldb, C + j, ldc, M, K, accumulate);
  for (; j < N; ++j) gemm_strip<4, 1>(A, sai, sak, B + j, ldb, C + j, ldc, M, K, accumulate);
}

template <int MR1, int NR1, int MR2, int NR2, int MR3, int NR3>
inline __attribute__((always_inline)) void gemm_strips(const float* A, int64_t sai, int64_t sak, const float* B,
                                                       int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N,
                                                       int64_t K, bool accumulate) {
  int64_t k = 0;
  do {  // at least once: K 0 writes C = 0 (or leaves it)
    const int64_t depth = std::min(kDepthBlock, K - k);
    gemm_block<MR1, NR1, MR2, NR2, MR3, NR3>(A + k * sak, sai, sak, B + k * ldb, ldb, C, ldc, M, N, depth,
                                             accumulate || k > 0);
    k += depth;
  } while (k < K);
}

// One kernel per instruction set; the CPU's features pick one when it is first used.
#ifdef MOETRAIN_GEMM_X86
__attribute__((target("avx512f"))) void gemm_avx512(const float* A, int64_t sai, int64_t sak, const float* B,
                                                    int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N, int64_t K,
                                                    bool accumulate) {
  gemm_strips<4, 64, 8, 32, 8, 16>(A, sai, sak, B, ldb, C, ldc, M, N, K, accumulate);  // 16-float vectors
}

__attribute__((target("avx2,fma"))) void gemm_avx2(const float* A, int64_t sai, int64_t sak, const float* B,
                                                   int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N, int64_t K,
                                                   bool accumulate) {
  gemm_strips<4, 16, 4, 8, 4, 4>(A, sai, sak, B, ldb, C, ldc, M, N, K, accumulate);  // 8-float vectors
}
#endif

void gemm_baseline(const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc,
                   int64_t M, int64_t N, int64_t K, bool accumulate) {
  gemm_strips<4, 8, 4, 4, 4, 4>(A, sai, sak, B, ldb, C, ldc, M, N, K, accumulate);  // 4-float vectors (SSE2)
}

using Kernel = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t,
                        int64_t, bool);

Kernel kernel_for(Isa isa) {
  switch (isa) {
#ifdef MOETRAIN_GEMM_X86
    case Isa::kAvx512:
      return gemm_avx512;
    case Isa::kAvx2:
      return gemm_avx2;
#endif
    default:
      return gemm_baseline;
  }
}

}  // namespace

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
#ifdef MOETRAIN_GEMM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) isas.push_back(Isa::kAvx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back(Isa::kAvx2);
#endif
  isas.push_back(Isa::kBaseline);
  return isas;
}

void small_gemm(const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M,
                int64_t N, int64_t K, bool accumulate) {
  static const Kernel kernel = kernel_for(supported_isas().front());
  kernel(A, sai, sak, B, ldb, C, ldc, M, N, K, accumulate);
}

void small_gemm(Isa isa, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc,
                int64_t M, int64_t N, int64_t K, bool accumulate) {
  kernel_for(isa)(A, sai, sak, B, ldb, C, ldc, M, N, K, accumulate);
}

bool applies(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() && b.defined() && a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == at::kFloat &&
         b.scalar_type() == at::kFloat && a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
         a.size(1) <= kMaxDepth;
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b_in) {
  if (!applies(a, b_in)) return at::mm(a, b_in);
  RECORD_FUNCTION("moetrain::cpu_gemm::mm", std::vector<c10::IValue>());
  const at::Tensor b = b_in.stride(1) == 1 || b_in.size(1) <= 1 ? b_in : b_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor c = at::empty({M, N}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return c;
  const float *ap = a.const_data_ptr<float>(), *bp = b.const_data_ptr<float>();
  float* cp = c.data_ptr<float>();
  const int64_t sai = a.stride(0), sak = a.stride(1), ldb = b.stride(0);
  // Tasks: 32 rows × 128 columns (whole strips of 64), row blocks outermost.
  constexpr int64_t kRows = 32, kCols = 128;
  const int64_t row_blocks = (M + kRows - 1) / kRows, col_blocks = (N + kCols - 1) / kCols;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t i = t / col_blocks * kRows, j = t % col_blocks * kCols;
      small_gemm(ap + i * sai, sai, sak, bp + j, ldb, cp + i * N + j, N, std::min(kRows, M - i), std::min(kCols, N - j),
                 K, false);
    }
  });
  return c;
}

}  // namespace moetrain::precision::cpu_gemm
