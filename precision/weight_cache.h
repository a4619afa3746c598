// Low-precision copies of the FP32 master weights for the GEMMs: a BF16 copy (bf16 mode) or an E4M3 copy with
// 128×128 block scales, in both orientations (fp8 mode: w for fprop, wᵀ for dgrad). A copy is made the first time
// a weight is used after it changed — an optimizer step, a checkpoint load — so once per optimizer step, not per
// micro-batch or per call. A weight has changed when its storage, its in-place version counter or its identity
// differs from the copy's; copies of weights that no longer exist are dropped.
#pragma once

#include <ATen/core/Tensor.h>

#include "precision/fp8.h"

namespace moetrain::precision {

// The BF16 copy of w (no autograd history); w itself, detached, when it is BF16 (the bf16 mode's parameters).
at::Tensor bf16_weight(const at::Tensor& w);
// The FP8 copies of w.
Fp8Weight fp8_weight(const at::Tensor& w);

// How many copies were made since the start (tests: once per optimizer step, not per micro-batch).
int64_t weight_copies_made();
void clear_weight_cache();

}  // namespace moetrain::precision
