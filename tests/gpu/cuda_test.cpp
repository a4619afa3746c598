// The CUDA path, run where a GPU is visible (the lent H200's check script, scripts/gpu-check.sh); without one each
// test says so and skips. Training on the GPU against the CPU, the FP8 GEMMs against their emulation, the fused FP8
// quantization against the ATen ops, RMSNorm's fused kernels against FP64, attention with v as it is against v
// padded, the grouped expert GEMM against the loop, and the host synchronisations of one training step.
#include <ATen/SDPBackend.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <string>
#include <tuple>
#include <vector>

#include "config/loader.h"
#include "model/attention.h"
#include "model/layers.h"
#include "model/moe.h"
#include "model/moe_load.h"
#include "moetrain/build_info.h"
#include "precision/fp8.h"
#include "precision/weight_cache.h"
#include "tests/model/test_models.h"
#include "trainer/train.h"
#if MOETRAIN_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#endif

namespace moetrain {
namespace {

#define REQUIRE_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible"

config::Config tiny_on(const std::string& device, std::vector<std::string> extra = {}) {
  std::vector<std::string> o{"parallel.pp=1", "parallel.dp=1", "parallel.ep=1", "train.device=" + device,
                             "train.peak_flops=1e12"};
  o.insert(o.end(), extra.begin(), extra.end());
  return config::load_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml", {o, 0});
}

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble).cpu(), w = want.to(at::kDouble).cpu();
  return ((g - w).norm() / w.norm()).item<double>();
}

TEST(Cuda, TrainingMatchesTheCpuInFp32) {
  REQUIRE_CUDA();
  trainer::Trainer gpu(tiny_on("cuda"), nullptr, "", false), cpu(tiny_on("cpu"), nullptr, "", false);
  for (int s = 0; s < 20; ++s) {
    const trainer::StepResult g = gpu.step(), c = cpu.step();
    EXPECT_NEAR(g.loss, c.loss, 1e-3) << "step " << s + 1;
    EXPECT_NEAR(g.grad_norm, c.grad_norm, 1e-3 * std::max(1.0, c.grad_norm)) << "step " << s + 1;
  }
}

// train.deterministic on the GPU: two runs of the same config compute the same numbers bit for bit (so does a
// resume: the checkpoint's state is exact, and the steps after it are computed as the first run's were). Attention's
// backward, whose default kernels sum with atomics, is the part the switch changes.
TEST(Cuda, DeterministicRunsAreBitIdentical) {
  REQUIRE_CUDA();
  struct Restore {  // the later tests run with LibTorch's default kernels, also when an assertion here returns early
    ~Restore() { at::globalContext().setDeterministicAlgorithms(false, false); }
  } restore;
  for (const std::string mode : {"fp32", "bf16"}) {
    const std::vector<std::string> o{"train.deterministic=true", "precision.mode=" + mode};
    trainer::Trainer a(tiny_on("cuda", o), nullptr, "", false), b(tiny_on("cuda", o), nullptr, "", false);
    ASSERT_TRUE(at::globalContext().deterministicAlgorithms());
    for (int s = 0; s < 5; ++s) {
      const trainer::StepResult x = a.step(), y = b.step();
      EXPECT_EQ(x.loss, y.loss) << mode << " step " << s + 1;
      EXPECT_EQ(x.grad_norm, y.grad_norm) << mode << " step " << s + 1;
    }
  }
}

TEST(Cuda, Fp8GemmsMatchTheEmulation) {
  REQUIRE_CUDA();
  using namespace precision;
  const c10::Device d(c10::kCUDA, 0);
  ASSERT_TRUE(fp8_gemm_on_device(d)) << "FP8 GEMMs need compute capability 9.x";
  torch::manual_seed(11);
  const auto opts = at::TensorOptions().device(d);
  // Token counts that are no multiple of 128 or 16 (an expert's share): the padded edges too. DeepSeek-V3's wkv_a
  // ([576, 7168]): 576 output rows (a partial block) and, in dgrad, a contraction over 4.5 tiles of 128.
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes{
      {1000, 7168, 2048}, {1440, 2048, 7168}, {37, 7168, 2048}, {300, 7168, 576}};
  for (const auto& [T, K, N] : shapes) {
    const at::Tensor x = at::randn({T, K}, opts), w = at::randn({N, K}, opts) * 0.02, dy = at::randn({T, N}, opts);
    const Fp8Weight wq = fp8_weight(w);
    const Fp8Tensor xq = quantize_tiles(x), dyq = quantize_tiles(dy);
    const int64_t Tp = (T + 127) / 128 * 128;  // wgrad: tokens padded to whole tiles, as fp8_linear does
    auto tokens_t = [&](const Fp8Tensor& q) {
      return quantize_tiles(at::constant_pad_nd(dequantize(q, at::kFloat), {0, 0, 0, Tp - T}).t());
    };
    const std::vector<std::pair<Fp8Tensor, Fp8Tensor>> gemms{{xq, wq.rows}, {dyq, wq.cols}, {tokens_t(dyq), tokens_t(xq)}};
    const char* names[] = {"fprop", "dgrad", "wgrad"};
    for (size_t i = 0; i < gemms.size(); ++i) {
      const at::Tensor got = fp8_mm_nt(gemms[i].first, gemms[i].second, at::kFloat);
      set_fp8_emulation(true);
      const at::Tensor want = fp8_mm_nt(gemms[i].first, gemms[i].second, at::kFloat);
      set_fp8_emulation(false);
      const double e = rel_err(got, want);
      std::printf("FP8 %s %ldx%ldx%ld: relative error against the emulation %.3e\n", names[i], static_cast<long>(T),
                  static_cast<long>(K), static_cast<long>(N), e);
      EXPECT_LE(e, 1e-2) << names[i] << " " << T << "x" << K << "x" << N;
      EXPECT_GT(e, 0.0) << names[i] << ": the tensor cores and the emulation accumulate differently";
    }
  }
  // Every weight GEMM above ran with 128×128 block scales: LibTorch took their layout (precision/fp8.h).
  EXPECT_FALSE(fp8_block_scales_refused());
  const at::Tensor x = at::randn({300, 7168}, opts), w = at::randn({2048, 7168}, opts) * 0.02;
  // The whole linear layer, GPU against CPU emulation: forward and both gradients.
  at::Tensor xg = x.clone().requires_grad_(true), wg = w.clone().requires_grad_(true);
  at::Tensor xc = xg.detach().cpu().requires_grad_(true), wc = wg.detach().cpu().requires_grad_(true);
  at::Tensor yg = fp8_linear(xg, wg), yc = fp8_linear(xc, wc);
  const at::Tensor g = at::randn(yc.sizes());
  yg.backward(g.to(d));
  yc.backward(g);
  EXPECT_LE(rel_err(yg, yc), 1e-2);
  EXPECT_LE(rel_err(xg.grad(), xc.grad()), 1e-2);
  EXPECT_LE(rel_err(wg.grad(), wc.grad()), 1e-2);
}

// The fused quantization kernels (precision/fp8_cuda.cu) against the ATen ops they replace, on the GPU and on the
// CPU: the same E4M3 bytes and the same scales, bit for bit (finite inputs: the CPU's NaN of inf/inf has its sign
// bit set). Sizes with partial tiles of 128 on both sides, a row of zeros (scale 1), rows of very different
// magnitudes, and FP32, BF16 and FP16 inputs.
TEST(Cuda, FusedFp8QuantizationIsBitIdentical) {
  REQUIRE_CUDA();
  using namespace precision;
  const c10::Device d(c10::kCUDA, 0);
  ASSERT_TRUE(fp8_fused_quantization_on(d)) << "no fused kernels for this GPU (this build compiles them for SM90)";
  torch::manual_seed(5);
  const auto same = [](const Fp8Tensor& a, const Fp8Tensor& b) {
    return a.data.sizes() == b.data.sizes() && a.scale.sizes() == b.scale.sizes() &&
           a.data.scalar_type() == at::kFloat8_e4m3fn && b.data.scalar_type() == at::kFloat8_e4m3fn &&
           a.scale.scalar_type() == at::kFloat && b.scale.scalar_type() == at::kFloat &&
           at::equal(a.data.view(at::kByte).cpu(), b.data.view(at::kByte).cpu()) &&
           at::equal(a.scale.cpu(), b.scale.cpu());
  };
  for (const auto& [M, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 5}, {37, 200}, {129, 128}, {300, 1000},
                                                                      {1000, 7168}, {4096, 2048}}) {
    for (const at::ScalarType t : {at::kFloat, at::kBFloat16, at::kHalf}) {
      at::Tensor x = at::randn({M, K}) * at::pow(10.0, at::randint(-3, 3, {M, 1}).to(at::kFloat));
      x[0].zero_();
      x = x.to(t);
      const std::string what = fmt::format("[{}, {}] {}", M, K, c10::toString(t));
      const at::Tensor xg = x.to(d);
      Fp8Tensor aten, aten_t;
      {
        const Fp8AtenQuantization unfused;
        aten = quantize_tiles(xg), aten_t = requantize_tokens(aten);
      }
      const Fp8Tensor fused = quantize_tiles(xg), fused_t = requantize_tokens(fused);
      const Fp8Tensor cpu = quantize_tiles(x), cpu_t = requantize_tokens(cpu);
      EXPECT_TRUE(same(fused, aten)) << what << ": quantize_tiles, fused vs ATen on the GPU";
      EXPECT_TRUE(same(fused, cpu)) << what << ": quantize_tiles, GPU vs CPU";
      EXPECT_TRUE(same(fused_t, aten_t)) << what << ": requantize_tokens, fused vs ATen on the GPU";
      EXPECT_TRUE(same(fused_t, cpu_t)) << what << ": requantize_tokens, GPU vs CPU";
      EXPECT_EQ(fused_t.data.size(1) % kTile, 0) << what;
      // The weight path: 128×128 blocks in both orientations.
      Fp8Weight aten_w;
      {
        const Fp8AtenQuantization unfused;
        aten_w = quantize_weight(xg);
      }
      const Fp8Weight fused_w = quantize_weight(xg), cpu_w = quantize_weight(x);
      EXPECT_TRUE(fused_w.rows.blocks && fused_w.cols.blocks) << what;
      EXPECT_TRUE(same(fused_w.rows, aten_w.rows)) << what << ": quantize_weight rows, fused vs ATen on the GPU";
      EXPECT_TRUE(same(fused_w.cols, aten_w.cols)) << what << ": quantize_weight cols, fused vs ATen on the GPU";
      EXPECT_TRUE(same(fused_w.rows, cpu_w.rows)) << what << ": quantize_weight rows, GPU vs CPU";
      EXPECT_TRUE(same(fused_w.cols, cpu_w.cols)) << what << ": quantize_weight cols, GPU vs CPU";
    }
  }
}

// RMSNorm on the GPU (ATen's fused kernels where input and weight share a dtype) against the formula in FP64 on the
// CPU: output, input gradient and weight gradient, at DeepSeek-V3's width and a narrow one with a partial warp.
TEST(Cuda, RmsNormMatchesFp64) {
  REQUIRE_CUDA();
  const c10::Device d(c10::kCUDA, 0);
  torch::manual_seed(13);
  for (const int64_t D : {7168, 100}) {
    const at::Tensor x = at::randn({3, 37, D}, at::kDouble) * 3, g = at::randn({3, 37, D}, at::kDouble);
    const at::Tensor w = 1 + 0.1 * at::randn({D}, at::kDouble);
    const double eps = 1e-6;
    const at::Tensor xr = x.clone().requires_grad_(true), wr = w.clone().requires_grad_(true);
    const at::Tensor want = xr * (xr.pow(2).mean(-1, true) + eps).rsqrt() * wr;
    want.backward(g);
    for (const at::ScalarType t : {at::kFloat, at::kBFloat16}) {
      model::RMSNorm norm(D, eps);
      norm->to(d);
      {
        const at::NoGradGuard no_grad;
        norm->weight.copy_(w);
      }
      norm->to(t);
      const at::Tensor xg = x.to(t).to(d).requires_grad_(true);
      const at::Tensor out = norm(xg);
      out.backward(g.to(t).to(d));
      const double tol = t == at::kFloat ? 1e-5 : 1e-2;
      const std::string what = fmt::format("D {} {}", D, c10::toString(t));
      EXPECT_EQ(out.scalar_type(), t) << what;
      EXPECT_LE(rel_err(out, want), tol) << what << ": output";
      EXPECT_LE(rel_err(xg.grad(), xr.grad()), tol) << what << ": input gradient";
      EXPECT_LE(rel_err(norm->weight.grad(), wr.grad()), tol) << what << ": weight gradient";
    }
  }
}

// MLA's attention at DeepSeek-V3's head dims (q/k 192, v 128) in BF16: v as it is (128) gives the output and
// gradients of v padded to 192, within BF16 rounding, and attention_v_width keeps v as it is exactly when ATen's
// dispatcher picks one fused kernel for both widths. Prints the kernels it picks.
TEST(Cuda, AttentionWithVAsItIsMatchesVPadded) {
  REQUIRE_CUDA();
  const c10::Device d(c10::kCUDA, 0);
  torch::manual_seed(17);
  const int64_t B = 1, T = 1024, H = 16, Dqk = 192, Dv = 128;
  const auto operand = [&](int64_t D) {
    return (at::randn({B, T, H, D}, at::TensorOptions().device(d)) * 0.5).to(at::kBFloat16);
  };
  const at::Tensor q = operand(Dqk), k = operand(Dqk), v = operand(Dv), g = operand(Dv);
  const auto run = [&](int64_t w) {
    const at::Tensor qg = q.clone().requires_grad_(true), kg = k.clone().requires_grad_(true);
    const at::Tensor vg = v.clone().requires_grad_(true);
    const at::Tensor vw = w == Dv ? vg : at::constant_pad_nd(vg, {0, w - Dv});
    const at::Tensor o =
        model::causal_attention(qg.transpose(1, 2), kg.transpose(1, 2), vw.transpose(1, 2), 1.0 / std::sqrt(192.0));
    const int64_t kernel = at::_fused_sdp_choice(qg.transpose(1, 2), kg.transpose(1, 2), vw.transpose(1, 2), {}, 0.0,
                                                 /*is_causal=*/true);
    const at::Tensor out = o.transpose(1, 2).narrow(-1, 0, Dv);
    out.backward(g);
    return std::make_tuple(kernel, out.detach(), qg.grad(), kg.grad(), vg.grad());
  };
  const auto [k_as_is, o_as_is, dq_as_is, dk_as_is, dv_as_is] = run(Dv);
  const auto [k_pad, o_pad, dq_pad, dk_pad, dv_pad] = run(Dqk);
  const int64_t width = model::attention_v_width(B, T, H, Dqk, Dv, at::kBFloat16, d, /*requires_grad=*/true);
  std::printf("attention q/k 192, v 128, BF16: ATen's kernel %ld for v as it is, %ld for v padded (0 math, 1 flash, "
              "2 memory-efficient, 3 cuDNN); MLA gives v width %ld\n",
              static_cast<long>(k_as_is), static_cast<long>(k_pad), static_cast<long>(width));
  const auto math = static_cast<int64_t>(at::SDPBackend::math);
  EXPECT_EQ(width, k_as_is != math && k_as_is == k_pad ? Dv : Dqk);
  EXPECT_LE(rel_err(o_as_is, o_pad), 1e-2) << "output";
  EXPECT_LE(rel_err(dq_as_is, dq_pad), 2e-2) << "dq";
  EXPECT_LE(rel_err(dk_as_is, dk_pad), 2e-2) << "dk";
  EXPECT_LE(rel_err(dv_as_is, dv_pad), 2e-2) << "dv";
}

TEST(Cuda, GroupedExpertGemmMatchesTheLoopInBf16) {
  REQUIRE_CUDA();
  config::ModelConfig m = testing::tiny_model();
  m.hidden_size = 256;
  m.moe_inter_dim = 128;
  m.n_routed_experts = 8;
  torch::manual_seed(12);
  model::MoE moe(m, model::ExpertShard{0, 1}, precision::Mode::kBf16);
  moe->to(c10::Device(c10::kCUDA, 0));
  for (auto& p : moe->parameters()) {
    at::NoGradGuard no_grad;
    p.normal_(0, 0.05);
  }
  const std::vector<int64_t> counts{100, 0, 37, 250, 1, 64, 0, 90};
  const at::Tensor tokens = at::randn({542, 256}, at::TensorOptions().device(at::kCUDA));
  ASSERT_TRUE(moe->grouped_expert_gemm(tokens));
  auto run = [&](bool grouped) {
    moe->zero_grad();
    at::Tensor x = tokens.clone().requires_grad_(true);
    at::Tensor y = moe->run_experts(x, counts, grouped);
    y.sum().backward();
    return std::vector<at::Tensor>{y.detach(), x.grad(), moe->local_experts[3]->w_up.grad().clone()};
  };
  const auto loop = run(false), grouped = run(true);
  for (size_t i = 0; i < loop.size(); ++i) EXPECT_LE(rel_err(grouped[i], loop[i]), 1e-2) << "tensor " << i;
}

#if MOETRAIN_WITH_CUDA
// Counts the warnings of LibTorch's CUDA sync debug mode: one per host synchronisation.
struct SyncCounter : c10::WarningHandler {
  int64_t count = 0;
  void process(const c10::Warning& w) override {
    if (w.msg().find("synchroniz") != std::string::npos) ++count;
  }
};
#endif

TEST(Cuda, HostSynchronisationsPerStep) {
  REQUIRE_CUDA();
#if MOETRAIN_WITH_CUDA
  const config::Config c = tiny_on("cuda", {"precision.mode=bf16"});
  trainer::Trainer t(c, nullptr, "", false);
  t.step();  // the first step's one-time work (allocations, peak FLOP/s measured already) is not counted
  const auto moe_layers = static_cast<int64_t>(model::moe_layer_names(c.model).size());
  const int64_t micro = c.train.micro_batches;
  SyncCounter counter;
  {
    c10::WarningUtils::WarningHandlerGuard guard(&counter);
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
    t.step();
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  }
  std::printf("host synchronisations in one step: %ld (%ld MoE layers x %ld micro-batches)\n",
              static_cast<long>(counter.count), static_cast<long>(moe_layers), static_cast<long>(micro));
  // One per MoE layer and micro-batch (the expert split sizes); per step one for the losses and the gradient
  // norm together and one for the metrics' router-bias ranges.
  EXPECT_LE(counter.count, moe_layers * micro + 2);
#endif
}

}  // namespace
}  // namespace moetrain
