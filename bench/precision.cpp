// bench/precision: the same model, data and steps trained in each precision mode (fp32, bf16, fp8), then the
// validation loss of each against fp32's, the step time and the peak of live tensor bytes, side by side. The bf16
// mode's target: a validation loss within 1% of fp32's. (Activation memory by mode, against the plan: bench_memory.)
//
//   bench_precision [--config configs/small-cpu.yaml] [--steps 300] [--modes fp32,bf16,fp8] [--set key=value ...]
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cmath>
#include <cstdio>

#include "bench/timing.h"
#include "cli/cli.h"
#include "config/loader.h"
#include "precision/weight_cache.h"
#include "trainer/memory_meter.h"  // count_cpu_tensors
#include "trainer/train.h"

int main(int argc, char** argv) {
  using namespace moetrain;
  CLI::App app{"Validation loss, step time and activation memory of each precision mode on one config"};
  std::string file = "configs/small-cpu.yaml";
  int64_t steps = 300;
  std::vector<std::string> modes{"fp32", "bf16", "fp8"}, overrides;
  app.add_option("--config", file, "Config (default configs/small-cpu.yaml)");
  app.add_option("--steps", steps, "Optimizer steps per mode")->check(CLI::Range(1, 1000000));
  app.add_option("--modes", modes, "precision.mode values, comma-separated (the first is the reference)")
      ->delimiter(',')
      ->check(CLI::IsMember({"fp32", "bf16", "fp8"}));
  cli::add_set_option(&app, overrides);
  CLI11_PARSE(app, argc, argv);

  struct Row {
    std::string mode;
    double val_loss, step_s, peak_bytes;
  };
  std::vector<Row> rows;
  trainer::count_cpu_tensors();
  try {
    for (const std::string& mode : modes) {
      std::vector<std::string> o = overrides;
      o.push_back("precision.mode=" + mode);
      o.push_back(fmt::format("train.steps={}", steps));
      o.push_back("train.eval_interval=0");
      o.push_back("checkpoint.interval=0");
      // FP8's 1×128 tiles need every GEMM width a multiple of 128 (small-cpu's expert width is 64): the same
      // width for every mode, so that they train the same model.
      o.push_back("model.moe_inter_dim=128");
      const config::Config c = config::load_config(file, {o, 0});
      double peak = 0;
      {
        trainer::Trainer t(c, nullptr, "", false);
        const auto t0 = bench::Clock::now();
        while (t.steps_done() < c.train.steps) peak = std::max(peak, t.step().peak_memory_bytes.at(0));
        const double secs = bench::since(t0);
        rows.push_back({mode, t.evaluate().loss, secs / static_cast<double>(steps), peak});
      }
      precision::clear_weight_cache();
      fmt::print("{:<5} done: {} steps, validation loss {:.4f}\n", mode, steps, rows.back().val_loss);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  const Row& ref = rows.front();
  fmt::print("\n{} ({} steps, one process)\n", file, steps);
  fmt::print("{:<6} {:>10} {:>12} {:>10} {:>14} {:>12}\n", "mode", "val loss", "vs " + ref.mode, "step ms",
             "peak memory", "vs " + ref.mode);
  for (const Row& r : rows)
    fmt::print("{:<6} {:>10.4f} {:>+11.2f}% {:>10.1f} {:>10.1f} MiB {:>+11.1f}%\n", r.mode, r.val_loss,
               100.0 * (r.val_loss / ref.val_loss - 1.0), 1e3 * r.step_s, r.peak_bytes / (1024.0 * 1024.0),
               100.0 * (r.peak_bytes / ref.peak_bytes - 1.0));
  return 0;
}
