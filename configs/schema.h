// The config schema: every key's path, type, default (from the Config member initializers), allowed range and
// meaning. It is the one source for validation, `moetrain config show` and the config reference
// (docs/config-reference.md is generated from it by `moetrain config reference`).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "configs/config.h"

namespace moetrain::config {

using FieldPtr = std::variant<int64_t*, double*, bool*, std::string*, std::vector<int64_t>*>;

struct Range {
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = false;  // lo itself is not allowed (e.g. a learning rate > 0)
};

struct KeySpec {
  std::string path;  // "section.key"
  FieldPtr (*field)(Config&);
  std::string doc;
  Range range{};
  std::vector<std::string> choices{};  // non-empty: a string that must be one of these

  std::string section() const { return path.substr(0, path.find('.')); }
  std::string type_name() const;  // "int", "float", "bool", "string", "fp32 | bf16 | fp8", "list of int"
};

const std::vector<KeySpec>& schema();
const std::vector<std::string>& sections();  // in the order configs are written
const KeySpec* find_key(std::string_view path);

// The value of `key` in `config`, written as YAML would show it ("4", "0.003", "true", "[2, 2]", "fp32").
std::string value_text(const KeySpec& key, const Config& config);

// The known key closest to a mistyped one ("model.hiden_size" -> "model.hidden_size"), or "" if none is close.
std::string closest_key(std::string_view unknown);

// Levenshtein distance, for suggestions.
size_t edit_distance(std::string_view a, std::string_view b);

// The config reference as Markdown: one table per section with key, type, default, range and meaning.
std::string reference_markdown();

}  // namespace moetrain::config
