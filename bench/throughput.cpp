// bench/throughput: training speed on this machine, figures measured in the same run.
//  1. moetrain against the transformers peer (bench/gpu_peer.py: DeepseekV3ForCausalLM trained eagerly from
//     Python, grouped expert GEMMs, SDPA attention, AdamW) on the same model shape, batch (with more than one
//     micro-batch per step the peer accumulates gradients over as many), sequence length and thread count, MTP off,
//     one process each: rounds alternate moetrain and the peer; the tokens/s of every round, the medians, their
//     ratio, and the MFU of both against one peak measured here (an FP32 matmul).
//  2. moetrain alone on other layouts (default dp 2 and pp 2 × dp 2 × ep 2), each launched here with
//     launch/mpirun.sh: tokens/s and, per rank, the fraction of the step its host spent blocked on collectives.
//
//   bench_throughput [--config configs/small-cpu.yaml] [--rounds 3] [--steps 20] [--warmup 3] [--threads 2]
//                    [--skip-peer] [--layouts dp2,pp2-dp2-ep2|none] [--python PATH] [--set k=v ...]
// Under mpirun (as part 2 starts it) it trains the launched layout and prints part 2's table.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <mpi.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bench/timing.h"
#include "cli/cli.h"
#include "config/loader.h"
#include "parallel/mpi_runtime.h"
#include "parallel/process_groups.h"
#include "trainer/metrics.h"
#include "trainer/train.h"

using namespace moetrain;
using bench::Clock;
using bench::median;
using bench::since;

namespace {

struct Options {
  std::string config = std::string(MOETRAIN_SOURCE_DIR) + "/configs/small-cpu.yaml";
  int rounds = 3, steps = 20, warmup = 3, threads = 2;
  bool skip_peer = false;
  std::vector<std::string> layouts{"dp2", "pp2-dp2-ep2"}, sets;
  std::string python = std::string(MOETRAIN_TORCH_PYTHON).empty() ? "python3" : MOETRAIN_TORCH_PYTHON;
};

struct Round {
  double tokens_per_s = 0, mfu = 0;
};

// The overrides of part 1: MTP off, the thread count, the peak measured once.
config::Config single_process_config(const Options& o, double peak) {
  std::vector<std::string> sets{"model.mtp_depth=0", fmt::format("parallel.intra_op_threads={}", o.threads),
                                fmt::format("train.peak_flops={}", peak)};
  sets.insert(sets.end(), o.sets.begin(), o.sets.end());
  config::Config c = config::load_config(o.config, {sets, 1});
  if (c.model.mtp_depth != 0) throw std::runtime_error("the peer has no MTP: keep model.mtp_depth=0");
  return c;
}

Round run_moetrain(const config::Config& c, const Options& o) {
  trainer::Trainer t(c, nullptr, "", false);
  for (int i = 0; i < o.warmup; ++i) t.step();
  double mfu_per_tps = 0;
  const auto t0 = Clock::now();
  for (int i = 0; i < o.steps; ++i) {
    const trainer::StepResult r = t.step();
    mfu_per_tps = r.mfu / r.tokens_per_s;
  }
  const double tps = static_cast<double>(o.steps * c.train.global_batch_size * c.train.seq_len) / since(t0);
  return {tps, tps * mfu_per_tps};
}

// One run of the peer on the config's shape; its result JSON (the last line it prints).
nlohmann::json run_peer(const config::Config& c, const Options& o, double peak) {
  const auto& m = c.model;
  const std::string json_path = fmt::format("/tmp/bench_throughput_peer_{}.json", getpid());
  const std::string cmd = fmt::format(
      "OMP_NUM_THREADS={0} '{1}' '{2}/bench/gpu_peer.py' --device cpu --dtype fp32 --threads {0} --layers {3} "
      "--dense-layers {4} --experts {5} --top-k {6} --shared {7} --hidden {8} --heads {9} --q-lora-rank {10} "
      "--kv-lora-rank {11} --qk-nope-dim {12} --qk-rope-dim {13} --v-head-dim {14} --moe-inter {15} --inter {16} "
      "--vocab {17} --seq {18} --micro-batch {19} --accumulate {24} --steps {20} --warmup {21} --peak-tflops {22} "
      "--json '{23}' > /dev/null 2>&1",
      o.threads, o.python, MOETRAIN_SOURCE_DIR, m.num_layers, m.n_dense_layers, m.n_routed_experts, m.top_k,
      m.n_shared_experts, m.hidden_size, m.num_heads, m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim,
      m.qk_rope_head_dim, m.v_head_dim, m.moe_inter_dim, m.dense_inter_dim, m.vocab_size, c.train.seq_len,
      c.train.micro_batch_size, o.steps, o.warmup, peak / 1e12, json_path, c.train.micro_batches);
  const int rc = std::system(cmd.c_str());
  std::ifstream in(json_path);
  std::string line;
  if (rc != 0 || !std::getline(in, line))
    throw std::runtime_error(fmt::format("the peer failed (exit status {}); run it alone to see why: {}", rc, cmd));
  std::remove(json_path.c_str());
  return nlohmann::json::parse(line);
}

void part_one(const Options& o) {
  at::set_num_threads(o.threads);
  const double peak = trainer::measure_peak_flops(c10::Device(c10::kCPU), at::kFloat);
  const config::Config c = single_process_config(o, peak);
  const auto& m = c.model;
  fmt::print("part 1: one process, {} threads, {} ({} layers, hidden {}, {} routed experts top-{}, MTP off), batch {} "
             "× {} tokens; {} warm-up + {} timed steps per run; peak {:.1f} GFLOP/s (FP32 matmul, measured here)\n",
             o.threads, o.config, m.num_layers, m.hidden_size, m.n_routed_experts, m.top_k,
             c.train.global_batch_size, c.train.seq_len, o.warmup, o.steps, peak / 1e9);
  std::vector<double> ours, peers, our_mfu, peer_mfu;
  std::string peer_name;
  for (int r = 0; r < o.rounds; ++r) {
    const Round mine = run_moetrain(c, o);
    ours.push_back(mine.tokens_per_s), our_mfu.push_back(mine.mfu);
    std::string peer_text = "skipped";
    if (!o.skip_peer) {
      const nlohmann::json p = run_peer(c, o, peak);
      peer_name = p.value("peer", "");
      peers.push_back(p.at("tokens_per_s").get<double>());
      // MFU by moetrain's FLOPs per token, so that both count the same model work.
      peer_mfu.push_back(peers.back() * mine.mfu / mine.tokens_per_s);
      peer_text = fmt::format("{:.0f} tokens/s (MFU {:.1f}%)", peers.back(), 100 * peer_mfu.back());
    }
    fmt::print("  round {}: moetrain {:.0f} tokens/s (MFU {:.1f}%) | peer {}\n", r + 1, mine.tokens_per_s,
               100 * mine.mfu, peer_text);
  }
  fmt::print("moetrain: median {:.0f} tokens/s, MFU {:.1f}%\n", median(ours), 100 * median(our_mfu));
  if (!peers.empty()) {
    fmt::print("peer ({}): median {:.0f} tokens/s, MFU {:.1f}%\n", peer_name, median(peers), 100 * median(peer_mfu));
    fmt::print("ratio moetrain / peer (medians): {:.2f}x\n", median(ours) / median(peers));
  }
}

// "pp2-dp2-ep2" -> the --set overrides and the rank count.
std::pair<std::vector<std::string>, int> parse_layout(const std::string& layout) {
  std::vector<std::string> sets;
  int64_t pp = 1, dp = 1;
  std::stringstream ss(layout);
  std::string part;
  while (std::getline(ss, part, '-')) {
    size_t digits = part.find_first_of("0123456789");
    const std::string key = part.substr(0, digits);
    if (digits == std::string::npos || (key != "pp" && key != "dp" && key != "ep"))
      throw std::runtime_error(fmt::format("layout '{}': '{}' is not ppN, dpN or epN", layout, part));
    const int64_t n = std::stoll(part.substr(digits));
    if (key == "pp") pp = n;
    if (key == "dp") dp = n;
    sets.push_back(fmt::format("parallel.{}={}", key, n));
  }
  return {sets, static_cast<int>(pp * dp)};
}

int64_t layout_pp(const std::vector<std::string>& sets) {
  for (const auto& s : sets)
    if (s.rfind("parallel.pp=", 0) == 0) return std::stoll(s.substr(12));
  return 1;
}

void part_two(const Options& o, char* self) {
  for (const std::string& layout : o.layouts) {
    const auto [sets, ranks] = parse_layout(layout);
    std::string cmd = fmt::format("'{}/launch/mpirun.sh' -np {} -- '{}' --config '{}' --steps {} --warmup {}",
                                  MOETRAIN_SOURCE_DIR, ranks, self, o.config, o.steps, o.warmup);
    for (const auto& s : sets) cmd += " --set " + s;
    // The same global batch split over the replicas; with pipeline stages, micro-batches of one sequence.
    const config::Config base = config::load_config(o.config, {o.sets, 1});
    const int64_t per_replica = base.train.global_batch_size / (ranks / layout_pp(sets));
    cmd += fmt::format(" --set train.micro_batch_size={}", layout_pp(sets) > 1 ? 1 : per_replica);
    for (const auto& s : o.sets) cmd += " --set '" + s + "'";
    std::fflush(stdout);
    if (const int rc = std::system(cmd.c_str()); rc != 0)
      throw std::runtime_error(fmt::format("layout {} failed (exit status {}): {}", layout, rc, cmd));
  }
}

// Under mpirun: train the launched layout; rank 0 prints tokens/s and each rank's communication wait.
void ranks_part(const Options& o, int world) {
  config::Config c = config::load_config(o.config, {o.sets, world});
  auto groups = std::make_unique<parallel::ProcessGroups>(
      parallel::ProcessGroups::create(c.parallel, parallel::Backend::kMpi));
  trainer::Trainer t(c, groups.get(), "", false);
  for (int i = 0; i < o.warmup; ++i) t.step();
  double step_s = 0, wait_s = 0;
  std::vector<double> tps;
  for (int i = 0; i < o.steps; ++i) {
    const trainer::StepResult r = t.step();
    step_s += r.step_time_s, wait_s += r.comm_wait_s;
    tps.push_back(r.tokens_per_s);
  }
  std::vector<double> mine{step_s, wait_s}, all(2 * static_cast<size_t>(world));
  MPI_Gather(mine.data(), 2, MPI_DOUBLE, all.data(), 2, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  if (groups->rank != 0) return;
  const auto& p = c.parallel;
  std::string fractions;
  double worst = 0, sum = 0, least = 1, busy_max = 0, busy_min = 1e300;
  for (int r = 0; r < world; ++r) {
    const double f = all[2 * r + 1] / all[2 * r], busy = all[2 * r] - all[2 * r + 1];
    fractions += fmt::format("{}{:.3f}", r ? " " : "", f);
    worst = std::max(worst, f), least = std::min(least, f), sum += f;
    busy_max = std::max(busy_max, busy), busy_min = std::min(busy_min, busy);
  }
  // Ranks of one synchronous step wait for the slowest: a rank that computed faster (its core less loaded by the
  // machine's other work) waits the difference. The least wait is what no such difference explains.
  fmt::print("part 2: pp {} × dp {} (ep {}), {} ranks on this machine, {} intra-op thread(s) each, {} micro-batch(es), "
             "{} timed steps: median {:.0f} tokens/s; communication wait (share of step time) per rank: {} — mean "
             "{:.3f}, worst {:.3f}, least {:.3f}; time not waiting, slowest rank / fastest: {:.3f}\n",
             p.pp, p.dp, p.ep, world, p.intra_op_threads, c.train.micro_batches, o.steps, median(tps), fractions,
             sum / world, worst, least, busy_max / busy_min);
}

}  // namespace

int main(int argc, char** argv) {
  parallel::MpiRuntime mpi(&argc, &argv);
  CLI::App app{"moetrain against the transformers peer on the CPU; tokens/s, MFU and communication wait"};
  Options o;
  std::string layouts = "dp2,pp2-dp2-ep2";
  app.add_option("--config", o.config);
  app.add_option("--rounds", o.rounds, "Alternating rounds of moetrain and the peer (0: part 2 only)");
  app.add_option("--steps", o.steps, "Timed steps per run");
  app.add_option("--warmup", o.warmup, "Untimed steps first");
  app.add_option("--threads", o.threads, "Intra-op threads of both (part 1)");
  app.add_flag("--skip-peer", o.skip_peer);
  app.add_option("--layouts", layouts, "Part 2's layouts, comma-separated (ppN-dpN-epN), or none");
  app.add_option("--python", o.python, "The Python with torch and transformers (the setup script's)");
  cli::add_set_option(&app, o.sets);
  std::optional<std::string> error;
  try {
    app.parse(argc, argv);
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    o.layouts.clear();
    std::stringstream ss(layouts);
    for (std::string l; std::getline(ss, l, ',');)
      if (!l.empty() && l != "none") o.layouts.push_back(l);
    if (mpi.active()) {
      ranks_part(o, mpi.size());
    } else {
      if (o.rounds > 0) part_one(o);
      part_two(o, argv[0]);
    }
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    error = e.what();
  }
  return mpi.finish(error);
}
