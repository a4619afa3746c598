// The GEMM of the model's linear layers under a precision mode: FP32 (reference), BF16 (inputs and weights cast
// to BF16, result back in the activation dtype; gradients reach the FP32 master weights), or FP8 (precision/fp8.h).
// Embedding, output head, router, norms and attention do not go through here: they stay in BF16/FP32.
#pragma once

#include <ATen/core/Tensor.h>

#include "precision/policy.h"

namespace moetrain::precision {

at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, Mode mode);

}  // namespace moetrain::precision
