// Per-step metrics: one JSON object per line in the run directory's metrics.jsonl, and on rank 0 a progress line
// every logging.interval steps.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <string>

namespace moetrain::trainer {

class MetricsWriter {
 public:
  // Opens `path` for writing, or for appending when a run resumes.
  explicit MetricsWriter(const std::string& path, bool append = false);
  void write(const nlohmann::json& record);

 private:
  std::ofstream out_;
};

// "1h02m", "3m05s", "12s"
std::string format_duration(double seconds);

}  // namespace moetrain::trainer
