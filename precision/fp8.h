// FP8 (E4M3, max 448) with DeepSeek-V3's fine-grained scaling: activations (and output gradients) per 1×128 tile
// along the contraction dimension, weights per 128×128 block, scale = amax / 448 from the current values (no
// delayed scaling). Quantize -> dequantize -> FP32 GEMM: the numerics of an FP8 GEMM with FP32 accumulation, on
// any device (partial tiles at the edges are scaled on their own).
#pragma once

#include <ATen/core/Tensor.h>

namespace moetrain::precision {

constexpr double kE4M3Max = 448.0;
constexpr int64_t kTile = 128;

// x [..., K] through E4M3 with one scale per 1×128 tile of the last dimension.
at::Tensor fake_quant_tiles(const at::Tensor& x);
// w [O, K] through E4M3 with one scale per 128×128 block.
at::Tensor fake_quant_blocks(const at::Tensor& w);

// y = x · wᵀ with all three GEMMs in FP8: fprop Q(x)·Q(w)ᵀ, dgrad Q(dy)·Q(w), wgrad Q(dy)ᵀ·Q(x).
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w);

}  // namespace moetrain::precision
