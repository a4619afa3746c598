#include "trainer/metrics.h"

#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <fmt/format.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "model/moe_load.h"
#include "trainer/preemption.h"

namespace moetrain::trainer {

MetricsWriter::MetricsWriter(const std::string& path, int64_t resumed_step) : path_(path) {
  if (path.empty()) return;
  if (resumed_step >= 0 && std::filesystem::exists(path)) {  // cut after the last record of a step ≤ resumed_step
    std::ifstream in(path);
    uint64_t kept = 0;
    for (std::string line; std::getline(in, line) && !in.eof();) {  // a last line without its newline is torn
      const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.contains("step") || !j["step"].is_number_integer()) break;
      if (j["step"].get<int64_t>() > resumed_step) break;
      kept += line.size() + 1;
    }
    in.close();
    std::error_code ec;
    std::filesystem::resize_file(path, kept, ec);
    if (ec)
      throw std::runtime_error(fmt::format("{}: cannot cut the metrics after step {} for the resume: {}", path,
                                           resumed_step, ec.message()));
  }
  out_.open(path, std::ios::out | (resumed_step >= 0 ? std::ios::app : std::ios::trunc));
  if (!out_) throw std::runtime_error(fmt::format("{}: cannot write metrics: {}", path, std::strerror(errno)));
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (!out_.is_open()) return;
  errno = 0;
  out_ << record.dump() << '\n';
  out_.flush();
  if (!out_)
    throw std::runtime_error(fmt::format("{}: cannot write metrics: {}", path_,
                                         errno ? std::strerror(errno) : "write failed"));
}

std::vector<MoeLayerMetrics> moe_layer_metrics(const at::Tensor& table, const std::vector<std::string>& names) {
  using T = model::MoeLoadTracker;
  const at::Tensor t = table.to(at::kDouble).contiguous();
  const double* v = t.data_ptr<double>();
  std::vector<MoeLayerMetrics> out;
  const int64_t width = t.size(1), experts = (width - T::kColumns) / 2;
  for (size_t i = 0; i < names.size(); ++i) {
    const double* row = v + static_cast<int64_t>(i) * width;
    out.push_back({names[i], row[T::kMaxVio], static_cast<int64_t>(row[T::kMinLoad]),
                   static_cast<int64_t>(row[T::kMaxLoad]), row[T::kBiasMin], row[T::kBiasMax],
                   std::vector<int64_t>(row + T::kColumns, row + T::kColumns + experts),
                   std::vector<double>(row + T::kColumns + experts, row + width)});
  }
  return out;
}

nlohmann::json step_record(const StepResult& r, bool experts) {
  nlohmann::json j = {{"step", r.step + 1},          {"loss", r.loss},         {"lm_loss", r.lm_loss},
                      {"mtp_loss", r.mtp_loss},      {"balance_loss", r.balance_loss},
                      {"grad_norm", r.grad_norm},    {"lr", r.lr},             {"tokens_per_s", r.tokens_per_s},
                      {"step_time_s", r.step_time_s}, {"mfu", r.mfu},   {"comm_wait_s", r.comm_wait_s}};
  if (!r.mtp_losses.empty()) j["mtp_losses"] = r.mtp_losses;
  if (r.skipped) j["skipped"] = true;
  if (!r.peak_memory_bytes.empty()) j["peak_mem_bytes"] = r.peak_memory_bytes;
  for (const auto& l : r.moe) {
    nlohmann::json layer = {{"layer", l.layer},         {"max_vio", l.max_vio},   {"min_tokens", l.min_tokens},
                            {"max_tokens", l.max_tokens}, {"bias_min", l.bias_min}, {"bias_max", l.bias_max}};
    if (experts) layer["tokens"] = l.tokens, layer["bias"] = l.bias;
    j["moe"].push_back(std::move(layer));
  }
  return j;
}

nlohmann::json eval_record(int64_t steps_done, const EvalResult& e) {
  nlohmann::json j = {{"step", steps_done}, {"val_loss", e.loss}, {"val_max_vio", e.max_vio}};
  if (e.entropy_rate >= 0) j["entropy_rate"] = e.entropy_rate;
  return j;
}

Progress::Progress(const config::Config& c, int64_t first_step)
    : steps_(c.train.steps), interval_(c.logging.interval), first_step_(first_step) {}

bool Progress::due(int64_t steps_done) const {
  return steps_done % interval_ == 0 || steps_done == steps_ || steps_done == first_step_ + 1;
}

double Progress::eta_s(int64_t steps_done, double elapsed_s) const {
  const int64_t trained_here = steps_done - first_step_;
  if (trained_here <= 0) return -1;
  return elapsed_s / static_cast<double>(trained_here) * static_cast<double>(steps_ - steps_done);
}

std::string Progress::line(const StepResult& r, double elapsed_s) const {
  const int64_t done = r.step + 1;
  // The first line of a run also gives the most memory a rank's live tensors took during the step.
  std::string memory;
  if (done == first_step_ + 1 && !r.peak_memory_bytes.empty()) {
    const auto top = std::max_element(r.peak_memory_bytes.begin(), r.peak_memory_bytes.end());
    memory = fmt::format(" | peak mem {:.1f} MiB (rank {})", *top / (1024.0 * 1024.0),
                         top - r.peak_memory_bytes.begin());
  }
  return fmt::format(
      "step {:>{}}/{} | loss {:.4f} | lm {:.4f} | mtp {:.4f} | grad {:.3f} | lr {:.2e} | {:.0f} tok/s | MFU {:.1f}% | "
      "max-vio {:.2f} | ETA {}{}\n",
      done, fmt::formatted_size("{}", steps_), steps_, r.loss, r.lm_loss, r.mtp_loss, r.grad_norm, r.lr,
      r.tokens_per_s, 100 * r.mfu, r.max_vio.empty() ? 0.0 : *std::max_element(r.max_vio.begin(), r.max_vio.end()),
      format_duration(eta_s(done, elapsed_s)), memory);
}

const StepResult& RunSummary::add(const StepResult& r) {
  steps_done_ = r.step + 1;
  tokens_ += r.tokens_per_s * r.step_time_s;
  step_s_ += r.step_time_s;
  mfu_s_ += r.mfu * r.step_time_s;
  for (double b : r.peak_memory_bytes) peak_bytes_ = std::max(peak_bytes_, b);
  return r;
}

const EvalResult& RunSummary::add(int64_t steps_done, const EvalResult& e) {
  eval_step_ = steps_done, val_loss_ = e.loss;
  return e;
}

std::string RunSummary::line(double wall_s, double entropy_rate, const std::string& checkpoint_root) const {
  const int64_t trained = std::max<int64_t>(steps_done_ - first_step_, 0);
  std::string s = fmt::format("summary: {} steps ({} → {}), {:.0f} tokens in {} | {:.0f} tokens/s, MFU {:.1f}% | ",
                              trained, first_step_, std::max(steps_done_, first_step_), tokens_,
                              format_duration(wall_s), step_s_ > 0 ? tokens_ / step_s_ : 0.0,
                              step_s_ > 0 ? 100 * mfu_s_ / step_s_ : 0.0);
  if (eval_step_ >= 0)
    s += fmt::format("val loss {:.4f} at step {}{} | ", val_loss_, eval_step_,
                     entropy_rate >= 0 ? fmt::format(" (gap {:.4f} to the entropy rate)", val_loss_ - entropy_rate)
                                       : "");
  s += checkpoints_ > 0 ? fmt::format("{} checkpoint(s), the last of step {} in {} | ", checkpoints_, last_saved_,
                                      checkpoint_root)
                        : "no checkpoint | ";
  return s + fmt::format("peak mem {:.1f} MiB\n", peak_bytes_ / (1024.0 * 1024.0));
}

std::string run_header(const config::Config& c, const data::BatchShape& shape, double peak_flops, double entropy_rate) {
  const int64_t T = c.train.seq_len;
  const std::string per_step =
      shape.ramp ? fmt::format("{} → {} tokens/step (batch-size ramp over the first {} steps)",
                               shape.global_sequences(0) * T, shape.global_sequences() * T, shape.ramp->ramp_steps())
                 : fmt::format("{} tokens/step", shape.global_sequences() * T);
  return fmt::format("training {} for {} steps on {} rank(s) (pp {} × dp {}, ep {}), {}: {}, peak {:.1f} "
                     "GFLOP/s per rank{}\n",
                     c.file, c.train.steps, c.parallel.world_size, c.parallel.pp, c.parallel.dp, c.parallel.ep,
                     config::name(c.train.device), per_step, peak_flops / 1e9,
                     entropy_rate >= 0 ? fmt::format(", corpus entropy rate {:.4f} nats/token", entropy_rate) : "");
}

std::string eval_line(int64_t steps_done, const EvalResult& e, double entropy_rate) {
  return fmt::format("eval step {} | val loss {:.4f}{} | val max-vio {:.3f}\n", steps_done, e.loss,
                     entropy_rate >= 0
                         ? fmt::format(" (entropy rate {:.4f}, gap {:.4f})", entropy_rate, e.loss - entropy_rate)
                         : "",
                     e.max_vio);
}

std::string stop_line(int64_t steps_done, int64_t steps, const std::string& why, const std::string& checkpoint_root) {
  return fmt::format("stopped at step {} of {} {}: checkpoint saved in {}; continue with --resume auto\n", steps_done,
                     steps, why, checkpoint_root);
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  auto s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

double measure_peak_flops(c10::Device device, c10::ScalarType dtype) {
  // Large enough to reach the device's peak (on the CPU about 10 ms a product on 2 cores); the best of 10.
  const int64_t n = device.is_cuda() ? 4096 : 1024;
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  at::Tensor a = at::randn({n, n}, opts), b = at::randn({n, n}, opts);
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
  };
  for (int i = 0; i < 2; ++i) at::mm(a, b);  // warm-up
  sync();
  double best = 0;
  for (int i = 0; i < 10; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor c = at::mm(a, b);
    sync();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0) best = std::max(best, 2.0 * static_cast<double>(n * n * n) / dt);
  }
  return best;
}

void print_line(const std::string& line) {
  fmt::print("{}", line);
  if (std::fflush(stdout) != 0 || std::ferror(stdout))
    throw std::runtime_error(fmt::format("cannot write progress to stdout: {}", std::strerror(errno)));
}

}  // namespace moetrain::trainer
