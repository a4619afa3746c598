// FP8 (E4M3, max 448) with DeepSeek-V3's fine-grained scaling: activations and output gradients per 1×128 tile
// along the contraction dimension, weights per 128×128 block, scale = amax / 448 from the current values (no
// delayed scaling); partial tiles at the edges are scaled on their own.
//
// The three GEMMs of a linear layer y = x · wᵀ:
//   fprop  y  = Q₁ₓ₁₂₈(x)  · Q₁₂₈ₓ₁₂₈(w)ᵀ
//   dgrad  dx = Q₁ₓ₁₂₈(dy) · Q₁₂₈ₓ₁₂₈(w)        (dy tiled along the output channels)
//   wgrad  dw = Q(dq(dy)ᵀ) · Q(dq(x)ᵀ)ᵀ         (both operands dequantized, transposed and re-quantized in
//                                                 128×1 tiles along the token dimension, as DeepSeek-V3 does)
// On a CUDA device of compute capability 9.0 the GEMMs run in FP8 on the tensor cores (at::_scaled_mm with
// blockwise scales, FP32 accumulation, BF16 output); everywhere else the same quantized values are dequantized and
// multiplied in FP32: the emulation, which is the CPU path and the GPU path's reference.
#pragma once

#include <ATen/core/Tensor.h>

#include "precision/fp8_format.h"

namespace moetrain::precision {

// E4M3 values and their FP32 scales: value ≈ data · scale per tile or block.
struct Fp8Tensor {
  at::Tensor data;   // Float8_e4m3fn, [M, K] row-major
  at::Tensor scale;  // float; tiles: [M, ⌈K/128⌉]; blocks: [⌈M/128⌉, ⌈K/128⌉]
  bool blocks = false;
};

// A weight in both orientations, for the forward (w) and dgrad (wᵀ) GEMMs.
struct Fp8Weight {
  Fp8Tensor rows;  // w  [O, K]
  Fp8Tensor cols;  // wᵀ [K, O] (the same 128×128 blocks, transposed)
};

// x [M, K] with one scale per 1×128 tile of each row.
Fp8Tensor quantize_tiles(const at::Tensor& x);
// w [O, K] with one scale per 128×128 block.
Fp8Tensor quantize_blocks(const at::Tensor& w);
// quantize_blocks(w) and its transpose (bytes and block scales).
Fp8Weight quantize_weight(const at::Tensor& w);
at::Tensor dequantize(const Fp8Tensor& q, at::ScalarType dtype);
// The wgrad operand of t [M, K] (1×128 tiles): dequantized, zero-padded to whole tiles of 128 rows (tokens),
// transposed and re-quantized in tiles along the tokens: [K, ⌈M/128⌉·128].
Fp8Tensor requantize_tokens(const Fp8Tensor& t);
// On a CUDA device that this build has kernels for (SM90) quantize_tiles, quantize_weight and requantize_tokens run
// as one fused kernel each (precision/fp8_cuda.h), bit-identical to the ATen ops that run everywhere else.
bool fp8_fused_quantization_on(const c10::Device& device);
// For tests and benchmarks: the ATen ops on CUDA too, for the scope of one of these.
class Fp8AtenQuantization {
 public:
  Fp8AtenQuantization();
  ~Fp8AtenQuantization();
  Fp8AtenQuantization(const Fp8AtenQuantization&) = delete;
  Fp8AtenQuantization& operator=(const Fp8AtenQuantization&) = delete;

 private:
  bool before_;
};

// Round trips through E4M3 (the values an FP8 GEMM sees), in the input's dtype and shape.
at::Tensor fake_quant_tiles(const at::Tensor& x);  // x [..., K]
at::Tensor fake_quant_blocks(const at::Tensor& w);

// a · bᵀ for a [M, K] (1×128 tiles) and b [N, K] (tiles or blocks): the FP8 GEMM on SM90, else the emulation.
// `out` is the dtype of the result; on the GPU the product is formed in BF16 and converted.
at::Tensor fp8_mm_nt(const Fp8Tensor& a, const Fp8Tensor& b, at::ScalarType out);
// Whether fp8_mm_nt runs on the tensor cores for operands on `device` (CUDA, compute capability 9.x).
bool fp8_gemm_on_device(const c10::Device& device);
// Whether this process fell back from 128×128 weight-block scales to per-row tiles because LibTorch refused the
// blocks' layout (the same numbers, another cuBLAS kernel; said once on stderr).
bool fp8_block_scales_refused();

// The operands at::_scaled_mm gets on SM90 for fp8_mm_nt(a, b): every dimension zero-padded to whole tiles of 128
// (zero rows and columns add nothing; cuBLAS's blockwise-scaled kernels were seen failing on an H200 for 1440 rows,
// CUBLAS_STATUS_EXECUTION_FAILED and then an illegal address, and working for multiples of 128), and the scales in
// the layouts LibTorch 2.11 checks: a's 1×128 tile scales outer-dim-major; b's 128×128 block scales (with
// `block_scales`) as the transpose of a row-major grid whose row stride is rounded up to a multiple of 4, or b's
// scales as 1×128 tiles (a block's scale repeated on each of its rows) row-major [K/128, N]. Built on any device.
struct ScaledMmOperands {
  at::Tensor a;        // [Mp, Kp] E4M3, row-major
  at::Tensor b;        // [Kp, Np] E4M3, column-major (the transpose of b padded)
  at::Tensor scale_a;  // [Mp, Kp/128], strides (1, Mp)
  at::Tensor scale_b;  // blocks: [Kp/128, Np/128], strides (1, round_up(Kp/128, 4)); tiles: [Kp/128, Np], (Np, 1)
  int64_t m = 0, n = 0;  // the product's rows and columns: [m, n] of the padded [Mp, Np]
};
ScaledMmOperands scaled_mm_operands(const Fp8Tensor& a, const Fp8Tensor& b, bool block_scales);
// For tests and benchmarks: force the emulation even where the device could run the FP8 GEMM.
void set_fp8_emulation(bool on);

// y = x · wᵀ with all three GEMMs in FP8 as above; w's quantized copy is made once per change of w
// (precision/weight_cache.h), x is saved for the backward pass in FP8 with its tile scales.
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w);

}  // namespace moetrain::precision
