#include "parallel/placement.h"

#include <fmt/format.h>

#include <algorithm>

#include "parallel/pipeline.h"
#include "parallel/topology.h"

namespace moetrain::parallel {

std::vector<model::LayerChunk> rank_chunks(const config::Config& c, int64_t pp_rank) {
  const VirtualStages where = VirtualStages::from(c.parallel);
  const auto counts = stage_layer_counts(c.model.num_layers, where.count(), c.parallel.stage_layers);
  const auto firsts = stage_first_layers(counts);
  std::vector<model::LayerChunk> chunks;
  for (int64_t chunk = 0; chunk < where.chunks; ++chunk) {
    const int64_t j = where.of(pp_rank, chunk);
    const auto at = static_cast<size_t>(j);
    chunks.push_back({firsts[at], counts[at], j == 0, j == where.count() - 1});
  }
  return chunks;
}

model::StageSpec stage_spec(const ProcessGroups* groups, const config::Config& c) {
  model::StageSpec stage = model::StageSpec::whole(c.model);
  if (!groups) {
    if (c.parallel.world_size != 1)
      throw std::runtime_error(fmt::format("{}the layout pp {} × dp {} needs {} ranks: launch with mpirun -np {}",
                                           c.where("parallel.pp"), c.parallel.pp, c.parallel.dp,
                                           c.parallel.world_size, c.parallel.world_size));
    return stage;
  }
  const Coords& coords = groups->coords;
  if (groups->topology.layout().head_on_first != (c.parallel.schedule == config::Schedule::kDualPipeV))
    throw std::logic_error("the process groups were made for another pipeline schedule (the embedding group differs "
                           "under dualpipev): create them from this config's parallel section");
  stage.chunks = rank_chunks(c, coords.pp);
  stage.first = std::any_of(stage.chunks.begin(), stage.chunks.end(), [](const auto& k) { return k.embed; });
  stage.last = std::any_of(stage.chunks.begin(), stage.chunks.end(), [](const auto& k) { return k.head; });
  stage.shard = model::ExpertShard{coords.ep, c.parallel.ep};
  return stage;
}

c10::Device local_device(const ProcessGroups* groups, const config::Config& c) {
  if (c.train.device != config::Device::kCuda) return c10::Device(c10::kCPU);
  return use_cuda_device(groups ? groups->local_rank : 0, c.where("train.device") + "train.device = cuda");
}

}  // namespace moetrain::parallel
