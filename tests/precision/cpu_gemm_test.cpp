// The FP32 CPU micro-kernel GEMMs (precision/cpu_gemm.h) and the FP32 linear layers built on them
// (precision/gemm.h): the products of FP64 within FP32 rounding, whatever the operands' layout, and the same bits
// whatever the thread count or the other rows of the matrix.
#include "precision/cpu_gemm.h"

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "precision/gemm.h"

namespace moetrain::precision {
namespace {

void expect_close(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  EXPECT_TRUE(torch::allclose(got.to(torch::kDouble), want, 1e-5, 1e-5))
      << what << ": largest difference " << (got.to(torch::kDouble) - want).abs().max().item<double>();
}

TEST(CpuGemm, MatchesTheFp64ProductForEveryLayout) {
  torch::manual_seed(1);
  // Rows in blocks of 32 with a partial one, columns in strips of 64, 32 and 16 and single ones (N 150 = 128 + 16 + 6).
  const at::Tensor a = torch::randn({37, 19}), b = torch::randn({19, 150});
  const at::Tensor want = torch::mm(a.to(torch::kDouble), b.to(torch::kDouble));
  ASSERT_TRUE(cpu_gemm::applies(a, b));
  expect_close(cpu_gemm::mm(a, b), want, "a·b");
  // A transposed view as a (read by strides), a column-major b (made row-contiguous first).
  expect_close(cpu_gemm::mm(a.t().contiguous().t(), b.t().contiguous().t()), want, "strided operands");
  EXPECT_EQ(cpu_gemm::mm(a.narrow(0, 0, 0), b).sizes(), (std::vector<int64_t>{0, 150}));
  // Deeper than the kernels' limit, and FP64: the BLAS.
  const at::Tensor deep = torch::randn({3, cpu_gemm::kMaxDepth + 1}), tall = torch::randn({cpu_gemm::kMaxDepth + 1, 4});
  EXPECT_FALSE(cpu_gemm::applies(deep, tall));
  EXPECT_TRUE(at::equal(cpu_gemm::mm(deep, tall), torch::mm(deep, tall)));
  EXPECT_FALSE(cpu_gemm::applies(a.to(torch::kDouble), b.to(torch::kDouble)));
}

// Every kernel this CPU can run (AVX-512, AVX2 + FMA, the baseline: different register tiles and strips), with a
// transposed A, and accumulating into C.
TEST(CpuGemm, EveryInstructionSetsKernelComputesTheProduct) {
  torch::manual_seed(4);
  const int64_t M = 37, K = 19, N = 150;
  const at::Tensor at_ = torch::randn({K, M}), b = torch::randn({K, N}), c0 = torch::randn({M, N});
  const at::Tensor a = at_.t();  // [M, K] with strides (1, M)
  const at::Tensor want = torch::mm(a.to(torch::kDouble), b.to(torch::kDouble));
  const std::vector<cpu_gemm::Isa> isas = cpu_gemm::supported_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.back(), cpu_gemm::Isa::kBaseline);
  for (const cpu_gemm::Isa isa : isas) {
    at::Tensor c = torch::empty({M, N});
    cpu_gemm::small_gemm(isa, at_.const_data_ptr<float>(), 1, M, b.const_data_ptr<float>(), N, c.data_ptr<float>(), N,
                         M, N, K, false);
    expect_close(c, want, "kernel " + std::to_string(static_cast<int>(isa)));
    at::Tensor acc = c0.clone();
    cpu_gemm::small_gemm(isa, at_.const_data_ptr<float>(), 1, M, b.const_data_ptr<float>(), N, acc.data_ptr<float>(), N,
                         M, N, K, true);
    expect_close(acc, want + c0.to(torch::kDouble), "kernel " + std::to_string(static_cast<int>(isa)) + ", +=");
  }
}

TEST(CpuGemm, SameBitsWhateverTheThreadsAndTheOtherRows) {
  torch::manual_seed(2);
  const at::Tensor a = torch::randn({200, 96}), b = torch::randn({96, 300});
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = cpu_gemm::mm(a, b);
  at::set_num_threads(2);
  const at::Tensor two = cpu_gemm::mm(a, b);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one, two));
  // A data-parallel rank's share of the rows computes the same rows of the product.
  EXPECT_TRUE(at::equal(cpu_gemm::mm(a.narrow(0, 50, 13), b), one.narrow(0, 50, 13)));
}

TEST(CpuGemm, Fp32LinearLayersMatchFp64) {
  torch::manual_seed(3);
  const at::Tensor x0 = torch::randn({2, 7, 40}), w0 = torch::randn({24, 40}) * 0.3, g = torch::randn({2, 7, 24});
  auto run = [&](at::ScalarType dtype) {
    const at::Tensor x = x0.to(dtype).detach().requires_grad_(true), w = w0.to(dtype).detach().requires_grad_(true);
    const at::Tensor y = gemm(x, w, Mode::kFp32);
    y.backward(g.to(dtype));
    return std::vector<at::Tensor>{y.detach(), x.grad(), w.grad()};
  };
  const auto single = run(torch::kFloat), reference = run(torch::kDouble);  // FP64 takes at::linear
  const char* names[] = {"output", "input gradient", "weight gradient"};
  for (size_t i = 0; i < single.size(); ++i) expect_close(single[i], reference[i], names[i]);
}

}  // namespace
}  // namespace moetrain::precision
