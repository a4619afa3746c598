// The 1F1B pipeline schedule (PipeDream-Flush, as in Megatron-Core): stage s runs min(pp − s − 1, m) warm-up
// forwards, then alternates one forward and one backward, then drains the remaining backwards. Activations go to
// the next stage and their gradients come back over the pp group; in the steady state a send and the matching
// receive of the neighbour are one operation, so two stages sending to each other never deadlock. The other
// sends (warm-up forwards, drain backwards) do not block the stage: they complete while it computes on.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

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
using StageForward = std::function<StageOutput(int64_t mb, const at::Tensor& input)>;

struct PipelineSpec {
  int64_t stage = 0, stages = 1, micro_batches = 1;
  std::vector<int64_t> activation_shape;  // [micro_batch_size, seq_len, hidden]
  at::TensorOptions activation_options;
  std::function<void()> before_last_backward;  // called before the step's last backward pass on this stage
};

// One stage (pp = 1): each micro-batch's forward, then its backward.
void run_micro_batches(const PipelineSpec& spec, const StageForward& forward);

// The order this stage ran its passes in ("F0", "B0", ...), for the bubble measurement of bench/parallel.
using ScheduleTrace = std::vector<std::string>;

void run_1f1b(Communicator& pp, const PipelineSpec& spec, const StageForward& forward, ScheduleTrace* trace);

// Forward only (validation): every micro-batch through every stage in order.
void run_forward_only(Communicator& pp, const PipelineSpec& spec, const StageForward& forward);

// The traced schedule replayed in unit time: each pass takes one slot and waits for its dependencies (F of
// micro-batch i on stage s after F_i on s − 1; B_i on s after B_i on s + 1 and F_i on s) and for the previous pass
// of its stage. slots[stage][t]: the pass run in slot t ("" where the stage is idle). Throws when a stage's next pass
// can never run (a trace that is not a valid schedule).
struct ScheduleTimeline {
  std::vector<std::vector<std::string>> slots;
  int64_t makespan = 0, busy = 0;
};
ScheduleTimeline simulate_schedule(const std::vector<ScheduleTrace>& traces);

// 1F1B's bubble fraction in theory, (stages − 1) / (m + stages − 1) with m micro-batches (unit-time passes).
double one_f_one_b_bubble(int64_t stages, int64_t micro_batches);

// Its bubble fraction: idle slots / (stages × makespan).
double bubble_fraction(const std::vector<ScheduleTrace>& traces);

// Its drawing as text: one row per stage, one column per slot, "." for an idle slot, the row's idle count at its
// end (e.g. for bench/parallel's report of the executed schedule).
std::string draw_schedule(const std::vector<ScheduleTrace>& traces);

}  // namespace moetrain::parallel
