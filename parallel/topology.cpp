#include "parallel/topology.h"

#include <fmt/format.h>

#include <stdexcept>

namespace moetrain::parallel {

// Checked once, where every layout is used: the Topology constructor.
Layout Layout::from(const config::ParallelConfig& p) {
  return Layout{p.pp, p.dp, p.ep, p.schedule == config::Schedule::kDualPipeV};
}

const char* group_name(GroupKind kind) {
  switch (kind) {
    case GroupKind::kPipeline: return "pp";
    case GroupKind::kData: return "dp";
    case GroupKind::kExpert: return "ep";
    case GroupKind::kExpertData: return "edp";
    case GroupKind::kEmbedding: return "embedding";
  }
  return "?";
}

Topology::Topology(Layout layout) : layout_(layout) {
  if (layout.pp < 1 || layout.ep < 1 || layout.dp < 1 || layout.dp % layout.ep != 0)
    throw std::invalid_argument(fmt::format("invalid layout pp={} dp={} ep={}: each must be >= 1 and ep must divide dp",
                                            layout.pp, layout.dp, layout.ep));
}

Coords Topology::coords(int64_t rank) const {
  if (rank < 0 || rank >= layout_.world())
    throw std::out_of_range(fmt::format("rank {} outside world of {}", rank, layout_.world()));
  Coords c;
  c.ep = rank % layout_.ep;
  c.edp = (rank / layout_.ep) % layout_.edp();
  c.pp = rank / layout_.dp;
  c.dp = c.edp * layout_.ep + c.ep;
  return c;
}

int64_t Topology::rank(int64_t pp, int64_t edp, int64_t ep) const {
  return pp * layout_.dp + edp * layout_.ep + ep;
}

std::vector<int64_t> Topology::group(GroupKind kind, int64_t r) const {
  const Coords c = coords(r);
  std::vector<int64_t> out;
  switch (kind) {
    case GroupKind::kPipeline:
      for (int64_t s = 0; s < layout_.pp; ++s) out.push_back(rank(s, c.edp, c.ep));
      break;
    case GroupKind::kData:
      for (int64_t e = 0; e < layout_.edp(); ++e)
        for (int64_t x = 0; x < layout_.ep; ++x) out.push_back(rank(c.pp, e, x));
      break;
    case GroupKind::kExpert:
      for (int64_t x = 0; x < layout_.ep; ++x) out.push_back(rank(c.pp, c.edp, x));
      break;
    case GroupKind::kExpertData:
      for (int64_t e = 0; e < layout_.edp(); ++e) out.push_back(rank(c.pp, e, c.ep));
      break;
    case GroupKind::kEmbedding:
      if (c.pp == 0 || c.pp == last_pp()) {
        out.push_back(rank(0, c.edp, c.ep));
        if (last_pp() != 0) out.push_back(rank(last_pp(), c.edp, c.ep));
      }
      break;
  }
  return out;
}

std::vector<int64_t> stage_layer_counts(int64_t num_layers, int64_t pp,
                                        const std::vector<int64_t>& explicit_counts) {
  if (!explicit_counts.empty()) return explicit_counts;
  std::vector<int64_t> counts(pp, num_layers / pp);
  for (int64_t s = 0; s < num_layers % pp; ++s) counts[s] += 1;
  return counts;
}

std::vector<int64_t> stage_first_layers(const std::vector<int64_t>& counts) {
  std::vector<int64_t> first(counts.size(), 0);
  for (size_t s = 1; s < counts.size(); ++s) first[s] = first[s - 1] + counts[s - 1];
  return first;
}

}  // namespace moetrain::parallel
