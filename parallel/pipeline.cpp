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
    const at::Tensor loss = forward(0, mb, {}).loss;
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

// The backward pass of one forward: from the activations sent on (given their gradient, unless `last`) and from
// the loss; returns the input's gradient (undefined when there is no input).
at::Tensor backward_pass(const InFlight& f, const at::Tensor& grad_out, bool last) {
  RECORD_USER_SCOPE("backward");
  std::vector<at::Tensor> roots, grads;
  if (!last) {
    roots.push_back(f.activations);
    grads.push_back(grad_out);
  }
  if (f.loss.defined() && f.loss.requires_grad()) {
    roots.push_back(f.loss);
    grads.push_back(at::ones_like(f.loss));
  }
  if (!roots.empty()) torch::autograd::backward(roots, grads);
  if (!f.input.defined()) return {};
  return f.input.grad().defined() ? f.input.grad() : at::zeros_like(f.input);
}

}  // namespace

std::string PipelinePass::name(int64_t chunks) const {
  return chunks == 1 ? fmt::format("{}{}", kind, mb) : fmt::format("{}{}.{}", kind, mb, chunk);
}

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
    StageOutput out = forward(0, f.mb, f.input);
    f.activations = out.activations;
    f.loss = out.loss;
    if (trace) trace->push_back(fmt::format("F{}", f.mb));
    queue.push_back(std::move(f));
    return queue.back().activations;
  };
  auto do_backward = [&](const at::Tensor& grad_out) -> at::Tensor {
    InFlight f = std::move(queue.front());
    queue.pop_front();
    if (f.mb == spec.micro_batches - 1 && spec.before_last_backward) spec.before_last_backward();
    at::Tensor grad_in = backward_pass(f, grad_out, last);
    if (trace) trace->push_back(fmt::format("B{}", f.mb));
    return grad_in;
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

std::vector<PipelinePass> interleaved_order(int64_t stage, int64_t stages, int64_t chunks, int64_t micro_batches) {
  if (chunks > 1 && micro_batches % stages != 0)
    throw std::invalid_argument(fmt::format("interleaved schedule: {} micro-batches are not a multiple of pp = {}",
                                            micro_batches, stages));
  const int64_t total = micro_batches * chunks, group = stages * chunks;
  auto pass = [&](char kind, int64_t k) {
    int64_t chunk = (k % group) / stages;
    if (kind == 'B') chunk = chunks - 1 - chunk;
    return PipelinePass{kind, chunk, (k / group) * stages + k % stages};
  };
  int64_t warmup = chunks == 1 ? stages - stage - 1 : (stages - stage - 1) * 2 + (chunks - 1) * stages;
  if (chunks > 1 && micro_batches == stages) warmup = total;
  warmup = std::min(warmup, total);
  std::vector<PipelinePass> order;
  for (int64_t k = 0; k < warmup; ++k) order.push_back(pass('F', k));
  for (int64_t k = 0; k < total - warmup; ++k) {
    order.push_back(pass('F', warmup + k));
    order.push_back(pass('B', k));
  }
  for (int64_t k = total - warmup; k < total; ++k) order.push_back(pass('B', k));
  return order;
}

namespace {

// Where virtual stage j of an interleaved pipeline lives: (rank, chunk).
std::pair<int, int64_t> virtual_stage_home(int64_t j, int64_t stages) {
  return {static_cast<int>(j % stages), j / stages};
}

// A transfer's tag: unique per direction, micro-batch and receiving chunk, so transfers between two ranks never
// match out of order.
int transfer_tag(char kind, int64_t chunk, int64_t mb, int64_t chunks) {
  return static_cast<int>(2 * (mb * chunks + chunk) + (kind == 'B' ? 1 : 0));
}

}  // namespace

void run_interleaved(Communicator& pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace) {
  const int64_t S = spec.stages, v = spec.chunks, V = S * v;
  const std::vector<PipelinePass> order = interleaved_order(spec.stage, S, v, spec.micro_batches);
  auto buffer = [&] { return at::empty(spec.activation_shape, spec.activation_options); };
  std::map<std::pair<int64_t, int64_t>, InFlight> live;  // (chunk, mb) -> its forward, until its backward
  std::vector<std::unique_ptr<PendingOp>> sends;          // each send's tensor lives until it completed
  size_t last_backward = 0;
  for (size_t i = 0; i < order.size(); ++i)
    if (order[i].kind == 'B') last_backward = i;
  for (size_t i = 0; i < order.size(); ++i) {
    const PipelinePass& p = order[i];
    const int64_t j = p.chunk * S + spec.stage;
    if (p.kind == 'F') {
      InFlight f{p.mb, {}, {}, {}};
      if (j > 0) {
        f.input = buffer();
        pp.recv(f.input, virtual_stage_home(j - 1, S).first, transfer_tag('F', p.chunk, p.mb, v));
        f.input.requires_grad_(true);
      }
      StageOutput out = forward(p.chunk, p.mb, f.input);
      f.activations = out.activations;
      f.loss = out.loss;
      if (j < V - 1) {
        const auto [rank, chunk] = virtual_stage_home(j + 1, S);
        sends.push_back(pp.start_send(f.activations.detach().contiguous(), rank, transfer_tag('F', chunk, p.mb, v)));
      }
      live.emplace(std::pair{p.chunk, p.mb}, std::move(f));
    } else {
      auto it = live.find({p.chunk, p.mb});
      if (it == live.end())
        throw std::logic_error(fmt::format("interleaved schedule: {} before its forward", p.name(v)));
      at::Tensor grad_out;
      if (j < V - 1) {
        grad_out = buffer();
        pp.recv(grad_out, virtual_stage_home(j + 1, S).first, transfer_tag('B', p.chunk, p.mb, v));
      }
      if (i == last_backward && spec.before_last_backward) spec.before_last_backward();
      const at::Tensor grad_in = backward_pass(it->second, grad_out, j == V - 1);
      live.erase(it);
      if (j > 0) {
        const auto [rank, chunk] = virtual_stage_home(j - 1, S);
        sends.push_back(pp.start_send(grad_in.contiguous(), rank, transfer_tag('B', chunk, p.mb, v)));
      }
    }
    if (trace) trace->push_back(p.name(v));
    std::erase_if(sends, [](const std::unique_ptr<PendingOp>& s) { return s->test(); });
  }
  for (auto& s : sends) s->wait();
}

void run_schedule(Communicator* pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace) {
  if (spec.stages == 1) return run_micro_batches(spec, forward);
  if (!pp) throw std::logic_error("a pipeline of several stages needs its communicator");
  if (spec.chunks > 1) return run_interleaved(*pp, spec, forward, trace);
  run_1f1b(*pp, spec, forward, trace);
}

void run_forward_only(Communicator& pp, const PipelineSpec& spec, const StageForward& forward) {
  const int64_t S = spec.stages, v = spec.chunks, V = S * v;
  for (int64_t mb = 0; mb < spec.micro_batches; ++mb) {
    for (int64_t chunk = 0; chunk < v; ++chunk) {
      const int64_t j = chunk * S + spec.stage;
      at::Tensor in;
      if (j > 0) {
        in = at::empty(spec.activation_shape, spec.activation_options);
        pp.recv(in, virtual_stage_home(j - 1, S).first, transfer_tag('F', chunk, mb, v));
      }
      StageOutput out = forward(chunk, mb, in);
      if (j < V - 1) {
        const auto [rank, next_chunk] = virtual_stage_home(j + 1, S);
        pp.send(out.activations.contiguous(), rank, transfer_tag('F', next_chunk, mb, v));
      }
    }
  }
}

namespace {

// A traced pass's name split up: "B3.1" -> ('B', 3, 1); "F2" -> ('F', 2, 0).
PipelinePass parse_pass(const std::string& op) {
  PipelinePass p;
  p.kind = op.at(0);
  const size_t dot = op.find('.');
  p.mb = std::stoll(op.substr(1, dot == std::string::npos ? std::string::npos : dot - 1));
  p.chunk = dot == std::string::npos ? 0 : std::stoll(op.substr(dot + 1));
  return p;
}

}  // namespace

ScheduleTimeline simulate_schedule(const std::vector<ScheduleTrace>& traces) {
  const auto stages = static_cast<int64_t>(traces.size());
  int64_t chunks = 1;
  for (const auto& trace : traces)
    for (const auto& op : trace) chunks = std::max(chunks, parse_pass(op).chunk + 1);
  const int64_t V = stages * chunks;
  // A pass on virtual stage j, by its name there.
  auto at_stage = [&](char kind, int64_t mb, int64_t j) {
    const auto [rank, chunk] = virtual_stage_home(j, stages);
    return std::pair<size_t, std::string>{rank, PipelinePass{kind, chunk, mb}.name(chunks)};
  };
  ScheduleTimeline t;
  t.slots.resize(traces.size());
  std::map<std::pair<size_t, std::string>, int64_t> done;  // (stage, pass) -> finish time
  std::vector<size_t> pos(traces.size(), 0);
  std::vector<int64_t> clock(traces.size(), 0);
  bool progress = true;
  while (progress) {
    progress = false;
    for (size_t s = 0; s < traces.size(); ++s) {
      if (pos[s] >= traces[s].size()) continue;
      const std::string& op = traces[s][pos[s]];
      const PipelinePass p = parse_pass(op);
      const int64_t j = p.chunk * stages + static_cast<int64_t>(s);
      std::vector<std::pair<size_t, std::string>> deps;
      if (p.kind == 'F' && j > 0) deps.push_back(at_stage('F', p.mb, j - 1));
      if (p.kind != 'F') {
        deps.push_back(at_stage('F', p.mb, j));
        if (j + 1 < V) deps.push_back(at_stage(p.kind, p.mb, j + 1));
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
  for (size_t s = 0; s < traces.size(); ++s) {
    if (pos[s] < traces[s].size())
      throw std::invalid_argument(fmt::format("schedule: stage {} cannot run {} (a dependency never runs)", s,
                                              traces[s][pos[s]]));
    t.makespan = std::max(t.makespan, clock[s]);
  }
  for (auto& row : t.slots) row.resize(static_cast<size_t>(t.makespan), "");
  return t;
}

double one_f_one_b_bubble(int64_t stages, int64_t micro_batches, int64_t chunks) {
  return static_cast<double>(stages - 1) / static_cast<double>(chunks * micro_batches + stages - 1);
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
