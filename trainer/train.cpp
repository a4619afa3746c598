#include "trainer/train.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <xxhash.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <exception>

#include "config/loader.h"
#include "model/device_copy.h"
#include "model/param_flops.h"
#include "parallel/expert_exchange.h"
#include "parallel/placement.h"
#include "precision/policy.h"
#include "trainer/lr_schedule.h"
#include "trainer/memory_meter.h"
#include "trainer/preemption.h"
#include "trainer/profiler.h"

namespace moetrain::trainer {
namespace {

// cuBLAS's workspace for deterministic GEMMs (train.deterministic). ATen reads CUBLAS_WORKSPACE_CONFIG once per
// process, at its first cuBLAS call, and with deterministic kernels on refuses every GEMM unless it is :4096:8 or
// :16:8; so it is set when the process starts, before any GEMM or thread (a value of the user's own is kept):
// eight 4 MiB workspaces, whatever the mode.
const bool g_cublas_workspace_set = [] { return setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0) == 0; }();

// train.deterministic: LibTorch's deterministic kernels for this process, switched as each trainer's config says.
void use_deterministic_kernels(const config::Config& c) {
  if (c.train.deterministic && c.train.device == config::Device::kCuda) {
    const char* workspace = std::getenv("CUBLAS_WORKSPACE_CONFIG");
    const std::string w = workspace ? workspace : "";
    if (w != ":4096:8" && w != ":16:8")
      throw std::runtime_error(fmt::format("{}train.deterministic = true on cuda needs CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                                           "or :16:8 (cuBLAS's deterministic workspaces); it is \"{}\"",
                                           c.where("train.deterministic"), w));
  }
  at::globalContext().setDeterministicAlgorithms(c.train.deterministic, /*warn_only=*/false);
}

}  // namespace

Trainer::Trainer(const config::Config& config, parallel::ProcessGroups* groups, std::string run_dir, bool main,
                 const std::string& resume)
    : c_(config), groups_(groups), verbose_(main),
      own_control_(groups ? nullptr : std::make_unique<parallel::ControlPlane>()),
      control_(groups ? *groups->control : *own_control_),
      run_dir_(std::move(run_dir), main, control_) {
  count_cpu_tensors();  // before the model: its storages and all that follow are counted (trainer/memory_meter.h)
  const model::StageSpec stage = parallel::stage_spec(groups_, c_);  // checks the layout against the launch
  at::set_num_threads(static_cast<int>(c_.parallel.intra_op_threads));
  device_ = parallel::local_device(groups_, c_);
  use_deterministic_kernels(c_);
  // Ranks started with different configs would compute different things and hang in mismatched collectives.
  const std::string yaml = config::to_yaml(c_);
  if (!control_.same_everywhere(XXH64(yaml.data(), yaml.size(), 0)))
    throw std::runtime_error("the ranks were started with different configs (the resolved configs differ); "
                             "launch every rank with the same config file and --set overrides");
  // This rank's part of the model: its pipeline stage's layers and its ep shard of the routed experts.
  dp_rank_ = groups_ ? groups_->coords.dp : 0;
  const auto policy = precision::policy_for(c_.precision);
  model_ = model::Transformer(c_.model, stage, policy.mode);
  model::init_parameters(*model_, static_cast<uint64_t>(c_.train.seed), c_.model.init_std);
  model_->to(device_);
  if (groups_ && c_.parallel.ep > 1)
    exchange_ = std::make_unique<parallel::AllToAllExpertExchange>(*groups_->ep, c_.model.n_routed_experts,
                                                                   groups_->ep_backward.get());
  else
    exchange_ = std::make_unique<model::LocalExpertExchange>();
  const std::vector<model::ParamInfo> params = model::parameter_roles(*model_);
  std::vector<NamedParam> named;
  for (const auto& p : params) named.push_back({p.name, p.tensor});
  if (groups_)  // it keeps the gradients, FP32 in flat buckets
    grad_sync_ = std::make_unique<parallel::GradSync>(*groups_, params, c_.parallel);
  if (grad_sync_)  // parallel.overlap_param_gather: each block waits for its own buckets' gathers
    model_->param_gate = [this](const torch::nn::Module& m) {
      if (grad_sync_->gathering()) grad_sync_->finish_gather(m.parameters());
    };
  // bf16 / fp8: the model's parameters become BF16, the optimizer keeps the FP32 master weights of its pieces.
  optimizer_ = std::make_unique<AdamW>(std::move(named), c_.train, policy.moment_bytes == 2 ? at::kBFloat16 : at::kFloat,
                                       grad_sync_ ? grad_sync_->pieces() : std::vector<parallel::ShardPiece>{},
                                       policy.param_dtype());
  loads_ = std::make_unique<model::MoeLoadTracker>(*model_);
  batches_ = data::make_batch_source(c_);
  checkpointer_ = std::make_unique<checkpoints::Checkpointer>(
      c_, checkpoints::checkpoint_root(c_, run_dir_.path()), control_, groups_ ? &groups_->coords : nullptr,
      checkpoint_state(params, *optimizer_, model::buffer_roles(*model_)), verbose_);

  flops_per_token_ = model::flops_per_token(c_.model, c_.train.seq_len).total();
  // MFU against the device trained on, in the GEMMs' precision there.
  const bool low_precision_gpu = device_.is_cuda() && policy.mode != precision::Mode::kFp32;
  peak_flops_ = c_.train.peak_flops > 0 ? c_.train.peak_flops
                                        : measure_peak_flops(device_, low_precision_gpu ? at::kBFloat16 : at::kFloat);
  // --resume: the whole state; else checkpoint.init_from (train --init-from): the weights alone, from step 0.
  const bool weights_only = resume.empty();
  if (const std::string from = weights_only ? c_.checkpoint.init_from : resume; !from.empty()) {
    const checkpoints::TrainerState s = checkpointer_->load(from, weights_only);
    optimizer_->set_steps_taken(s.optimizer_steps);
    optimizer_->publish();  // master weights: the parameters from them
    if (grad_sync_) grad_sync_->gather_params(optimizer_->piece_values());
    finish_param_gather();
    step_ = s.step;
    if (!weights_only) {
      batches_->resume(s.data);  // the data order continues where the saved run stood, on any dp size
      origin_ = {s.step, s.data.samples_consumed};
    }
  }
  run_dir_.start(c_, resume.empty() ? -1 : step_);
}

Trainer::~Trainer() {
  // A parameter all-gather still in flight is finished here on a normal end (MPI must not be finalized with it
  // pending); while unwinding from an error GradSync leaves it rather than wait on peers that may have failed.
  if (grad_sync_ && std::uncaught_exceptions() == 0) try {
      grad_sync_->finish_gather();
    } catch (const std::exception& e) {
      say(fmt::format("warning: the last parameter all-gather failed: {}\n", e.what()));
    }
}

void Trainer::finish_param_gather() const {
  if (grad_sync_) grad_sync_->finish_gather();
}

void Trainer::say(const std::string& line) const {
  if (verbose_) print_line(line);
}

void Trainer::save_checkpoint() {
  finish_param_gather();
  checkpoints::TrainerState s;
  s.step = step_;
  s.optimizer_steps = optimizer_->steps_taken();
  s.samples_consumed = origin_.samples_before(shape_, step_);
  s.tokens_seen = tokens_before(step_);
  s.data = batches_->state(step_);
  checkpointer_->save(s);
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

// One micro-batch through this stage: the loss to differentiate (main, MTP and balance terms, each divided by the
// global batch's token or sequence count) and, on a stage before the last, the activations to send on. Adds the
// loss sums to `sums` and the expert loads to the tracker.
parallel::StageOutput Trainer::stage_forward(int64_t chunk, const at::Tensor& input, const at::Tensor& window,
                                             at::Tensor& sums, bool training) {
  RECORD_USER_SCOPE("forward");
  const int64_t T = c_.train.seq_len, depth = c_.model.mtp_depth;
  const double sequences = static_cast<double>(training ? shape_.global_sequences(step_) : shape_.global_sequences());
  const double tokens = sequences * static_cast<double>(T);
  model::LossSums s;
  const model::LayerChunk& part = model_->stage().chunks.at(static_cast<size_t>(chunk));
  at::Tensor h = part.embed ? model_->embed_tokens(window.narrow(1, 0, T)) : input;
  h = model_->run_chunk(static_cast<size_t>(chunk), h, *exchange_, s.moe);
  // parallel.overlap_param_gather: the blocks waited for their own buckets; the rest (the head, MTP, other
  // chunks' blocks) here, so that no gather is in flight once a backward pass runs.
  finish_param_gather();
  parallel::StageOutput out;
  at::Tensor loss;
  if (part.head) {
    model_->head_losses(h, window, *exchange_, s);
    const double lambda = mtp_weight(tokens_before(step_));
    loss = s.lm / tokens;
    sums[0] += s.lm.detach().to(at::kDouble);
    for (size_t k = 0; k < s.mtp.size(); ++k) {  // sums: [LM, balance, MTP depth 1, ..., depth D]
      loss = loss + s.mtp[k] * (lambda / static_cast<double>(depth) / tokens);
      sums[2 + static_cast<int64_t>(k)] += s.mtp[k].detach().to(at::kDouble);
    }
  } else {
    out.activations = h;
  }
  for (const auto& moe : s.moe) {
    if (training) loss = loss.defined() ? loss + moe.balance_loss / sequences : moe.balance_loss / sequences;
    sums[1] += moe.balance_loss.detach().to(at::kDouble);
  }
  loads_->add(s.moe, model_->moe_blocks_before(static_cast<size_t>(chunk)));
  out.loss = loss;
  return out;
}

parallel::PipelineSpec Trainer::pipeline_spec(int64_t micro_batches) const {
  const bool v = c_.parallel.schedule == config::Schedule::kDualPipeV;
  return {groups_ ? groups_->coords.pp : 0, c_.parallel.pp, micro_batches, c_.parallel.virtual_stages, v,
          v && c_.parallel.overlap_chunk_pairs, {c_.train.micro_batch_size, c_.train.seq_len, c_.model.hidden_size},
          at::TensorOptions().dtype(model_->activation_dtype()).device(device_),
          [this] { if (grad_sync_) grad_sync_->arm(); }, groups_ ? groups_->channels() : parallel::PipelineChannels{}};
}

std::vector<MoeLayerMetrics> Trainer::moe_metrics() {
  // One rank per stage fills in its layers; the sum over the world gathers the whole model.
  at::Tensor table = loads_->layer_table(/*fill=*/dp_rank_ == 0);
  if (groups_) reduce(table, groups_->world.get());
  return moe_layer_metrics(table, loads_->layer_names());
}

StepResult Trainer::step() {
  const auto t0 = Clock::now();
  const double waited0 = groups_ ? groups_->waited_s() : 0.0;
  const int64_t sequences = shape_.global_sequences(step_), micro_batches = shape_.micro_batches_at(step_);
  const double tokens = static_cast<double>(sequences * c_.train.seq_len);
  const int64_t depth = c_.model.mtp_depth;
  if (groups_) maybe_inject_failure(step_, groups_->rank);

  StepResult r;
  r.step = step_;
  r.lr = lr_at(c_.train, step_);
  grad_sync_ ? grad_sync_->zero_grads() : optimizer_->zero_grad();
  loads_->reset();
  at::Tensor sums = at::zeros({2 + depth}, at::TensorOptions().dtype(at::kDouble).device(device_));
  auto forward = [&](int64_t chunk, int64_t mb, const at::Tensor& input) {
    return stage_forward(chunk, input, model::to_device(batches_->train(step_, dp_rank_, mb), device_), sums, true);
  };
  trace_.clear();
  parallel::run_schedule(groups_ ? groups_->pp.get() : nullptr, pipeline_spec(micro_batches), forward, &trace_);

  if (grad_sync_) grad_sync_->reduce();
  const at::Tensor norm_sq = grad_sync_ ? grad_sync_->global_norm_sq() : grad_norm_sq(optimizer_->params());
  // Global means (the last stage holds the LM and MTP sums, every stage its balance terms), before the update: a
  // step whose loss or gradient norm is not finite is not applied (trainer/divergence.h).
  if (groups_) reduce(sums, groups_->world.get());  // on the device; then one copy to the host, with the norm
  const at::Tensor host = at::cat({sums, norm_sq.to(sums.device())}).to(at::kCPU);
  r.grad_norm = std::sqrt(host[2 + depth].item<double>());
  for (int64_t k = 0; k < depth; ++k) r.mtp_losses.push_back(host[2 + k].item<double>() / tokens);
  const double lambda = mtp_weight(tokens_before(step_));
  r.lm_loss = host[0].item<double>() / tokens;
  for (double l : r.mtp_losses) r.mtp_loss += l / static_cast<double>(depth);  // the mean over the depths
  r.balance_loss = host[1].item<double>() / static_cast<double>(sequences);
  r.loss = r.lm_loss + lambda * r.mtp_loss + r.balance_loss;
  const auto verdict = divergence_.judge(r, optimizer_->params(), control_);
  if (verdict == DivergenceGuard::Verdict::kStop) {
    checkpointer_->commit();  // a pending save of an earlier, finite step
    throw std::runtime_error(divergence_.message());
  }
  r.skipped = verdict == DivergenceGuard::Verdict::kSkip;
  if (r.skipped) say("warning: " + divergence_.message() + "\n");
  // The balancer: loads of the whole global batch (all micro-batches, all dp ranks), the same on every replica.
  // Before the update, while the ranks are together after the gradient reduction, so that no collective on dp
  // follows the parameter all-gather the update starts (NCCL would run it after the gathers).
  if (groups_) loads_->reduce([&](at::Tensor& t) { reduce(t, groups_->dp.get()); });
  if (c_.model.balance_mode == config::BalanceMode::kAuxFree && !r.skipped)
    loads_->update_biases(model::bias_update_rate(c_.model, tokens_before(step_)));
  if (!r.skipped) {
    const bool zero = grad_sync_ && grad_sync_->sharded();
    optimizer_->step(r.lr, clip_factor(r.grad_norm, c_.train.grad_clip), zero ? &grad_sync_->piece_grads() : nullptr);
    // ZeRO-1: every replica gets every slice (with overlap_param_gather, finished in the next forward pass).
    if (zero) grad_sync_->gather_params(optimizer_->piece_values());
  }
  ++step_;
  r.peak_memory_bytes = peak_bytes_per_rank(device_, groups_ ? groups_->rank : 0, c_.parallel.world_size,
                                            [&](at::Tensor& t) { reduce(t, groups_ ? groups_->world.get() : nullptr); });
  r.moe = moe_metrics();
  for (const auto& l : r.moe) r.max_vio.push_back(l.max_vio);

  r.step_time_s = seconds_since(t0), r.comm_wait_s = groups_ ? groups_->waited_s() - waited0 : 0.0;
  r.tokens_per_s = tokens / r.step_time_s;
  r.mfu = flops_per_token_ * r.tokens_per_s / (peak_flops_ * static_cast<double>(c_.parallel.world_size));
  run_dir_.record(r);

  // One agreement per step (identical on every rank whether it is needed): a stop signal anywhere, and whether
  // every rank's asynchronous checkpoint writer is done, so that they commit together.
  if (c_.checkpoint.save_on_signal || checkpointer_->pending() || c_.train.exit_duration_mins > 0) {
    const StepVote v = vote(control_, StopSignals::received() != 0, over_budget(), checkpointer_->busy());
    if (checkpointer_->pending() && v.writers_done) checkpointer_->commit();
    r.stop = v.stop, r.out_of_time = v.out_of_time;
  }
  return r;
}

EvalResult Trainer::evaluate() {
  at::NoGradGuard no_grad;
  loads_->reset();
  at::Tensor sums = at::zeros({2 + c_.model.mtp_depth}, at::TensorOptions().dtype(at::kDouble).device(device_));
  for (int64_t i = 0; i < c_.train.eval_batches; ++i) {
    auto forward = [&](int64_t chunk, int64_t mb, const at::Tensor& input) {
      return stage_forward(chunk, input, model::to_device(batches_->validation(i, dp_rank_, mb), device_), sums,
                           false);
    };
    if (c_.parallel.pp == 1) {
      for (int64_t mb = 0; mb < c_.train.micro_batches; ++mb) forward(0, mb, {});
    } else {
      parallel::run_forward_only(*groups_->pp, pipeline_spec(c_.train.micro_batches), forward);
    }
  }
  if (groups_) {
    loads_->reduce([&](at::Tensor& t) { reduce(t, groups_->dp.get()); });
    reduce(sums, groups_->world.get());
  }
  const double tokens = static_cast<double>(c_.train.eval_batches * shape_.global_sequences() * c_.train.seq_len);
  EvalResult r{.loss = sums.to(at::kCPU)[0].item<double>() / tokens, .entropy_rate = batches_->entropy_rate()};
  const std::vector<MoeLayerMetrics> moe = moe_metrics();
  for (const auto& l : moe) r.max_vio += l.max_vio / static_cast<double>(moe.size());
  run_dir_.record(step_, r);
  return r;
}

void Trainer::run() {
  const double entropy = batches_->entropy_rate();
  say(run_header(c_, shape_, peak_flops_, entropy));
  const StopSignals signals(c_.checkpoint.save_on_signal);
  const Progress progress(c_, step_);
  RunSummary summary(step_);
  const auto t0 = Clock::now();
  StepProfiler profiler(c_.logging, run_dir_.path(), groups_ ? groups_->rank : 0, device_.is_cuda());
  while (step_ < c_.train.steps) {
    profiler.before(step_ + 1);
    const StepResult r = summary.add(step());
    if (const std::string trace = profiler.after(step_); !trace.empty()) say("profile trace written: " + trace + "\n");
    const bool last = step_ == c_.train.steps;
    if (progress.due(step_)) say(progress.line(r, seconds_since(t0)));
    const bool interval_save = c_.checkpoint.interval > 0 && (step_ % c_.checkpoint.interval == 0 || last);
    if (interval_save) save_checkpoint(), summary.saved(step_);
    // A stop signal on any rank: every rank saves this step and stops.
    if (r.stop && !last) {
      if (!interval_save) save_checkpoint(), summary.saved(step_);
      settle_checkpoints();
      say(stop_line(step_, c_.train.steps,
                    r.out_of_time ? fmt::format("at its time budget (train.exit_duration_mins = {:g})",
                                                c_.train.exit_duration_mins)
                                  : fmt::format("on {}", StopSignals::name(StopSignals::received())),
                    checkpoint_root()));
      return say(summary.line(seconds_since(t0), entropy, checkpoint_root()));
    }
    if (c_.train.eval_interval > 0 && (step_ % c_.train.eval_interval == 0 || last))
      say(eval_line(step_, summary.add(step_, evaluate()), entropy));
  }
  settle_checkpoints();
  say(summary.line(seconds_since(t0), entropy, checkpoint_root()));
}

}  // namespace moetrain::trainer
