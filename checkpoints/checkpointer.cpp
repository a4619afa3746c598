#include "checkpoints/checkpointer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <fmt/format.h>
#include <xxhash.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <thread>

#include "config/loader.h"

namespace moetrain::checkpoints {

struct Checkpointer::Pending {
  SaveRequest request;
  ShardResult result;
  std::thread writer;
  std::atomic<bool> written{false};
  std::vector<at::Tensor> snapshots;  // the host copies, in the order they were taken: the next save's buffers
};

std::string checkpoint_root(const config::Config& c, const std::string& run_dir) {
  std::filesystem::path dir(c.checkpoint.dir);
  if (dir.is_relative() && !run_dir.empty()) dir = std::filesystem::path(run_dir) / dir;
  return dir.string();
}

Checkpointer::Checkpointer(const config::Config& c, std::string root, parallel::ControlPlane& control,
                           const parallel::Coords* coords, std::vector<StateTensor> state, bool verbose)
    : c_(c),
      config_yaml_(config::to_yaml(c)),
      root_(std::move(root)),
      control_(control),
      coords_(coords ? std::optional<parallel::Coords>(*coords) : std::nullopt),
      state_(std::move(state)),
      verbose_(verbose),
      remover_(std::make_unique<Remover>()) {}

Checkpointer::~Checkpointer() {
  if (pending_ && pending_->writer.joinable()) pending_->writer.join();
  remover_.reset();  // waits for the deletions it was asked for
}

namespace {

// Where a piece's first element sits in the flattened global tensor (a routed expert: in its row of the stack).
int64_t global_offset(const StateTensor& st) {
  return (st.info.routed() ? st.info.expert_row * st.info.tensor.numel() : 0) + st.offset;
}

}  // namespace

bool Checkpointer::embedding_copy(const model::ParamInfo& info) const {
  return info.shared_embedding && coords_ && coords_->pp == c_.parallel.pp - 1 && coords_->pp != 0;
}

bool Checkpointer::writes(const model::ParamInfo& info) const {
  if (!coords_) return true;
  if (embedding_copy(info)) return false;  // the first stage's copy is the same
  const std::string key = info.global_name();
  const uint64_t h = XXH64(key.data(), key.size(), 0);
  if (info.routed())
    return static_cast<int64_t>(h % static_cast<uint64_t>(c_.parallel.dp / c_.parallel.ep)) == coords_->edp;
  return static_cast<int64_t>(h % static_cast<uint64_t>(c_.parallel.dp)) == coords_->dp;
}


bool Checkpointer::busy() const { return pending_ && !pending_->written.load(); }

std::string Checkpointer::first_nonfinite() const {
  std::vector<at::Tensor> finite;
  std::vector<const StateTensor*> which;
  for (const StateTensor& st : state_)
    if (at::isFloatingType(st.tensor.scalar_type())) {
      finite.push_back(at::isfinite(st.tensor).all());
      which.push_back(&st);
    }
  if (finite.empty()) return "";
  const at::Tensor ok = at::stack(finite).to(at::kCPU);  // one copy from the device
  for (size_t i = 0; i < which.size(); ++i)
    if (!ok[static_cast<int64_t>(i)].item<bool>()) return which[i]->prefix + which[i]->info.name;
  return "";
}

void Checkpointer::save(const TrainerState& s) {
  commit();
  // A checkpoint of a diverged state would become `latest` and let keep_last prune the good ones: every rank
  // checks what it holds, and all agree, before anything is written.
  const std::string bad = first_nonfinite();
  std::string where = bad.empty() ? "" : fmt::format("{} on rank {}", bad, control_.rank());
  const std::vector<std::string> all = control_.gather(where);  // rank 0 names the first rank's tensor
  if (control_.any(!bad.empty())) {
    for (const auto& a : all)
      if (!a.empty()) {
        where = a;
        break;
      }
    throw std::runtime_error(fmt::format(
        "checkpoint of step {} refused: tensor {} is not finite (NaN or inf); the previous checkpoint in {} stays "
        "current",
        s.step, where.empty() ? "(of another rank)" : where, root_));
  }
  auto pending = std::make_unique<Pending>();
  SaveRequest& r = pending->request;
  r.root = root_;
  r.step = s.step;
  r.keep_last = c_.checkpoint.keep_last;
  r.meta = {{"config", config_yaml_},
            {"layout", {{"pp", c_.parallel.pp}, {"dp", c_.parallel.dp}, {"ep", c_.parallel.ep},
                        {"world_size", c_.parallel.world_size}}},
            {"trainer", {{"step", s.step},
                         {"samples_consumed", s.samples_consumed},
                         {"tokens_seen", s.tokens_seen},
                         {"data", data::to_json(s.data)}}}};
  // An asynchronous writer works from host copies taken now (into the previous save's buffers when they fit),
  // while training goes on; a synchronous save writes from the tensors themselves (host tensors: no copy). Only
  // what this rank writes is copied.
  stats_ = {};
  const bool copy = c_.checkpoint.async;
  size_t next_buffer = 0;
  std::vector<at::Tensor> pool = std::move(snapshot_pool_);
  auto snap = [&](const at::Tensor& t) {
    at::Tensor host;
    if (!copy) {
      host = t.detach().to(at::kCPU);
      if (!host.is_same(t)) stats_.host_bytes_copied += static_cast<int64_t>(host.nbytes());
    } else {
      const size_t i = next_buffer++;
      if (i < pool.size() && pool[i].sizes() == t.sizes() && pool[i].scalar_type() == t.scalar_type()) {
        pool[i].copy_(t.detach());
        host = pool[i];
      } else {
        host = t.detach().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
      }
      pending->snapshots.push_back(host);
      stats_.host_bytes_copied += static_cast<int64_t>(host.nbytes());
    }
    stats_.bytes_written += static_cast<int64_t>(host.nbytes());
    return host;
  };
  std::map<std::string, size_t> stacked;  // stacked expert tensor -> its entry in r.tensors
  for (const StateTensor& st : state_) {
    if (st.offset >= 0) {  // a ZeRO-1 piece: saved by the rank holding it (the first stage for the embedding)
      if (embedding_copy(st.info)) continue;
      TensorEntry e{st.prefix + st.info.global_name(), snap(st.tensor)};
      e.flat_begin = global_offset(st);
      e.global_shape = st.info.global_shape();
      r.tensors.push_back(std::move(e));
      continue;
    }
    if (!writes(st.info)) continue;
    if (!st.info.routed()) {
      r.tensors.push_back({st.prefix + st.info.name, snap(st.tensor)});
      continue;
    }
    const std::string global = st.prefix + st.info.global_name();
    auto it = stacked.find(global);
    if (it == stacked.end()) {
      it = stacked.emplace(global, r.tensors.size()).first;
      TensorEntry e{global, {}};
      e.row_begin = st.info.expert_row;
      e.rows_total = st.info.expert_rows;
      r.tensors.push_back(std::move(e));
    }
    TensorEntry& e = r.tensors[it->second];
    if (st.info.expert_row != e.row_begin + static_cast<int64_t>(e.rows.size()))
      throw std::logic_error(fmt::format("checkpoint: the experts of {} on this rank are not contiguous", global));
    e.rows.push_back(snap(st.tensor));
  }
  const int rank = control_.rank();
  // Made for the save on the host: staged and written alike.
  at::Tensor optim_step = at::scalar_tensor(s.optimizer_steps, at::kLong);
  at::Tensor rng = at::detail::getDefaultCPUGenerator().get_state();
  if (rank == 0) r.tensors.push_back({"optim/step", optim_step});
  r.tensors.push_back({fmt::format("rng/{}", rank), rng});
  for (const at::Tensor* t : {&optim_step, &rng})
    if (rank == 0 || t == &rng) {
      stats_.host_bytes_copied += static_cast<int64_t>(t->nbytes());
      stats_.bytes_written += static_cast<int64_t>(t->nbytes());
    }

  pending_ = std::move(pending);
  if (c_.checkpoint.async) {
    Pending* p = pending_.get();
    p->writer = std::thread([p, rank] {
      p->result = write_shard(p->request, rank);
      p->written = true;
    });
  } else {
    pending_->result = write_shard(pending_->request, rank);
    commit();
  }
}

void Checkpointer::commit() {
  if (!pending_) return;
  std::unique_ptr<Pending> p = std::move(pending_);
  if (p->writer.joinable()) p->writer.join();
  const std::string dir = checkpoints::commit(p->request, p->result, control_, remover_.get());
  if (c_.checkpoint.async) snapshot_pool_ = std::move(p->snapshots);
  if (verbose_) {
    fmt::print("checkpoint step {} saved: {} ({:.1f} MB written by rank 0, {:.1f} MB of it copied to host)\n",
               p->request.step, dir, static_cast<double>(stats_.bytes_written) / 1e6,
               static_cast<double>(stats_.host_bytes_copied) / 1e6);
    std::fflush(stdout);
  }
}

void Checkpointer::settle() {
  commit();
  remover_->wait();
}

TrainerState Checkpointer::load(const std::string& dir, bool weights_only) {
  Checkpoint ck(dir);
  // Every key and tensor of the index read below is checked first, so that an error names <dir>/index.json and
  // the key rather than surfacing from the JSON library.
  check_complete(ck);
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
  auto skipped = [&](const StateTensor& st) { return weights_only && st.prefix != "model/"; };
  for (const StateTensor& st : state_) {
    if (!st.info.routed() || st.offset >= 0 || skipped(st)) continue;
    const int64_t row = st.info.expert_row;
    auto [it, fresh] = wanted_rows.emplace(st.prefix + st.info.global_name(), std::make_pair(row, row + 1));
    it->second = {std::min(it->second.first, row), std::max(it->second.second, row + 1)};
  }
  std::map<std::string, at::Tensor> rows_read;
  for (const StateTensor& st : state_) {
    if (skipped(st)) continue;
    // The global tensor: a parameter, buffer or moment under its name; a routed expert's under the stacked name.
    const std::string global = st.prefix + st.info.global_name();
    const std::vector<int64_t> ours = st.info.global_shape();
    if (need(global) != ours) throw mismatch(global, ck.shape(global), ours);
    at::Tensor t;
    if (st.offset >= 0) {  // a ZeRO-1 piece: its elements, from whichever parts hold them
      const int64_t begin = global_offset(st);
      t = ck.read_elements(global, begin, begin + st.tensor.numel());
    } else if (st.info.routed()) {
      const auto [begin, end] = wanted_rows.at(global);
      auto it = rows_read.find(global);
      if (it == rows_read.end()) it = rows_read.emplace(global, ck.read_rows(global, begin, end)).first;
      t = it->second[st.info.expert_row - begin];
    } else {
      t = ck.read(global);
    }
    at::NoGradGuard no_grad;
    at::Tensor into = st.tensor;
    into.copy_(t.to(into.scalar_type()).to(into.device()));
  }
  TrainerState s;
  if (weights_only) {
    if (verbose_) fmt::print("initialized from the weights of {} (step 0, fresh optimizer)\n", dir);
    return s;
  }
  s.optimizer_steps = ck.read("optim/step").item<int64_t>();
  const auto& trainer = ck.meta().at("trainer");
  s.step = trainer.at("step").get<int64_t>();
  s.samples_consumed = trainer.value("samples_consumed", int64_t{0});
  s.tokens_seen = trainer.value("tokens_seen", int64_t{0});
  s.data = data::data_state_from_json(trainer.at("data"));
  // The RNG state of this rank, when the layout is the one that saved it.
  const int rank = control_.rank();
  const auto& layout = ck.meta().at("layout");
  if (layout.at("pp") == c_.parallel.pp && layout.at("dp") == c_.parallel.dp && layout.at("ep") == c_.parallel.ep &&
      ck.has(fmt::format("rng/{}", rank))) {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(ck.read(fmt::format("rng/{}", rank)));
  }
  if (verbose_) {
    fmt::print("resumed from {} at step {} (saved with pp {} × dp {}, ep {})\n", dir, s.step,
               layout.at("pp").get<int64_t>(), layout.at("dp").get<int64_t>(), layout.at("ep").get<int64_t>());
    std::fflush(stdout);
  }
  return s;
}

}  // namespace moetrain::checkpoints
