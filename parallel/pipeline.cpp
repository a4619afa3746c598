#include "parallel/pipeline.h"

#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <fmt/format.h>
#include <torch/autograd.h>

#include <algorithm>
#include <deque>
#include <map>
#include <stdexcept>
#include <thread>
#include <tuple>

#include "parallel/expert_exchange.h"
#include "precision/weight_grad_store.h"

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

std::vector<PipelinePass> dualpipev_order(int64_t stage, int64_t stages, int64_t micro_batches) {
  if (micro_batches < 2 * stages)
    throw std::invalid_argument(fmt::format("dualpipev schedule: {} micro-batches, fewer than 2·pp = {}",
                                            micro_batches, 2 * stages));
  const int64_t r = stage, pp = stages;
  std::vector<PipelinePass> order;
  int64_t forwards[2] = {0, 0}, backwards[2] = {0, 0};
  std::deque<PipelinePass> deferred;  // the split backwards whose weight gradients wait, oldest first
  auto F = [&](int64_t c) { order.push_back({'F', c, forwards[c]++}); };
  auto B = [&](int64_t c, bool split) {
    order.push_back({split ? 'I' : 'B', c, backwards[c]++});
    if (split) deferred.push_back({'W', c, order.back().mb});
  };
  auto W = [&] {
    order.push_back(deferred.front());
    deferred.pop_front();
  };
  for (int64_t i = 0; i < (pp - r - 1) * 2; ++i) F(0);  // 1: nF0
  for (int64_t i = 0; i < r + 1; ++i) F(0), F(1);        // 2: nF0F1
  for (int64_t i = 0; i < pp - r - 1; ++i) B(1, true), W(), F(1);  // 3: nB1W1F1, split
  for (int64_t i = 0; i < micro_batches - 2 * pp + r + 1; ++i) F(0), B(1, false), F(1), B(0, false);  // 4
  for (int64_t i = 0; i < pp - r - 1; ++i) B(1, false), F(1), B(0, false);  // 5: nB1F1B0
  bool split = false;                                                           // 6: nB1B0, the second half split
  for (int64_t i = 0; i < r + 1; ++i) {
    if (i == (r + 1) / 2 && r % 2 == 1) split = true;
    B(1, split);
    if (i == (r + 1) / 2 && r % 2 == 0) split = true;
    B(0, split);
  }
  for (int64_t i = 0; i < pp - r - 1; ++i) W(), B(0, true);  // 7: nWB0, split
  while (!deferred.empty()) W();                             // 8: nW (r + 1 of them)
  return order;
}

namespace {

// A transfer's tag: unique per direction, micro-batch and receiving chunk, so transfers between two ranks never
// match out of order.
int transfer_tag(char kind, int64_t chunk, int64_t mb, int64_t chunks) {
  return static_cast<int>(2 * (mb * chunks + chunk) + (kind == 'F' ? 0 : 1));
}

VirtualStages placement(const PipelineSpec& spec) { return {spec.stages, spec.chunks, spec.v_shape}; }

// A transfer of `kind` to or from pipeline rank `peer`: over its channel when the spec has one (group rank 0 sends,
// 1 receives: one ordered stream per direction and kind, as NCCL needs), else over the pp group by tag.
std::unique_ptr<PendingOp> send_to(Communicator& pp, const PipelineSpec& spec, char kind, int64_t peer,
                                   const at::Tensor& t, int tag) {
  if (Communicator* ch = spec.channels ? spec.channels(kind, spec.stage, peer) : nullptr)
    return ch->start_send(t, 1, tag);
  return pp.start_send(t, static_cast<int>(peer), tag);
}

void recv_from(Communicator& pp, const PipelineSpec& spec, char kind, int64_t peer, at::Tensor& t, int tag) {
  if (Communicator* ch = spec.channels ? spec.channels(kind, peer, spec.stage) : nullptr) return ch->recv(t, 0, tag);
  pp.recv(t, static_cast<int>(peer), tag);
}

// Runs this rank's passes in `order`: forwards and backwards through its chunks, split backwards deferring their
// weight gradients, W passes running them. Transfers to another rank are non-blocking sends (each tensor kept until
// its send completed, checked after every pass) and blocking receives just before the pass that needs them; a
// hand-over between two chunks of this rank stays here.
void run_passes(Communicator& pp, const PipelineSpec& spec, const std::vector<PipelinePass>& order,
                const StageForward& forward, ScheduleTrace* trace) {
  const VirtualStages where = placement(spec);
  const int64_t V = where.count(), v = spec.chunks, me = spec.stage;
  auto buffer = [&] { return at::empty(spec.activation_shape, spec.activation_options); };
  std::map<std::pair<int64_t, int64_t>, InFlight> live;  // (chunk, mb) -> its forward, until its backward
  std::map<std::pair<int64_t, int64_t>, at::Tensor> local_inputs, local_grads;  // hand-overs within this rank
  std::vector<std::unique_ptr<PendingOp>> sends;  // each send's tensor lives until it completed
  // With overlap the gradient buckets start reducing during the last backward pass; deferred weight gradients would
  // land after that, so a schedule with W passes reduces them all after its passes (GradSync::reduce()).
  bool splits = false;
  size_t last_backward = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    splits = splits || order[i].kind == 'W';
    if (order[i].kind == 'B' || order[i].kind == 'I') last_backward = i;
  }
  auto hand_over = [&](char kind, int64_t j, int64_t mb, const at::Tensor& t) {  // to virtual stage j
    const auto [rank, chunk] = where.home(j);
    if (rank == me)
      (kind == 'F' ? local_inputs : local_grads)[{chunk, mb}] = t.detach();
    else
      sends.push_back(send_to(pp, spec, kind, rank, t.detach().contiguous(), transfer_tag(kind, chunk, mb, v)));
  };
  auto take = [&](char kind, int64_t j_from, int64_t chunk, int64_t mb) {  // from virtual stage j_from
    auto& local = kind == 'F' ? local_inputs : local_grads;
    if (auto it = local.find({chunk, mb}); it != local.end()) {
      at::Tensor t = std::move(it->second);
      local.erase(it);
      return t;
    }
    at::Tensor t = buffer();
    recv_from(pp, spec, kind, where.home(j_from).first, t, transfer_tag(kind, chunk, mb, v));
    return t;
  };
  // A forward in three parts: its input received, its computation (which may run on another thread), its output
  // handed on.
  auto forward_input = [&](const PipelinePass& p) {
    InFlight f{p.mb, {}, {}, {}};
    const int64_t j = where.of(me, p.chunk);
    if (j > 0) f.input = take('F', j - 1, p.chunk, p.mb).requires_grad_(true);
    return f;
  };
  auto forward_compute = [&](const PipelinePass& p, InFlight& f) {
    StageOutput out = forward(p.chunk, p.mb, f.input);
    f.activations = out.activations;
    f.loss = out.loss;
  };
  auto forward_done = [&](const PipelinePass& p, InFlight f) {
    const int64_t j = where.of(me, p.chunk);
    if (j < V - 1) hand_over('F', j + 1, p.mb, f.activations);
    live.emplace(std::pair{p.chunk, p.mb}, std::move(f));
  };
  // A backward likewise: its live forward and output gradient, its computation, its input's gradient handed back.
  struct Backward {
    std::map<std::pair<int64_t, int64_t>, InFlight>::iterator it;
    at::Tensor grad_out, grad_in;
  };
  auto backward_input = [&](const PipelinePass& p) {
    Backward b{live.find({p.chunk, p.mb}), {}, {}};
    if (b.it == live.end())
      throw std::logic_error(fmt::format("pipeline schedule: {} before its forward", p.name(v)));
    const int64_t j = where.of(me, p.chunk);
    if (j < V - 1) b.grad_out = take('B', j + 1, p.chunk, p.mb);
    return b;
  };
  auto backward_compute = [&](const PipelinePass& p, Backward& b) {
    const precision::DeferWeightGrads split(p.kind == 'I');
    b.grad_in = backward_pass(b.it->second, b.grad_out, where.of(me, p.chunk) == V - 1);
  };
  auto backward_done = [&](const PipelinePass& p, Backward& b) {
    live.erase(b.it);
    if (const int64_t j = where.of(me, p.chunk); j > 0) hand_over('B', j - 1, p.mb, b.grad_in);
  };
  auto is_backward = [](const PipelinePass& p) { return p.kind == 'B' || p.kind == 'I'; };
  for (size_t i = 0; i < order.size(); ++i) {
    const PipelinePass& p = order[i];
    const bool pair = spec.overlap_pairs && i + 1 < order.size() &&
                      ((p.kind == 'F' && is_backward(order[i + 1])) || (is_backward(p) && order[i + 1].kind == 'F')) &&
                      (p.chunk != order[i + 1].chunk || p.mb != order[i + 1].mb);
    if (pair) {
      // DualPipe's overlapped pair: both inputs first, then the forward on a thread of its own while the backward
      // runs here on the backward lane of the expert exchange (its all-to-alls on their own communicator), then
      // both outputs handed on, in the schedule's order.
      const PipelinePass& fp = p.kind == 'F' ? p : order[i + 1];
      const PipelinePass& bp = p.kind == 'F' ? order[i + 1] : p;
      InFlight f = forward_input(fp);
      Backward b = backward_input(bp);
      std::exception_ptr failed;
      const at::ThreadLocalState state;  // grad mode, the profiler's ranges
      std::thread worker([&, state] {
        const at::ThreadLocalStateGuard guard(state);
        try {
          forward_compute(fp, f);
        } catch (...) {
          failed = std::current_exception();
        }
      });
      try {
        const BackwardLane lane;
        backward_compute(bp, b);
      } catch (...) {
        worker.join();
        throw;
      }
      worker.join();
      if (failed) std::rethrow_exception(failed);
      forward_done(fp, std::move(f));
      backward_done(bp, b);
      if (trace) trace->insert(trace->end(), {p.name(v), order[i + 1].name(v)});
      ++i;
    } else if (p.kind == 'F') {
      InFlight f = forward_input(p);
      forward_compute(p, f);
      forward_done(p, std::move(f));
    } else if (p.kind == 'W') {  // the oldest split backward's weight gradients (dualpipev_order keeps them FIFO)
      RECORD_USER_SCOPE("backward");
      precision::WeightGradStore::run_oldest();
    } else {
      Backward b = backward_input(p);
      if (i == last_backward && !splits && spec.before_last_backward) spec.before_last_backward();
      backward_compute(p, b);
      backward_done(p, b);
    }
    if (trace && !pair) trace->push_back(p.name(v));
    std::erase_if(sends, [](const std::unique_ptr<PendingOp>& s) { return s->test(); });
  }
  for (auto& s : sends) s->wait();
  if (precision::WeightGradStore::units() != 0)
    throw std::logic_error("pipeline schedule: deferred weight gradients left at the end of the step");
}

}  // namespace

void run_interleaved(Communicator& pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace) {
  run_passes(pp, spec, interleaved_order(spec.stage, spec.stages, spec.chunks, spec.micro_batches), forward, trace);
}

void run_dualpipev(Communicator& pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace) {
  // The forwards record linear layers whose backward can defer its weight gradients.
  struct SplitForward {
    SplitForward() { precision::WeightGradStore::set_split_forward(true); }
    ~SplitForward() {
      precision::WeightGradStore::set_split_forward(false);
      precision::WeightGradStore::clear();  // nothing left queued after a failed step
    }
  } split;
  run_passes(pp, spec, dualpipev_order(spec.stage, spec.stages, spec.micro_batches), forward, trace);
}

void run_schedule(Communicator* pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace) {
  if (spec.stages == 1) return run_micro_batches(spec, forward);
  if (!pp) throw std::logic_error("a pipeline of several stages needs its communicator");
  if (spec.v_shape) return run_dualpipev(*pp, spec, forward, trace);
  if (spec.chunks > 1) return run_interleaved(*pp, spec, forward, trace);
  run_1f1b(*pp, spec, forward, trace);
}

void run_forward_only(Communicator& pp, const PipelineSpec& spec, const StageForward& forward) {
  const VirtualStages where = placement(spec);
  const int64_t V = where.count(), v = spec.chunks;
  for (int64_t mb = 0; mb < spec.micro_batches; ++mb) {
    at::Tensor local;  // a hand-over between two chunks of this rank (the bottom of a V)
    for (int64_t j = 0; j < V; ++j) {  // the micro-batch down the pipeline, this rank's chunks where it is
      const auto [rank, chunk] = where.home(j);
      if (rank != spec.stage) continue;
      at::Tensor in = local;
      if (j > 0 && !in.defined()) {
        in = at::empty(spec.activation_shape, spec.activation_options);
        recv_from(pp, spec, 'F', where.home(j - 1).first, in, transfer_tag('F', chunk, mb, v));
      }
      StageOutput out = forward(chunk, mb, in);
      local = at::Tensor();
      if (j == V - 1) continue;
      const auto [next_rank, next_chunk] = where.home(j + 1);
      if (next_rank == spec.stage)
        local = out.activations;
      else
        send_to(pp, spec, 'F', next_rank, out.activations.contiguous(), transfer_tag('F', next_chunk, mb, v))->wait();
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

ScheduleTimeline simulate_schedule(const std::vector<ScheduleTrace>& traces, const ReplayOptions& options) {
  const auto stages = static_cast<int64_t>(traces.size());
  int64_t chunks = 1;
  for (const auto& trace : traces)
    for (const auto& op : trace) chunks = std::max(chunks, parse_pass(op).chunk + 1);
  const VirtualStages where{stages, chunks, options.v_shape};
  auto duration = [&](char kind) {
    switch (kind) {
      case 'F': return options.forward;
      case 'B': return options.backward;
      case 'I': return options.input_grad;
      default: return options.weight_grad;
    }
  };
  ScheduleTimeline t;
  t.slots.resize(traces.size());
  // (pass class, virtual stage, micro-batch) -> finish time; 'B' stands for B and I (the input gradient is there).
  std::map<std::tuple<char, int64_t, int64_t>, int64_t> done;
  std::vector<size_t> pos(traces.size(), 0);
  std::vector<int64_t> clock(traces.size(), 0);
  bool progress = true;
  while (progress) {
    progress = false;
    for (size_t s = 0; s < traces.size(); ++s) {
      if (pos[s] >= traces[s].size()) continue;
      const std::string& op = traces[s][pos[s]];
      const PipelinePass p = parse_pass(op);
      const int64_t j = where.of(static_cast<int64_t>(s), p.chunk);
      const char cls = p.kind == 'I' ? 'B' : p.kind;
      std::vector<std::tuple<char, int64_t, int64_t>> deps;
      if (cls == 'F' && j > 0) deps.push_back({'F', j - 1, p.mb});
      if (cls == 'B') {
        deps.push_back({'F', j, p.mb});
        if (j + 1 < where.count()) deps.push_back({'B', j + 1, p.mb});
      }
      if (cls == 'W') deps.push_back({'B', j, p.mb});
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
      const int64_t length = duration(p.kind);
      t.slots[s].resize(static_cast<size_t>(ready), "");  // idle until its dependencies are done
      t.slots[s].insert(t.slots[s].end(), static_cast<size_t>(length), op);
      clock[s] = ready + length;
      done[{cls, j, p.mb}] = clock[s];
      t.busy += length;
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

double dualpipev_bubble(int64_t stages, int64_t micro_batches) {
  return static_cast<double>(stages - 1) / static_cast<double>(6 * micro_batches + stages - 1);
}

double schedule_bubble(const config::ParallelConfig& p, int64_t micro_batches) {
  return p.schedule == config::Schedule::kDualPipeV ? dualpipev_bubble(p.pp, micro_batches)
                                                    : one_f_one_b_bubble(p.pp, micro_batches, p.virtual_stages);
}

double bubble_fraction(const std::vector<ScheduleTrace>& traces, const ReplayOptions& options) {
  const ScheduleTimeline t = simulate_schedule(traces, options);
  return t.makespan == 0 ? 0.0
                         : 1.0 - static_cast<double>(t.busy) /
                                     static_cast<double>(static_cast<int64_t>(traces.size()) * t.makespan);
}

std::string draw_schedule(const std::vector<ScheduleTrace>& traces, const ReplayOptions& options) {
  const ScheduleTimeline t = simulate_schedule(traces, options);
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
