// The error type for bad configs: its message names the file and line (or --set argument), the key and what was
// expected, so the top-level handler prints it as is.
#pragma once

#include <stdexcept>
#include <string>

namespace moetrain::config {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace moetrain::config
