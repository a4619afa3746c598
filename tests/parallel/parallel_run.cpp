// Test program for the parallel layouts (run under mpirun by tests/parallel/equivalence_test.sh):
//   parallel_run --config FILE [--set k=v ...] --steps N --out DIR [--starve-expert E]
// Trains N steps and writes DIR/losses.txt (rank 0: one line per step, then the validation loss) and
// DIR/params.<rank>.bin (every parameter this rank holds: name, element count, values as doubles).
//   parallel_run --compare REF_DIR DIR
// checks DIR against REF_DIR: every loss and every parameter of every rank within 1e-5 relative.
// --starve-expert E (repeatable): the routers never pick expert E (bias −1e9, balancing off); its gradients must
// stay zero. Starving every expert of one ep rank leaves that rank without any routed token.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>

#include "checkpoints/hdf5_file.h"
#include "config/loader.h"
#include "cli/cli.h"
#include "parallel/mpi_runtime.h"
#include "model/param_roles.h"
#include "parallel/grad_sync.h"
#include "parallel/process_groups.h"
#include "trainer/train.h"

namespace fs = std::filesystem;
using namespace moetrain;

namespace {

std::map<std::string, std::vector<double>> read_params(const fs::path& dir) {
  std::map<std::string, std::vector<double>> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().rfind("params.", 0) != 0) continue;
    std::ifstream in(e.path(), std::ios::binary);
    uint64_t len = 0;
    while (in.read(reinterpret_cast<char*>(&len), sizeof(len))) {
      std::string name(len, '\0');
      in.read(name.data(), static_cast<std::streamsize>(len));
      uint64_t n = 0;
      in.read(reinterpret_cast<char*>(&n), sizeof(n));
      std::vector<double> v(n);
      in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(double)));
      auto [it, fresh] = out.emplace(name, v);
      if (!fresh && it->second != v)  // replicas of one parameter must be identical
        throw std::runtime_error(fmt::format("{}: replicas of {} differ", dir.string(), name));
    }
  }
  return out;
}

std::vector<double> read_losses(const fs::path& dir) {
  std::ifstream in(dir / "losses.txt");
  std::vector<double> v;
  for (double x; in >> x;) v.push_back(x);
  return v;
}

int compare(const fs::path& ref, const fs::path& dir) {
  auto rl = read_losses(ref), dl = read_losses(dir);
  int bad = 0;
  if (rl.size() != dl.size() || rl.empty()) {
    fmt::print("losses: {} in {} vs {} in {}\n", dl.size(), dir.string(), rl.size(), ref.string());
    return 1;
  }
  for (size_t i = 0; i < rl.size(); ++i) {
    double rel = std::abs(dl[i] - rl[i]) / std::abs(rl[i]);
    if (rel > 1e-5) {
      fmt::print("loss {}: {:.9f} vs reference {:.9f} (relative {:.2e})\n", i, dl[i], rl[i], rel);
      ++bad;
    }
  }
  auto rp = read_params(ref), dp = read_params(dir);
  if (rp.size() != dp.size()) {
    fmt::print("{} parameters in {} vs {} in the reference\n", dp.size(), dir.string(), rp.size());
    ++bad;
  }
  double worst = 0;
  for (const auto& [name, ref_v] : rp) {
    auto it = dp.find(name);
    if (it == dp.end()) {
      fmt::print("parameter {} missing\n", name);
      ++bad;
      continue;
    }
    double scale = 0, diff = 0;
    for (size_t i = 0; i < ref_v.size(); ++i) {
      scale = std::max(scale, std::abs(ref_v[i]));
      diff = std::max(diff, std::abs(ref_v[i] - it->second[i]));
    }
    double rel = diff / std::max(scale, 1e-30);
    worst = std::max(worst, rel);
    if (rel > 1e-5) {
      fmt::print("parameter {}: max difference {:.3e} relative to its scale\n", name, rel);
      ++bad;
    }
  }
  fmt::print("{}: {} losses and {} parameters match the reference (worst parameter difference {:.2e}){}\n",
             dir.string(), dl.size(), dp.size(), worst, bad ? " — NOT" : "");
  return bad ? 1 : 0;
}

// The AdamW moments (and, in the bf16 / fp8 modes, the FP32 master weights) this rank holds against the whole of
// its stage's (its ep shard's for routed experts): with ZeRO-1, 1/dp of the dense and 1/edp of the routed ones
// (±5%); without it, all. Written to DIR/optim.<rank>.txt.
void check_optimizer_shards(trainer::Trainer& t, const config::Config& c, int rank, const fs::path& out) {
  const auto& opt = t.optimizer();
  const auto roles = model::parameter_roles(*t.model());
  const bool zero = c.parallel.distributed_optimizer && c.parallel.dp > 1;
  const double expect[2] = {zero ? 1.0 / static_cast<double>(c.parallel.dp) : 1.0,
                            zero ? static_cast<double>(c.parallel.ep) / static_cast<double>(c.parallel.dp) : 1.0};
  std::ofstream f(out / fmt::format("optim.{}.txt", rank));
  // parallel.overlap_grad_reduce: the buckets of the last step started inside its backward pass;
  // parallel.overlap_param_gather: the buckets whose parameter all-gather a forward pass waited for.
  if (t.grad_sync())
    f << fmt::format("rank {} gradient buckets started during the backward pass: {}; parameter buckets gathered "
                     "during a forward pass: {}\n",
                     rank, t.grad_sync()->started_early(), t.grad_sync()->gathered_in_forward());
  const char* kind[2] = {"dense", "routed"};
  auto check = [&](const char* what, auto bytes_of_piece, double bytes_per_element) {
    double held[2] = {0, 0}, whole[2] = {0, 0};  // dense, routed
    for (size_t i = 0; i < opt.pieces().size(); ++i)
      held[roles[opt.pieces()[i].param].routed() ? 1 : 0] += bytes_of_piece(i);
    for (const auto& r : roles) whole[r.routed() ? 1 : 0] += bytes_per_element * static_cast<double>(r.tensor.numel());
    for (int k = 0; k < 2; ++k) {
      if (whole[k] == 0) continue;
      const double ratio = held[k] / whole[k];
      f << fmt::format("rank {} {} {}: {:.0f} of {:.0f} bytes = {:.4f} (expected {:.4f})\n", rank, kind[k], what,
                       held[k], whole[k], ratio, expect[k]);
      if (std::abs(ratio / expect[k] - 1.0) > 0.05)
        throw std::runtime_error(fmt::format("rank {}: {} {} are {:.4f} of the whole, expected {:.4f} ±5%", rank,
                                             kind[k], what, ratio, expect[k]));
    }
  };
  check("moments", [&](size_t i) { return static_cast<double>(opt.exp_avg(i).nbytes() + opt.exp_avg_sq(i).nbytes()); },
        2.0 * static_cast<double>(opt.exp_avg(0).element_size()));
  if (!opt.has_master()) return;
  check("master weights", [&](size_t i) { return static_cast<double>(opt.master(i).nbytes()); }, 4.0);
  // Each parameter holds its master weights rounded to its dtype (the slices of this rank's pieces here).
  for (size_t i = 0; i < opt.pieces().size(); ++i) {
    const auto& p = opt.params()[opt.pieces()[i].param];
    const at::Tensor v = parallel::piece_view(p.param, p.name, opt.pieces()[i]);
    if (!at::equal(v, opt.master(i).reshape({-1}).to(v.scalar_type())))
      throw std::runtime_error(fmt::format("rank {}: parameter {} is not its master weights rounded to {}", rank,
                                           p.name, c10::toString(v.scalar_type())));
  }
}

}  // namespace

int main(int argc, char** argv) {
  moetrain::checkpoints::start_hdf5_without_teardown();  // before MPI_Init (checkpoints/hdf5_file.h)
  parallel::MpiRuntime mpi(&argc, &argv);
  CLI::App app{"parallel equivalence test program"};
  std::string file, out, ref_dir;
  std::vector<std::string> overrides, cmp;
  int64_t steps = 10;
  std::vector<int64_t> starve;
  app.add_option("--config", file);
  cli::add_set_option(&app, overrides);
  app.add_option("--steps", steps);
  app.add_option("--out", out);
  app.add_option("--starve-expert", starve)->expected(1)->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--compare", cmp)->expected(2);
  std::optional<std::string> error;
  try {
    app.parse(argc, argv);
    if (!cmp.empty()) {
      int rc = compare(cmp[0], cmp[1]);
      if (rc) error = "mismatch";
      return mpi.finish(error);
    }
    config::Config c = config::load_config(file, {overrides, mpi.active() ? mpi.size() : 0});
    std::unique_ptr<parallel::ProcessGroups> groups;
    if (mpi.active()) groups = std::make_unique<parallel::ProcessGroups>(parallel::ProcessGroups::create(c.parallel, parallel::Backend::kMpi));
    trainer::Trainer t(c, groups.get(), "", false);
    {
      at::NoGradGuard g;
      for (auto& item : t.model()->named_buffers())
        if (item.key().find("router.bias") != std::string::npos)
          for (int64_t e : starve) item.value()[e] = -1e9f;
    }
    fs::create_directories(out);
    std::ofstream losses;
    if (mpi.rank() == 0) losses.open(fs::path(out) / "losses.txt");
    for (int64_t s = 0; s < steps; ++s) {
      trainer::StepResult r = t.step();
      if (losses.is_open()) losses << fmt::format("{:.17g}\n", r.loss);
      for (int64_t e : starve)
        for (auto& item : t.model()->named_parameters())
          if (item.key().find(fmt::format(".experts.{}.", e)) != std::string::npos && item.value().grad().defined() &&
              item.value().grad().abs().max().item<double>() != 0.0)
            throw std::runtime_error(fmt::format("starved expert parameter {} has a non-zero gradient", item.key()));
    }
    // evaluate() first: with parallel.overlap_param_gather its forward pass finishes the last step's gathers.
    trainer::EvalResult e = t.evaluate();
    check_optimizer_shards(t, c, mpi.rank(), fs::path(out));
    if (losses.is_open()) losses << fmt::format("{:.17g}\n", e.loss);
    std::ofstream params(fs::path(out) / fmt::format("params.{}.bin", mpi.rank()), std::ios::binary);
    for (auto& item : t.model()->named_parameters()) {
      at::Tensor v = item.value().detach().to(at::kDouble).contiguous().view({-1});
      uint64_t len = item.key().size(), n = static_cast<uint64_t>(v.numel());
      params.write(reinterpret_cast<const char*>(&len), sizeof(len));
      params.write(item.key().data(), static_cast<std::streamsize>(len));
      params.write(reinterpret_cast<const char*>(&n), sizeof(n));
      params.write(reinterpret_cast<const char*>(v.data_ptr<double>()), static_cast<std::streamsize>(n * sizeof(double)));
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  return mpi.finish(error);
}
