// bench/parallel: trains a few steps of a config on the launched layout and prints, per group, the bytes each
// collective moved on this job next to the theoretical volume, and the 1F1B bubble fraction of the executed
// schedule next to (pp − 1)/(m + pp − 1). Counts, not CPU times.
//
//   launch/mpirun.sh -np 8 -- build/bin/bench_parallel [--config configs/tiny.yaml] [--steps 3] [--set k=v ...]
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <mpi.h>

#include <map>
#include <optional>

#include "config/loader.h"
#include "cli/cli.h"
#include "parallel/mpi_runtime.h"
#include "parallel/pipeline.h"
#include "parallel/process_groups.h"
#include "trainer/train.h"

using namespace moetrain;

namespace {

// Sums a value over the world (as double).
double world_sum(double v) {
  double out = 0;
  MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return out;
}

// Rank 0 receives each stage's schedule trace from that stage's first rank.
std::vector<parallel::ScheduleTrace> gather_traces(const parallel::ProcessGroups& g, const parallel::ScheduleTrace& mine) {
  const int64_t pp = g.topology.layout().pp;
  std::vector<parallel::ScheduleTrace> out(static_cast<size_t>(pp));
  std::vector<int> encoded;
  for (const auto& op : mine) encoded.push_back((op[0] == 'F' ? 1 : -1) * (std::stoi(op.substr(1)) + 1));
  for (int64_t s = 0; s < pp; ++s) {
    const int src = static_cast<int>(g.topology.rank(s, 0, 0));
    std::vector<int> buf;
    if (g.rank == src) buf = encoded;
    int n = static_cast<int>(buf.size());
    if (src != 0) {
      if (g.rank == src) MPI_Send(&n, 1, MPI_INT, 0, 7, MPI_COMM_WORLD);
      if (g.rank == 0) MPI_Recv(&n, 1, MPI_INT, src, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      if (g.rank == 0) buf.resize(static_cast<size_t>(n));
      if (g.rank == src) MPI_Send(buf.data(), n, MPI_INT, 0, 8, MPI_COMM_WORLD);
      if (g.rank == 0) MPI_Recv(buf.data(), n, MPI_INT, src, 8, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
    if (g.rank == 0)
      for (int v : buf) out[static_cast<size_t>(s)].push_back(fmt::format("{}{}", v > 0 ? 'F' : 'B', std::abs(v) - 1));
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  parallel::MpiRuntime mpi(&argc, &argv);
  CLI::App app{"Bytes per collective and the 1F1B bubble, measured on the launched layout"};
  std::string file = "configs/tiny.yaml";
  int64_t steps = 3;
  std::vector<std::string> overrides;
  app.add_option("--config", file);
  app.add_option("--steps", steps);
  cli::add_set_option(&app, overrides);
  std::optional<std::string> error;
  try {
    app.parse(argc, argv);
    if (!mpi.active()) throw std::runtime_error("run under mpirun (launch/mpirun.sh -np N -- ...)");
    config::Config c = config::load_config(file, {overrides, mpi.size()});
    auto groups = std::make_unique<parallel::ProcessGroups>(
        parallel::ProcessGroups::create(c.parallel, parallel::Backend::kMpi));
    trainer::Trainer t(c, groups.get(), "", false);
    t.step();  // warm-up step, not counted
    for (auto* comm : {groups->pp.get(), groups->dp.get(), groups->ep.get(), groups->edp.get(),
                       groups->embedding.get()})
      if (comm) comm->reset_stats();
    for (int64_t s = 0; s < steps; ++s) t.step();

    const auto& m = c.model;
    const auto& p = c.parallel;
    const double tokens_per_rank_step = static_cast<double>(c.train.micro_batch_size * c.train.micro_batches * c.train.seq_len);
    // MoE layers on each stage: every exchange moves top_k copies of each token's hidden state.
    int64_t local_moe = 0;
    for (auto& b : t.model()->layers) local_moe += b->moe ? 1 : 0;
    for (auto& k : t.model()->mtp) local_moe += k->block->moe ? 1 : 0;
    const double ep_tokens = p.ep > 1 ? static_cast<double>(local_moe) * 4.0 /* dispatch, combine, and both backward */ *
                                            tokens_per_rank_step * static_cast<double>(m.top_k) *
                                            static_cast<double>(m.hidden_size) * 4.0 *
                                            static_cast<double>(p.ep - 1) / static_cast<double>(p.ep)
                                      : 0.0;
    const double ep_counts = p.ep > 1 ? static_cast<double>(local_moe) * static_cast<double>(c.train.micro_batches) *
                                            static_cast<double>(m.n_routed_experts) * 8.0 *
                                            static_cast<double>(p.ep - 1) / static_cast<double>(p.ep)
                                      : 0.0;
    int64_t params = 0, expert_params = 0, embed = 0;
    for (auto& item : t.model()->named_parameters()) {
      (item.key().find(".experts.") != std::string::npos ? expert_params : params) += item.value().numel();
      if (item.key() == "embed.weight") embed += item.value().numel();
    }
    const double act = static_cast<double>(c.train.micro_batch_size * c.train.seq_len * m.hidden_size) * 4.0 *
                       static_cast<double>(c.train.micro_batches);
    const bool first = groups->coords.pp == 0, last = groups->coords.pp == p.pp - 1;
    const double pp_theory = p.pp > 1 ? act * ((last ? 0 : 1) + (first ? 0 : 1)) : 0.0;

    struct Row {
      std::string group, op;
      double measured, theory;
    };
    std::vector<Row> rows;
    auto add = [&](parallel::Communicator* comm, const char* op, double theory) {
      double bytes = 0;
      if (comm && comm->size() > 1) {
        auto it = comm->stats().find(op);
        if (it != comm->stats().end()) bytes = static_cast<double>(it->second.bytes_sent);
      }
      rows.push_back({comm ? comm->name() : "-", op, world_sum(bytes) / steps, world_sum(theory)});
    };
    add(groups->ep.get(), "all_to_all_v", ep_tokens + ep_counts);
    add(groups->dp.get(), "all_reduce", p.dp > 1 ? static_cast<double>(params) * 4.0 : 0.0);
    add(groups->edp.get(), "all_reduce", p.dp / p.ep > 1 ? static_cast<double>(expert_params) * 4.0 : 0.0);
    add(groups->embedding.get(), "all_reduce", p.pp > 1 && (first || last) ? static_cast<double>(embed) * 4.0 : 0.0);
    add(groups->pp.get(), "send", pp_theory);

    auto traces = gather_traces(*groups, t.schedule_trace());
    if (mpi.rank() == 0) {
      fmt::print("layout pp {} × dp {} (ep {} × edp {}), {} micro-batches of {} × {} tokens, {} steps measured\n\n",
                 p.pp, p.dp, p.ep, p.dp / p.ep, c.train.micro_batches, c.train.micro_batch_size, c.train.seq_len, steps);
      fmt::print("{:<10} {:<14} {:>18} {:>18} {:>8}\n", "group", "operation", "bytes/step (all)", "theoretical", "ratio");
      for (const auto& r : rows)
        fmt::print("{:<10} {:<14} {:>18.0f} {:>18.0f} {:>8}\n", r.group, r.op, r.measured, r.theory,
                   r.theory > 0 ? fmt::format("{:.3f}", r.measured / r.theory) : "-");
      fmt::print("\n(ep theoretical: tokens·top_k·hidden·4 bytes·(ep−1)/ep per exchange, 4 exchanges per MoE layer and "
                 "micro-batch, plus the split sizes; dp/edp: one all-reduce of the gradients; pp: one activation and "
                 "one gradient per micro-batch and stage boundary)\n");
      if (p.pp > 1) {
        fmt::print("1F1B bubble fraction: executed schedule {:.4f}, theory (pp−1)/(m+pp−1) = {:.4f}\n",
                   parallel::bubble_fraction(traces), parallel::one_f_one_b_bubble(p.pp, c.train.micro_batches));
        fmt::print("the executed schedule, each stage's passes replayed in unit time (. idle):\n{}",
                   parallel::draw_schedule(traces));
      }
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  return mpi.finish(error);
}
