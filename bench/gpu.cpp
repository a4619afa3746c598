// bench/gpu: one GPU, figures measured in the same run.
//  1. The expert GEMM shapes of DeepSeek-V3 (tokens × 7168 → 2048 and 2048 → 7168): fprop, dgrad and wgrad in BF16
//     and in FP8 (E4M3, 1×128 activation tiles, 128×128 weight blocks, weights quantized beforehand as once per
//     step), timed without quantizing the activations and with it (fused kernels on CUDA, then the ATen ops), and
//     the weight's quantization itself (both orientations, from BF16, fused and ATen); the FP8 results' relative
//     error against the emulation (the CPU path); tokens/s of the three GEMMs and the FP8 / BF16 ratio.
//  2. Training a DeepSeek-V3-shaped model (configs/bench-gpu-dsv3.yaml) in each precision mode, at each number of
//     micro-batches per optimizer step (gradient accumulation): tokens/s, MFU against the device's own BF16 matmul
//     peak measured at start-up, peak memory. One micro-batch of 4096 tokens per step pays the optimizer step (AdamW
//     over FP32 master weights and moments, the BF16/FP8 weight copies) for every 4096 tokens; pre-training
//     accumulates many micro-batches per step, where that cost is spread over all of them.
// bench/gpu_peer.py trains the same model shape with Hugging Face transformers as the peer.
//
//   bench_gpu [--config configs/bench-gpu-dsv3.yaml] [--modes bf16,fp8] [--micro-batches 1] [--steps 6] [--warmup 2]
//             [--gemm-tokens 8192] [--gemm-hidden 7168] [--gemm-expert 2048] [--gemm-repeats 20]
//             [--skip-model] [--skip-gemm] [--profile-top N [--profile-trace PATH]] [--set k=v ...]
// Without a GPU it runs the same code on the CPU (the FP8 GEMMs emulated): a check that it works, not a figure.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <torch/cuda.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <set>
#include <tuple>

#include <cstdio>
#include <vector>

#include "bench/timing.h"
#include "config/loader.h"
#include "moetrain/build_info.h"
#include "precision/fp8.h"
#include "precision/weight_cache.h"
#include "trainer/metrics.h"
#include "trainer/train.h"
#if MOETRAIN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

using namespace moetrain;
using bench::Clock;
using bench::median;
using bench::since;

namespace {

void sync(const c10::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

// The median seconds of `repeats` runs of f after two warm-ups.
template <typename F>
double time_it(const c10::Device& d, int repeats, F&& f) {
  for (int i = 0; i < 2; ++i) f();
  sync(d);
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = Clock::now();
    f();
    sync(d);
    t.push_back(since(t0));
  }
  return median(t);
}

// f timed with the FP8 quantization as training does it (the fused kernels on CUDA), then with the ATen ops.
template <typename F>
std::pair<double, double> fused_then_aten(const c10::Device& d, int repeats, F&& f) {
  const double fused = time_it(d, repeats, f);
  const precision::Fp8AtenQuantization unfused;
  return {fused, time_it(d, repeats, f)};
}

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor w = want.to(at::kDouble).cpu(), g = got.to(at::kDouble).cpu();
  return ((g - w).norm() / w.norm()).item<double>();
}

struct GemmFigures {
  double bf16_s = 0, fp8_s = 0, fp8_with_quant_s = 0, fp8_with_aten_quant_s = 0, max_rel_err = 0;
  double weight_quant_s = 0, weight_aten_quant_s = 0;  // the BF16 weight to E4M3 in both orientations
};

// y = x · wᵀ with x [T, K], w [N, K]: fprop, dgrad (dy [T, N] · w) and wgrad (dyᵀ · x).
GemmFigures gemm_shape(const c10::Device& d, int64_t T, int64_t K, int64_t N, int repeats) {
  using namespace precision;
  auto opts = at::TensorOptions().device(d);
  const at::Tensor x = at::randn({T, K}, opts), w = at::randn({N, K}, opts) * 0.02, dy = at::randn({T, N}, opts);
  GemmFigures f;
  const at::Tensor wb = w.to(at::kBFloat16);  // the bf16 and fp8 modes' BF16 parameter
  f.bf16_s = time_it(d, repeats, [&] {  // the weight as it is, activations cast as the bf16 path does
    const at::Tensor xb = x.to(at::kBFloat16), dyb = dy.to(at::kBFloat16);
    at::mm(xb, wb.t());
    at::mm(dyb, wb);
    at::mm(dyb.t(), xb);
  });
  const Fp8Weight wq = fp8_weight(w);
  const Fp8Tensor xq = quantize_tiles(x), dyq = quantize_tiles(dy);
  const Fp8Tensor dyt = requantize_tokens(dyq), xt = requantize_tokens(xq);
  f.fp8_s = time_it(d, repeats, [&] {
    fp8_mm_nt(xq, wq.rows, at::kBFloat16);
    fp8_mm_nt(dyq, wq.cols, at::kBFloat16);
    fp8_mm_nt(dyt, xt, at::kBFloat16);
  });
  // With the activations' quantization as training does it: the fused kernels on CUDA, then the ATen ops.
  const auto with_quantization = [&] {
    const Fp8Tensor a = quantize_tiles(x), g = quantize_tiles(dy);
    fp8_mm_nt(a, wq.rows, at::kBFloat16);
    fp8_mm_nt(g, wq.cols, at::kBFloat16);
    fp8_mm_nt(requantize_tokens(g), requantize_tokens(a), at::kBFloat16);
  };
  std::tie(f.fp8_with_quant_s, f.fp8_with_aten_quant_s) = fused_then_aten(d, repeats, with_quantization);
  // The weight's E4M3 copies (w and wᵀ), made once per optimizer step from the BF16 parameter.
  std::tie(f.weight_quant_s, f.weight_aten_quant_s) = fused_then_aten(d, repeats, [&] { quantize_weight(wb); });
  // Against the emulation: the same quantized operands multiplied in FP32.
  const std::vector<std::pair<Fp8Tensor, Fp8Tensor>> ops{{xq, wq.rows}, {dyq, wq.cols}, {dyt, xt}};
  for (const auto& [a, b] : ops) {
    const at::Tensor got = fp8_mm_nt(a, b, at::kFloat);
    set_fp8_emulation(true);
    const at::Tensor want = fp8_mm_nt(a, b, at::kFloat);
    set_fp8_emulation(false);
    f.max_rel_err = std::max(f.max_rel_err, rel_err(got, want));
  }
  return f;
}

// One training step under the Kineto profiler: the GPU time by kernel (top `top`), against the step's wall time
// (the difference is the GPU waiting for the host); the Chrome trace saved to `path` if given.
void profile_step(trainer::Trainer& t, const c10::Device& d, const std::string& path, size_t top) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  const std::set<ActivityType> activities{ActivityType::CPU, ActivityType::CUDA};
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  sync(d);
  const auto t0 = Clock::now();
  t.step();
  sync(d);
  const double wall = since(t0);
  const auto result = prof::disableProfiler();
  std::map<std::string, std::pair<double, int64_t>> by_kernel;
  double gpu = 0;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;
    const double ms = static_cast<double>(e.durationNs()) / 1e6;
    auto& [total, count] = by_kernel[e.name().substr(0, 90)];
    total += ms, ++count, gpu += ms;
  }
  std::vector<std::pair<double, std::string>> rows;
  for (const auto& [name, v] : by_kernel) rows.push_back({v.first, fmt::format("{:>6} x {}", v.second, name)});
  std::sort(rows.rbegin(), rows.rend());
  fmt::print("profile of one step: wall {:.1f} ms, GPU kernels {:.1f} ms ({:.0f}% busy), {} kernel names\n", wall * 1e3,
             gpu, 100 * gpu / (wall * 1e3), by_kernel.size());
  for (size_t i = 0; i < std::min(top, rows.size()); ++i)
    fmt::print("  {:8.2f} ms {:5.1f}%  {}\n", rows[i].first, 100 * rows[i].first / gpu, rows[i].second);
  if (!path.empty()) result->save(path);
}

void free_device_memory() {
  precision::clear_weight_cache();
#if MOETRAIN_WITH_CUDA
  if (torch::cuda::is_available()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"One GPU: FP8 against BF16 on the expert GEMM shapes; training tokens/s and MFU of a DSV3-shaped model"};
  std::string file = std::string(MOETRAIN_SOURCE_DIR) + "/configs/bench-gpu-dsv3.yaml";
  std::vector<std::string> modes{"bf16", "fp8"}, sets;
  std::vector<int64_t> micro_batch_counts{1};
  int steps = 6, warmup = 2, repeats = 20;
  int64_t tokens = 8192, hidden = 7168, expert = 2048;
  bool skip_model = false, skip_gemm = false;
  std::string profile_trace;
  size_t profile_top = 0;
  app.add_option("--config", file);
  app.add_option("--modes", modes, "Precision modes trained")->delimiter(',');
  app.add_option("--micro-batches", micro_batch_counts,
                 "Micro-batches per optimizer step, each trained in each mode (train.micro_batches)")
      ->delimiter(',')
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--steps", steps, "Timed training steps per mode");
  app.add_option("--warmup", warmup, "Untimed training steps first");
  app.add_option("--gemm-tokens", tokens, "Token rows of the expert GEMMs");
  app.add_option("--gemm-repeats", repeats, "Timed repeats of each GEMM set (median)");
  app.add_option("--gemm-hidden", hidden, "Model width of the expert GEMMs (DeepSeek-V3: 7168)");
  app.add_option("--gemm-expert", expert, "Expert width of the expert GEMMs (DeepSeek-V3: 2048)");
  app.add_flag("--skip-model", skip_model);
  app.add_flag("--skip-gemm", skip_gemm);
  app.add_option("--profile-top", profile_top,
                 "Profile one step per mode (at the first micro-batch count) after the timed ones: the top N kernels");
  app.add_option("--profile-trace", profile_trace, "…and save its Chrome trace here (MODE is replaced by the mode)");
  app.add_option("--set", sets, "Config overrides key=value");
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // line by line into a log
  try {
    const bool cuda = torch::cuda::is_available();
    const c10::Device d = cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
    fmt::print("device: {}{}\n", cuda ? "cuda" : "cpu (no GPU: FP8 emulated, figures are not GPU figures)",
               cuda && precision::fp8_gemm_on_device(d) ? ", FP8 GEMMs on the tensor cores" : "");
    // The device's own peak for MFU: a BF16 matmul timed here (FP32 on the CPU), measured once for every mode.
    const double peak = trainer::measure_peak_flops(d, cuda ? at::kBFloat16 : at::kFloat);
    fmt::print("peak {:.1f} TFLOP/s ({} matmul on this device)\n", peak / 1e12, cuda ? "bf16" : "fp32");
    std::vector<std::string> summary;
    if (!skip_gemm) {
      torch::manual_seed(0);
      double bf16 = 0, fp8 = 0, fp8q = 0, fp8a = 0, err = 0;
      for (const auto& [K, N] : std::vector<std::pair<int64_t, int64_t>>{{hidden, expert}, {expert, hidden}}) {
        const GemmFigures f = gemm_shape(d, tokens, K, N, repeats);
        const double flops = 3.0 * 2.0 * static_cast<double>(tokens * K * N);
        fmt::print("gemm {}x{}x{}: bf16 {:.3f} ms ({:.0f} TFLOP/s) | fp8 {:.3f} ms ({:.0f} TFLOP/s) | fp8 with "
                   "activation quantization {:.3f} ms (ATen ops: {:.3f} ms) | weight [{}, {}] to E4M3 both ways "
                   "{:.3f} ms (ATen ops: {:.3f} ms) | fp8 rel. error vs emulation {:.2e}\n",
                   tokens, K, N, f.bf16_s * 1e3, flops / f.bf16_s / 1e12, f.fp8_s * 1e3, flops / f.fp8_s / 1e12,
                   f.fp8_with_quant_s * 1e3, f.fp8_with_aten_quant_s * 1e3, N, K, f.weight_quant_s * 1e3,
                   f.weight_aten_quant_s * 1e3, f.max_rel_err);
        bf16 += f.bf16_s, fp8 += f.fp8_s, fp8q += f.fp8_with_quant_s, fp8a += f.fp8_with_aten_quant_s;
        err = std::max(err, f.max_rel_err);
      }
      const double t = static_cast<double>(tokens);
      summary.push_back(fmt::format(
          "expert GEMMs (fprop+dgrad+wgrad, up and down): bf16 {:.0f} tokens/s, fp8 {:.0f} tokens/s ({:.2f}x), fp8 "
          "with activation quantization {:.0f} tokens/s ({:.2f}x; with the ATen ops instead of the fused kernels "
          "{:.0f} tokens/s, {:.2f}x); fp8 max rel. error vs emulation {:.2e}",
          t / bf16, t / fp8, bf16 / fp8, t / fp8q, bf16 / fp8q, t / fp8a, bf16 / fp8a, err));
      free_device_memory();
    }
    if (!skip_model) {
      for (const std::string& mode : modes) {
        for (const int64_t micro_batches : micro_batch_counts) {
          std::vector<std::string> o{"precision.mode=" + mode, std::string("train.device=") + (cuda ? "cuda" : "cpu"),
                                     fmt::format("train.peak_flops={}", peak),
                                     fmt::format("train.micro_batches={}", micro_batches),
                                     "train.global_batch_size=0"};  // the batch follows the micro-batches
          o.insert(o.end(), sets.begin(), sets.end());
          const config::Config c = config::load_config(file, {o, 0});
          double tps = 0, mfu = 0, memory = 0, loss = 0;
          {
            trainer::Trainer t(c, nullptr, "", false);
            for (int i = 0; i < warmup; ++i) t.step();
            std::vector<double> tok, util;
            for (int i = 0; i < steps; ++i) {
              const trainer::StepResult r = t.step();
              tok.push_back(r.tokens_per_s), util.push_back(r.mfu), loss = r.loss;
              for (double b : r.peak_memory_bytes) memory = std::max(memory, b);
            }
            tps = median(tok), mfu = median(util);
            if (profile_top > 0 && micro_batches == micro_batch_counts.front()) {
              std::string path = profile_trace;
              if (const auto at = path.find("MODE"); at != std::string::npos) path.replace(at, 4, mode);
              profile_step(t, d, path, profile_top);
            }
          }
          const std::string line = fmt::format(
              "model {} ({} layers, {} experts top-{}, seq {}, {} micro-batch{} of {} per step): {:.0f} tokens/s, MFU "
              "{:.1f}%, peak memory {:.1f} GiB, last loss {:.4f}",
              mode, c.model.num_layers, c.model.n_routed_experts, c.model.top_k, c.train.seq_len, micro_batches,
              micro_batches == 1 ? "" : "es", c.train.micro_batch_size, tps, 100 * mfu, memory / double(1 << 30), loss);
          fmt::print("{}\n", line);
          summary.push_back(line);
          free_device_memory();
        }
      }
    }
    if (precision::fp8_gemm_on_device(d))
      summary.push_back(precision::fp8_block_scales_refused()
                            ? "FP8 weight scales: 128x128 blocks refused by LibTorch, per-row 1x128 tiles used"
                            : "FP8 weight scales: 128x128 blocks");
    fmt::print("\nsummary\n");
    for (const auto& s : summary) fmt::print("  {}\n", s);
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
