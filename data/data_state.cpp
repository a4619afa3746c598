#include "data/data_state.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <stdexcept>

namespace moetrain::data {

nlohmann::json to_json(const DataState& s) {
  return {{"step", s.step},
          {"samples_consumed", s.samples_consumed},
          {"epochs", s.epochs},
          {"samples_in_epoch", s.samples_in_epoch},
          {"seed", s.seed},
          {"fingerprint", s.fingerprint}};
}

DataState data_state_from_json(const nlohmann::json& j) {
  try {
    DataState s;
    s.step = j.at("step").get<int64_t>();
    s.samples_consumed = j.at("samples_consumed").get<int64_t>();
    s.epochs = j.at("epochs").get<std::vector<int64_t>>();
    s.samples_in_epoch = j.at("samples_in_epoch").get<std::vector<int64_t>>();
    s.seed = j.at("seed").get<uint64_t>();
    s.fingerprint = j.at("fingerprint").get<uint64_t>();
    return s;
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(fmt::format("the saved data position is incomplete: {}", e.what()));
  }
}

}  // namespace moetrain::data
