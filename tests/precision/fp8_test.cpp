#include "precision/fp8.h"
#include "precision/weight_cache.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "precision/gemm.h"

namespace moetrain::precision {
namespace {

TEST(Fp8, TilesScaleIndependently) {
  // Tile 0 holds large values, tile 1 tiny ones: per-tile scales keep both at E4M3's relative precision
  // (3 mantissa bits: ≤ 2^-4 relative rounding error), where one scale for the row would flush tile 1 to zero.
  at::Tensor x = torch::cat({torch::linspace(-1000, 1000, 128), torch::linspace(1e-3, 2e-3, 128)}).view({1, 256});
  at::Tensor q = fake_quant_tiles(x);
  at::Tensor rel = ((q - x).abs() / x.abs().clamp_min(1e-12));
  EXPECT_LE(rel.max().item<double>(), 1.0 / 16 + 1e-6);
  EXPECT_EQ(q[0][0].item<float>(), -1000.0f);      // the tile's amax maps to 448 exactly
  EXPECT_EQ(q[0][255].item<float>(), 2e-3f);
  EXPECT_GT(q.slice(1, 128, 256).abs().min().item<double>(), 0.0);
}

TEST(Fp8, PartialTilesAndBlocks) {
  torch::manual_seed(0);
  at::Tensor x = torch::randn({3, 5, 200});  // 200 = one full tile + a partial one
  at::Tensor q = fake_quant_tiles(x);
  EXPECT_EQ(q.sizes(), x.sizes());
  // E4M3: ≤ 2^-4 relative error for normal values, and a subnormal step of 2^-9 (half of it as error) below
  // 2^-6 of the scale.
  auto within = [](const at::Tensor& q, const at::Tensor& v, double scale) {
    return ((q - v).abs() <= v.abs() / 16 + scale * std::pow(2.0, -10) + 1e-12).all().item<bool>();
  };
  for (int64_t t = 0; t < 2; ++t) {
    at::Tensor xs = x.narrow(2, t * 128, t == 0 ? 128 : 72), qs = q.narrow(2, t * 128, t == 0 ? 128 : 72);
    at::Tensor scale = xs.abs().amax(2, true) / 448;
    EXPECT_TRUE(((qs - xs).abs() <= xs.abs() / 16 + scale * std::pow(2.0, -10) + 1e-12).all().item<bool>());
  }
  at::Tensor w = torch::randn({130, 260});
  w.slice(0, 0, 128).slice(1, 0, 128) *= 1000;  // one block much larger than the others
  at::Tensor wq = fake_quant_blocks(w);
  EXPECT_EQ(wq.sizes(), w.sizes());
  for (int64_t bo = 0; bo < 2; ++bo)
    for (int64_t bk = 0; bk < 3; ++bk) {
      at::Tensor v = w.slice(0, bo * 128, std::min<int64_t>(130, (bo + 1) * 128)).slice(1, bk * 128, std::min<int64_t>(260, (bk + 1) * 128));
      at::Tensor qv = wq.slice(0, bo * 128, std::min<int64_t>(130, (bo + 1) * 128)).slice(1, bk * 128, std::min<int64_t>(260, (bk + 1) * 128));
      EXPECT_TRUE(within(qv, v, v.abs().max().item<double>() / 448)) << "block " << bo << "," << bk;
    }
}

TEST(Fp8, LinearUsesQuantizedOperandsInAllThreeGemms) {
  torch::manual_seed(1);
  at::Tensor x = torch::randn({4, 7, 256}, torch::requires_grad());
  at::Tensor w = torch::randn({64, 256}, torch::requires_grad());
  at::Tensor y = fp8_linear(x, w);
  at::Tensor xq = fake_quant_tiles(x.detach()), wq = fake_quant_blocks(w.detach());
  EXPECT_TRUE(torch::allclose(y, torch::matmul(xq, wq.t()), 1e-5, 1e-4));
  EXPECT_LT(((y - torch::matmul(x, w.t())).norm() / torch::matmul(x, w.t()).norm()).item<double>(), 0.05);
  at::Tensor dy = torch::randn({4, 7, 64});
  y.backward(dy);
  at::Tensor dyq = fake_quant_tiles(dy);
  EXPECT_TRUE(torch::allclose(x.grad(), torch::matmul(dyq, wq), 1e-5, 1e-4));
  // wgrad: both operands re-quantized along the tokens (their transposes in 1×128 tiles): tested below by hand.
  at::Tensor dyt = fake_quant_tiles(dyq.reshape({-1, 64}).t().contiguous());
  at::Tensor xt = fake_quant_tiles(xq.reshape({-1, 256}).t().contiguous());
  EXPECT_TRUE(torch::allclose(w.grad(), torch::matmul(dyt, xt.t()), 1e-4, 1e-3));
}

// E4M3 of one value by hand: the nearest of the representable numbers (3 mantissa bits, exponent ≥ -6, subnormals
// below 2^-6 in steps of 2^-9), ties to even, saturating nothing (|v| ≤ 448 here by construction).
double e4m3_by_hand(double v) {
  const double a = std::abs(v);
  if (a == 0) return 0;
  int e = static_cast<int>(std::floor(std::log2(a)));
  e = std::max(e, -6);
  const double step = std::ldexp(1.0, e - 3);
  double q = std::nearbyint(a / step) * step;  // round half to even (default rounding mode)
  return std::copysign(q, v);
}

// The wgrad operands as DeepSeek-V3 forms them, from the definitions: per output channel, tiles of 128 tokens.
TEST(Fp8, WgradRequantizesAlongTokensByHand) {
  torch::manual_seed(3);
  const int64_t N = 200, O = 16, K = 32;  // 200 tokens: one full tile and a partial one of 72
  at::Tensor x = torch::randn({N, K}) * 3;
  at::Tensor w = torch::randn({O, K}, torch::requires_grad());
  at::Tensor dy = torch::randn({N, O});
  fp8_linear(x, w).backward(dy);
  // Forward and dgrad operands, then the token-dimension tiles of their transposes, all by hand.
  auto tiles_by_hand = [](const at::Tensor& m) {  // rows of m, 1×128 tiles along the columns
    at::Tensor out = torch::empty_like(m);
    auto a = m.accessor<float, 2>();
    auto o = out.accessor<float, 2>();
    for (int64_t r = 0; r < m.size(0); ++r)
      for (int64_t t0 = 0; t0 < m.size(1); t0 += 128) {
        const int64_t t1 = std::min<int64_t>(m.size(1), t0 + 128);
        double amax = 0;
        for (int64_t c = t0; c < t1; ++c) amax = std::max(amax, std::abs(static_cast<double>(a[r][c])));
        const float scale = amax > 0 ? static_cast<float>(amax / 448.0) : 1.0f;
        for (int64_t c = t0; c < t1; ++c)
          o[r][c] = static_cast<float>(e4m3_by_hand(static_cast<double>(a[r][c] / scale))) * scale;
      }
    return out;
  };
  at::Tensor xq = tiles_by_hand(x.detach());      // forward: x in tiles along K
  at::Tensor dyq = tiles_by_hand(dy);              // dgrad: dy in tiles along O
  at::Tensor dyt = tiles_by_hand(dyq.t().contiguous());  // [O, N]: tiles of 128 tokens
  at::Tensor xt = tiles_by_hand(xq.t().contiguous());    // [K, N]: tiles of 128 tokens
  at::Tensor want = torch::matmul(dyt.to(torch::kDouble), xt.t().to(torch::kDouble)).to(torch::kFloat);
  EXPECT_TRUE(torch::allclose(w.grad(), want, 1e-5, 1e-4)) << (w.grad() - want).abs().max();
  // Scaling along the channels instead (the old emulation) gives other numbers.
  at::Tensor channels = torch::matmul(dyq.t(), xq);
  EXPECT_GT((w.grad() - channels).abs().max().item<double>(), 1e-3);
}

// requantize_tokens by itself: the wgrad operand [K, tokens padded to whole tiles of 128], zeros in the padding, and
// the dequantized operand's values re-quantized per tile of 128 tokens (within E4M3's relative step, 1/16).
TEST(Fp8, RequantizeTokensTransposesAndPadsToWholeTiles) {
  torch::manual_seed(4);
  const at::Tensor x = torch::randn({200, 40});
  const Fp8Tensor q = quantize_tiles(x), t = requantize_tokens(q);
  ASSERT_EQ(t.data.sizes(), (std::vector<int64_t>{40, 256}));
  ASSERT_EQ(t.scale.sizes(), (std::vector<int64_t>{40, 2}));
  EXPECT_FALSE(t.blocks);
  const at::Tensor back = dequantize(t, at::kFloat);
  EXPECT_TRUE(at::equal(back.narrow(1, 200, 56), torch::zeros({40, 56}))) << "the padded tokens are not zero";
  const at::Tensor want = dequantize(q, at::kFloat).t();
  const at::Tensor got = back.narrow(1, 0, 200);
  EXPECT_TRUE(torch::allclose(got, want, 0.0625, 1e-6)) << (got - want).abs().max();
}

// The weight's two orientations: w in 128×128 blocks, and wᵀ holding the same bytes and block scales transposed
// (the dgrad GEMM's operand), partial blocks on both sides.
TEST(Fp8, WeightQuantizedInBothOrientations) {
  torch::manual_seed(6);
  const at::Tensor w = torch::randn({130, 260}).to(torch::kBFloat16);
  const Fp8Weight q = quantize_weight(w);
  const Fp8Tensor rows = quantize_blocks(w);
  ASSERT_TRUE(q.rows.blocks && q.cols.blocks);
  ASSERT_EQ(q.cols.data.sizes(), (std::vector<int64_t>{260, 130}));
  ASSERT_EQ(q.cols.scale.sizes(), (std::vector<int64_t>{3, 2}));
  EXPECT_TRUE(at::equal(q.rows.data.view(at::kByte), rows.data.view(at::kByte)));
  EXPECT_TRUE(at::equal(q.rows.scale, rows.scale));
  EXPECT_TRUE(at::equal(q.cols.data.view(at::kByte), rows.data.view(at::kByte).t()));
  EXPECT_TRUE(at::equal(q.cols.scale, rows.scale.t()));
  EXPECT_TRUE(q.cols.data.is_contiguous() && q.cols.scale.is_contiguous());
  EXPECT_TRUE(at::equal(dequantize(q.cols, at::kFloat), dequantize(q.rows, at::kFloat).t()));
}

TEST(Fp8, QuantizedTensorsRoundTrip) {
  torch::manual_seed(4);
  at::Tensor x = torch::randn({5, 300});
  Fp8Tensor q = quantize_tiles(x);
  EXPECT_EQ(q.data.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(q.scale.sizes(), (at::IntArrayRef{5, 3}));
  EXPECT_TRUE(torch::equal(dequantize(q, at::kFloat), fake_quant_tiles(x)));
  at::Tensor w = torch::randn({130, 260});
  Fp8Tensor b = quantize_blocks(w);
  EXPECT_EQ(b.scale.sizes(), (at::IntArrayRef{2, 3}));
  EXPECT_TRUE(torch::equal(dequantize(b, at::kFloat), fake_quant_blocks(w)));
  // a · bᵀ: the emulated FP8 GEMM on the dequantized operands.
  at::Tensor a = torch::randn({7, 260});
  at::Tensor got = fp8_mm_nt(quantize_tiles(a), b, at::kFloat);
  EXPECT_TRUE(torch::allclose(got, torch::matmul(fake_quant_tiles(a), fake_quant_blocks(w).t()), 1e-5, 1e-4));
}

// What at::_scaled_mm gets on SM90 (built here on the CPU): zero-padded to whole tiles of 128 on every side, and the
// scales in the layouts LibTorch 2.11's ScaledBlas.cpp checks (is_blockwise_1x128_scaling on a, and on bᵀ either
// is_blockwise_128x128_scaling, whose row stride is ⌈K/128⌉ rounded up to 4, or the 1×128 check). DeepSeek-V3's
// wkv_a is [576, 7168]: its dgrad contracts over 576 (4.5 tiles, 5 blocks: the stride rounds up to 8).
TEST(Fp8, ScaledMmOperandsHaveTheLayoutsLibTorchChecks) {
  torch::manual_seed(8);
  auto expect_strides = [](const at::Tensor& t, std::vector<int64_t> sizes, std::vector<int64_t> strides,
                           const std::string& what) {
    EXPECT_EQ(t.sizes(), at::IntArrayRef(sizes)) << what;
    // A dimension of size 1 has any stride in LibTorch's check.
    for (size_t d = 0; d < sizes.size(); ++d) {
      if (sizes[d] > 1) {
        EXPECT_EQ(t.stride(static_cast<int64_t>(d)), strides[d]) << what << " dim " << d;
      }
    }
  };
  // The padded bytes: t's where they were, and zero bytes around them (the byte sums agree).
  auto same_bytes_padded = [](const at::Tensor& padded, const at::Tensor& t) {
    const at::Tensor p = padded.view(at::kByte), b = t.view(at::kByte);
    return at::equal(p.narrow(0, 0, b.size(0)).narrow(1, 0, b.size(1)), b) &&
           p.to(at::kLong).sum().item<int64_t>() == b.to(at::kLong).sum().item<int64_t>();
  };
  for (const auto& [M, K, N] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {37, 576, 7168}, {300, 7168, 576}, {1440, 2048, 384}, {5, 100, 48}, {128, 1024, 256}}) {
    const at::Tensor x = torch::randn({M, K}), w = torch::randn({N, K}) * 0.02;
    const Fp8Tensor a = quantize_tiles(x);
    const Fp8Weight wq = quantize_weight(w);
    const Fp8Tensor tiles = quantize_tiles(w);
    const int64_t Mp = (M + 127) / 128 * 128, Np = (N + 127) / 128 * 128, Kb = (K + 127) / 128, Kp = Kb * 128;
    const std::string shape = std::to_string(M) + "x" + std::to_string(K) + "x" + std::to_string(N);
    const at::Tensor want_blocks = fp8_mm_nt(a, wq.rows, at::kFloat), want_tiles = fp8_mm_nt(a, tiles, at::kFloat);
    for (const auto& [b, block_scales, want] : std::vector<std::tuple<Fp8Tensor, bool, at::Tensor>>{
             {wq.rows, true, want_blocks}, {wq.rows, false, want_blocks}, {tiles, true, want_tiles}}) {
      const std::string what = shape + (b.blocks ? (block_scales ? " blocks" : " blocks as tiles") : " tiles");
      const ScaledMmOperands o = scaled_mm_operands(a, b, block_scales);
      EXPECT_EQ(o.m, M);
      EXPECT_EQ(o.n, N);
      expect_strides(o.a, {Mp, Kp}, {Kp, 1}, what + ": a");
      expect_strides(o.b, {Kp, Np}, {1, Kp}, what + ": b");
      expect_strides(o.scale_a, {Mp, Kb}, {1, Mp}, what + ": scale_a");
      if (b.blocks && block_scales)
        expect_strides(o.scale_b, {Kb, Np / 128}, {1, (Kb + 3) / 4 * 4}, what + ": scale_b");
      else
        expect_strides(o.scale_b, {Kb, Np}, {Np, 1}, what + ": scale_b");
      // The operands' bytes where they were and zero bytes around them, and the padded operands multiply to the
      // same product.
      EXPECT_TRUE(same_bytes_padded(o.a, a.data)) << what;
      EXPECT_TRUE(same_bytes_padded(o.b.t(), b.data)) << what;
      const bool blocks = b.blocks && block_scales;
      const Fp8Tensor pa{o.a, o.scale_a.contiguous(), false};
      const Fp8Tensor pb{o.b.t().contiguous(), o.scale_b.t().contiguous(), blocks};
      const at::Tensor got = fp8_mm_nt(pa, pb, at::kFloat).narrow(0, 0, M).narrow(1, 0, N);
      EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-5)) << what << ": " << (got - want).abs().max();
    }
  }
}

TEST(WeightCache, OneCopyPerChangeOfTheWeight) {
  torch::manual_seed(5);
  at::Tensor w = torch::randn({32, 64}, torch::requires_grad());
  at::Tensor x = torch::randn({4, 64});
  const int64_t before = weight_copies_made();
  for (Mode mode : {Mode::kBf16, Mode::kFp8}) {
    for (int i = 0; i < 3; ++i) gemm(x, w, mode).sum().backward();  // three micro-batches: one copy
  }
  EXPECT_EQ(weight_copies_made() - before, 2);
  // An optimizer-style in-place update makes the next call copy again, and the copy holds the new values.
  {
    at::NoGradGuard no_grad;
    w.mul_(2);
  }
  at::Tensor y = gemm(x, w, Mode::kBf16);
  EXPECT_EQ(weight_copies_made() - before, 3);
  EXPECT_TRUE(torch::equal(y, at::linear(x.to(at::kBFloat16), w.detach().to(at::kBFloat16)).to(at::kFloat)));
}

TEST(Gemm, Bf16ComputeKeepsFp32MasterGradients) {
  torch::manual_seed(2);
  at::Tensor x = torch::randn({8, 64});
  at::Tensor w = torch::randn({32, 64}, torch::requires_grad());
  at::Tensor y = gemm(x, w, Mode::kBf16);
  EXPECT_EQ(y.scalar_type(), at::kFloat);
  at::Tensor ref = torch::matmul(x, w.t());
  EXPECT_LT(((y - ref).norm() / ref.norm()).item<double>(), 1e-2);
  EXPECT_GT((y - ref).abs().max().item<double>(), 0.0);  // really computed in BF16
  y.sum().backward();
  EXPECT_EQ(w.grad().scalar_type(), at::kFloat);
  EXPECT_TRUE(torch::equal(gemm(x, w, Mode::kFp32), at::linear(x, w)));
}

}  // namespace
}  // namespace moetrain::precision
