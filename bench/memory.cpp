// bench/memory: measured memory per rank against `moetrain plan`'s estimate, for each activation recomputation mode,
// precision and ZeRO-1 setting. Each case trains a few steps of the config (the counting CPU allocator or the CUDA
// caching allocator measures live tensor bytes) and prints, for the last step and every rank: the measured peak,
// the planned total (weights + master weights + gradients + optimizer + the larger of in-flight activations and
// ZeRO-1's reduce-scattered gradient slices) and their ratio; the transient memory alone: measured (peak − live
// bytes after the step) and planned; and the AdamW moments plus FP32 master weights the rank holds against the
// plan's.
//
//   bench_memory [--config configs/small-cpu.yaml] [--recompute none,selective,full] [--precision fp32,bf16,fp8]
//                [--zero on,off] [--set key=value ...]
//   mpirun -np 4 bench_memory ...   (dp = the number of ranks; ZeRO-1 partitions the moments over them)
#include <ATen/ops/zeros.h>
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>

#include "checkpoints/hdf5_file.h"
#include "cli/cli.h"
#include "cli/plan.h"
#include "config/loader.h"
#include "parallel/mpi_runtime.h"
#include "parallel/process_groups.h"
#include "precision/weight_cache.h"
#include "trainer/memory_meter.h"
#include "trainer/train.h"

namespace {

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  using namespace moetrain;
  checkpoints::start_hdf5_without_teardown();  // before MPI_Init (checkpoints/hdf5_file.h)
  parallel::MpiRuntime mpi(&argc, &argv);
  CLI::App app{"Measured memory per rank against moetrain plan, per recompute mode, precision and ZeRO-1 setting"};
  std::string file = "configs/small-cpu.yaml";
  std::vector<std::string> recompute{"none", "selective", "full"}, precision{"fp32", "bf16", "fp8"}, zero{"on", "off"};
  int64_t steps = 3;
  std::vector<std::string> overrides;
  app.add_option("--config", file, "Config (default configs/small-cpu.yaml)");
  app.add_option("--recompute", recompute, "model.recompute values, comma-separated")->delimiter(',');
  app.add_option("--precision", precision, "precision.mode values, comma-separated")->delimiter(',');
  app.add_option("--zero", zero, "parallel.distributed_optimizer: on, off or both (comma-separated)")
      ->delimiter(',')
      ->check(CLI::IsMember({"on", "off"}));
  app.add_option("--steps", steps, "Steps per case (the last is measured; at least 2)")->check(CLI::Range(2, 1000));
  cli::add_set_option(&app, overrides);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // --help prints and is not an error
    return mpi.finish(rc == 0 ? std::nullopt : std::optional<std::string>(e.what()));
  }

  trainer::count_cpu_tensors();
  const int ranks = mpi.active() ? mpi.size() : 1, rank = mpi.active() ? mpi.rank() : 0;
  // Per case and rank: measured peak, planned total, measured and planned activations, moments held and planned.
  constexpr int kCols = 6;
  struct Case {
    std::string recompute, precision, zero;
    at::Tensor table;  // [ranks, kCols]
  };
  std::vector<Case> cases;
  std::optional<std::string> error;
  try {
    for (const std::string& r : recompute)
      for (const std::string& p : precision)
        for (const std::string& z : zero) {
          if (z == "off" && ranks == 1 && zero.size() > 1) continue;  // one rank: nothing to partition
          std::vector<std::string> o = overrides;
          o.push_back("model.recompute=" + r);
          o.push_back("precision.mode=" + p);
          o.push_back(std::string("parallel.distributed_optimizer=") + (z == "on" ? "true" : "false"));
          o.push_back("parallel.dp=0");  // every rank a dp replica, with the same micro-batches as one rank
          o.push_back("train.global_batch_size=0");
          // FP8's 1×128 tiles need the expert width a multiple of 128 (small-cpu's is 64).
          if (p == "fp8") o.push_back("model.moe_inter_dim=128");
          o.push_back(fmt::format("train.steps={}", steps));
          o.push_back("train.eval_interval=0");
          o.push_back("checkpoint.interval=0");
          config::Config c = config::load_config(file, {o, ranks});
          std::unique_ptr<parallel::ProcessGroups> groups;
          if (mpi.active())
            groups = std::make_unique<parallel::ProcessGroups>(
                parallel::ProcessGroups::create(c.parallel, parallel::Backend::kMpi));
          const cli::Plan plan = cli::make_plan(c);
          const cli::StagePlan& s = plan.stages.at(groups ? static_cast<size_t>(groups->coords.pp) : 0);
          at::Tensor table = at::zeros({ranks, kCols}, at::kDouble);
          {
            trainer::Trainer t(c, groups.get(), "", false);
            trainer::StepResult last;
            while (t.steps_done() < c.train.steps) last = t.step();
            const double after =
                static_cast<double>(trainer::tensor_memory(t.model()->parameters().front().device()).live_bytes);
            const double peak = last.peak_memory_bytes.at(static_cast<size_t>(rank));
            // The step's transient memory: the activations.
            const double optimizer = static_cast<double>(t.optimizer().state_bytes() + t.optimizer().master_bytes());
            const double row[kCols] = {peak,         s.total_bytes(),
                                       peak - after, s.activation_bytes,
                                       optimizer,    s.optimizer_bytes + s.master_bytes};
            for (int k = 0; k < kCols; ++k) table[rank][k] = row[k];
          }
          if (groups) groups->world->all_reduce(table, parallel::ReduceOp::kSum);
          cases.push_back({r, p, z, table});
          precision::clear_weight_cache();  // this trainer's BF16/FP8 weight copies, not to be counted in the next case
          if (rank == 0) {
            fmt::print("{:<9} {:<4} zero {:<3} done\n", r, p, z);
            std::fflush(stdout);
          }
        }
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (!error && rank == 0) {
    fmt::print("\n{} ({} rank{}, dp {}; MiB of live tensors, the last of {} steps)\n", file, ranks,
               ranks > 1 ? "s" : "", ranks, steps);
    fmt::print("{:<10} {:<5} {:<4} {:>4} {:>9} {:>9} {:>6}   {:>9} {:>9} {:>6}   {:>8} {:>8}\n", "recompute", "prec",
               "zero", "rank", "measured", "planned", "ratio", "act meas", "act plan", "ratio", "opt+mstr", "planned");
    for (const Case& c : cases)
      for (int r = 0; r < ranks; ++r) {
        auto v = [&](int k) { return c.table[r][k].item<double>(); };
        fmt::print("{:<10} {:<5} {:<4} {:>4} {:>9.1f} {:>9.1f} {:>6.3f}   {:>9.1f} {:>9.1f} {:>6.3f}   {:>8.2f} {:>8.2f}\n",
                   c.recompute, c.precision, c.zero, r, mib(v(0)), mib(v(1)), v(1) / v(0), mib(v(2)), mib(v(3)),
                   v(3) / v(2), mib(v(4)), mib(v(5)));
      }
  }
  return mpi.finish(error);
}
