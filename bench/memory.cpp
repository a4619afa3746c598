// bench/memory: measured memory per rank against `moetrain plan`'s estimate,
// for each activation recomputation mode and precision. Each case trains a few
// steps of the config in this process (the counting CPU allocator or the CUDA
// caching allocator measures live tensor bytes) and prints, for the step after
// the first:
//   measured peak, planned total (weights + gradients + optimizer + in-flight
//   activations) and their ratio; the activations alone: measured (peak − live
//   bytes after the step, i.e. the step's transient memory) and planned.
//
//   bench_memory [--config configs/small-cpu.yaml] [--recompute
//   none,selective,full] [--precision fp32,bf16,fp8]
//                [--set key=value ...]
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>

#include "cli/cli.h"
#include "cli/plan.h"
#include "config/loader.h"
#include "precision/weight_cache.h"
#include "trainer/memory_meter.h"
#include "trainer/train.h"

namespace {

double mib(double bytes) {
  return bytes / (1024.0 * 1024.0);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace moetrain;
  CLI::App app{
      "Measured memory per rank against moetrain plan, per recompute "
      "mode and precision"};
  std::string file = "configs/small-cpu.yaml";
  std::vector<std::string> recompute{"none", "selective", "full"}, precision{"fp32", "bf16", "fp8"};
  int64_t steps = 3;
  std::vector<std::string> overrides;
  app.add_option("--config", file, "Config (default configs/small-cpu.yaml)");
  app.add_option("--recompute", recompute, "model.recompute values, comma-separated")->delimiter(',');
  app.add_option("--precision", precision, "precision.mode values, comma-separated")->delimiter(',');
  app.add_option("--steps", steps, "Steps per case (the last is measured; at least 2)")->check(CLI::Range(2, 1000));
  cli::add_set_option(&app, overrides);
  CLI11_PARSE(app, argc, argv);

  trainer::count_cpu_tensors();
  struct Row {
    std::string recompute, precision;
    double measured, planned, act_measured, act_planned;
  };
  std::vector<Row> rows;
  try {
    for (const std::string& r : recompute)
      for (const std::string& p : precision) {
        std::vector<std::string> o = overrides;
        o.push_back("model.recompute=" + r);
        o.push_back("precision.mode=" + p);
        // FP8's 1×128 tiles need the expert width a multiple of 128 (small-cpu's is 64).
        if (p == "fp8") o.push_back("model.moe_inter_dim=128");
        o.push_back(fmt::format("train.steps={}", steps));
        o.push_back("train.eval_interval=0");
        o.push_back("checkpoint.interval=0");
        config::Config c = config::load_config(file, {o, 0});
        const cli::Plan plan = cli::make_plan(c);
        const cli::StagePlan& s = plan.stages.at(0);
        trainer::Trainer t(c, nullptr, "", false);
        trainer::StepResult last;
        while (t.steps_done() < c.train.steps) last = t.step();
        const double after =
            static_cast<double>(trainer::tensor_memory(t.model()->parameters().front().device()).live_bytes);
        const double peak = last.peak_memory_bytes.at(0);
        rows.push_back({r, p, peak, s.total_bytes(), peak - after, s.activation_bytes});
        precision::clear_weight_cache();  // this trainer's BF16/FP8 weight copies, not to be counted in the next case
        fmt::print("{:<9} {:<4} done\n", r, p);
        std::fflush(stdout);
      }
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_memory: {}\n", e.what());
    return 1;
  }
  fmt::print("\n{} (one rank; MiB of live tensors, the step after the first)\n", file);
  fmt::print("{:<10} {:<5} {:>9} {:>9} {:>6}   {:>10} {:>10} {:>6}\n", "recompute", "prec", "measured", "planned",
             "ratio", "act meas.", "act plan", "ratio");
  for (const Row& w : rows)
    fmt::print(
        "{:<10} {:<5} {:>9.1f} {:>9.1f} {:>6.3f}   {:>10.1f} {:>10.1f} "
        "{:>6.3f}\n",
        w.recompute, w.precision, mib(w.measured), mib(w.planned), w.planned / w.measured, mib(w.act_measured),
        mib(w.act_planned), w.act_planned / w.act_measured);
  return 0;
}
