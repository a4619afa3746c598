#include "precision/fp8.h"

#include <ATen/ops/_scaled_mm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <torch/autograd.h>

#include <atomic>
#include <cstdio>
#include <optional>

#include "moetrain/build_info.h"
#include "precision/weight_cache.h"
#include "precision/weight_grad_store.h"
#if MOETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "precision/fp8_cuda.h"
#endif

namespace moetrain::precision {
namespace {

std::atomic<bool> g_force_emulation{false};
std::atomic<bool> g_aten_quantization{false};  // Fp8AtenQuantization: the ATen ops even on CUDA
// cuBLAS's 128×128 weight-block layout is tried first; a build that refuses it gets the same scales repeated per
// row (1×128 tiles on both operands: the same numbers, another kernel), once and for all.
std::atomic<bool> g_blocks_refused{false};

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// A tensor divisor, not a scalar: ATen's CUDA kernel divides by a CPU scalar as a multiplication by its reciprocal
// (BinaryDivTrueKernel.cu), not always the correctly rounded quotient the CPU and the fused kernels compute.
at::Tensor scales_from(const at::Tensor& amax) {
  return at::where(amax > 0, amax / at::full_like(amax, kE4M3Max), at::ones_like(amax));
}

// A block scale [⌈O/128⌉, ⌈K/128⌉] as one scale per row tile [O, ⌈K/128⌉].
at::Tensor rows_of_blocks(const at::Tensor& scale, int64_t rows) {
  return scale.repeat_interleave(kTile, 0).narrow(0, 0, rows);
}

// t zero-padded at the end to [rows, cols].
at::Tensor pad_to(const at::Tensor& t, int64_t rows, int64_t cols) {
  if (rows == t.size(0) && cols == t.size(1)) return t;
  return at::constant_pad_nd(t, {0, cols - t.size(1), 0, rows - t.size(0)});
}

at::Tensor pad_rows(const at::Tensor& t, int64_t to) { return pad_to(t, round_up(t.size(0), to), t.size(1)); }

#if MOETRAIN_WITH_CUDA
at::Tensor scaled_mm(const Fp8Tensor& a, const Fp8Tensor& b) {
  auto run = [&](bool block_scales) {
    const ScaledMmOperands o = scaled_mm_operands(a, b, block_scales);
    const at::Tensor y = at::_scaled_mm(o.a, o.b, o.scale_a, o.scale_b, /*bias=*/std::nullopt,
                                        /*scale_result=*/std::nullopt, at::kBFloat16, /*use_fast_accum=*/false)
                             .narrow(0, 0, o.m);
    return y.size(1) == o.n ? y : y.narrow(1, 0, o.n).contiguous();
  };
  if (b.blocks && !g_blocks_refused.load()) {
    try {
      return run(true);
    } catch (const c10::OutOfMemoryError&) {
      throw;  // the caller's error, not a refusal of the block scales
    } catch (const c10::Error& e) {
      // LibTorch's refusal of the scales' layout ("Invalid scaling configuration") or cuBLAS finding no kernel for
      // them: per-row tiles from now on (an error that is neither comes back from them too).
      g_blocks_refused.store(true);
      std::fprintf(stderr, "moetrain: FP8 128x128 weight scales refused by this build (%s); using per-row tiles\n",
                   e.what_without_backtrace());
    }
  }
  return run(false);
}
#endif

struct Fp8Linear : public torch::autograd::Function<Fp8Linear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    const int64_t K = x.size(-1);
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = w.size(0);
    const Fp8Tensor xq = quantize_tiles(x.reshape({-1, K}));
    const Fp8Weight wq = fp8_weight(w);
    ctx->save_for_backward({xq.data, xq.scale, w});
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return fp8_mm_nt(xq, wq.rows, x.scalar_type()).view(out_shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const Fp8Tensor xq{saved[0], saved[1], false};
    const at::Tensor& w = saved[2];
    const Fp8Weight wq = fp8_weight(w);
    const at::Tensor& dy = grads[0];
    const int64_t O = dy.size(-1), K = xq.data.size(1);
    const Fp8Tensor dyq = quantize_tiles(dy.reshape({-1, O}));
    std::vector<int64_t> dx_shape(dy.sizes().begin(), dy.sizes().end());
    dx_shape.back() = K;
    at::Tensor dx = fp8_mm_nt(dyq, wq.cols, dtype).view(dx_shape);
    // wgrad over the tokens: both operands re-quantized in tiles along the token dimension (padded to whole tiles
    // of 128 tokens: zero tokens add nothing and leave every tile's amax as it is).
    return {dx, weight_grad_or_defer(w, [dyq, xq, w] {
              return fp8_mm_nt(requantize_tokens(dyq), requantize_tokens(xq), w.scalar_type());
            })};
  }
};

#if MOETRAIN_WITH_CUDA
void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// The fused kernels' name for the dtype of their input, where they take it.
std::optional<cuda::Dtype> kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::Dtype::kFloat;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    case at::kHalf: return cuda::Dtype::kHalf;
    default: return std::nullopt;
  }
}
#endif

}  // namespace

Fp8Tensor quantize_tiles(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "quantize_tiles expects [M, K], got ", x.sizes());
  at::NoGradGuard no_grad;
  const int64_t M = x.size(0), K = x.size(1), Kp = round_up(K, kTile);
#if MOETRAIN_WITH_CUDA
  if (const auto dtype = kernel_dtype(x.scalar_type()); dtype && fp8_fused_quantization_on(x.device())) {
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor xc = x.contiguous();
    at::Tensor q = at::empty({M, K}, x.options().dtype(at::kFloat8_e4m3fn));
    at::Tensor scale = at::empty({M, Kp / kTile}, x.options().dtype(at::kFloat));
    cuda::quantize_tiles(xc.data_ptr(), *dtype, M, K, /*ld=*/K, q.data_ptr(), scale.data_ptr<float>(), stream_of(x));
    return {q, scale, false};
  }
#endif
  at::Tensor v = x.to(at::kFloat).contiguous();
  if (Kp != K) v = at::constant_pad_nd(v, {0, Kp - K});
  v = v.view({M, Kp / kTile, kTile});
  at::Tensor scale = scales_from(v.abs().amax({2}));  // [M, Kp/128]
  at::Tensor q = (v / scale.unsqueeze(2)).to(at::kFloat8_e4m3fn).view({M, Kp});
  if (Kp != K) q = q.narrow(1, 0, K).contiguous();
  return {q, scale, false};
}

Fp8Tensor quantize_blocks(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "quantize_blocks expects [O, K], got ", w.sizes());
  at::NoGradGuard no_grad;
  const int64_t O = w.size(0), K = w.size(1), Op = round_up(O, kTile), Kp = round_up(K, kTile);
  at::Tensor v = w.to(at::kFloat).contiguous();
  if (Op != O || Kp != K) v = at::constant_pad_nd(v, {0, Kp - K, 0, Op - O});
  v = v.view({Op / kTile, kTile, Kp / kTile, kTile});
  at::Tensor scale = scales_from(v.abs().amax({1, 3}));  // [Op/128, Kp/128]
  at::Tensor q = (v / scale.view({Op / kTile, 1, Kp / kTile, 1})).to(at::kFloat8_e4m3fn).view({Op, Kp});
  if (Op != O || Kp != K) q = q.narrow(0, 0, O).narrow(1, 0, K).contiguous();
  return {q, scale, true};
}

Fp8Weight quantize_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "quantize_weight expects [O, K], got ", w.sizes());
  at::NoGradGuard no_grad;
#if MOETRAIN_WITH_CUDA
  const int64_t O = w.size(0), K = w.size(1), Ob = round_up(O, kTile) / kTile, Kb = round_up(K, kTile) / kTile;
  if (const auto dtype = kernel_dtype(w.scalar_type()); dtype && fp8_fused_quantization_on(w.device()) && Ob <= 65535) {
    const c10::cuda::CUDAGuard guard(w.device());
    const at::Tensor wc = w.contiguous();
    const auto bytes = w.options().dtype(at::kFloat8_e4m3fn), floats = w.options().dtype(at::kFloat);
    at::Tensor q = at::empty({O, K}, bytes), q_t = at::empty({K, O}, bytes);
    at::Tensor scale = at::empty({Ob, Kb}, floats), scale_t = at::empty({Kb, Ob}, floats);
    cuda::quantize_blocks(wc.data_ptr(), *dtype, O, K, q.data_ptr(), q_t.data_ptr(), scale.data_ptr<float>(),
                          scale_t.data_ptr<float>(), stream_of(w));
    return {{q, scale, true}, {q_t, scale_t, true}};
  }
#endif
  Fp8Tensor rows = quantize_blocks(w);
  Fp8Tensor cols{rows.data.t().contiguous(), rows.scale.t().contiguous(), true};
  return {rows, cols};
}

Fp8Tensor requantize_tokens(const Fp8Tensor& t) {
  const int64_t M = t.data.dim() == 2 ? t.data.size(0) : -1, K = t.data.dim() == 2 ? t.data.size(1) : -1;
  TORCH_CHECK(!t.blocks && t.data.scalar_type() == at::kFloat8_e4m3fn && M >= 0 && t.scale.dim() == 2 &&
                  t.scale.size(0) == M && t.scale.size(1) == round_up(K, kTile) / kTile &&
                  t.scale.scalar_type() == at::kFloat && t.scale.device() == t.data.device(),
              "requantize_tokens expects E4M3 data [M, K] with FP32 1×128 tile scales [M, ⌈K/128⌉] on its device, "
              "got ", t.data.sizes(), " ", t.data.scalar_type(), " and ", t.scale.sizes(), " ", t.scale.scalar_type(),
              t.blocks ? " (128×128 blocks)" : "");
  at::NoGradGuard no_grad;
#if MOETRAIN_WITH_CUDA
  if (const int64_t Mp = round_up(M, kTile); fp8_fused_quantization_on(t.data.device()) && Mp / kTile <= 65535) {
    const c10::cuda::CUDAGuard guard(t.data.device());
    const at::Tensor data = t.data.contiguous(), scale = t.scale.contiguous();
    at::Tensor q = at::empty({K, Mp}, data.options());
    at::Tensor s = at::empty({K, Mp / kTile}, scale.options());
    cuda::requantize_transposed(data.data_ptr(), scale.data_ptr<float>(), M, K, q.data_ptr(), s.data_ptr<float>(),
                                stream_of(data));
    return {q, s, false};
  }
#endif
  return quantize_tiles(pad_rows(dequantize(t, at::kFloat), kTile).t());
}

bool fp8_fused_quantization_on(const c10::Device& device) {
#if MOETRAIN_WITH_CUDA
  return device.is_cuda() && !g_aten_quantization.load() && cuda::kernels_available(device.index());
#else
  (void)device;
  return false;
#endif
}

Fp8AtenQuantization::Fp8AtenQuantization() : before_(g_aten_quantization.exchange(true)) {}
Fp8AtenQuantization::~Fp8AtenQuantization() { g_aten_quantization.store(before_); }

at::Tensor dequantize(const Fp8Tensor& q, at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  const int64_t M = q.data.size(0), K = q.data.size(1);
  at::Tensor s = q.blocks ? rows_of_blocks(q.scale, M) : q.scale;
  s = s.repeat_interleave(kTile, 1).narrow(1, 0, K);
  return (q.data.to(at::kFloat) * s).to(dtype);
}

at::Tensor fake_quant_tiles(const at::Tensor& x) {
  return dequantize(quantize_tiles(x.reshape({-1, x.size(-1)})), x.scalar_type()).view(x.sizes());
}

at::Tensor fake_quant_blocks(const at::Tensor& w) { return dequantize(quantize_blocks(w), w.scalar_type()); }

bool fp8_gemm_on_device(const c10::Device& device) {
#if MOETRAIN_WITH_CUDA
  if (!device.is_cuda() || g_force_emulation.load()) return false;
  return at::cuda::getDeviceProperties(device.index() < 0 ? 0 : device.index())->major == 9;
#else
  (void)device;
  return false;
#endif
}

void set_fp8_emulation(bool on) { g_force_emulation.store(on); }

bool fp8_block_scales_refused() { return g_blocks_refused.load(); }

ScaledMmOperands scaled_mm_operands(const Fp8Tensor& a, const Fp8Tensor& b, bool block_scales) {
  TORCH_CHECK(!a.blocks && a.data.dim() == 2 && b.data.dim() == 2 && a.data.size(1) == b.data.size(1),
              "scaled_mm_operands: a [M, K] in 1×128 tiles and b [N, K] expected, got ", a.data.sizes(),
              a.blocks ? " (128×128 blocks)" : "", " and ", b.data.sizes());
  at::NoGradGuard no_grad;
  const int64_t M = a.data.size(0), N = b.data.size(0), K = a.data.size(1);
  const int64_t Mp = round_up(M, kTile), Np = round_up(N, kTile), Kb = round_up(K, kTile) / kTile;
  ScaledMmOperands o;
  o.m = M;
  o.n = N;
  o.a = pad_to(a.data, Mp, Kb * kTile);
  o.b = pad_to(b.data, Np, Kb * kTile).t();
  o.scale_a = pad_to(a.scale, Mp, Kb).t().contiguous().t();
  if (block_scales && b.blocks) {
    // LibTorch checks the block grid [N/128, K/128] for a row stride of K/128 rounded up to a multiple of 4 (its
    // kernels read it so; PyTorch #166752).
    const int64_t stride = round_up(Kb, 4);
    if (b.scale.stride(0) == stride && b.scale.stride(1) == 1) {
      o.scale_b = b.scale.t();
    } else {
      o.scale_b = at::zeros({Np / kTile, stride}, b.scale.options()).narrow(1, 0, Kb).copy_(b.scale).t();
    }
  } else {
    o.scale_b = (b.blocks ? rows_of_blocks(b.scale, Np) : pad_to(b.scale, Np, Kb)).t().contiguous();
  }
  return o;
}

at::Tensor fp8_mm_nt(const Fp8Tensor& a, const Fp8Tensor& b, at::ScalarType out) {
  TORCH_CHECK(a.data.size(1) == b.data.size(1), "fp8_mm_nt: contraction dims differ: ", a.data.sizes(), " and ",
              b.data.sizes());
#if MOETRAIN_WITH_CUDA
  if (fp8_gemm_on_device(a.data.device())) return scaled_mm(a, b).to(out);
#endif
  return at::matmul(dequantize(a, at::kFloat), dequantize(b, at::kFloat).t()).to(out);
}

at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w) { return Fp8Linear::apply(x, w); }

}  // namespace moetrain::precision
