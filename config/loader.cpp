#include "config/loader.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "config/count.h"
#include "config/schema.h"

namespace moetrain::config {
namespace fs = std::filesystem;

std::string Origin::describe() const {
  if (!text.empty()) return fmt::format("--set {}", text);
  if (!note.empty()) return note;
  if (file.empty()) return "default";
  return line > 0 ? fmt::format("{}:{}", file, line) : file;
}

std::string Config::where(const std::string& key) const {
  auto it = origins.find(key);
  if (it == origins.end() || !it->second.note.empty()) return "";  // defaults and derived values have no place
  return it->second.describe() + ": ";
}

namespace {

// One key's raw value before typing: the YAML node and where it was written.
struct Entry {
  std::string path;
  YAML::Node value;
  Origin origin;
};

// Entries in the order they were written; a later entry for the same key replaces the earlier one in place.
class Entries {
 public:
  void set(Entry e) {
    auto it = std::find_if(items_.begin(), items_.end(), [&](const Entry& x) { return x.path == e.path; });
    if (it == items_.end())
      items_.push_back(std::move(e));
    else
      *it = std::move(e);
  }
  const std::vector<Entry>& items() const { return items_; }

 private:
  std::vector<Entry> items_;
};

[[noreturn]] void fail(const Origin& where, const std::string& message) {
  throw ConfigError(fmt::format("{}: {}", where.describe(), message));
}

std::string unknown_key_message(const std::string& path) {
  std::string hint = closest_key(path);
  if (path.find('.') == std::string::npos) {  // a top-level name: compare with the sections
    hint.clear();
    size_t best = 3;
    for (const auto& s : sections())
      if (size_t d = edit_distance(path, s); d < best) best = d, hint = s;
  }
  if (!hint.empty()) return fmt::format("unknown key '{}'; did you mean '{}'?", path, hint);
  std::string known;
  for (const auto& s : sections()) known += (known.empty() ? "" : ", ") + s;
  return fmt::format("unknown key '{}' (sections: {}; `moetrain config reference` lists every key)", path, known);
}

bool is_section_prefix(const std::string& prefix) {
  return std::any_of(schema().begin(), schema().end(),
                     [&](const KeySpec& k) { return k.path.rfind(prefix + ".", 0) == 0; });
}

std::string node_kind(const YAML::Node& n) {
  if (!n.IsDefined() || n.IsNull()) return "nothing";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return fmt::format("'{}'", n.Scalar());
}

// Flattens a file's mapping into dotted keys; nested mappings are sections, leaves are known keys.
void flatten(const YAML::Node& map, const std::string& prefix, const std::string& file, Entries& out) {
  std::set<std::string> seen;
  for (const auto& kv : map) {
    Origin origin{.file = file, .line = kv.first.Mark().line + 1};
    if (!kv.first.IsScalar()) fail(origin, "a key must be a plain name");
    const std::string name = kv.first.Scalar();
    const std::string path = prefix.empty() ? name : prefix + "." + name;
    if (!seen.insert(name).second) fail(origin, fmt::format("key '{}' appears twice", path));
    if (prefix.empty() && name == "base") continue;  // handled by read_file
    if (find_key(path)) {
      out.set({path, kv.second, origin});
    } else if (is_section_prefix(path)) {
      if (!kv.second.IsMap())
        fail(origin, fmt::format("'{}' is a section: expected a mapping of keys, got {}", path,
                                 node_kind(kv.second)));
      flatten(kv.second, path, file, out);
    } else {
      fail(origin, unknown_key_message(path));
    }
  }
}

// The 1-based line of the `---` (or `...`) that starts the document whose first node is on 0-based `line`.
int document_start_line(const std::string& text, int line) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  for (int i = std::min<int>(line, static_cast<int>(lines.size()) - 1); i >= 0; --i)
    if (lines[i].rfind("---", 0) == 0 || lines[i].rfind("...", 0) == 0) return i + 1;
  return line + 1;
}

YAML::Node parse_file(const std::string& file) {
  std::error_code ec;
  if (fs::is_directory(file, ec)) throw ConfigError(fmt::format("{}: is a directory, expected a YAML file", file));
  std::ifstream in(file);
  if (!in) throw ConfigError(fmt::format("{}: cannot open config file: {}", file, std::strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw ConfigError(fmt::format("{}: cannot read config file: {}", file, std::strerror(errno)));
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(text.str());
  } catch (const YAML::ParserException& e) {
    throw ConfigError(fmt::format("{}:{}:{}: invalid YAML: {}", file, e.mark.line + 1, e.mark.column + 1, e.msg));
  }
  // yaml-cpp's Load would read the first document and drop the rest without a word; an empty one (a trailing
  // `---`) drops nothing.
  for (size_t i = 1; i < documents.size(); ++i)
    if (!documents[i].IsNull())
      throw ConfigError(fmt::format("{}:{}: a second YAML document; one config per file", file,
                                    document_start_line(text.str(), documents[i].Mark().line)));
  return documents.empty() ? YAML::Node() : documents[0];
}

// Reads `file` and, first, the chain of files it names with `base:`.
void read_file(const std::string& file, std::vector<std::string>& chain, Entries& out) {
  std::error_code ec;
  fs::path canonical = fs::weakly_canonical(file, ec);
  for (const auto& c : chain)
    if (c == canonical.string()) {
      std::string loop;
      for (const auto& x : chain) loop += x + " -> ";
      throw ConfigError(fmt::format("{}: `base:` chain loops: {}{}", file, loop, canonical.string()));
    }
  YAML::Node root = parse_file(file);
  if (!root.IsDefined() || root.IsNull()) throw ConfigError(fmt::format("{}: the config file is empty", file));
  if (!root.IsMap())
    throw ConfigError(fmt::format("{}:{}: expected a mapping of sections (model:, parallel:, ...), got {}", file,
                                  root.Mark().line + 1, node_kind(root)));
  chain.push_back(canonical.string());
  if (YAML::Node base = root["base"]; base) {
    Origin origin{.file = file, .line = base.Mark().line + 1};
    if (!base.IsScalar() || base.Scalar().empty())
      fail(origin, fmt::format("base: expected the path of another config file, got {}", node_kind(base)));
    fs::path base_path = fs::path(base.Scalar());
    if (base_path.is_relative()) base_path = fs::path(file).parent_path() / base_path;
    if (!fs::exists(base_path))
      fail(origin, fmt::format("base: file '{}' does not exist", base_path.lexically_normal().string()));
    if (fs::is_directory(base_path))
      fail(origin,
           fmt::format("base: '{}' is a directory, expected a YAML file", base_path.lexically_normal().string()));
    read_file(base_path.lexically_normal().string(), chain, out);
  }
  flatten(root, "", file, out);
  chain.pop_back();
}

Entry parse_override(const std::string& text) {
  Origin origin{.text = text};
  auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0) fail(origin, "expected section.key=value");
  std::string path = text.substr(0, eq);
  if (path == "base") fail(origin, "`base` cannot be overridden; name the config file instead");
  if (std::find(sections().begin(), sections().end(), path) != sections().end()) {
    auto first = std::find_if(schema().begin(), schema().end(), [&](const KeySpec& k) { return k.section() == path; });
    fail(origin, fmt::format("'{}' is a section; --set needs section.key=value (e.g. --set {}={})", path,
                             first->path, value_text(*first, Config{})));
  }
  if (!find_key(path)) fail(origin, unknown_key_message(path));
  YAML::Node value;
  try {
    value = YAML::Load(text.substr(eq + 1));
  } catch (const YAML::ParserException& e) {
    fail(origin, fmt::format("{}: the value is not valid YAML: {}", path, e.msg));
  }
  return {path, value, origin};
}

// ---- typed values -----------------------------------------------------------------------------------------------

std::string expected(const char* what, const YAML::Node& n) {
  return fmt::format("expected {}, got {}", what, node_kind(n));
}

bool parse_double(const std::string& s, double& out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  out = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size() && errno == 0 && std::isfinite(out);
}

// Integers may be written as 4096, or as 1e13 / 10.0e12 when the value is integral.
std::optional<int64_t> parse_int(const YAML::Node& n) {
  if (!n.IsScalar()) return std::nullopt;
  const std::string& s = n.Scalar();
  int64_t v = 0;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec == std::errc() && ptr == s.data() + s.size()) return v;
  double d = 0;
  if (parse_double(s, d) && std::floor(d) == d && std::fabs(d) < 9.2e18) return static_cast<int64_t>(d);
  return std::nullopt;
}

void check_range(const KeySpec& key, double v, const std::string& text, const Origin& origin) {
  if (!key.range.contains(v))
    fail(origin, fmt::format("{}: {} is out of range (must be {})", key.path, text, key.range.describe()));
}

void assign(const KeySpec& key, const Entry& e, Config& config) {
  const YAML::Node& n = e.value;
  auto bad = [&](const std::string& why) { fail(e.origin, fmt::format("{}: {}", key.path, why)); };
  std::visit(
      [&](auto p) {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, int64_t>) {
          auto v = parse_int(n);
          if (!v) bad(expected("an integer", n));
          check_range(key, static_cast<double>(*v), n.Scalar(), e.origin);
          *p = *v;
        } else if constexpr (std::is_same_v<T, double>) {
          double v = 0;
          if (!n.IsScalar() || !parse_double(n.Scalar(), v)) bad(expected("a number", n));
          check_range(key, v, n.Scalar(), e.origin);
          *p = v;
        } else if constexpr (std::is_same_v<T, bool>) {
          std::string s = n.IsScalar() ? n.Scalar() : "";
          std::transform(s.begin(), s.end(), s.begin(), ::tolower);
          if (s == "true" || s == "yes" || s == "on")
            *p = true;
          else if (s == "false" || s == "no" || s == "off")
            *p = false;
          else
            bad(expected("true or false", n));
        } else if constexpr (std::is_same_v<T, std::string>) {
          if (!n.IsScalar()) bad(expected("a string", n));
          *p = n.Scalar();
        } else if constexpr (std::is_same_v<T, EnumRef>) {
          const std::string list = fmt::format("{}", fmt::join(p.names, ", "));
          if (!n.IsScalar()) bad(fmt::format("expected one of {}, got {}", list, node_kind(n)));
          auto it = std::find(p.names.begin(), p.names.end(), n.Scalar());
          if (it == p.names.end()) bad(fmt::format("'{}' is not one of {}", n.Scalar(), list));
          p.set(p.p, static_cast<int>(it - p.names.begin()));
        } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
          if (!n.IsSequence()) bad(expected("a list of integers like [2, 2]", n));
          std::vector<int64_t> out;
          for (const auto& item : n) {
            auto v = parse_int(item);
            if (!v) bad(fmt::format("expected a list of integers, but one item is {}", node_kind(item)));
            out.push_back(*v);
          }
          *p = std::move(out);
        }
      },
      key.field(config));
}

// ---- cross-field checks -----------------------------------------------------------------------------------------

// Throws "<where key was set>: <message>".
[[noreturn]] void conflict(const Config& c, const std::string& key, const std::string& message) {
  throw ConfigError(c.where(key) + message);
}

void validate_model(const Config& c) {
  const ModelConfig& m = c.model;
  if (m.n_dense_layers > m.num_layers)
    conflict(c, "model.n_dense_layers",
             fmt::format("model.n_dense_layers = {} exceeds model.num_layers = {}", m.n_dense_layers, m.num_layers));
  if (m.qk_rope_head_dim % 2 != 0)
    conflict(c, "model.qk_rope_head_dim",
             fmt::format("model.qk_rope_head_dim = {} must be even (RoPE rotates pairs of dimensions)",
                         m.qk_rope_head_dim));
  bool has_moe = m.n_dense_layers < m.num_layers;
  if (!has_moe) return;
  if (m.n_routed_experts == 0)
    conflict(c, "model.n_routed_experts",
             fmt::format("model.n_routed_experts = 0, but layers {}..{} are MoE layers (model.n_dense_layers = {} < "
                         "model.num_layers = {})",
                         m.n_dense_layers, m.num_layers - 1, m.n_dense_layers, m.num_layers));
  if (m.top_k > m.n_routed_experts)
    conflict(c, "model.top_k",
             fmt::format("model.top_k = {} exceeds model.n_routed_experts = {}", m.top_k, m.n_routed_experts));
  if (m.n_routed_experts % m.n_group != 0)
    conflict(c, "model.n_group",
             fmt::format("model.n_group = {} does not divide model.n_routed_experts = {}", m.n_group,
                         m.n_routed_experts));
  if (m.topk_group > m.n_group)
    conflict(c, "model.topk_group",
             fmt::format("model.topk_group = {} exceeds model.n_group = {}", m.topk_group, m.n_group));
  int64_t per_group = m.n_routed_experts / m.n_group;
  if (m.n_group > 1 && per_group < 2)
    conflict(c, "model.n_group",
             fmt::format("model.n_group = {} leaves {} expert per group; group scores sum each group's two best "
                         "experts, so groups need at least 2",
                         m.n_group, per_group));
  if (m.top_k > m.topk_group * per_group)
    conflict(c, "model.top_k",
             fmt::format("model.top_k = {} exceeds the {} experts in the model.topk_group = {} kept groups of {} "
                         "experts",
                         m.top_k, m.topk_group * per_group, m.topk_group, per_group));
}

// The layout, batch and activation counts the loader, the data loader and the trainer form from the sizes; each
// must fit 64 bits (check_counts names the key when one does not). One micro-batch's activations: its tokens
// times each width a layer materializes per token.
void batch_counts(const Config& c) {
  const ModelConfig& m = c.model;
  const TrainConfig& t = c.train;
  const int64_t dp = c.parallel.dp;
  (Count(c.parallel.pp) * dp).value("the world size (parallel.pp · parallel.dp)");
  const Count sequences = Count(t.micro_batch_size) * t.micro_batches * dp;
  sequences.value("the global batch (train.micro_batch_size · train.micro_batches · dp sequences)");
  (sequences * t.seq_len).value("the tokens of one step (global batch · train.seq_len)");
  (Count(t.global_batch_size) * t.seq_len).value("the tokens of one step (train.global_batch_size · train.seq_len)");
  const Count window = Count(t.seq_len) + 1 + m.mtp_depth;  // a sample: inputs, the next token, MTP's targets
  const Count tokens = Count(t.micro_batch_size) * window;
  tokens.value("the tokens of one micro-batch (train.micro_batch_size · (train.seq_len + 1 + model.mtp_depth))");
  const Count qk = Count(m.qk_nope_head_dim) + m.qk_rope_head_dim;
  for (Count width : {Count(m.hidden_size), Count(m.vocab_size), Count(m.dense_inter_dim),
                      Count(m.top_k) * m.moe_inter_dim, Count(m.top_k) * m.hidden_size, Count(m.n_routed_experts),
                      Count(m.num_heads) * qk, Count(m.num_heads) * m.v_head_dim,
                      Count(m.kv_lora_rank) + m.qk_rope_head_dim, Count(m.q_lora_rank)})
    (tokens * width).value("the activations of one micro-batch (its tokens × a layer's width)");
}


// The batch-size ramp (train.batch_rampup_*): every step's global batch a whole number of micro-batches on every dp
// rank, at least pp of them, growing to train.global_batch_size in whole increments.
void validate_batch_rampup(Config& c) {
  TrainConfig& t = c.train;
  const int64_t dp = c.parallel.dp, unit = t.micro_batch_size * dp;
  if (t.batch_rampup_start == 0) {
    const std::pair<const char*, int64_t> set[] = {{"train.batch_rampup_tokens", t.batch_rampup_tokens},
                                                   {"train.batch_rampup_increment", t.batch_rampup_increment}};
    for (const auto& [key, value] : set)
      if (value > 0) conflict(c, key, fmt::format("{} = {} but train.batch_rampup_start = 0 (no ramp)", key, value));
    return;
  }
  if (t.batch_rampup_start >= t.global_batch_size)
    conflict(c, "train.batch_rampup_start",
             fmt::format("train.batch_rampup_start = {} is not below train.global_batch_size = {} (the batch the "
                         "ramp grows to)",
                         t.batch_rampup_start, t.global_batch_size));
  if (t.batch_rampup_start % unit != 0)
    conflict(c, "train.batch_rampup_start",
             fmt::format("train.batch_rampup_start = {} is not divisible by train.micro_batch_size · dp = {} · {}",
                         t.batch_rampup_start, t.micro_batch_size, dp));
  if (t.batch_rampup_increment == 0)  // not derived from the layout: a resume on another dp keeps the same ramp
    conflict(c, "train.batch_rampup_start",
             fmt::format("train.batch_rampup_start > 0 needs train.batch_rampup_increment (the sequences the batch "
                         "grows by, a multiple of train.micro_batch_size · dp = {} · {})",
                         t.micro_batch_size, dp));
  if (t.batch_rampup_increment % unit != 0)
    conflict(c, "train.batch_rampup_increment",
             fmt::format("train.batch_rampup_increment = {} is not divisible by train.micro_batch_size · dp = {} · {}",
                         t.batch_rampup_increment, t.micro_batch_size, dp));
  if ((t.global_batch_size - t.batch_rampup_start) % t.batch_rampup_increment != 0)
    conflict(c, "train.batch_rampup_increment",
             fmt::format("train.global_batch_size − train.batch_rampup_start = {} − {} is not a multiple of "
                         "train.batch_rampup_increment = {}",
                         t.global_batch_size, t.batch_rampup_start, t.batch_rampup_increment));
  if (t.batch_rampup_tokens <= 0)
    conflict(c, "train.batch_rampup_start",
             "train.batch_rampup_start > 0 needs train.batch_rampup_tokens (the tokens over which the batch grows)");
  if (c.parallel.pp > 1 && t.batch_rampup_start / unit < c.parallel.pp)
    conflict(c, "train.batch_rampup_start",
             fmt::format("train.batch_rampup_start = {} gives {} micro-batches per dp rank, fewer than parallel.pp "
                         "= {} (the 1F1B schedule needs at least one micro-batch per stage)",
                         t.batch_rampup_start, t.batch_rampup_start / unit, c.parallel.pp));
}

// parallel.schedule and parallel.virtual_stages (the batch's micro-batch count is checked with the batch).
void validate_schedule(Config& c) {
  ParallelConfig& p = c.parallel;
  const std::string schedule(config::name(p.schedule));
  if (p.schedule == Schedule::k1F1B && p.virtual_stages != 1)
    conflict(c, "parallel.virtual_stages",
             fmt::format("parallel.virtual_stages = {} needs parallel.schedule = interleaved (1f1b runs one model "
                         "chunk per rank)",
                         p.virtual_stages));
  if (p.schedule == Schedule::k1F1B) return;
  if (p.pp < 2)
    conflict(c, "parallel.schedule",
             fmt::format("parallel.schedule = {} needs parallel.pp ≥ 2 (a pipeline)", schedule));
  if (p.schedule == Schedule::kDualPipeV) {
    if (p.virtual_stages == 1) {
      p.virtual_stages = 2;
      c.origins["parallel.virtual_stages"] = Origin{.note = "derived: dualpipev's two chunks per rank"};
    }
    if (p.virtual_stages != 2)
      conflict(c, "parallel.virtual_stages",
               fmt::format("parallel.virtual_stages = {} but parallel.schedule = dualpipev holds exactly two chunks "
                           "per rank (the V)",
                           p.virtual_stages));
  }
  if (p.virtual_stages < 2)
    conflict(c, "parallel.virtual_stages",
             fmt::format("parallel.schedule = interleaved needs parallel.virtual_stages ≥ 2 (model chunks per rank; "
                         "it is {})",
                         p.virtual_stages));
  // On a GPU the CPU autograd engine's thread is not the one that runs the backward pass (CUDA backward passes run
  // on autograd's device threads), so the backward lane of an overlapped pair cannot be told apart there: the pairs
  // run in turn.
  if (p.schedule == Schedule::kDualPipeV && p.overlap_chunk_pairs && c.train.device == Device::kCuda) {
    if (c.origins.count("parallel.overlap_chunk_pairs"))
      conflict(c, "parallel.overlap_chunk_pairs",
               "parallel.overlap_chunk_pairs = true needs train.device = cpu for now (on a GPU DualPipeV runs its "
               "chunk pairs in turn); leave it unset or set it to false");
    p.overlap_chunk_pairs = false;
    c.origins["parallel.overlap_chunk_pairs"] = Origin{.note = "derived: train.device = cuda runs the pairs in turn"};
  }
}

// Interleaved 1F1B runs the micro-batches in groups of pp; DualPipeV needs at least 2·pp of them.
void validate_schedule_batches(const Config& c) {
  const ParallelConfig& p = c.parallel;
  const TrainConfig& t = c.train;
  const char* batch_key = c.where("train.micro_batches").empty() ? "train.global_batch_size" : "train.micro_batches";
  if (p.schedule == Schedule::kDualPipeV) {
    const int64_t fewest = t.batch_rampup_start > 0 ? t.batch_rampup_start / (t.micro_batch_size * p.dp)
                                                    : t.micro_batches;
    if (fewest < 2 * p.pp)
      conflict(c, t.batch_rampup_start > 0 ? "train.batch_rampup_start" : batch_key,
               fmt::format("{} micro-batches per step{} but parallel.schedule = dualpipev needs at least 2·pp = {}",
                           fewest, t.batch_rampup_start > 0 ? " at the ramp's start" : "", 2 * p.pp));
    return;
  }
  if (p.schedule != Schedule::kInterleaved) return;
  if (t.micro_batches % p.pp != 0)
    conflict(c, batch_key,
             fmt::format("train.micro_batches = {} is not a multiple of parallel.pp = {} (the interleaved schedule "
                         "runs micro-batches in groups of pp)",
                         t.micro_batches, p.pp));
  const int64_t unit = t.micro_batch_size * p.dp * p.pp;
  const std::pair<const char*, int64_t> ramp[] = {{"train.batch_rampup_start", t.batch_rampup_start},
                                                  {"train.batch_rampup_increment", t.batch_rampup_increment}};
  for (const auto& [key, value] : ramp)
    if (value % unit != 0)
      conflict(c, key,
               fmt::format("{} = {} is not divisible by train.micro_batch_size · dp · pp = {} · {} · {} (the "
                           "interleaved schedule needs a multiple of pp micro-batches at every step)",
                           key, value, t.micro_batch_size, p.dp, p.pp));
}

void validate_parallel(Config& c, int launch_world_size) {
  ParallelConfig& p = c.parallel;
  const ModelConfig& m = c.model;
  int64_t world = p.world_size;
  if (launch_world_size > 0) {
    if (world != 0 && world != launch_world_size)
      conflict(c, "parallel.world_size",
               fmt::format("parallel.world_size = {} but the job was launched with {} ranks", world,
                           launch_world_size));
    world = launch_world_size;
  }
  if (p.dp == 0) {
    if (world == 0)
      conflict(c, "parallel.dp",
               "parallel.dp = 0 (derive from the world size) needs parallel.world_size or a launch under "
               "mpirun/srun");
    if (world % p.pp != 0)
      conflict(c, "parallel.pp",
               fmt::format("parallel.pp = {} does not divide the world size {}", p.pp, world));
    p.dp = world / p.pp;
    c.origins["parallel.dp"] = Origin{.note = "derived: world size / pp"};
  }
  check_counts(c, batch_counts);  // before the products below are formed
  if (world != 0 && world != p.pp * p.dp) {
    std::string key = p.world_size != 0 ? "parallel.world_size" : "parallel.dp";
    conflict(c, key,
             fmt::format("world size {}{} ≠ pp·dp = {}·{} = {}", world,
                         launch_world_size > 0 ? " (ranks launched)" : "", p.pp, p.dp, p.pp * p.dp));
  }
  if (p.world_size == 0) c.origins["parallel.world_size"] = Origin{.note = "derived: pp·dp"};
  p.world_size = p.pp * p.dp;
  if (p.dp % p.ep != 0)
    conflict(c, "parallel.ep",
             fmt::format("parallel.ep = {} does not divide parallel.dp = {} (expert parallelism is carved out of "
                         "data parallelism: dp = ep·edp)",
                         p.ep, p.dp));
  bool has_moe = m.n_dense_layers < m.num_layers;
  if (has_moe && m.n_routed_experts % p.ep != 0)
    conflict(c, "parallel.ep",
             fmt::format("model.n_routed_experts = {} is not divisible by parallel.ep = {} (each ep rank holds "
                         "n_routed_experts/ep experts)",
                         m.n_routed_experts, p.ep));
  if (!has_moe && p.ep > 1)
    conflict(c, "parallel.ep", fmt::format("parallel.ep = {} but the model has no MoE layer", p.ep));
  validate_schedule(c);
  const int64_t stages = p.pp * p.virtual_stages;  // virtual stages (pp with 1F1B)
  const std::string what = p.virtual_stages > 1 ? fmt::format("pp·virtual_stages = {}·{} = {}", p.pp,
                                                              p.virtual_stages, stages)
                                                 : fmt::format("parallel.pp = {}", p.pp);
  if (stages > m.num_layers)
    conflict(c, "parallel.pp",
             fmt::format("{} exceeds model.num_layers = {} (every stage needs a layer)", what, m.num_layers));
  if (!p.stage_layers.empty()) {
    if (static_cast<int64_t>(p.stage_layers.size()) != stages)
      conflict(c, "parallel.stage_layers",
               fmt::format("parallel.stage_layers has {} entries but {}", p.stage_layers.size(), what));
    int64_t sum = 0;
    for (size_t s = 0; s < p.stage_layers.size(); ++s) {
      if (p.stage_layers[s] < 1)
        conflict(c, "parallel.stage_layers",
                 fmt::format("parallel.stage_layers[{}] = {}: every stage needs at least one layer", s,
                             p.stage_layers[s]));
      if (p.stage_layers[s] > m.num_layers - sum)  // sum ≤ num_layers so far: the subtraction cannot overflow
        conflict(c, "parallel.stage_layers",
                 fmt::format("parallel.stage_layers sums to more than model.num_layers = {}", m.num_layers));
      sum += p.stage_layers[s];
    }
    if (sum != m.num_layers)
      conflict(c, "parallel.stage_layers",
               fmt::format("parallel.stage_layers sums to {} but model.num_layers = {}", sum, m.num_layers));
  }
  TrainConfig& t = c.train;
  if (t.global_batch_size > 0) {
    const int64_t per_micro_batch = t.micro_batch_size * p.dp;
    if (t.global_batch_size % per_micro_batch != 0)
      conflict(c, "train.global_batch_size",
               fmt::format("train.global_batch_size = {} is not divisible by train.micro_batch_size · dp = {} · {}",
                           t.global_batch_size, t.micro_batch_size, p.dp));
    const int64_t derived = t.global_batch_size / per_micro_batch;
    if (c.origins.count("train.micro_batches") && t.micro_batches != derived)
      conflict(c, "train.micro_batches",
               fmt::format("train.micro_batches = {} but train.global_batch_size = {} with micro_batch_size {} and "
                           "dp {} needs {}; set one of them",
                           t.micro_batches, t.global_batch_size, t.micro_batch_size, p.dp, derived));
    if (!c.origins.count("train.micro_batches"))
      c.origins["train.micro_batches"] = Origin{.note = "derived: global_batch_size / (micro_batch_size·dp)"};
    t.micro_batches = derived;
  } else {
    c.origins["train.global_batch_size"] = Origin{.note = "derived: micro_batch_size·micro_batches·dp"};
  }
  t.global_batch_size = t.micro_batch_size * t.micro_batches * p.dp;
  validate_batch_rampup(c);
  if (p.pp > 1 && c.train.micro_batches < p.pp)
    conflict(c, c.where("train.micro_batches").empty() ? "train.global_batch_size" : "train.micro_batches",
             fmt::format("train.micro_batches = {} is less than parallel.pp = {} (the 1F1B schedule needs at "
                         "least one micro-batch per stage)",
                         c.train.micro_batches, p.pp));
  validate_schedule_batches(c);
}

// data.source = synthetic: the Markov source's alphabet, branching and states.
void validate_synthetic(const Config& c) {
  const DataConfig& d = c.data;
  const int64_t alphabet = d.synthetic_alphabet(c.model.vocab_size);
  const char* alphabet_key = d.synthetic_vocab > 0 ? "data.synthetic_vocab" : "model.vocab_size";
  if (d.synthetic_vocab > c.model.vocab_size)
    conflict(c, "data.synthetic_vocab",
             fmt::format("data.synthetic_vocab = {} exceeds model.vocab_size = {} (the source writes token ids "
                         "below it)",
                         d.synthetic_vocab, c.model.vocab_size));
  if (d.synthetic_vocab == 1)
    conflict(c, "data.synthetic_vocab",
             "data.synthetic_vocab = 1: the source needs at least 2 letters (0: model.vocab_size)");
  if (d.synthetic_branching > alphabet)
    conflict(c, "data.synthetic_branching",
             fmt::format("data.synthetic_branching = {} exceeds the source's alphabet of {} ({})",
                         d.synthetic_branching, alphabet, alphabet_key));
  if (d.synthetic_order == 1) return;
  double states = 1;
  for (int64_t i = 0; i < d.synthetic_order; ++i) states *= static_cast<double>(alphabet);
  if (states > static_cast<double>(int64_t{1} << 24))
    conflict(c, "data.synthetic_order",
             fmt::format("data.synthetic_order = {} over an alphabet of {} ({}) gives {:.3g} Markov states, more "
                         "than the 2^24 the synthetic source tabulates; lower the order or the alphabet "
                         "(data.synthetic_vocab)",
                         d.synthetic_order, alphabet, alphabet_key, states));
}

void validate_rest(const Config& c) {
  const TrainConfig& t = c.train;
  if (t.lr_min > t.lr)
    conflict(c, "train.lr_min", fmt::format("train.lr_min = {} exceeds train.lr = {}", t.lr_min, t.lr));
  if (t.lr_final_steps > t.steps)
    conflict(c, "train.lr_final_steps",
             fmt::format("train.lr_final_steps = {} exceeds train.steps = {}", t.lr_final_steps, t.steps));
  if (c.precision.mode == PrecisionMode::kFp8) {
    const ModelConfig& m = c.model;
    for (auto [key, value] : {std::pair<const char*, int64_t>{"model.hidden_size", m.hidden_size},
                              {"model.moe_inter_dim", m.moe_inter_dim},
                              {"model.dense_inter_dim", m.dense_inter_dim}})
      if (value % 128 != 0)
        conflict(c, "precision.mode",
                 fmt::format("precision.mode = fp8 needs {} divisible by 128 (1×128 activation tiles, 128×128 "
                             "weight blocks); it is {}",
                             key, value));
  }
  if (c.data.source == DataSource::kSynthetic) validate_synthetic(c);
  if (c.data.source == DataSource::kShards && c.data.path.empty())
    conflict(c, "data.source", "data.source = shards needs data.path (the token-shard prefix)");
  if (c.checkpoint.interval > 0 && c.checkpoint.dir.empty())
    conflict(c, "checkpoint.dir", "checkpoint.interval > 0 needs checkpoint.dir");
  if (c.logging.name.empty() || c.logging.name.find('/') != std::string::npos)
    conflict(c, "logging.name", fmt::format("logging.name = '{}' must be a non-empty name without '/'",
                                            c.logging.name));
}

}  // namespace

void check_counts(const Config& config, const std::function<void(const Config&)>& derive) {
  std::string what;
  try {
    derive(config);
    return;
  } catch (const CountOverflow& e) {
    what = e.what();
  }
  // The candidates: integer keys set above their defaults (derived ones are not the user's doing), furthest
  // above first. The culprit is the first whose default lets derive() finish; if none does alone, the first.
  static const Config defaults;
  Config probe = config;
  struct Candidate {
    const KeySpec* key;
    int64_t* value;
    int64_t fallback;
    double ratio;
  };
  std::vector<Candidate> candidates;
  for (const auto& key : schema()) {
    const FieldPtr field = key.field(probe);
    int64_t* const* p = std::get_if<int64_t*>(&field);
    if (!p) continue;
    const int64_t def = *std::get<int64_t*>(key.field(const_cast<Config&>(defaults)));
    auto it = config.origins.find(key.path);
    if (**p <= def || (it != config.origins.end() && !it->second.note.empty())) continue;
    candidates.push_back({&key, *p, def, static_cast<double>(**p) / static_cast<double>(std::max<int64_t>(def, 1))});
  }
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const Candidate& a, const Candidate& b) { return a.ratio > b.ratio; });
  if (candidates.empty()) throw ConfigError(fmt::format("{}: {} overflows 64 bits", config.file, what));
  const Candidate* culprit = &candidates.front();
  for (const auto& cand : candidates) {
    const int64_t value = *cand.value;
    *cand.value = cand.fallback;
    bool fits = false;
    try {
      derive(probe);
      fits = true;
    } catch (const std::exception&) {  // still overflows, or the default makes the config inconsistent
    }
    *cand.value = value;
    if (fits) {
      culprit = &cand;
      break;
    }
  }
  const std::string& key = culprit->key->path;
  throw ConfigError(fmt::format("{}{}: {} makes {} overflow 64 bits", config.where(key), key, *culprit->value, what));
}

void validate(Config& config, int launch_world_size) {
  validate_model(config);
  validate_parallel(config, launch_world_size);
  validate_rest(config);
}

Config load_config(const std::string& file, const LoadOptions& options) {
  Entries entries;
  std::vector<std::string> chain;
  read_file(file, chain, entries);
  for (const auto& text : options.overrides) entries.set(parse_override(text));

  Config config;
  config.file = file;
  for (const auto& e : entries.items()) {
    assign(*find_key(e.path), e, config);
    config.origins[e.path] = e.origin;
  }
  validate(config, options.launch_world_size);
  return config;
}

std::string to_yaml(const Config& config, bool with_origins) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  for (const auto& section : sections()) {
    out << YAML::Key << section << YAML::Value << YAML::BeginMap;
    for (const auto& key : schema()) {
      if (key.section() != section) continue;
      out << YAML::Key << key.path.substr(section.size() + 1) << YAML::Value;
      std::string text = value_text(key, config);
      const FieldPtr field = key.field(const_cast<Config&>(config));
      if (const auto* list = std::get_if<std::vector<int64_t>*>(&field)) {
        out << YAML::Flow << YAML::BeginSeq;
        for (int64_t v : **list) out << v;
        out << YAML::EndSeq;
      } else if (std::holds_alternative<std::string*>(field) || std::holds_alternative<EnumRef>(field)) {
        out << text;  // the emitter quotes strings that would otherwise read as another type
      } else {
        out << YAML::Node(text);  // numbers and booleans as plain scalars in their shortest exact form
      }
      if (with_origins) {
        auto it = config.origins.find(key.path);
        out << YAML::Comment(it == config.origins.end() ? "default" : it->second.describe());
      }
    }
    out << YAML::EndMap;
  }
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

void write_resolved(const Config& config, const std::string& path) {
  fs::path target(path);
  fs::path tmp = target;
  tmp += ".tmp";
  {
    std::ofstream f(tmp);
    if (!f) throw ConfigError(fmt::format("{}: cannot write the resolved config: {}", tmp.string(),
                                          std::strerror(errno)));
    f << "# Resolved by moetrain from " << config.file << "\n" << to_yaml(config);
    if (!f.flush()) throw ConfigError(fmt::format("{}: write failed: {}", tmp.string(), std::strerror(errno)));
  }
  fs::rename(tmp, target);
}

}  // namespace moetrain::config
