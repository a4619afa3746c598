#include "precision/fp8.h"

#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/matmul.h>
#include <torch/autograd.h>

namespace moetrain::precision {
namespace {

int64_t round_up(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

// q = E4M3(v / s) · s with s = amax / 448 over the reduced dims (all-zero tiles keep scale 1).
at::Tensor qdq(const at::Tensor& v, at::IntArrayRef dims) {
  at::Tensor amax = v.abs().amax(dims, /*keepdim=*/true);
  at::Tensor scale = at::where(amax > 0, amax / kE4M3Max, at::ones_like(amax));
  return (v / scale).to(at::kFloat8_e4m3fn).to(v.scalar_type()) * scale;
}

struct Fp8Linear : public torch::autograd::Function<Fp8Linear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    at::Tensor xq = fake_quant_tiles(x), wq = fake_quant_blocks(w);
    ctx->save_for_backward({xq, wq});
    return at::matmul(xq, wq.t());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& xq = saved[0];
    const at::Tensor& wq = saved[1];
    at::Tensor dyq = fake_quant_tiles(grads[0]);
    at::Tensor dx = at::matmul(dyq, wq);
    at::Tensor dw = at::matmul(dyq.reshape({-1, dyq.size(-1)}).t(), xq.reshape({-1, xq.size(-1)}));
    return {dx, dw};
  }
};

}  // namespace

at::Tensor fake_quant_tiles(const at::Tensor& x) {
  const int64_t K = x.size(-1), Kp = round_up(K);
  at::Tensor flat = x.reshape({-1, K});
  if (Kp != K) flat = at::constant_pad_nd(flat, {0, Kp - K});
  at::Tensor q = qdq(flat.view({flat.size(0), Kp / kTile, kTile}), {2}).view({-1, Kp});
  return q.narrow(1, 0, K).reshape(x.sizes());
}

at::Tensor fake_quant_blocks(const at::Tensor& w) {
  const int64_t O = w.size(0), K = w.size(1), Op = round_up(O), Kp = round_up(K);
  at::Tensor p = (Op != O || Kp != K) ? at::constant_pad_nd(w, {0, Kp - K, 0, Op - O}) : w;
  at::Tensor q = qdq(p.view({Op / kTile, kTile, Kp / kTile, kTile}), {1, 3}).view({Op, Kp});
  return q.narrow(0, 0, O).narrow(1, 0, K);
}

at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w) { return Fp8Linear::apply(x, w); }

}  // namespace moetrain::precision
