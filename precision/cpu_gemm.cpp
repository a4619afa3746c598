#include "precision/cpu_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

// One copy per instruction set, chosen when the library loads by the CPU's features (GCC function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOETRAIN_GEMM_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOETRAIN_GEMM_LOOP
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

// Columns in strips of 64, 32 and 16 (then one at a time), each strip's rows in tiles of 16 accumulator vectors
// (AVX-512) where the rows allow: enough independent sums to keep the FMA units busy.
template <int MR, int NR>
inline __attribute__((always_inline)) void gemm_strip(const float* A, int64_t sai, int64_t sak, const float* B,
                                                      int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t K,
                                                      bool accumulate) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) gemm_tile<MR, NR>(A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, K, accumulate);
  for (; i < M; ++i) gemm_tile<1, NR>(A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, K, accumulate);
}

}  // namespace

MOETRAIN_GEMM_LOOP
void small_gemm(const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc,
                int64_t M, int64_t N, int64_t K, bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) gemm_strip<4, 64>(A, sai, sak, B + j, ldb, C + j, ldc, M, K, accumulate);
  for (; j + 32 <= N; j += 32) gemm_strip<8, 32>(A, sai, sak, B + j, ldb, C + j, ldc, M, K, accumulate);
  for (; j + 16 <= N; j += 16) gemm_strip<8, 16>(A, sai, sak, B + j, ldb, C + j, ldc, M, K, accumulate);
  for (; j < N; ++j) gemm_strip<4, 1>(A, sai, sak, B + j, ldb, C + j, ldc, M, K, accumulate);
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
      small_gemm(ap + i * sai, sai, sak, bp + j, ldb, cp + i * N + j, N, std::min(kRows, M - i),
                 std::min(kCols, N - j), K, false);
    }
  });
  return c;
}

}  // namespace moetrain::precision::cpu_gemm
