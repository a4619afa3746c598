#include "trainer/train.h"

#include <ATen/Parallel.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <torch/cuda.h>
#include <xxhash.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <atomic>
#include <thread>
#include <cstdlib>
#include <filesystem>
#include <csignal>
#include <map>
#include <optional>

#include "checkpoints/checkpoint.h"
#include "configs/loader.h"
#include "model/balancer.h"
#include "model/model_spec.h"
#include "parallel/expert_exchange.h"
#include "parallel/topology.h"
#include "precision/policy.h"
#include "trainer/lr_schedule.h"

namespace moetrain::trainer {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A routed expert's tensor ("layers.3.moe.experts.12.w_up") is saved as row 12 of one tensor per layer and kind
// ("layers.3.moe.experts.w_up", [n_routed_experts, ...]), the way Megatron-Core and torchtitan store grouped
// experts: a few large datasets, each EP rank writing its experts' rows, instead of thousands of small ones.
// Returns the stacked name and the row, or nothing for a tensor that is not a routed expert's.
std::optional<std::pair<std::string, int64_t>> expert_row(const std::string& name) {
  const std::string key = ".experts.";
  const size_t at = name.find(key);
  if (at == std::string::npos) return std::nullopt;
  size_t end = at + key.size();
  while (end < name.size() && std::isdigit(static_cast<unsigned char>(name[end]))) ++end;
  if (end == at + key.size() || end >= name.size() || name[end] != '.') return std::nullopt;
  return std::make_pair(name.substr(0, at + key.size() - 1) + name.substr(end),
                        std::stoll(name.substr(at + key.size(), end - at - key.size())));
}

// checkpoint.save_on_signal: the handler only records the signal; the training loop agrees on it across ranks at
// the end of each step, saves and stops.
std::atomic<int> stop_signal{0};
extern "C" void record_stop_signal(int sig) { stop_signal.store(sig); }

// Installs the SIGTERM and SIGUSR1 handlers for one run() and restores the previous ones after. A repeated signal
// (Slurm and mpirun may both forward one) changes nothing; SIGINT and SIGKILL still end the process at once.
class StopSignals {
 public:
  explicit StopSignals(bool on) : on_(on) {
    if (!on_) return;
    stop_signal.store(0);
    struct sigaction sa = {};
    sa.sa_handler = record_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, &old_term_);
    sigaction(SIGUSR1, &sa, &old_usr1_);
  }
  ~StopSignals() {
    if (!on_) return;
    sigaction(SIGTERM, &old_term_, nullptr);
    sigaction(SIGUSR1, &old_usr1_, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  bool on_;
  struct sigaction old_term_ = {}, old_usr1_ = {};
};

// Test-only fault injection: MOETRAIN_TEST_FAIL_STEP=k [MOETRAIN_TEST_FAIL_RANK=r] makes rank r throw at step k.
void maybe_inject_failure(int64_t step, int64_t rank) {
  const char* at_step = std::getenv("MOETRAIN_TEST_FAIL_STEP");
  if (!at_step || std::atoll(at_step) != step) return;
  const char* on_rank = std::getenv("MOETRAIN_TEST_FAIL_RANK");
  if (on_rank && std::atoll(on_rank) != rank) return;
  throw std::runtime_error(fmt::format("injected failure at step {} on rank {} (MOETRAIN_TEST_FAIL_STEP)", step, rank));
}

}  // namespace

// Sums over one step's micro-batches on this rank.
struct Trainer::Accumulator {
  at::Tensor sums;                // [lm, mtp, balance] in FP64 on the model's device: read once per step
  std::vector<at::Tensor> loads;  // per local MoE layer
};

double measure_peak_flops() {
  const int64_t n = 512;
  at::Tensor a = at::randn({n, n}), b = at::randn({n, n});
  at::mm(a, b);  // warm-up
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    auto t0 = Clock::now();
    at::Tensor c = at::mm(a, b);
    double dt = seconds_since(t0);
    if (dt > 0) best = std::max(best, 2.0 * static_cast<double>(n * n * n) / dt);
  }
  return best;
}

struct Trainer::PendingSave {
  checkpoints::SaveRequest request;
  checkpoints::ShardResult result;
  std::thread writer;
  std::atomic<bool> written{false};
  std::vector<at::Tensor> snapshots;  // the host copies, in the order they were taken: the next save's buffers
};

Trainer::Trainer(const config::Config& config, parallel::ProcessGroups* groups, std::string run_dir, bool main,
                 const std::string& resume)
    : c_(config), groups_(groups), run_dir_(std::move(run_dir)), verbose_(main) {
  const auto& m = c_.model;
  if (!groups_ && c_.parallel.world_size != 1)
    throw std::runtime_error(fmt::format("{}the layout pp {} × dp {} needs {} ranks: launch with mpirun -np {}",
                                         c_.where("parallel.pp"), c_.parallel.pp, c_.parallel.dp,
                                         c_.parallel.world_size, c_.parallel.world_size));
  at::set_num_threads(static_cast<int>(c_.parallel.intra_op_threads));
  if (c_.train.device == "cuda") {
    if (!torch::cuda::is_available())
      throw std::runtime_error(fmt::format("{}train.device = cuda but no CUDA device is visible",
                                           c_.where("train.device")));
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    const int64_t local_rank = local ? std::atoll(local) : (groups_ ? groups_->rank : 0);
    device_ = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank % torch::cuda::device_count()));
  }

  // Ranks started with different configs would compute different things and hang in mismatched collectives.
  config_yaml_ = config::to_yaml(c_);  // also every checkpoint's record of the config
  if (groups_) {
    const std::string& yaml = config_yaml_;
    at::Tensor h = at::zeros({2}, at::kLong);
    const auto hash = static_cast<int64_t>(XXH64(yaml.data(), yaml.size(), 0) & 0x7fffffffffffffffULL);
    h[0] = hash;
    h[1] = -hash;
    // The max of (h, −h) over the ranks is (max h, −min h): equal hashes everywhere iff max = min.
    at::Tensor hd = h.to(device_);
    groups_->world->all_reduce(hd, parallel::ReduceOp::kMax);
    h = hd.to(at::kCPU);
    if (h[0].item<int64_t>() != -h[1].item<int64_t>())
      throw std::runtime_error("the ranks were started with different configs (the resolved configs differ); "
                               "launch every rank with the same config file and --set overrides");
  }

  // This rank's part of the model: its pipeline stage's layers and its ep shard of the routed experts.
  model::StageSpec stage = model::StageSpec::whole(m);
  if (groups_) {
    const auto& coords = groups_->coords;
    const auto counts = parallel::stage_layer_counts(m.num_layers, c_.parallel.pp, c_.parallel.stage_layers);
    const auto firsts = parallel::stage_first_layers(counts);
    stage.first_layer = firsts[static_cast<size_t>(coords.pp)];
    stage.num_layers = counts[static_cast<size_t>(coords.pp)];
    stage.first = coords.pp == 0;
    stage.last = coords.pp == c_.parallel.pp - 1;
    stage.shard = model::ExpertShard{coords.ep, c_.parallel.ep};
    dp_rank_ = coords.dp;
  }
  first_stage_ = stage.first;
  last_stage_ = stage.last;
  const auto policy = precision::policy_for(c_.precision);
  model_ = model::Transformer(m, stage, policy.mode);
  model::init_parameters(*model_, static_cast<uint64_t>(c_.train.seed), m.init_std);
  model_->to(device_);
  if (groups_ && c_.parallel.ep > 1)
    exchange_ = std::make_unique<parallel::AllToAllExpertExchange>(*groups_->ep, m.n_routed_experts);
  else
    exchange_ = std::make_unique<model::LocalExpertExchange>();

  std::vector<NamedParam> params;
  std::vector<std::pair<std::string, at::Tensor>> named;
  for (auto& item : model_->named_parameters(/*recurse=*/true)) {
    params.push_back({item.key(), item.value()});
    named.emplace_back(item.key(), item.value());
  }
  optimizer_ = std::make_unique<AdamW>(std::move(params), c_.train,
                                       policy.moment_bytes == 2 ? at::kBFloat16 : at::kFloat);
  if (groups_) grad_sync_ = std::make_unique<parallel::GradSync>(*groups_, std::move(named), c_.parallel.bucket_size_mb);

  // Every MoE layer of the whole model (main layers, then the MTP blocks), and which of them this stage holds, in
  // the order its forward pass reports them.
  for (int64_t l = m.n_dense_layers; l < m.num_layers; ++l) all_moe_names_.push_back(fmt::format("layers.{}", l));
  const bool mtp_moe = model::mtp_is_moe(m);
  for (int64_t k = 0; mtp_moe && k < m.mtp_depth; ++k) all_moe_names_.push_back(fmt::format("mtp.{}", k));
  for (size_t i = 0; i < model_->layers.size(); ++i)
    if (model_->layers[i]->moe) {
      router_biases_.push_back(&model_->layers[i]->moe->router->bias);
      moe_global_index_.push_back(stage.first_layer + static_cast<int64_t>(i) - m.n_dense_layers);
    }
  for (size_t k = 0; k < model_->mtp.size(); ++k)
    if (model_->mtp[k]->block->moe) {
      router_biases_.push_back(&model_->mtp[k]->block->moe->router->bias);
      moe_global_index_.push_back(m.num_layers - m.n_dense_layers + static_cast<int64_t>(k));
    }

  batches_ = data::make_batch_source(c_);
  remover_ = std::make_unique<checkpoints::Remover>();
  flops_per_token_ = model::flops_per_token(m, c_.train.seq_len).total();
  peak_flops_ = c_.train.peak_flops > 0 ? c_.train.peak_flops : measure_peak_flops();
  if (!resume.empty()) load_checkpoint(resume);
  if (!run_dir_.empty() && verbose_) {
    std::filesystem::create_directories(run_dir_);
    config::write_resolved(c_, run_dir_ + "/config.yaml");
    metrics_ = std::make_unique<MetricsWriter>(run_dir_ + "/metrics.jsonl", /*append=*/!resume.empty());
  }
}

Trainer::~Trainer() {
  if (pending_save_ && pending_save_->writer.joinable()) pending_save_->writer.join();
  remover_.reset();  // waits for the deletions it was asked for
}

std::string checkpoint_root(const config::Config& c, const std::string& run_dir) {
  std::filesystem::path dir(c.checkpoint.dir);
  if (dir.is_relative() && !run_dir.empty()) dir = std::filesystem::path(run_dir) / dir;
  return dir.string();
}

std::string Trainer::checkpoint_root() const { return trainer::checkpoint_root(c_, run_dir_); }

// What a checkpoint holds: every parameter and buffer under "model/<global name>", the AdamW moments under
// "optim/exp_avg/<name>" and "optim/exp_avg_sq/<name>", the optimizer step, and this rank's RNG state. Each
// replicated tensor is written by one of its replicas, chosen by a hash of its name so the writes spread out.
void Trainer::save_checkpoint() {
  finish_checkpoint();
  auto req = std::make_unique<PendingSave>();
  checkpoints::SaveRequest& r = req->request;
  r.root = checkpoint_root();
  r.step = step_;
  r.keep_last = c_.checkpoint.keep_last;
  const auto shape = data::BatchShape::from(c_);
  const data::DataState ds = batches_->state(step_);
  r.meta = {{"config", config_yaml_},
            {"layout", {{"pp", c_.parallel.pp}, {"dp", c_.parallel.dp}, {"ep", c_.parallel.ep},
                        {"world_size", c_.parallel.world_size}}},
            {"trainer", {{"step", step_},
                         {"samples_consumed", step_ * shape.global_sequences()},
                         {"tokens_seen", step_ * shape.global_sequences() * c_.train.seq_len},
                         {"data", {{"step", ds.step},
                                   {"samples_consumed", ds.samples_consumed},
                                   {"epochs", ds.epochs},
                                   {"samples_in_epoch", ds.samples_in_epoch},
                                   {"seed", ds.seed},
                                   {"fingerprint", ds.fingerprint}}}}}};
  const bool last_not_first = last_stage_ && !first_stage_;
  auto writes = [&](const std::string& name) {
    if (!groups_) return true;
    if (name == "embed.weight" && last_not_first) return false;  // the first stage's copy is the same
    const uint64_t h = XXH64(name.data(), name.size(), 0);
    if (parallel::GradSync::is_expert(name))
      return static_cast<int64_t>(h % static_cast<uint64_t>(c_.parallel.dp / c_.parallel.ep)) == groups_->coords.edp;
    return static_cast<int64_t>(h % static_cast<uint64_t>(c_.parallel.dp)) == groups_->coords.dp;
  };
  // An asynchronous writer works from host copies taken now (into the previous save's buffers when they fit), while
  // training goes on; a synchronous save writes from the tensors themselves.
  const bool copy = c_.checkpoint.async;
  size_t next_buffer = 0;
  std::vector<at::Tensor> pool = std::move(snapshot_pool_);
  auto snap = [&](const at::Tensor& t) {
    if (!copy) return t.detach().to(at::kCPU);
    const size_t i = next_buffer++;
    at::Tensor host;
    if (i < pool.size() && pool[i].sizes() == t.sizes() && pool[i].scalar_type() == t.scalar_type()) {
      pool[i].copy_(t.detach());
      host = pool[i];
    } else {
      host = t.detach().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
    }
    req->snapshots.push_back(host);
    return host;
  };
  std::map<std::string, size_t> stacked;  // stacked expert tensor -> its entry in r.tensors
  auto add = [&](const std::string& prefix, const std::string& name, const at::Tensor& t) {
    const auto row = expert_row(name);
    if (!row) {
      r.tensors.push_back({prefix + name, snap(t), writes(name)});
      return;
    }
    const std::string global = prefix + row->first;
    auto it = stacked.find(global);
    if (it == stacked.end()) {
      it = stacked.emplace(global, r.tensors.size()).first;
      checkpoints::TensorEntry e{global, {}, writes(row->first)};
      e.row_begin = row->second;
      e.rows_total = c_.model.n_routed_experts;
      r.tensors.push_back(std::move(e));
    }
    checkpoints::TensorEntry& e = r.tensors[it->second];
    if (row->second != e.row_begin + static_cast<int64_t>(e.rows.size()))
      throw std::logic_error(fmt::format("checkpoint: the experts of {} on this rank are not contiguous", global));
    e.rows.push_back(snap(t));
  };
  const auto& params = optimizer_->params();
  for (size_t i = 0; i < params.size(); ++i) {
    add("model/", params[i].name, params[i].param);
    add("optim/exp_avg/", params[i].name, optimizer_->exp_avg(i));
    add("optim/exp_avg_sq/", params[i].name, optimizer_->exp_avg_sq(i));
  }
  for (auto& item : model_->named_buffers(/*recurse=*/true)) add("model/", item.key(), item.value());
  const int rank = groups_ ? static_cast<int>(groups_->rank) : 0;
  r.tensors.push_back({"optim/step", at::scalar_tensor(optimizer_->steps_taken(), at::kLong), rank == 0});
  r.tensors.push_back({fmt::format("rng/{}", rank), at::detail::getDefaultCPUGenerator().get_state(), true});

  pending_save_ = std::move(req);
  if (c_.checkpoint.async) {
    PendingSave* p = pending_save_.get();
    p->writer = std::thread([p, rank] {
      p->result = checkpoints::write_shard(p->request, rank);
      p->written = true;
    });
  } else {
    pending_save_->result = checkpoints::write_shard(pending_save_->request, rank);
    finish_checkpoint();
  }
}

void Trainer::settle_checkpoints() {
  finish_checkpoint();
  remover_->wait();
}

void Trainer::finish_checkpoint() {
  if (!pending_save_) return;
  std::unique_ptr<PendingSave> p = std::move(pending_save_);
  if (p->writer.joinable()) p->writer.join();
  std::string dir =
      checkpoints::commit(p->request, p->result, checkpoints::Collective(groups_ != nullptr), remover_.get());
  if (c_.checkpoint.async) snapshot_pool_ = std::move(p->snapshots);
  if (verbose_) {
    fmt::print("checkpoint step {} saved: {}\n", p->request.step, dir);
    std::fflush(stdout);
  }
}

// Restores everything save_checkpoint wrote, onto this rank's part of the model whatever layout saved it.
void Trainer::load_checkpoint(const std::string& dir) {
  checkpoints::Checkpoint ck(dir);
  auto mismatch = [&](const std::string& name, const std::vector<int64_t>& theirs, const std::vector<int64_t>& ours) {
    return std::runtime_error(fmt::format("{}: tensor {} has shape {} in the checkpoint but {} in this model (a "
                                          "checkpoint of another model shape)",
                                          dir, name, nlohmann::json(theirs).dump(), nlohmann::json(ours).dump()));
  };
  auto need = [&](const std::string& name) {
    if (!ck.has(name))
      throw std::runtime_error(fmt::format("{}: the checkpoint has no tensor {} (a checkpoint of another model?)",
                                           dir, name));
    return ck.shape(name);
  };
  // A stacked expert tensor is read once per rank: the rows of this rank's experts.
  std::map<std::string, std::pair<int64_t, int64_t>> wanted_rows;
  auto note_rows = [&](const std::string& prefix, const std::string& name) {
    if (const auto row = expert_row(name)) {
      auto [it, fresh] = wanted_rows.emplace(prefix + row->first, std::make_pair(row->second, row->second + 1));
      it->second = {std::min(it->second.first, row->second), std::max(it->second.second, row->second + 1)};
    }
  };
  std::map<std::string, at::Tensor> rows_read;
  auto restore = [&](const std::string& prefix, const std::string& name, at::Tensor& into) {
    at::Tensor t;
    if (const auto row = expert_row(name)) {
      const std::string global = prefix + row->first;
      std::vector<int64_t> ours = into.sizes().vec();
      ours.insert(ours.begin(), c_.model.n_routed_experts);
      if (need(global) != ours) throw mismatch(global, ck.shape(global), ours);
      const auto [begin, end] = wanted_rows.at(global);
      auto it = rows_read.find(global);
      if (it == rows_read.end()) it = rows_read.emplace(global, ck.read_rows(global, begin, end)).first;
      t = it->second[row->second - begin];
    } else {
      if (need(prefix + name) != into.sizes().vec()) throw mismatch(prefix + name, ck.shape(prefix + name), into.sizes().vec());
      t = ck.read(prefix + name);
    }
    at::NoGradGuard no_grad;
    into.copy_(t.to(into.scalar_type()).to(into.device()));
  };
  auto& params = optimizer_->params();
  for (const auto& p : params)
    for (const char* prefix : {"model/", "optim/exp_avg/", "optim/exp_avg_sq/"}) note_rows(prefix, p.name);
  for (auto& item : model_->named_buffers(/*recurse=*/true)) note_rows("model/", item.key());
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i].param;
    restore("model/", params[i].name, p);
    restore("optim/exp_avg/", params[i].name, optimizer_->exp_avg_mut(i));
    restore("optim/exp_avg_sq/", params[i].name, optimizer_->exp_avg_sq_mut(i));
  }
  for (auto& item : model_->named_buffers(/*recurse=*/true)) restore("model/", item.key(), item.value());
  optimizer_->set_steps_taken(ck.read("optim/step").item<int64_t>());
  step_ = ck.meta().at("trainer").at("step").get<int64_t>();
  // The data order continues where the saved run stood, also with another dp size or micro-batching.
  const auto& d = ck.meta().at("trainer").at("data");
  data::DataState ds;
  ds.step = d.at("step").get<int64_t>();
  ds.samples_consumed = d.at("samples_consumed").get<int64_t>();
  ds.epochs = d.at("epochs").get<std::vector<int64_t>>();
  ds.samples_in_epoch = d.at("samples_in_epoch").get<std::vector<int64_t>>();
  ds.seed = d.at("seed").get<uint64_t>();
  ds.fingerprint = d.at("fingerprint").get<uint64_t>();
  batches_->resume(ds);
  // The RNG state of this rank, when the layout is the one that saved it.
  const int rank = groups_ ? static_cast<int>(groups_->rank) : 0;
  const auto& layout = ck.meta().at("layout");
  if (layout.at("pp") == c_.parallel.pp && layout.at("dp") == c_.parallel.dp && layout.at("ep") == c_.parallel.ep &&
      ck.has(fmt::format("rng/{}", rank)))
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(ck.read(fmt::format("rng/{}", rank)));
  }
  if (verbose_) {
    fmt::print("resumed from {} at step {} (saved with pp {} × dp {}, ep {})\n", dir, step_,
               layout.at("pp").get<int64_t>(), layout.at("dp").get<int64_t>(), layout.at("ep").get<int64_t>());
    std::fflush(stdout);
  }
}

void Trainer::reduce(at::Tensor& t, parallel::Communicator* comm) const {
  if (!comm || comm->size() == 1) return;
  at::Tensor d = t.to(device_).contiguous();
  comm->all_reduce(d, parallel::ReduceOp::kSum);
  t.copy_(d.to(t.device()));
}

double Trainer::mtp_weight(int64_t tokens_seen) const {
  const auto& m = c_.model;
  const bool switched = m.mtp_loss_weight_switch_tokens > 0 && tokens_seen >= m.mtp_loss_weight_switch_tokens;
  return switched ? m.mtp_loss_weight_final : m.mtp_loss_weight;
}

parallel::StageOutput Trainer::stage_forward(int64_t mb, const at::Tensor& input, const at::Tensor& window,
                                             Accumulator& acc, bool training) {
  const int64_t T = c_.train.seq_len, depth = c_.model.mtp_depth;
  const auto shape = data::BatchShape::from(c_);
  const double tokens = static_cast<double>(shape.global_sequences() * T);
  const double sequences = static_cast<double>(shape.global_sequences());
  model::LossSums s;
  at::Tensor h = first_stage_ ? model_->embed_tokens(window.narrow(1, 0, T)) : input;
  h = model_->run_layers(h, *exchange_, s.moe);
  parallel::StageOutput out;
  at::Tensor loss;
  if (last_stage_) {
    model_->head_losses(h, window, *exchange_, s);
    const double lambda = mtp_weight(step_ * shape.global_sequences() * T);
    loss = s.lm / tokens;
    acc.sums[0] += s.lm.detach().to(at::kDouble);
    for (const auto& l : s.mtp) {
      loss = loss + l * (lambda / static_cast<double>(depth) / tokens);
      acc.sums[1] += l.detach().to(at::kDouble);
    }
  } else {
    out.activations = h;
  }
  for (size_t i = 0; i < s.moe.size(); ++i) {
    if (training) loss = loss.defined() ? loss + s.moe[i].balance_loss / sequences : s.moe[i].balance_loss / sequences;
    acc.sums[2] += s.moe[i].balance_loss.detach().to(at::kDouble);
    const at::Tensor& c = s.moe[i].counts;
    acc.loads[i] = acc.loads[i].defined() ? acc.loads[i] + c : c;
  }
  out.loss = loss;
  return out;
}

Trainer::Accumulator Trainer::new_accumulator() const {
  Accumulator acc;
  acc.sums = at::zeros({3}, at::TensorOptions().dtype(at::kDouble).device(device_));
  acc.loads.resize(router_biases_.size());
  return acc;
}

// Loads of the whole global batch: summed over this rank's micro-batches (done) and over the dp ranks (here).
void Trainer::global_loads(Accumulator& acc) const {
  for (auto& l : acc.loads)
    if (!l.defined()) l = at::zeros({c_.model.n_routed_experts}, at::kLong);
  if (acc.loads.empty() || !groups_ || groups_->dp->size() == 1) return;
  at::Tensor all = at::stack(acc.loads);
  reduce(all, groups_->dp.get());
  for (size_t i = 0; i < acc.loads.size(); ++i) acc.loads[i] = all[static_cast<int64_t>(i)];
}

parallel::PipelineSpec Trainer::pipeline_spec() const {
  return {groups_->coords.pp, c_.parallel.pp, c_.train.micro_batches,
          {c_.train.micro_batch_size, c_.train.seq_len, c_.model.hidden_size},
          at::TensorOptions().dtype(at::kFloat).device(device_)};
}

at::Tensor Trainer::layer_metrics(const std::vector<at::Tensor>& loads) {
  at::Tensor table = at::zeros({static_cast<int64_t>(all_moe_names_.size()), 5}, at::kDouble);
  if (dp_rank_ == 0 && !loads.empty()) {  // one rank per stage fills in its layers; the sum over the world gathers them
    // The biases' minima and maxima in one copy from the device.
    std::vector<at::Tensor> biases;
    for (size_t i = 0; i < loads.size(); ++i) biases.push_back(*router_biases_[i]);
    auto [lo, hi] = at::aminmax(at::stack(biases), /*dim=*/1);
    const at::Tensor bias_range = at::stack({lo, hi}, 1).to(at::kDouble).to(at::kCPU);
    for (size_t i = 0; i < loads.size(); ++i) {
      auto row = table[moe_global_index_[i]];
      row[0] = model::max_violation(loads[i]);
      row[1] = static_cast<double>(loads[i].min().item<int64_t>());
      row[2] = static_cast<double>(loads[i].max().item<int64_t>());
      row[3] = bias_range[static_cast<int64_t>(i)][0].item<double>();
      row[4] = bias_range[static_cast<int64_t>(i)][1].item<double>();
    }
  }
  if (groups_) reduce(table, groups_->world.get());
  return table;
}

StepResult Trainer::step() {
  const auto t0 = Clock::now();
  const auto shape = data::BatchShape::from(c_);
  const int64_t sequences = shape.global_sequences();
  const double tokens = static_cast<double>(sequences * c_.train.seq_len);
  const int64_t depth = c_.model.mtp_depth;
  // An asynchronous save commits at the first step where every rank's writer has finished (agreed by all ranks,
  // so they commit together); until then training goes on.
  if (pending_save_ && checkpoints::Collective(groups_ != nullptr).all_ok(pending_save_->written.load()))
    finish_checkpoint();
  if (groups_) maybe_inject_failure(step_, groups_->rank);

  StepResult r;
  r.step = step_;
  r.lr = lr_at(c_.train, step_);
  optimizer_->zero_grad();
  Accumulator acc = new_accumulator();
  auto forward = [&](int64_t mb, const at::Tensor& input) {
    at::Tensor window = batches_->train(step_, dp_rank_, mb).to(device_);
    return stage_forward(mb, input, window, acc, /*training=*/true);
  };
  trace_.clear();
  if (c_.parallel.pp == 1) {
    for (int64_t mb = 0; mb < c_.train.micro_batches; ++mb) {
      parallel::StageOutput out = forward(mb, {});
      out.loss.backward();
    }
  } else {
    parallel::run_1f1b(*groups_->pp, pipeline_spec(), forward, &trace_);
  }

  if (grad_sync_) grad_sync_->reduce();
  r.grad_norm = grad_sync_ ? grad_sync_->global_norm() : grad_norm(optimizer_->params());
  clip_grads(optimizer_->params(), r.grad_norm, c_.train.grad_clip);
  optimizer_->step(r.lr);

  // The balancer: loads of the whole global batch (all micro-batches, all dp ranks), the same on every replica.
  global_loads(acc);
  if (c_.model.balance_mode == "aux_free" && !acc.loads.empty()) {
    const at::Tensor loads = at::stack(acc.loads).to(device_);  // one copy to the device for all layers
    for (size_t i = 0; i < acc.loads.size(); ++i)
      model::update_bias(*router_biases_[i], loads[static_cast<int64_t>(i)], c_.model.bias_update_rate);
  }
  ++step_;

  // Global means: the last stage holds the LM and MTP sums, every stage its balance terms.
  if (groups_) reduce(acc.sums, groups_->world.get());  // on the device; then one copy to the host
  const at::Tensor sums = acc.sums.to(at::kCPU);
  const double lambda = mtp_weight((step_ - 1) * sequences * c_.train.seq_len);
  r.lm_loss = sums[0].item<double>() / tokens;
  r.mtp_loss = depth > 0 ? sums[1].item<double>() / tokens / static_cast<double>(depth) : 0.0;
  r.balance_loss = sums[2].item<double>() / static_cast<double>(sequences);
  r.loss = r.lm_loss + lambda * r.mtp_loss + r.balance_loss;
  at::Tensor table = layer_metrics(acc.loads);
  for (int64_t i = 0; i < table.size(0); ++i) r.max_vio.push_back(table[i][0].item<double>());

  r.step_time_s = seconds_since(t0);
  r.tokens_per_s = tokens / r.step_time_s;
  r.mfu = flops_per_token_ * r.tokens_per_s / (peak_flops_ * static_cast<double>(c_.parallel.world_size));
  if (metrics_) {
    nlohmann::json j = {{"step", step_},           {"loss", r.loss},         {"lm_loss", r.lm_loss},
                        {"mtp_loss", r.mtp_loss},  {"balance_loss", r.balance_loss},
                        {"grad_norm", r.grad_norm}, {"lr", r.lr},           {"tokens_per_s", r.tokens_per_s},
                        {"step_time_s", r.step_time_s}, {"mfu", r.mfu}};
    for (int64_t i = 0; i < table.size(0); ++i)
      j["moe"].push_back({{"layer", all_moe_names_[static_cast<size_t>(i)]},
                          {"max_vio", table[i][0].item<double>()},
                          {"min_tokens", static_cast<int64_t>(table[i][1].item<double>())},
                          {"max_tokens", static_cast<int64_t>(table[i][2].item<double>())},
                          {"bias_min", table[i][3].item<double>()},
                          {"bias_max", table[i][4].item<double>()}});
    metrics_->write(j);
  }
  return r;
}

EvalResult Trainer::evaluate() {
  at::NoGradGuard no_grad;
  const auto shape = data::BatchShape::from(c_);
  Accumulator acc = new_accumulator();
  for (int64_t i = 0; i < c_.train.eval_batches; ++i) {
    auto forward = [&](int64_t mb, const at::Tensor& input) {
      at::Tensor window = batches_->validation(i, dp_rank_, mb).to(device_);
      return stage_forward(mb, input, window, acc, /*training=*/false);
    };
    if (c_.parallel.pp == 1) {
      for (int64_t mb = 0; mb < c_.train.micro_batches; ++mb) forward(mb, {});
    } else {
      parallel::run_forward_only(*groups_->pp, pipeline_spec(), forward);
    }
  }
  global_loads(acc);
  if (groups_) reduce(acc.sums, groups_->world.get());
  const at::Tensor sums = acc.sums.to(at::kCPU);
  at::Tensor table = layer_metrics(acc.loads);
  EvalResult r;
  r.loss = sums[0].item<double>() /
           static_cast<double>(c_.train.eval_batches * shape.global_sequences() * c_.train.seq_len);
  if (table.size(0) > 0) r.max_vio = table.select(1, 0).mean().item<double>();
  if (metrics_) metrics_->write({{"step", step_}, {"val_loss", r.loss}, {"val_max_vio", r.max_vio}});
  return r;
}

void Trainer::run() {
  const double entropy = batches_->entropy_rate();
  if (verbose_) {
    fmt::print("training {} for {} steps on {} rank(s) (pp {} × dp {}, ep {}), {}: {} tokens/step, peak {:.1f} "
               "GFLOP/s per rank{}\n",
               c_.file, c_.train.steps, c_.parallel.world_size, c_.parallel.pp, c_.parallel.dp, c_.parallel.ep,
               c_.train.device, data::BatchShape::from(c_).global_sequences() * c_.train.seq_len, peak_flops_ / 1e9,
               entropy >= 0 ? fmt::format(", corpus entropy rate {:.4f} nats/token", entropy) : "");
    std::fflush(stdout);
  }
  const StopSignals signals(c_.checkpoint.save_on_signal);
  const auto t0 = Clock::now();
  while (step_ < c_.train.steps) {
    StepResult r = step();
    const bool last = step_ == c_.train.steps;
    if (verbose_ && (step_ % c_.logging.interval == 0 || last || step_ == 1)) {
      double elapsed = seconds_since(t0);
      double eta = elapsed / static_cast<double>(step_) * static_cast<double>(c_.train.steps - step_);
      fmt::print("step {:>{}}/{} | loss {:.4f} | lm {:.4f} | mtp {:.4f} | grad {:.3f} | lr {:.2e} | {:.0f} tok/s | "
                 "MFU {:.1f}% | max-vio {:.2f} | ETA {}\n",
                 step_, fmt::formatted_size("{}", c_.train.steps), c_.train.steps, r.loss, r.lm_loss, r.mtp_loss,
                 r.grad_norm, r.lr, r.tokens_per_s, 100 * r.mfu,
                 r.max_vio.empty() ? 0.0 : *std::max_element(r.max_vio.begin(), r.max_vio.end()),
                 format_duration(eta));
      std::fflush(stdout);
    }
    const bool interval_save = c_.checkpoint.interval > 0 && (step_ % c_.checkpoint.interval == 0 || last);
    if (interval_save) save_checkpoint();
    // A stop signal on any rank: every rank saves this step and stops (one agreement per step).
    if (c_.checkpoint.save_on_signal && !last &&
        checkpoints::Collective(groups_ != nullptr).any(stop_signal.load() != 0)) {
      if (!interval_save) save_checkpoint();
      settle_checkpoints();
      if (verbose_) {
        const int sig = stop_signal.load();
        fmt::print("stopped at step {} of {} on {}: checkpoint saved in {}; continue with --resume auto\n", step_,
                   c_.train.steps, sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : "a signal to another rank",
                   checkpoint_root());
        std::fflush(stdout);
      }
      return;
    }
    if ((c_.train.eval_interval > 0 && step_ % c_.train.eval_interval == 0) || last) {
      EvalResult e = evaluate();
      if (verbose_) {
        fmt::print("eval step {} | val loss {:.4f}{} | val max-vio {:.3f}\n", step_, e.loss,
                   entropy >= 0 ? fmt::format(" (entropy rate {:.4f}, gap {:.4f})", entropy, e.loss - entropy) : "",
                   e.max_vio);
        std::fflush(stdout);
      }
    }
  }
  settle_checkpoints();
}

}  // namespace moetrain::trainer
