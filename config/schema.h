// The config schema: every key's path, type, default (from the Config member initializers), allowed range and
// meaning. It is the one source for validation, `moetrain config show` and the config reference
// (docs/config-reference.md is generated from it by `moetrain config reference`).
#pragma once

#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "config/config.h"

namespace moetrain::config {

// A Config member of a choice enum (config.h), read and written as its enumerator's index. `of` binds the
// accessors to the member's own enum type, so nothing else ever reinterprets the pointer.
struct EnumRef {
  void* p;
  int (*get)(const void*);
  void (*set)(void*, int);
  std::span<const std::string_view> names;  // the YAML names, in enumerator order

  template <ChoiceEnum E>
  static EnumRef of(E* e) {
    return {e, [](const void* q) { return static_cast<int>(*static_cast<const E*>(q)); },
            [](void* q, int v) { *static_cast<E*>(q) = static_cast<E>(v); }, choice_names(E{})};
  }
  std::string_view name() const { return names[static_cast<size_t>(get(p))]; }
};

using FieldPtr = std::variant<int64_t*, double*, bool*, std::string*, std::vector<int64_t>*, EnumRef>;

// A FieldPtr to a Config member: the pointer itself, or an EnumRef for a choice enum.
template <typename T>
FieldPtr field_ptr(T* p) {
  if constexpr (ChoiceEnum<T>)
    return EnumRef::of(p);
  else
    return p;
}

struct Range {
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = false;  // lo itself is not allowed (e.g. a learning rate > 0)
  bool hi_open = false;  // hi itself is not allowed (e.g. an Adam β < 1)

  bool contains(double v) const;
  std::string describe() const;  // "≥ 1", "> 0", "≥ 0 and < 1"; "" when unbounded
};

struct KeySpec {
  std::string path;  // "section.key"
  FieldPtr (*field)(Config&);
  std::string doc;
  Range range{};

  std::string section() const { return path.substr(0, path.find('.')); }
  std::string type_name() const;  // "int", "float", "bool", "string", "fp32 | bf16 | fp8", "list of int"
  std::span<const std::string_view> choices() const;  // an enum key's allowed names; empty for other keys
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
