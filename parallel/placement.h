// Where this rank's work goes: the part of the model it holds (its pipeline stage's layers and its expert-parallel
// shard of the routed experts) and the device it computes on.
#pragma once

#include <c10/core/Device.h>

#include "config/config.h"
#include "model/transformer.h"
#include "parallel/process_groups.h"

namespace moetrain::parallel {

// groups: the job's communicators, nullptr for one process (the whole model; throws unless the layout is one rank).
model::StageSpec stage_spec(const ProcessGroups* groups, const config::Config& c);

// The model chunks pipeline rank `pp_rank` holds under c's schedule, in the order it runs them (one with 1F1B;
// chunk c at virtual stage VirtualStages::from(c.parallel).of(pp_rank, c)), each with its layers and whether it
// embeds (the first virtual stage) or holds the heads (the last). Also what `moetrain plan` counts per rank.
std::vector<model::LayerChunk> rank_chunks(const config::Config& c, int64_t pp_rank);

// train.device = cpu: the CPU. cuda: GPU local_rank mod the visible devices, local_rank being this rank's index
// among the ranks of its node (ProcessGroups::local_rank; 0 for one process), made the current CUDA device
// (use_cuda_device). Throws when no GPU is visible.
c10::Device local_device(const ProcessGroups* groups, const config::Config& c);

}  // namespace moetrain::parallel
