// Loading a config: YAML files composed with `base:`, --set overrides, typed parsing against the schema and the
// cross-field checks of the parallel layout and the model. Every problem throws ConfigError naming where it is.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "config/config.h"
#include "config/error.h"

namespace moetrain::config {

struct LoadOptions {
  std::vector<std::string> overrides;  // "section.key=value", applied in order after the files
  int launch_world_size = 0;           // ranks of the launch (mpirun/srun); 0: not launched, a static check
};

// Reads `file` (and its bases), applies the overrides, validates. The result has dp and world_size resolved.
Config load_config(const std::string& file, const LoadOptions& options = {});

// Cross-field checks; resolves parallel.dp and parallel.world_size. load_config calls it.
void validate(Config& config, int launch_world_size);

// Runs `derive`, which computes counts from the config with config::Count (count.h). When one overflows 64 bits,
// throws a ConfigError naming the integer key that makes it overflow, where that key was set and the quantity:
// "configs/x.yaml:7: model.hidden_size: 4611686018427387904 makes the model's parameter count overflow 64 bits".
// The key named is the one furthest above its default whose default lets `derive` finish.
void check_counts(const Config& config, const std::function<void(const Config&)>& derive);

// The resolved config as YAML, every key, in schema order; with_origins adds a comment with where each value
// came from.
std::string to_yaml(const Config& config, bool with_origins = false);

// Writes to_yaml(config) to `path` (the run directory's config.yaml), through a temporary file and a rename.
void write_resolved(const Config& config, const std::string& path);

}  // namespace moetrain::config
