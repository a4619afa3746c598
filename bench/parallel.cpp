// bench/parallel: trains a few steps of a config on the launched layout and prints, per group, the bytes each
// collective moved on this job next to the theoretical volume, and the bubble fraction of the executed pipeline
// schedule (each rank's pass order replayed in unit time) next to its formula, with the schedule drawn. With
// --schedules it does so for each listed schedule on the same layout and batch, then compares them: bubble,
// formula, median step time and its ratio to 1F1B's, measured in this run.
//
//   launch/mpirun.sh -np 8 -- build/bin/bench_parallel [--config configs/tiny.yaml] [--steps 3] [--set k=v ...]
//                                [--schedules 1f1b,interleaved,dualpipev,dualpipev-sequential] [--virtual-stages 2]
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <mpi.h>

#include <map>
#include <optional>
#include <sstream>

#include "bench/timing.h"
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

// Rank 0 receives each stage's schedule trace from that stage's first rank (pass names joined by spaces).
std::vector<parallel::ScheduleTrace> gather_traces(const parallel::ProcessGroups& g,
                                                   const parallel::ScheduleTrace& mine) {
  const int64_t pp = g.topology.layout().pp;
  std::vector<parallel::ScheduleTrace> out(static_cast<size_t>(pp));
  std::string encoded;
  for (const auto& op : mine) encoded += (encoded.empty() ? "" : " ") + op;
  for (int64_t s = 0; s < pp; ++s) {
    const int src = static_cast<int>(g.topology.rank(s, 0, 0));
    std::string buf;
    if (g.rank == src) buf = encoded;
    int n = static_cast<int>(buf.size());
    if (src != 0) {
      if (g.rank == src) MPI_Send(&n, 1, MPI_INT, 0, 7, MPI_COMM_WORLD);
      if (g.rank == 0) MPI_Recv(&n, 1, MPI_INT, src, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      if (g.rank == 0) buf.resize(static_cast<size_t>(n));
      if (g.rank == src) MPI_Send(buf.data(), n, MPI_CHAR, 0, 8, MPI_COMM_WORLD);
      if (g.rank == 0) MPI_Recv(buf.data(), n, MPI_CHAR, src, 8, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
    if (g.rank == 0) {
      std::istringstream in(buf);
      for (std::string op; in >> op;) out[static_cast<size_t>(s)].push_back(op);
    }
  }
  return out;
}

struct Row {
  std::string group, op;
  double measured, theory;
};

// One schedule measured on the launched layout.
struct Measured {
  std::string schedule;
  std::vector<Row> rows;
  std::vector<parallel::ScheduleTrace> traces;  // rank 0 only
  double step_s = 0;                            // median over the measured steps (slowest rank's each)
};

Measured measure(const config::Config& c, parallel::ProcessGroups& groups, int64_t steps) {
  trainer::Trainer t(c, &groups, "", false);
  t.step();  // warm-up step, not counted
  for (auto* comm : {groups.pp.get(), groups.dp.get(), groups.ep.get(), groups.edp.get(), groups.embedding.get()})
    if (comm) comm->reset_stats();
  for (auto& [key, comm] : groups.pp_channels) comm->reset_stats();
  std::vector<double> times;
  for (int64_t s = 0; s < steps; ++s) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = bench::Clock::now();
    t.step();
    double dt = bench::since(t0), slowest = 0;
    MPI_Allreduce(&dt, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    times.push_back(slowest);
  }

  const auto& m = c.model;
  const auto& p = c.parallel;
  const double tokens_per_rank_step =
      static_cast<double>(c.train.micro_batch_size * c.train.micro_batches * c.train.seq_len);
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
  // Each chunk sends its activations on (but the model's last virtual stage) and its input's gradient back (but the
  // first), unless the next (previous) virtual stage is on this rank (the bottom of DualPipeV's V).
  const auto where = parallel::VirtualStages::from(p);
  double boundaries = 0;
  for (int64_t chunk = 0; chunk < p.virtual_stages; ++chunk) {
    const int64_t j = where.of(groups.coords.pp, chunk);
    if (j < where.count() - 1 && where.home(j + 1).first != groups.coords.pp) boundaries += 1;
    if (j > 0 && where.home(j - 1).first != groups.coords.pp) boundaries += 1;
  }
  const double pp_theory = p.pp > 1 ? act * boundaries : 0.0;
  const bool embedding_group = groups.embedding && groups.embedding->size() > 1;

  Measured out;
  out.schedule = std::string(config::name(p.schedule));
  auto add = [&](parallel::Communicator* comm, const char* op, double theory) {
    double bytes = 0;
    if (comm && comm->size() > 1) {
      auto it = comm->stats().find(op);
      if (it != comm->stats().end()) bytes = static_cast<double>(it->second.bytes_sent);
    }
    out.rows.push_back(
        {comm ? comm->name() : "-", op, world_sum(bytes) / static_cast<double>(steps), world_sum(theory)});
  };
  add(groups.ep.get(), "all_to_all_v", ep_tokens + ep_counts);
  add(groups.dp.get(), "all_reduce", p.dp > 1 ? static_cast<double>(params) * 4.0 : 0.0);
  add(groups.edp.get(), "all_reduce", p.dp / p.ep > 1 ? static_cast<double>(expert_params) * 4.0 : 0.0);
  add(groups.embedding.get(), "all_reduce", embedding_group ? static_cast<double>(embed) * 4.0 : 0.0);
  // The pipeline's sends: over the pp group (1F1B) or the schedule's channels (interleaved, DualPipeV).
  double pp_bytes = 0;
  std::vector<parallel::Communicator*> pipeline{groups.pp.get()};
  for (auto& [key, comm] : groups.pp_channels) pipeline.push_back(comm.get());
  for (auto* comm : pipeline) {
    if (!comm) continue;
    auto it = comm->stats().find("send");
    if (it != comm->stats().end()) pp_bytes += static_cast<double>(it->second.bytes_sent);
  }
  out.rows.push_back({"pp", "send", world_sum(pp_bytes) / static_cast<double>(steps), world_sum(pp_theory)});
  out.traces = gather_traces(groups, t.schedule_trace());
  out.step_s = bench::median(times);
  return out;
}

// Every schedule replayed in the same units: a chunk's forward 1 slot, its full backward 2 (input and weight
// gradients, one GEMM each), a split backward's halves 1 each.
parallel::ReplayOptions replay_options(const config::Config& c) {
  return {c.parallel.schedule == config::Schedule::kDualPipeV, 1, 2, 1, 1};
}

const char* formula_name(const config::Config& c) {
  switch (c.parallel.schedule) {
    case config::Schedule::kDualPipeV: return "(pp−1)/(6m+pp−1)";
    case config::Schedule::kInterleaved: return "(pp−1)/(v·m+pp−1)";
    default: return "(pp−1)/(m+pp−1)";
  }
}

double theory(const config::Config& c) { return parallel::schedule_bubble(c.parallel, c.train.micro_batches); }

void print_measured(const Measured& r, const config::Config& c, int64_t steps) {
  const auto& p = c.parallel;
  fmt::print("layout pp {} × dp {} (ep {} × edp {}), schedule {}{}, {} micro-batches of {} × {} tokens, {} steps "
             "measured\n\n",
             p.pp, p.dp, p.ep, p.dp / p.ep, r.schedule,
             p.virtual_stages > 1 ? fmt::format(" ({} chunks per rank)", p.virtual_stages) : "", c.train.micro_batches,
             c.train.micro_batch_size, c.train.seq_len, steps);
  fmt::print("{:<10} {:<14} {:>18} {:>18} {:>8}\n", "group", "operation", "bytes/step (all)", "theoretical", "ratio");
  for (const auto& row : r.rows)
    fmt::print("{:<10} {:<14} {:>18.0f} {:>18.0f} {:>8}\n", row.group, row.op, row.measured, row.theory,
               row.theory > 0 ? fmt::format("{:.3f}", row.measured / row.theory) : "-");
  fmt::print("\n(ep theoretical: tokens·top_k·hidden·4 bytes·(ep−1)/ep per exchange, 4 exchanges per MoE layer and "
             "micro-batch, plus the split sizes; dp/edp: one all-reduce of the gradients; pp: one activation and "
             "one gradient per micro-batch and (virtual) stage boundary)\n");
  if (p.pp > 1) {
    const parallel::ReplayOptions replay = replay_options(c);
    fmt::print("{} bubble fraction: executed schedule {:.4f}, theory {} = {:.4f} (passes replayed with F = 1, B = 2, "
               "I = W = 1 slots)\n",
               r.schedule, parallel::bubble_fraction(r.traces, replay), formula_name(c), theory(c));
    fmt::print("the executed schedule, each stage's passes replayed (. idle):\n{}\n",
               parallel::draw_schedule(r.traces, replay));
  }
}

}  // namespace

int main(int argc, char** argv) {
  parallel::MpiRuntime mpi(&argc, &argv);
  CLI::App app{"Bytes per collective and the 1F1B bubble, measured on the launched layout"};
  std::string file = "configs/tiny.yaml";
  int64_t steps = 3, virtual_stages = 2;
  std::vector<std::string> overrides, schedules;
  app.add_option("--config", file);
  app.add_option("--steps", steps);
  app.add_option("--schedules", schedules, "schedules to compare on the launched layout (default: the config's)")
      ->delimiter(',');
  app.add_option("--virtual-stages", virtual_stages, "chunks per rank of the interleaved schedule in --schedules");
  cli::add_set_option(&app, overrides);
  std::optional<std::string> error;
  try {
    app.parse(argc, argv);
    if (!mpi.active()) throw std::runtime_error("run under mpirun (launch/mpirun.sh -np N -- ...)");
    // A schedule's name: 1f1b, interleaved, dualpipev, or dualpipev-sequential (its chunk pairs not overlapped).
    auto load = [&](const std::string& name) {
      std::vector<std::string> sets = overrides;
      const bool sequential = name == "dualpipev-sequential";
      const std::string schedule = sequential ? "dualpipev" : name;
      if (!schedule.empty())
        sets.insert(sets.end(), {"parallel.schedule=" + schedule,
                                 fmt::format("parallel.virtual_stages={}", schedule == "interleaved" ? virtual_stages
                                                                           : schedule == "dualpipev"  ? 2
                                                                                                      : 1)});
      if (sequential) sets.push_back("parallel.overlap_chunk_pairs=false");
      return config::load_config(file, {sets, mpi.size()});
    };
    if (schedules.empty()) schedules.push_back("");
    const config::Config base = load(schedules.front());
    std::vector<Measured> results;
    for (const auto& schedule : schedules) {
      const config::Config c = load(schedule);
      // Per schedule: DualPipeV's embedding group differs (the head is on pipeline rank 0).
      auto groups = std::make_unique<parallel::ProcessGroups>(
          parallel::ProcessGroups::create(c.parallel, parallel::Backend::kMpi));
      results.push_back(measure(c, *groups, steps));
      if (!schedule.empty()) results.back().schedule = schedule;
      if (mpi.rank() == 0) print_measured(results.back(), c, steps);
    }
    if (mpi.rank() == 0 && results.size() > 1 && base.parallel.pp > 1) {
      const double reference = results.front().step_s;
      fmt::print("schedules on this layout ({} micro-batches, median step time of {} steps, ratio to {}):\n",
                 base.train.micro_batches, steps, results.front().schedule);
      fmt::print("{:<22} {:>10} {:>10} {:>12} {:>8}\n", "schedule", "bubble", "theory", "step (s)", "ratio");
      for (size_t i = 0; i < results.size(); ++i) {
        const config::Config c = load(schedules[i]);
        fmt::print("{:<22} {:>10.4f} {:>10.4f} {:>12.4f} {:>8.3f}\n", results[i].schedule,
                   parallel::bubble_fraction(results[i].traces, replay_options(c)), theory(c), results[i].step_s,
                   results[i].step_s / reference);
      }
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  return mpi.finish(error);
}
