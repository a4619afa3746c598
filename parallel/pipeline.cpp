#include "parallel/pipeline.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <fmt/format.h>
#include <torch/autograd.h>

#include <algorithm>
#include <deque>
#include <map>
#include <stdexcept>

namespace moetrain::parallel {

void run_micro_batches(const PipelineSpec& spec, const StageForward& forward) {
  for (int64_t mb = 0; mb < spec.micro_batches; ++mb) {
    const at::Tensor loss = forward(mb, {}).loss;
    if (mb == spec.micro_batches - 1 && spec.before_last_backward) spec.before_last_backward();
    RECORD_USER_SCOPE("backward");  // the profiler's range (trainer/profiler.h)
    loss.backward();
  }
}
namespace {

constexpr int kForwardTag = 0;
constexpr int kBackwardTag = 1;

struct InFlight {
  int64_t mb;
  at::Tensor input, activations, loss;
};

}  // namespace

void run_1f1b(Communicator& pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace) {
  const bool first = spec.stage == 0, last = spec.stage == spec.stages - 1;
  const int prev = static_cast<int>(spec.stage) - 1, next = static_cast<int>(spec.stage) + 1;
  auto buffer = [&] { return at::empty(spec.activation_shape, spec.activation_options); };
  auto recv_forward = [&]() -> at::Tensor {
    if (first) return {};
    at::Tensor in = buffer();
    pp.recv(in, prev, kForwardTag);
    return in;
  };
  int64_t next_forward = 0;
  std::deque<InFlight> queue;
  auto do_forward = [&](const at::Tensor& received) {
    InFlight f{next_forward++, received, {}, {}};
    if (f.input.defined()) f.input.requires_grad_(true);
    StageOutput out = forward(f.mb, f.input);
    f.activations = out.activations;
    f.loss = out.loss;
    if (trace) trace->push_back(fmt::format("F{}", f.mb));
    queue.push_back(std::move(f));
    return queue.back().activations;
  };
  auto do_backward = [&](const at::Tensor& grad_out) -> at::Tensor {
    RECORD_USER_SCOPE("backward");
    InFlight f = std::move(queue.front());
    queue.pop_front();
    std::vector<at::Tensor> roots, grads;
    if (!last) {
      roots.push_back(f.activations);
      grads.push_back(grad_out);
    }
    if (f.loss.defined() && f.loss.requires_grad()) {
      roots.push_back(f.loss);
      grads.push_back(at::ones_like(f.loss));
    }
    if (f.mb == spec.micro_batches - 1 && spec.before_last_backward) spec.before_last_backward();
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    if (trace) trace->push_back(fmt::format("B{}", f.mb));
    if (first) return {};
    return f.input.grad().defined() ? f.input.grad() : at::zeros_like(f.input);
  };

  // Lone sends do not block: each is waited for at the end of the schedule (its tensor lives until then).
  std::vector<std::unique_ptr<PendingOp>> sends;
  const int64_t warmup = std::min(spec.stages - spec.stage - 1, spec.micro_batches);
  const int64_t steady = spec.micro_batches - warmup;
  for (int64_t i = 0; i < warmup; ++i) {
    at::Tensor out = do_forward(recv_forward());
    sends.push_back(pp.start_send(out.detach().contiguous(), next, kForwardTag));
  }
  at::Tensor input = steady > 0 ? recv_forward() : at::Tensor();
  for (int64_t i = 0; i < steady; ++i) {
    at::Tensor out = do_forward(input);
    at::Tensor grad_out;
    if (!last) {
      grad_out = buffer();
      pp.send_recv(out.detach().contiguous(), next, kForwardTag, grad_out, next, kBackwardTag);
    }
    at::Tensor grad_in = do_backward(grad_out);
    if (i == steady - 1) {
      if (!first) sends.push_back(pp.start_send(grad_in.contiguous(), prev, kBackwardTag));
    } else if (!first) {
      input = buffer();
      pp.send_recv(grad_in.contiguous(), prev, kBackwardTag, input, prev, kForwardTag);
    } else {
      input = at::Tensor();
    }
  }
  for (int64_t i = 0; i < warmup; ++i) {
    at::Tensor grad_out = buffer();
    pp.recv(grad_out, next, kBackwardTag);
    at::Tensor grad_in = do_backward(grad_out);
    if (!first) sends.push_back(pp.start_send(grad_in.contiguous(), prev, kBackwardTag));
  }
  for (auto& s : sends) s->wait();
}

void run_forward_only(Communicator& pp, const PipelineSpec& spec, const StageForward& forward) {
  const bool first = spec.stage == 0, last = spec.stage == spec.stages - 1;
  for (int64_t mb = 0; mb < spec.micro_batches; ++mb) {
    at::Tensor in;
    if (!first) {
      in = at::empty(spec.activation_shape, spec.activation_options);
      pp.recv(in, static_cast<int>(spec.stage) - 1, kForwardTag);
    }
    StageOutput out = forward(mb, in);
    if (!last) pp.send(out.activations.contiguous(), static_cast<int>(spec.stage) + 1, kForwardTag);
  }
}

ScheduleTimeline simulate_schedule(const std::vector<ScheduleTrace>& traces) {
  const size_t stages = traces.size();
  ScheduleTimeline t;
  t.slots.resize(stages);
  std::map<std::pair<size_t, std::string>, int64_t> done;  // (stage, pass) -> finish time
  std::vector<size_t> pos(stages, 0);
  std::vector<int64_t> clock(stages, 0);
  bool progress = true;
  while (progress) {
    progress = false;
    for (size_t s = 0; s < stages; ++s) {
      if (pos[s] >= traces[s].size()) continue;
      const std::string& op = traces[s][pos[s]];
      const bool fwd = op[0] == 'F';
      std::vector<std::pair<size_t, std::string>> deps;
      if (fwd && s > 0) deps.push_back({s - 1, op});
      if (!fwd) {
        deps.push_back({s, "F" + op.substr(1)});
        if (s + 1 < stages) deps.push_back({s + 1, op});
      }
      int64_t ready = clock[s];
      bool ok = true;
      for (const auto& d : deps) {
        auto it = done.find(d);
        if (it == done.end()) {
          ok = false;
          break;
        }
        ready = std::max(ready, it->second);
      }
      if (!ok) continue;
      t.slots[s].resize(static_cast<size_t>(ready), "");  // idle until its dependencies are done
      t.slots[s].push_back(op);
      clock[s] = ready + 1;
      done[{s, op}] = clock[s];
      ++t.busy;
      ++pos[s];
      progress = true;
    }
  }
  for (size_t s = 0; s < stages; ++s) {
    if (pos[s] < traces[s].size())
      throw std::invalid_argument(fmt::format("schedule: stage {} cannot run {} (a dependency never runs)", s,
                                              traces[s][pos[s]]));
    t.makespan = std::max(t.makespan, clock[s]);
  }
  for (auto& row : t.slots) row.resize(static_cast<size_t>(t.makespan), "");
  return t;
}

double one_f_one_b_bubble(int64_t stages, int64_t micro_batches) {
  return static_cast<double>(stages - 1) / static_cast<double>(micro_batches + stages - 1);
}

double bubble_fraction(const std::vector<ScheduleTrace>& traces) {
  const ScheduleTimeline t = simulate_schedule(traces);
  return t.makespan == 0 ? 0.0
                         : 1.0 - static_cast<double>(t.busy) /
                                     static_cast<double>(static_cast<int64_t>(traces.size()) * t.makespan);
}

std::string draw_schedule(const std::vector<ScheduleTrace>& traces) {
  const ScheduleTimeline t = simulate_schedule(traces);
  size_t width = 1;
  for (const auto& row : t.slots)
    for (const auto& op : row) width = std::max(width, op.size());
  std::string out = fmt::format("{:<8}", "slot");
  for (int64_t i = 0; i < t.makespan; ++i) out += fmt::format(" {:>{}}", i % 10 == 0 ? std::to_string(i) : "", width);
  out.erase(out.find_last_not_of(' ') + 1);
  out += "\n";
  for (size_t s = 0; s < t.slots.size(); ++s) {
    int64_t idle = 0;
    out += fmt::format("{:<8}", fmt::format("stage {}", s));
    for (const auto& op : t.slots[s]) {
      out += fmt::format(" {:>{}}", op.empty() ? "." : op, width);
      idle += op.empty();
    }
    out += fmt::format("   idle {}\n", idle);
  }
  return out;
}

}  // namespace moetrain::parallel
