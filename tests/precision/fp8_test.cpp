#include "precision/fp8.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

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
  EXPECT_TRUE(torch::allclose(w.grad(), torch::matmul(dyq.reshape({-1, 64}).t(), xq.reshape({-1, 256})), 1e-4, 1e-3));
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
