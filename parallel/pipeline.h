// The pipeline schedules.
// 1F1B (PipeDream-Flush, as in Megatron-Core): stage s runs min(pp − s − 1, m) warm-up forwards, then alternates
// one forward and one backward, then drains the remaining backwards. Activations go to the next stage and their
// gradients come back over the pp group; in the steady state a send and the matching receive of the neighbour are
// one operation, so two stages sending to each other never deadlock. The other sends (warm-up forwards, drain
// backwards) do not block the stage: they complete while it computes on.
// Interleaved 1F1B (Megatron-Core's virtual pipeline): each rank holds v model chunks, chunk c of rank r being
// virtual stage c·pp + r, so a micro-batch passes every rank v times (the last rank hands it back to the first);
// the passes are ordered as Megatron-Core orders them (interleaved_order), every send is non-blocking and tagged
// with its micro-batch and chunk, and a pass waits only for the one transfer it needs.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "config/config.h"
#include "parallel/communicator.h"

namespace moetrain::parallel {

// A stage's forward pass of micro-batch `mb` given the activations received from the previous stage (undefined
// on the first stage). Returns the activations to send on (undefined on the last stage) and the scalar this stage
// backpropagates from besides them (the loss on the last stage; the stage's own balance-loss terms elsewhere;
// undefined when none).
struct StageOutput {
  at::Tensor activations;
  at::Tensor loss;
};
// Where the virtual stages of a pipeline live: `stages` ranks with `chunks` model chunks each. Interleaved (and
// 1F1B, one chunk): chunk c of rank r is virtual stage c·stages + r. V-shaped (DualPipeV, two chunks): chunk 0 of
// rank r is virtual stage r, chunk 1 is 2·stages − 1 − r, so rank 0 holds the first and the last.
struct VirtualStages {
  int64_t stages = 1, chunks = 1;
  bool v_shape = false;
  static VirtualStages from(const config::ParallelConfig& p) {
    return {p.pp, p.virtual_stages, p.schedule == config::Schedule::kDualPipeV};
  }
  int64_t count() const { return stages * chunks; }
  int64_t of(int64_t rank, int64_t chunk) const {
    return v_shape && chunk == 1 ? 2 * stages - 1 - rank : chunk * stages + rank;
  }
  std::pair<int64_t, int64_t> home(int64_t j) const {  // (rank, chunk) of virtual stage j
    if (v_shape) return j < stages ? std::pair{j, int64_t{0}} : std::pair{2 * stages - 1 - j, int64_t{1}};
    return {j % stages, j / stages};
  }
};

// The pipeline channels of the interleaved and DualPipeV schedules: for a transfer of `kind` ('F': activations,
// 'B': their gradients) from pipeline rank `from` to `to`, a communicator of two ranks whose rank 0 sends and rank 1
// receives (parallel/process_groups.h); null where there is none (then the pp group carries it, by tag).
using PipelineChannels = std::function<Communicator*(char kind, int64_t from, int64_t to)>;

// `chunk`: which of the rank's model chunks (0 with one chunk per rank).
using StageForward = std::function<StageOutput(int64_t chunk, int64_t mb, const at::Tensor& input)>;

struct PipelineSpec {
  int64_t stage = 0, stages = 1, micro_batches = 1;
  int64_t chunks = 1;  // model chunks per rank (the interleaved schedule's virtual stages)
  bool v_shape = false;  // DualPipeV's placement and order (chunks = 2)
  // DualPipeV: a forward and the backward that follows it (or the reverse) run at once, the forward on a thread of
  // its own, the backward on the backward lane of the expert exchange (parallel/expert_exchange.h).
  bool overlap_pairs = false;
  std::vector<int64_t> activation_shape;  // [micro_batch_size, seq_len, hidden]
  at::TensorOptions activation_options;
  std::function<void()> before_last_backward;  // called before the step's last backward pass on this stage
  PipelineChannels channels;                   // interleaved and DualPipeV: each direction's own communicator
};

// One stage (pp = 1): each micro-batch's forward, then its backward.
void run_micro_batches(const PipelineSpec& spec, const StageForward& forward);

// The order this stage ran its passes in ("F0", "B0", ...; with several chunks per rank "F0.1": micro-batch 0,
// chunk 1), for the bubble measurement of bench/parallel.
using ScheduleTrace = std::vector<std::string>;

// One pass of a stage through one of its chunks: forward ('F'); backward ('B', input and weight gradients); the
// input-gradient half of a split backward ('I', its weight gradients deferred); or the deferred weight gradients of
// an earlier 'I' pass ('W', named by that pass's micro-batch and chunk).
struct PipelinePass {
  char kind = 'F';
  int64_t chunk = 0, mb = 0;
  std::string name(int64_t chunks) const;  // as in a ScheduleTrace
};

// The order stage `stage` runs its passes in under interleaved 1F1B with `chunks` chunks per rank (Megatron-Core's
// forward_backward_pipelining_with_interleaving): forward k is micro-batch ⌊k / (pp·v)⌋·pp + k mod pp of chunk
// ⌊k / pp⌋ mod v (backward k the same micro-batch of chunk v − 1 − that); (pp − s − 1)·2 + (v − 1)·pp warm-up
// forwards (all of them when m = pp), then one forward and one backward alternately, then the remaining backwards.
// With one chunk it is 1F1B's order. micro_batches must be a multiple of stages when chunks > 1.
std::vector<PipelinePass> interleaved_order(int64_t stage, int64_t stages, int64_t chunks, int64_t micro_batches);

// The order rank `stage` runs its passes in under DualPipeV (deepseek-ai/DualPipe's dualpipev.py), chunk 0 going
// down the V and chunk 1 back up, each chunk's micro-batches in order, in eight phases: (pp − r − 1)·2 F0; r + 1
// × (F0 F1); pp − r − 1 × (I1 W F1); m − 2pp + r + 1 × (F0 B1 F1 B0); pp − r − 1 × (B1 F1 B0); r + 1 × (B1 B0),
// the second half split (I); pp − r − 1 × (W I0); r + 1 × W. Each W runs the oldest deferred weight gradients.
// Needs micro_batches ≥ 2·stages.
std::vector<PipelinePass> dualpipev_order(int64_t stage, int64_t stages, int64_t micro_batches);

void run_1f1b(Communicator& pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace);
// Interleaved 1F1B and DualPipeV: every send non-blocking and tagged with its micro-batch and the receiving chunk,
// each pass waiting only for the one transfer it needs (a hand-over between two chunks of one rank, at the bottom of
// the V, stays local). DualPipeV's split backwards defer the linear layers' weight gradients
// (precision/weight_grad_store.h) to its W passes.
void run_interleaved(Communicator& pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace);
void run_dualpipev(Communicator& pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace);

// The step's passes under the spec's schedule: one stage (no communicator needed), 1F1B, interleaved 1F1B
// (spec.chunks > 1) or DualPipeV (spec.v_shape).
void run_schedule(Communicator* pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace);

// Forward only (validation): every micro-batch through every (virtual) stage in order.
void run_forward_only(Communicator& pp, const PipelineSpec& spec, const StageForward& forward);

// How a traced schedule is replayed: the V-shaped placement or not, and each kind of pass's duration in slots
// (1 each by default; {1, 2, 1, 1} counts a full backward as its input and weight halves, one GEMM each).
struct ReplayOptions {
  bool v_shape = false;
  int64_t forward = 1, backward = 1, input_grad = 1, weight_grad = 1;
};

// The traced schedule replayed in unit time: each pass takes its duration in slots and waits for its dependencies
// (F of micro-batch i on virtual stage j after F_i on j − 1; B_i or I_i on j after B_i / I_i on j + 1 and F_i on j;
// W_i on j after I_i on j) and for the previous pass of its stage. slots[stage][t]: the pass run in slot t ("" where
// the stage is idle). Throws when a stage's next pass can never run (a trace that is not a valid schedule).
struct ScheduleTimeline {
  std::vector<std::vector<std::string>> slots;
  int64_t makespan = 0, busy = 0;
};
ScheduleTimeline simulate_schedule(const std::vector<ScheduleTrace>& traces, const ReplayOptions& options = {});

// 1F1B's bubble fraction in theory, (stages − 1) / (m + stages − 1) with m micro-batches (unit-time passes); with
// v chunks per rank (interleaved 1F1B), (stages − 1) / (v·m + stages − 1) (a chunk's pass taking 1/v of the time).
double one_f_one_b_bubble(int64_t stages, int64_t micro_batches, int64_t chunks = 1);

// DualPipeV's in theory (the DualPipe paper's (PP/2 − 1)(F&B + B − 3W) with PP/2 = stages ranks and F&B = F + B + W,
// no computation-communication overlap), as a fraction of the step in chunk-pass units F = B = W = 1:
// (stages − 1) / (6m + stages − 1).
double dualpipev_bubble(int64_t stages, int64_t micro_batches);

// The theoretical bubble of p's schedule with m micro-batches per dp rank (dualpipev_bubble for DualPipeV, else
// one_f_one_b_bubble with its chunks); 0 without a pipeline.
double schedule_bubble(const config::ParallelConfig& p, int64_t micro_batches);

// Its bubble fraction: idle slots / (stages × makespan).
double bubble_fraction(const std::vector<ScheduleTrace>& traces, const ReplayOptions& options = {});

// Its drawing as text: one row per stage, one column per slot (a pass of several slots fills each), "." for an idle
// slot, the row's idle count at its end (e.g. for bench/parallel's report of the executed schedule).
std::string draw_schedule(const std::vector<ScheduleTrace>& traces, const ReplayOptions& options = {});

}  // namespace moetrain::parallel
