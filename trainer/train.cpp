#include "trainer/train.h"

#include "trainer/lr_schedule.h"

#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "configs/loader.h"
#include "model/balancer.h"
#include "model/model_spec.h"
#include "precision/policy.h"

namespace moetrain::trainer {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

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

Trainer::Trainer(const config::Config& config, std::string run_dir, bool verbose)
    : c_(config), run_dir_(std::move(run_dir)), verbose_(verbose) {
  if (c_.parallel.world_size != 1)
    throw std::runtime_error(fmt::format(
        "{}this build trains on one process (world size 1); the config's layout is pp {} × dp {} (ep {})",
        c_.where("parallel.pp"), c_.parallel.pp, c_.parallel.dp, c_.parallel.ep));
  at::set_num_threads(static_cast<int>(c_.parallel.intra_op_threads));
  const auto policy = precision::policy_for(c_.precision);
  model_ = model::Transformer(c_.model, model::StageSpec::whole(c_.model), policy.mode);
  model::init_parameters(*model_, static_cast<uint64_t>(c_.train.seed), c_.model.init_std);

  std::vector<NamedParam> params;
  for (auto& item : model_->named_parameters(/*recurse=*/true)) params.push_back({item.key(), item.value()});
  optimizer_ = std::make_unique<AdamW>(std::move(params), c_.train,
                                       policy.moment_bytes == 2 ? at::kBFloat16 : at::kFloat);

  // The MoE layers in the order the forward pass reports them: main blocks, then the MTP modules' blocks.
  for (auto& block : model_->layers)
    if (block->moe) {
      router_biases_.push_back(&block->moe->router->bias);
      moe_names_.push_back(fmt::format("layers.{}", &block - &model_->layers[0] + model_->stage().first_layer));
    }
  for (size_t k = 0; k < model_->mtp.size(); ++k)
    if (model_->mtp[k]->block->moe) {
      router_biases_.push_back(&model_->mtp[k]->block->moe->router->bias);
      moe_names_.push_back(fmt::format("mtp.{}", k));
    }

  batches_ = data::make_batch_source(c_);
  flops_per_token_ = model::flops_per_token(c_.model, c_.train.seq_len).total();
  peak_flops_ = c_.train.peak_flops > 0 ? c_.train.peak_flops : measure_peak_flops();
  if (!run_dir_.empty()) {
    std::filesystem::create_directories(run_dir_);
    config::write_resolved(c_, run_dir_ + "/config.yaml");
    metrics_ = std::make_unique<MetricsWriter>(run_dir_ + "/metrics.jsonl");
  }
}

double Trainer::mtp_weight(int64_t tokens_seen) const {
  const auto& m = c_.model;
  const bool switched = m.mtp_loss_weight_switch_tokens > 0 && tokens_seen >= m.mtp_loss_weight_switch_tokens;
  return switched ? m.mtp_loss_weight_final : m.mtp_loss_weight;
}

StepResult Trainer::step() {
  const auto t0 = Clock::now();
  const auto shape = data::BatchShape::from(c_);
  const int64_t sequences = shape.global_sequences();
  const double tokens = static_cast<double>(sequences * c_.train.seq_len);
  const int64_t depth = c_.model.mtp_depth;
  const double lambda = mtp_weight(step_ * sequences * c_.train.seq_len);

  StepResult r;
  r.step = step_;
  r.lr = lr_at(c_.train, step_);
  optimizer_->zero_grad();
  std::vector<at::Tensor> loads(router_biases_.size());
  double lm = 0, mtp = 0, balance = 0;
  for (int64_t mb = 0; mb < c_.train.micro_batches; ++mb) {
    at::Tensor window = batches_->train(step_, /*dp_rank=*/0, mb);
    model::LossSums s = model_->forward(window, exchange_);
    // Sums over this micro-batch divided by the global batch's token and sequence counts: the mean over the
    // global batch whatever the split into micro-batches and ranks.
    at::Tensor loss = s.lm / tokens + s.balance / static_cast<double>(sequences);
    at::Tensor mtp_sum = at::zeros({}, s.lm.options());
    for (const auto& l : s.mtp) mtp_sum = mtp_sum + l;
    if (depth > 0) loss = loss + mtp_sum * (lambda / static_cast<double>(depth) / tokens);
    loss.backward();
    lm += s.lm.item<double>();
    mtp += mtp_sum.item<double>();
    balance += s.balance.item<double>();
    for (size_t i = 0; i < loads.size(); ++i) loads[i] = loads[i].defined() ? loads[i] + s.moe[i].counts : s.moe[i].counts;
  }
  r.lm_loss = lm / tokens;
  r.mtp_loss = depth > 0 ? mtp / tokens / static_cast<double>(depth) : 0.0;
  r.balance_loss = balance / static_cast<double>(sequences);
  r.loss = r.lm_loss + lambda * r.mtp_loss + r.balance_loss;

  r.grad_norm = grad_norm(optimizer_->params());
  clip_grads(optimizer_->params(), r.grad_norm, c_.train.grad_clip);
  optimizer_->step(r.lr);
  for (size_t i = 0; i < loads.size(); ++i) {
    if (c_.model.balance_mode == "aux_free") model::update_bias(*router_biases_[i], loads[i], c_.model.bias_update_rate);
    r.max_vio.push_back(model::max_violation(loads[i]));
  }
  ++step_;

  r.step_time_s = seconds_since(t0);
  r.tokens_per_s = tokens / r.step_time_s;
  r.mfu = flops_per_token_ * r.tokens_per_s / (peak_flops_ * static_cast<double>(c_.parallel.world_size));
  if (metrics_) {
    nlohmann::json j = {{"step", step_},           {"loss", r.loss},         {"lm_loss", r.lm_loss},
                        {"mtp_loss", r.mtp_loss},  {"balance_loss", r.balance_loss},
                        {"grad_norm", r.grad_norm}, {"lr", r.lr},           {"tokens_per_s", r.tokens_per_s},
                        {"step_time_s", r.step_time_s}, {"mfu", r.mfu}};
    for (size_t i = 0; i < loads.size(); ++i) {
      at::Tensor bias = *router_biases_[i];
      j["moe"].push_back({{"layer", moe_names_[i]},
                          {"max_vio", r.max_vio[i]},
                          {"min_tokens", loads[i].min().item<int64_t>()},
                          {"max_tokens", loads[i].max().item<int64_t>()},
                          {"bias_min", bias.min().item<double>()},
                          {"bias_max", bias.max().item<double>()}});
    }
    metrics_->write(j);
  }
  return r;
}

EvalResult Trainer::evaluate() {
  at::NoGradGuard no_grad;
  const auto shape = data::BatchShape::from(c_);
  double lm = 0;
  std::vector<at::Tensor> loads(router_biases_.size());
  for (int64_t i = 0; i < c_.train.eval_batches; ++i)
    for (int64_t mb = 0; mb < c_.train.micro_batches; ++mb) {
      model::LossSums s = model_->forward(batches_->validation(i, /*dp_rank=*/0, mb), exchange_);
      lm += s.lm.item<double>();
      for (size_t l = 0; l < loads.size(); ++l)
        loads[l] = loads[l].defined() ? loads[l] + s.moe[l].counts : s.moe[l].counts;
    }
  EvalResult r;
  r.loss = lm / static_cast<double>(c_.train.eval_batches * shape.global_sequences() * c_.train.seq_len);
  for (const auto& l : loads) r.max_vio += model::max_violation(l) / static_cast<double>(loads.size());
  if (metrics_) metrics_->write({{"step", step_}, {"val_loss", r.loss}, {"val_max_vio", r.max_vio}});
  return r;
}

void Trainer::run() {
  const double entropy = batches_->entropy_rate();
  if (verbose_) {
    fmt::print("training {} for {} steps: {} tokens/step, peak {:.1f} GFLOP/s per rank{}\n", c_.file, c_.train.steps,
               data::BatchShape::from(c_).global_sequences() * c_.train.seq_len, peak_flops_ / 1e9,
               entropy >= 0 ? fmt::format(", corpus entropy rate {:.4f} nats/token", entropy) : "");
    std::fflush(stdout);
  }
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
}

}  // namespace moetrain::trainer
