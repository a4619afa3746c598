#include "precision/gemm.h"

#include <ATen/ops/linear.h>

#include "precision/fp8.h"

namespace moetrain::precision {

at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, Mode mode) {
  switch (mode) {
    case Mode::kFp32:
      return at::linear(x, weight);
    case Mode::kBf16:
      return at::linear(x.to(at::kBFloat16), weight.to(at::kBFloat16)).to(x.scalar_type());
    case Mode::kFp8:
      return fp8_linear(x, weight).to(x.scalar_type());
  }
  return at::linear(x, weight);
}

}  // namespace moetrain::precision
