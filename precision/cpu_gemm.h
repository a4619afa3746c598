// FP32 GEMMs on the CPU for the small shapes of a CPU-sized model: register-tiled micro-kernels (each output element
// summed in k order by one thread, so results depend neither on the thread count nor on the matrix's other
// dimensions) that run near the FMA units' peak where the BLAS's per-call overhead and packing dominate (attention
// blocks, experts' row blocks, the linear layers of small-cpu). Compiled for AVX-512, AVX2 + FMA and the baseline and
// picked by the CPU's features; split over LibTorch's intra-op threads.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace moetrain::precision::cpu_gemm {

// C[M×N] = A·B (C += A·B with `accumulate`) on the calling thread: A[i][k] at A[i·sai + k·sak] (any layout), B rows
// of N contiguous floats ldb apart, C rows ldc apart. The kernel of the widest instruction set the CPU has.
void small_gemm(const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M,
                int64_t N, int64_t K, bool accumulate);

// The kernels by instruction set (their register tiles differ): those this CPU runs, widest first, and one of them
// by name (the tests run each).
enum class Isa { kAvx512, kAvx2, kBaseline };
std::vector<Isa> supported_isas();
void small_gemm(Isa isa, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc,
                int64_t M, int64_t N, int64_t K, bool accumulate);

// Whether mm takes the micro-kernels for a ·b of these FP32 CPU operands: a [M, K] (any strides), b [K, N], K up to
// kMaxDepth (the kernels do not block the k loop for the caches; deeper products go to the BLAS).
constexpr int64_t kMaxDepth = 2048;
bool applies(const at::Tensor& a, const at::Tensor& b);

// a·b -> [M, N] contiguous, in blocks of rows and columns over the intra-op threads (b made row-contiguous first if
// it is not). For operands where `applies` is false it is at::mm.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);

}  // namespace moetrain::precision::cpu_gemm
