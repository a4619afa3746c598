// Where the data order stands before a step (data/sampler.h gives the order itself): what a checkpoint saves so
// that a resumed run reads exactly the samples the uninterrupted run would have read, on any dp size.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <vector>

namespace moetrain::data {

struct DataState {
  int64_t step = 0;                       // the next optimizer step
  int64_t samples_consumed = 0;           // global sequences trained on before it (all dp ranks together)
  std::vector<int64_t> epochs;            // per dataset (several for a blend): the epoch of its next sample
  std::vector<int64_t> samples_in_epoch;  // per dataset: samples of that epoch already read
  uint64_t seed = 0;                      // the seed of the order
  uint64_t fingerprint = 0;               // of the data and the window: a resume must read the same samples
};

// As stored in a checkpoint's index ({"step", "samples_consumed", "epochs", "samples_in_epoch", "seed",
// "fingerprint"}). from_json throws naming the missing or mistyped field.
nlohmann::json to_json(const DataState& s);
DataState data_state_from_json(const nlohmann::json& j);

}  // namespace moetrain::data
