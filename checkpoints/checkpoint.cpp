#include "checkpoints/checkpoint.h"

#include <ATen/ops/empty.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>
#include <thread>

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

namespace moetrain::checkpoints {
namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "moetrain-checkpoint-2";

std::string hex(uint64_t v) { return fmt::format("{:016x}", v); }

void write_file_durably(const fs::path& path, const std::string& text) {
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f || !(f << text) || !f.flush()) throw std::runtime_error(fmt::format("{}: cannot write", path.string()));
  }
  fsync_path(path.string());
}

// Test-only: MOETRAIN_TEST_CKPT_PAUSE_S=N [MOETRAIN_TEST_CKPT_PAUSE_STEP=k] pauses after the shards and the index
// are written and before the commit, so a test can kill the job in the middle of a save.
void maybe_pause(int rank, int64_t step) {
  const char* s = std::getenv("MOETRAIN_TEST_CKPT_PAUSE_S");
  const char* at = std::getenv("MOETRAIN_TEST_CKPT_PAUSE_STEP");
  if (!s || (at && std::atoll(at) != step)) return;
  if (rank == 0) std::fprintf(stderr, "checkpoint: pausing %s s before the commit (MOETRAIN_TEST_CKPT_PAUSE_S)\n", s);
  std::this_thread::sleep_for(std::chrono::duration<double>(std::atof(s)));
}

using json = nlohmann::json;

// A value of index.json as an error shows it: on one line, short.
std::string shown(const json& v) {
  const std::string s = v.dump(-1, ' ', /*ensure_ascii=*/true);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// What a key of index.json must hold.
enum class Kind { kObject, kArray, kString, kCount, kPositive, kUnsigned, kCounts, kSlice };

bool is_count(const json& v) {  // an int64 >= 0
  return v.is_number_unsigned() ? v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX)
                                : v.is_number_integer() && v.get<int64_t>() >= 0;
}

bool has_kind(const json& v, Kind kind) {
  switch (kind) {
    case Kind::kObject: return v.is_object();
    case Kind::kArray: return v.is_array();
    case Kind::kString: return v.is_string();
    case Kind::kCount: return is_count(v);
    case Kind::kPositive: return is_count(v) && v.get<int64_t>() > 0;
    case Kind::kUnsigned: return v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0);
    case Kind::kCounts: return v.is_array() && std::all_of(v.begin(), v.end(), is_count);
    case Kind::kSlice:
      return v.is_array() && std::all_of(v.begin(), v.end(), [](const json& d) {
               return d.is_array() && d.size() == 2 && is_count(d[0]) && is_count(d[1]);
             });
  }
  return false;
}

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kObject: return "an object";
    case Kind::kArray: return "an array";
    case Kind::kString: return "a string";
    case Kind::kCount: return "a non-negative integer";
    case Kind::kPositive: return "a positive integer";
    case Kind::kUnsigned: return "a non-negative integer";
    case Kind::kCounts: return "an array of non-negative integers";
    case Kind::kSlice: return "an array of [begin, end] pairs of non-negative integers";
  }
  return "";
}

// Where in index.json a check looks, for its errors: "<dir>/index.json: tensor model/w, part 0: `file` is missing".
struct Place {
  std::string file;     // the index
  std::string context;  // "" or "tensor model/w: " or "tensor model/w, part 0: "
  std::string path;     // the keys of the enclosing object: "" or "meta.trainer."

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(fmt::format("{}: {}{}", file, context, what));
  }
  std::string key(const std::string& k) const { return fmt::format("`{}{}`", path, k); }
  // obj[k], which must be there and be of `kind`.
  const json& need(const json& obj, const std::string& k, Kind kind) const {
    const auto it = obj.find(k);
    if (it == obj.end()) fail(key(k) + " is missing");
    if (!has_kind(*it, kind)) fail(fmt::format("{} must be {}, not {}", key(k), kind_name(kind), shown(*it)));
    return *it;
  }
  Place in(const std::string& k) const { return {file, context, path + k + "."}; }
};

// A tensor's parts must tile it: row slices ([0, rows) without gaps or overlaps, each inside the shape and holding
// every other dimension whole) or, where any part is an element range ("flat"), the flattened tensor's elements
// [0, numel) likewise. Returns what is wrong ("" if nothing); the entry's keys have their types.
std::string parts_problem(const std::string& name, const json& entry) {
  const auto shape = entry.at("shape").get<std::vector<int64_t>>();
  const auto& parts = entry.at("parts");
  int64_t row = 1, numel = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    numel *= shape[d];
    if (d > 0) row *= shape[d];
  }
  bool flat = false;
  for (const auto& p : parts) flat = flat || p.contains("flat");
  const char* unit = flat ? "elements" : "rows";
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i].contains("flat")) {
      const auto r = parts[i].at("flat").get<std::vector<int64_t>>();
      const std::string part = fmt::format("tensor {}, part {}: `flat` {}", name, i, shown(parts[i].at("flat")));
      if (r.size() != 2) return fmt::format("{} must be one [begin, end] pair", part);
      if (r[0] > r[1] || r[1] > numel)
        return fmt::format("{} does not fit in the {} elements of `shape` {}", part, numel, shown(entry.at("shape")));
      ranges.emplace_back(r[0], r[1]);
      continue;
    }
    const auto slice = parts[i].at("slice").get<std::vector<std::vector<int64_t>>>();
    const std::string part = fmt::format("tensor {}, part {}: `slice` {}", name, i, shown(parts[i].at("slice")));
    if (slice.size() != shape.size())
      return fmt::format("{} has {} dimensions, `shape` {} has {}", part, slice.size(), shown(entry.at("shape")),
                         shape.size());
    for (size_t d = 0; d < shape.size(); ++d) {
      if (slice[d][0] > slice[d][1] || slice[d][1] > shape[d])
        return fmt::format("{} does not fit in `shape` {}", part, shown(entry.at("shape")));
      if (d > 0 && (slice[d][0] != 0 || slice[d][1] != shape[d]))
        return fmt::format("{} does not hold dimension {} whole", part, d);
    }
    const int64_t b = shape.empty() ? 0 : slice[0][0], e = shape.empty() ? 1 : slice[0][1];
    ranges.emplace_back(flat ? b * row : b, flat ? e * row : e);
  }
  std::sort(ranges.begin(), ranges.end());
  int64_t at = 0;
  for (const auto& [b, e] : ranges) {
    if (b != at)
      return fmt::format("tensor {}: {} at {} {}", name,
                         b < at ? fmt::format("two ranks wrote the {}", unit) : fmt::format("no rank wrote the {}", unit),
                         flat ? "element" : "row", std::min(b, at));
    at = e;
  }
  const int64_t total = flat ? numel : shape.empty() ? 1 : shape[0];
  if (at != total) return fmt::format("tensor {}: no rank wrote {} {} to {}", name, unit, at, total);
  return "";
}

// "shard_00003.h5" with 3 below `shards`, as write_shard names them: a file of this checkpoint's directory.
bool is_shard_file(const std::string& f, int64_t shards) {
  if (f.size() < 14 || f.rfind("shard_", 0) != 0 || f.compare(f.size() - 3, 3, ".h5") != 0) return false;
  const std::string digits = f.substr(6, f.size() - 9);
  if (digits.size() > 12 || digits.find_first_not_of("0123456789") != std::string::npos) return false;
  const int64_t n = std::stoll(digits);
  return n < shards && f == fmt::format("shard_{:05}.h5", n);
}

bool is_known_dtype(const std::string& name) {
  try {
    dtype_from_name(name, "");
    return true;
  } catch (const std::runtime_error&) {
    return false;
  }
}

// The index's structure: what every read of it relies on.
void check_index(const json& index, const std::string& file) {
  const Place top{file, "", ""};
  if (!index.is_object()) top.fail(fmt::format("the index must be a JSON object, not {}", shown(index)));
  const json& format = top.need(index, "format", Kind::kString);
  if (format != kFormat) top.fail(fmt::format("not a {} index (`format` is {})", kFormat, shown(format)));
  top.need(index, "step", Kind::kCount);
  const int64_t shards = top.need(index, "shards", Kind::kPositive).get<int64_t>();
  top.need(index, "meta", Kind::kObject);
  for (const auto& [name, entry] : top.need(index, "tensors", Kind::kObject).items()) {
    const Place t{file, fmt::format("tensor {}: ", name), ""};
    if (!entry.is_object()) t.fail(fmt::format("its entry must be an object, not {}", shown(entry)));
    t.need(entry, "shape", Kind::kCounts);
    const json& dtype = t.need(entry, "dtype", Kind::kString);
    if (!is_known_dtype(dtype)) t.fail(fmt::format("`dtype` {} is not a dtype a checkpoint holds", shown(dtype)));
    const json& parts = t.need(entry, "parts", Kind::kArray);
    if (parts.empty()) t.fail("`parts` is empty (no shard holds it)");
    for (size_t i = 0; i < parts.size(); ++i) {
      const Place p{file, fmt::format("tensor {}, part {}: ", name, i), ""};
      const json& part = parts[i];
      if (!part.is_object()) p.fail(fmt::format("the part must be an object, not {}", shown(part)));
      const json& shard = p.need(part, "file", Kind::kString);
      if (!is_shard_file(shard, shards))
        p.fail(fmt::format("`file` must be a shard of this checkpoint (shard_NNNNN.h5, NNNNN below {}), not {}", shards,
                           shown(shard)));
      const json& dataset = p.need(part, "dataset", Kind::kString);
      if (dataset.get_ref<const std::string&>().rfind('/', 0) != 0)
        p.fail(fmt::format("`dataset` must be an HDF5 path starting with /, not {}", shown(dataset)));
      if (part.contains("flat"))
        p.need(part, "flat", Kind::kCounts);
      else
        p.need(part, "slice", Kind::kSlice);
      const std::string& sum = p.need(part, "xxh64", Kind::kString).get_ref<const std::string&>();
      if (sum.size() != 16 || sum.find_first_not_of("0123456789abcdef") != std::string::npos)
        p.fail(fmt::format("`xxh64` must be 16 hexadecimal digits, not {}", shown(part["xxh64"])));
    }
    if (const std::string problem = parts_problem(name, entry); !problem.empty()) top.fail(problem);
  }
}

// meta as the trainer writes it (Checkpointer::save) and reads it back (Checkpointer::load).
void check_meta(const json& index, const std::string& file) {
  const Place m = Place{file, "", ""}.in("meta");
  const json& meta = index.at("meta");
  m.need(meta, "config", Kind::kString);
  const Place l = m.in("layout");
  const json& layout = m.need(meta, "layout", Kind::kObject);
  for (const char* k : {"pp", "dp", "ep", "world_size"}) l.need(layout, k, Kind::kPositive);
  const Place t = m.in("trainer");
  const json& trainer = m.need(meta, "trainer", Kind::kObject);
  const int64_t step = t.need(trainer, "step", Kind::kCount).get<int64_t>();
  if (step != index.at("step").get<int64_t>())
    t.fail(fmt::format("{} is {} but `step` is {}", t.key("step"), step, index.at("step").get<int64_t>()));
  for (const char* k : {"samples_consumed", "tokens_seen"})  // optional: a resume takes 0 for one missing
    if (trainer.contains(k)) t.need(trainer, k, Kind::kCount);
  // The fields data::data_state_from_json reads.
  const Place d = t.in("data");
  const json& data = t.need(trainer, "data", Kind::kObject);
  d.need(data, "step", Kind::kCount);
  d.need(data, "samples_consumed", Kind::kCount);
  const size_t epochs = d.need(data, "epochs", Kind::kCounts).size();
  const size_t in_epoch = d.need(data, "samples_in_epoch", Kind::kCounts).size();
  if (epochs != in_epoch)  // one of each per dataset
    d.fail(fmt::format("{} and {} differ in length ({} and {})", d.key("epochs"), d.key("samples_in_epoch"), epochs,
                       in_epoch));
  d.need(data, "seed", Kind::kUnsigned);
  d.need(data, "fingerprint", Kind::kUnsigned);
}

// The tensors every trainer checkpoint holds (see check_complete).
void check_tensors(const json& index, const std::string& file) {
  const Place top{file, "", ""};
  const json& tensors = index.at("tensors");
  auto find = [&](const std::string& name) -> const json* {
    const auto it = tensors.find(name);
    return it == tensors.end() ? nullptr : &*it;
  };
  auto missing = [](const std::string& name, const std::string& why) {
    return fmt::format("tensor {} is missing ({})", name, why);
  };
  const json* step = find("optim/step");
  if (!step) top.fail(missing("optim/step", "AdamW's step count"));
  if (!step->at("shape").empty() || step->at("dtype") != "int64")
    top.fail(fmt::format("tensor optim/step must be an int64 scalar, not {} of shape {}",
                         step->at("dtype").get<std::string>(), shown(step->at("shape"))));
  const int64_t shards = index.at("shards").get<int64_t>();
  for (int64_t r = 0; r < shards; ++r)
    if (!find(fmt::format("rng/{}", r)))
      top.fail(missing(fmt::format("rng/{}", r), fmt::format("the RNG state of rank {} of {}", r, shards)));
  const std::string avg = "optim/exp_avg/", avg_sq = "optim/exp_avg_sq/";
  for (const auto& [name, entry] : tensors.items()) {
    if (name.rfind("model/", 0) == 0 || name == "optim/step") continue;
    if (name.rfind("rng/", 0) == 0) {
      const std::string r = name.substr(4);
      if (r.empty() || r.size() > 12 || r.find_first_not_of("0123456789") != std::string::npos ||
          std::stoll(r) >= shards)
        top.fail(fmt::format("tensor {}: not the RNG state of one of the {} ranks that saved the checkpoint", name,
                             shards));
      continue;
    }
    // AdamW's moments come in pairs, each of its parameter's shape; a model/ tensor without them is a buffer.
    const bool first = name.rfind(avg, 0) == 0;
    if (!first && name.rfind(avg_sq, 0) != 0)
      top.fail(fmt::format("tensor {}: not a tensor a checkpoint holds (model/…, optim/exp_avg/…, "
                           "optim/exp_avg_sq/…, optim/step, rng/<rank>)",
                           name));
    const std::string param = name.substr(first ? avg.size() : avg_sq.size());
    const std::string pair = (first ? avg_sq : avg) + param;
    const json* model = find("model/" + param);
    if (!model) top.fail(missing("model/" + param, fmt::format("{} is there", name)));
    const json* other = find(pair);
    if (!other) top.fail(missing(pair, fmt::format("{} is there", name)));
    if (entry.at("shape") != model->at("shape"))
      top.fail(fmt::format("tensor {} has shape {} but model/{} has {}", name, shown(entry.at("shape")), param,
                           shown(model->at("shape"))));
    if (entry.at("dtype") != other->at("dtype"))
      top.fail(fmt::format("tensors {} and {} differ in dtype ({} and {})", first ? name : pair, first ? pair : name,
                           (first ? entry : *other).at("dtype").get<std::string>(),
                           (first ? *other : entry).at("dtype").get<std::string>()));
    if (!at::isFloatingType(dtype_from_name(entry.at("dtype"), name)))
      top.fail(fmt::format("tensor {}: an AdamW moment of dtype {}", name, entry.at("dtype").get<std::string>()));
  }
}

// step_N.tmp (a save that did not finish) and step_N.deleting-… (set aside for deletion) are never loaded: why, or
// "" for any other name.
std::string never_loaded(const std::string& name) {
  if (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0)
    return "an uncommitted checkpoint (a save that did not finish), never loaded";
  if (name.find(".deleting-") != std::string::npos)
    return "a checkpoint set aside for deletion (pruned or replaced), never loaded";
  return "";
}

// "x/step_1.tmp/" and "x/./step_1.tmp/." as "x/step_1.tmp": whose file name is the directory's.
fs::path normalized(const fs::path& p) {
  fs::path n = p.lexically_normal();
  if (!n.has_filename() && n.has_parent_path() && n != n.root_path()) n = n.parent_path();
  return n;
}

}  // namespace

bool within(const fs::path& path, const fs::path& dir) {
  const fs::path p = fs::weakly_canonical(fs::absolute(path)), d = fs::weakly_canonical(fs::absolute(dir));
  const fs::path rel = p.lexically_relative(d);
  return !rel.empty() && *rel.begin() != "..";
}

uint64_t checksum(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return checksum_bytes(c.data_ptr(), c.nbytes());
}

std::string step_dir_name(int64_t step) { return fmt::format("step_{:07}", step); }

std::vector<int64_t> committed_steps(const std::string& root_dir) {
  const fs::path root(root_dir);
  std::vector<int64_t> steps;
  if (!fs::exists(root)) return steps;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.size() > 5 && n.rfind("step_", 0) == 0 &&
        n.find_first_not_of("0123456789", 5) == std::string::npos)
      steps.push_back(std::stoll(n.substr(5)));
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

ShardResult write_shard(const SaveRequest& req, int rank) {
  const fs::path tmp = fs::path(req.root) / (step_dir_name(req.step) + ".tmp");
  const std::string shard = fmt::format("shard_{:05}.h5", rank);
  ShardResult out;
  try {
    fs::create_directories(tmp);
    CheckpointShardWriter file((tmp / shard).string());
    struct Written {
      std::string name;
      std::vector<int64_t> shape, global;  // this part's shape and the whole tensor's
      c10::ScalarType dtype;
      int64_t row_begin;
      int64_t flat_begin = -1;  // an element range: [flat_begin, flat_begin + shape[0])
      std::string dataset;
    };
    std::vector<Written> written;
    auto host = [](const at::Tensor& t) { return t.detach().to(at::kCPU).contiguous(); };  // the writer holds it
    // The largest first: the writer thread has bytes to write at once, while HDF5 creates the many small datasets.
    std::vector<const TensorEntry*> order;
    for (const auto& e : req.tensors)
      if (e.write) order.push_back(&e);
    auto bytes = [](const TensorEntry* e) {
      int64_t n = e->rows.empty() ? static_cast<int64_t>(e->tensor.nbytes()) : 0;
      for (const auto& r : e->rows) n += static_cast<int64_t>(r.nbytes());
      return n;
    };
    std::stable_sort(order.begin(), order.end(),
                     [&](const TensorEntry* a, const TensorEntry* b) { return bytes(a) > bytes(b); });
    for (const TensorEntry* ep : order) {
      const TensorEntry& e = *ep;
      if (e.flat_begin >= 0) {  // one rank may hold several ranges of a tensor: a dataset for each
        at::Tensor t = host(e.tensor).view({-1});
        const std::string dataset = fmt::format("/{}@{}", e.name, e.flat_begin);
        file.add(dataset, t);
        written.push_back({e.name, t.sizes().vec(), e.global_shape, t.scalar_type(), 0, e.flat_begin, dataset});
        continue;
      }
      if (e.rows.empty()) {
        at::Tensor t = host(e.tensor);
        file.add("/" + e.name, t);
        written.push_back({e.name, t.sizes().vec(), t.sizes().vec(), t.scalar_type(), 0, -1, "/" + e.name});
        continue;
      }
      std::vector<at::Tensor> rows;
      for (const auto& r : e.rows) rows.push_back(host(r));
      file.add_stacked("/" + e.name, rows);
      std::vector<int64_t> shape = rows[0].sizes().vec();
      shape.insert(shape.begin(), static_cast<int64_t>(rows.size()));
      std::vector<int64_t> global = shape;
      global[0] = e.rows_total;
      written.push_back({e.name, shape, global, rows[0].scalar_type(), e.row_begin, -1, "/" + e.name});
    }
    const std::vector<uint64_t> sums = file.finish();
    for (size_t i = 0; i < written.size(); ++i) {
      const Written& w = written[i];
      nlohmann::json part = {{"file", shard}, {"dataset", w.dataset}, {"xxh64", hex(sums[i])}};
      if (w.flat_begin >= 0) {
        part["flat"] = {w.flat_begin, w.flat_begin + w.shape[0]};
      } else {
        nlohmann::json slice = nlohmann::json::array();
        for (size_t d = 0; d < w.shape.size(); ++d) {
          const int64_t b = d == 0 ? w.row_begin : 0;
          slice.push_back({b, b + w.shape[d]});
        }
        part["slice"] = slice;
      }
      if (out.entries.contains(w.name)) {
        out.entries[w.name]["parts"].push_back(std::move(part));
      } else {
        out.entries[w.name] = {{"shape", w.global}, {"dtype", dtype_name(w.dtype)}, {"parts", {std::move(part)}}};
      }
    }
  } catch (const std::exception& ex) {
    out.error = ex.what();
  }
  return out;
}

namespace {

// Renames a directory on its way out aside (atomic), to a name nothing loads and no other job's leftover has.
fs::path set_aside(const fs::path& dir) {
  static int serial = 0;
  const auto stamp = std::chrono::system_clock::now().time_since_epoch().count();
  fs::path aside = dir;
  aside += fmt::format(".deleting-{}-{}-{}", ::getpid(), stamp, serial++);
  fs::rename(dir, aside);
  return aside;
}

// Rank 0's part of the commit: step_N.tmp becomes step_N, `latest` names it, keep_last prunes older steps.
void publish(const SaveRequest& req, const fs::path& root, const fs::path& final_dir, const fs::path& tmp,
             Remover* remover) {
  std::vector<fs::path> doomed;
  for (const auto& e : fs::directory_iterator(root))  // left by a job that ended before deleting them
    if (e.path().filename().string().find(".deleting-") != std::string::npos) doomed.push_back(e.path());
  if (fs::exists(final_dir)) {
    // A new save of a step that exists (and that `latest` may name): swap the two atomically, so that step_N is
    // always a complete checkpoint; the old one, now at the .tmp name, is set aside.
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
      doomed.push_back(set_aside(tmp));
    } else {  // a filesystem without the exchange: a short window where step_N is missing
      doomed.push_back(set_aside(final_dir));
      fs::rename(tmp, final_dir);
    }
  } else {
    fs::rename(tmp, final_dir);
  }
  fsync_path(root.string());
  write_file_durably(root / "latest.tmp", step_dir_name(req.step) + "\n");
  fs::rename(root / "latest.tmp", root / "latest");
  fsync_path(root.string());
  // keep_last counts this step and the newest older ones. Later steps (left by a run this one was resumed
  // before) are neither counted nor deleted, and this step never is.
  if (req.keep_last > 0) {
    std::vector<int64_t> older;
    for (int64_t s : committed_steps(root))
      if (s < req.step) older.push_back(s);
    for (size_t i = 0; i + static_cast<size_t>(req.keep_last) - 1 < older.size(); ++i)
      doomed.push_back(set_aside(root / step_dir_name(older[i])));
  }
  for (const auto& d : doomed) {
    if (remover)
      remover->remove(d.string());
    else
      fs::remove_all(d);
  }
}

}  // namespace

Remover::~Remover() { wait(); }

void Remover::remove(const std::string& dir) {
  std::lock_guard<std::mutex> lock(mu_);
  queue_.push_back(dir);
  if (running_) return;  // the running thread takes it
  if (thread_.joinable()) thread_.join();  // one that has run out of work and ended
  thread_ = std::thread([this] {
    for (;;) {
      std::string next;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (queue_.empty()) {
          running_ = false;
          return;
        }
        next = queue_.front();
        queue_.erase(queue_.begin());
      }
      std::error_code ec;  // a directory that cannot be deleted stays, renamed aside, and is tried again next time
      fs::remove_all(next, ec);
    }
  });
  running_ = true;  // under the lock: the thread looks at running_ only once it has the lock
}

void Remover::wait() {
  std::thread t;
  {
    std::lock_guard<std::mutex> lock(mu_);
    t = std::move(thread_);
  }
  if (t.joinable()) t.join();
}

std::string commit(const SaveRequest& req, const ShardResult& mine, parallel::ControlPlane& coll, Remover* remover) {
  const fs::path root(req.root);
  const fs::path final_dir = root / step_dir_name(req.step);
  const fs::path tmp = root / (step_dir_name(req.step) + ".tmp");
  std::string error = mine.error;

  // Rank 0 gathers the entries (or a rank's error: the first one is what rank 0 reports) and writes the index;
  // every rank must have succeeded.
  std::vector<std::string> all =
      coll.gather(mine.error.empty() ? mine.entries.dump() : nlohmann::json{{"error", mine.error}}.dump());
  std::vector<nlohmann::json> parts;  // each rank's, parsed once
  if (coll.rank() == 0 && error.empty()) {
    for (size_t r = 0; r < all.size() && error.empty(); ++r) {
      parts.push_back(nlohmann::json::parse(all[r]));
      if (parts.back().contains("error") && parts.back()["error"].is_string())
        error = fmt::format("rank {}: {}", r, parts.back()["error"].get<std::string>());
    }
  }
  if (coll.rank() == 0 && error.empty()) {
    try {
      nlohmann::json index = {{"format", kFormat}, {"step", req.step}, {"meta", req.meta},
                              {"shards", coll.size()}, {"tensors", nlohmann::json::object()}};
      nlohmann::json& tensors = index["tensors"];
      for (auto& entries : parts) {
        for (auto& [name, entry] : entries.items()) {
          if (!tensors.contains(name)) {
            tensors[name] = std::move(entry);
            continue;
          }
          nlohmann::json& have = tensors[name];
          if (have["shape"] != entry["shape"] || have["dtype"] != entry["dtype"])
            throw std::runtime_error(fmt::format("checkpoint: ranks disagree on the shape or dtype of {}", name));
          for (auto& p : entry["parts"]) have["parts"].push_back(std::move(p));
        }
      }
      for (auto& [name, entry] : tensors.items())
        if (const std::string problem = parts_problem(name, entry); !problem.empty())
          throw std::runtime_error("checkpoint: " + problem);
      // Shards a crashed earlier save left in the .tmp directory (another layout) are not part of this one.
      for (const auto& e : fs::directory_iterator(tmp)) {
        const std::string n = e.path().filename().string();
        if (n.rfind("shard_", 0) == 0 && std::stoi(n.substr(6)) >= coll.size()) fs::remove(e.path());
      }
      write_file_durably(tmp / "index.json", index.dump(1));
      fsync_path(tmp.string());
    } catch (const std::exception& ex) {
      error = ex.what();
    }
  }
  if (!coll.all(error.empty()))
    throw std::runtime_error(error.empty() ? fmt::format("checkpoint {}: another rank failed to write its shard; "
                                                         "the previous checkpoint stays current",
                                                         tmp.string())
                                           : error);
  maybe_pause(coll.rank(), req.step);

  // One rename makes the checkpoint; then `latest` moves to it. Rank 0 does it; every rank learns how it went.
  if (coll.rank() == 0) {
    try {
      publish(req, root, final_dir, tmp, remover);
    } catch (const std::exception& ex) {
      error = fmt::format("checkpoint {}: the commit failed: {}", final_dir.string(), ex.what());
    }
  }
  if (!coll.all(error.empty()))
    throw std::runtime_error(error.empty() ? fmt::format("checkpoint {}: the commit failed on rank 0",
                                                         final_dir.string())
                                           : error);
  return final_dir.string();
}

std::string resolve_resume(const std::string& root, const std::string& what) {
  fs::path dir;
  if (what == "auto") {
    if (!fs::exists(fs::path(root) / "latest")) return "";
    dir = normalized(root);
  } else {
    dir = normalized(what);
  }
  if (fs::exists(dir / "latest")) {
    std::ifstream f(dir / "latest");
    std::string name;
    f >> name;
    if (const std::string why = never_loaded(name); !why.empty())
      throw std::runtime_error(fmt::format("{}: `latest` names '{}': {}", (dir / "latest").string(), name, why));
    if (name.empty() || !fs::exists(dir / name / "index.json"))
      throw std::runtime_error(fmt::format(
          "{}: `latest` names '{}', which is not a committed checkpoint ({})", (dir / "latest").string(), name,
          name.empty()            ? "the file is empty"
          : !fs::exists(dir / name) ? fmt::format("no directory {}", (dir / name).string())
                                    : fmt::format("{} is missing", (dir / name / "index.json").string())));
    return (dir / name).string();
  }
  if (const std::string why = never_loaded(dir.filename().string()); !why.empty())
    throw std::runtime_error(fmt::format("{}: {}", dir.string(), why));
  if (!fs::exists(dir / "index.json"))
    throw std::runtime_error(fmt::format("{}: not a checkpoint (no index.json and no `latest`)", dir.string()));
  return dir.string();
}

Checkpoint::Checkpoint(std::string dir) : dir_(std::move(dir)) {
  const std::string file = index_file();
  std::ifstream f(file);
  if (!f) throw std::runtime_error(fmt::format("{}: missing checkpoint index", file));
  try {
    index_ = nlohmann::json::parse(f);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(fmt::format("{}: not valid JSON (a syntax error at byte {}); the index is corrupt", file,
                                         e.byte));
  }
  check_index(index_, file);
}

std::string Checkpoint::index_file() const { return (fs::path(dir_) / "index.json").string(); }

H5File& Checkpoint::shard(const std::string& file) {
  auto it = shards_.find(file);
  if (it == shards_.end())
    it = shards_.emplace(file, std::make_unique<H5File>(H5File::open((fs::path(dir_) / file).string()))).first;
  return *it->second;
}

std::vector<int64_t> Checkpoint::shape(const std::string& name) const {
  if (!has(name)) throw std::runtime_error(fmt::format("{}: the checkpoint has no tensor {}", dir_, name));
  return index_["tensors"][name].at("shape").get<std::vector<int64_t>>();
}

at::Tensor Checkpoint::read(const std::string& name) {
  const auto s = shape(name);
  return read_rows(name, 0, s.empty() ? 1 : s[0]);
}

at::Tensor Checkpoint::read_part(const nlohmann::json& part, const std::vector<int64_t>& extent) {
  const std::string file = part.at("file"), dataset = part.at("dataset");
  const std::string key = file + ":" + dataset;
  if (key == last_part_) return last_read_;  // consecutive pieces of one part: read and checked once
  at::Tensor t = shard(file).read(dataset);
  if (t.sizes().vec() != extent)
    throw std::runtime_error(fmt::format("{}/{}: dataset {} has shape {} but the index says {}", dir_, file, dataset,
                                         nlohmann::json(t.sizes().vec()).dump(), nlohmann::json(extent).dump()));
  if (hex(checksum(t)) != part.at("xxh64").get<std::string>())
    throw std::runtime_error(fmt::format("{}/{}: checksum mismatch in dataset {} (the shard is corrupt)", dir_, file,
                                         dataset));
  last_part_ = key;
  last_read_ = t;
  return t;
}

at::Tensor Checkpoint::read_rows(const std::string& name, int64_t begin, int64_t end) {
  std::vector<int64_t> want = shape(name);
  const bool scalar = want.empty();
  const int64_t rows = scalar ? 1 : want[0];
  if (begin < 0 || end > rows || begin > end)
    throw std::runtime_error(fmt::format("{}: tensor {} has {} rows; rows {} to {} asked for", dir_, name, rows, begin,
                                         end));
  int64_t row = 1;
  for (size_t d = 1; d < want.size(); ++d) row *= want[d];
  if (!scalar) want[0] = end - begin;
  return read_elements(name, begin * row, end * row).view(want);
}

at::Tensor Checkpoint::read_elements(const std::string& name, int64_t begin, int64_t end) {
  const std::vector<int64_t> whole = shape(name);
  const auto& e = index_["tensors"][name];
  int64_t numel = 1, row = 1;
  for (size_t d = 0; d < whole.size(); ++d) {
    numel *= whole[d];
    if (d > 0) row *= whole[d];
  }
  if (begin < 0 || end > numel || begin > end)
    throw std::runtime_error(fmt::format("{}: tensor {} has {} elements; elements {} to {} asked for", dir_, name,
                                         numel, begin, end));
  at::Tensor out =
      at::empty({end - begin}, at::TensorOptions().dtype(dtype_from_name(e.at("dtype"), dir_ + ": " + name)));
  int64_t covered = 0;
  for (const auto& p : e.at("parts")) {
    int64_t b = 0, pe = 0;
    std::vector<int64_t> extent;
    if (p.contains("flat")) {
      b = p.at("flat").at(0).get<int64_t>();
      pe = p.at("flat").at(1).get<int64_t>();
      extent = {pe - b};
    } else {
      const auto slice = p.at("slice").get<std::vector<std::vector<int64_t>>>();
      b = whole.empty() ? 0 : slice.at(0).at(0) * row;
      pe = whole.empty() ? 1 : slice.at(0).at(1) * row;
      for (const auto& d : slice) extent.push_back(d.at(1) - d.at(0));
    }
    if (pe <= begin || b >= end) continue;
    const at::Tensor t = read_part(p, extent).reshape({-1});
    if (b == begin && pe == end) return t;  // one part holds exactly the elements asked for (a scalar too)
    const int64_t from = std::max(b, begin), to = std::min(pe, end);
    out.narrow(0, from - begin, to - from).copy_(t.narrow(0, from - b, to - from));
    covered += to - from;
  }
  if (covered != end - begin)
    throw std::runtime_error(
        fmt::format("{}: the parts of tensor {} do not hold elements {} to {}", dir_, name, begin, end));
  return out;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (auto& [name, _] : index_.at("tensors").items()) out.push_back(name);
  return out;
}

std::string inspect(const std::string& dir) {
  Checkpoint ck(dir);
  std::string out = fmt::format("checkpoint {} (step {}, {} shards)\n{:<60} {:>18} {:>10} {:>12}  {}\n", dir,
                                ck.index().at("step").get<int64_t>(), ck.index().at("shards").get<int64_t>(), "tensor",
                                "shape", "dtype", "bytes", "shard");
  int64_t total = 0;
  for (const auto& name : ck.names()) {
    const auto& e = ck.index()["tensors"][name];
    auto shape = e.at("shape").get<std::vector<int64_t>>();
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const auto dt = dtype_from_name(e.at("dtype"), name);
    const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(dt));
    total += bytes;
    std::vector<std::string> files;
    for (const auto& p : e.at("parts")) files.push_back(p.at("file"));
    out += fmt::format("{:<60} {:>18} {:>10} {:>12}  {}\n", name, fmt::format("{}", fmt::join(shape, "×")),
                       e.at("dtype").get<std::string>(), bytes, fmt::join(files, ","));
  }
  out += fmt::format("{} tensors, {} bytes\n", ck.names().size(), total);
  return out;
}

void check_complete(const Checkpoint& ck) {
  check_meta(ck.index(), ck.index_file());
  check_tensors(ck.index(), ck.index_file());
}

std::string verify(const std::string& dir) {
  Checkpoint ck(dir);
  check_complete(ck);
  int64_t bytes = 0;
  std::set<std::string> files;
  for (const auto& name : ck.names()) {
    bytes += static_cast<int64_t>(ck.read(name).nbytes());
    for (const auto& p : ck.index()["tensors"][name].at("parts")) files.insert(p.at("file").get<std::string>());
  }
  return fmt::format("{}: ok — {} tensors, {} bytes in {} shards, every checksum matches", dir, ck.names().size(),
                     bytes, files.size());
}

std::string export_weights(const std::string& dir, const std::string& out) {
  // Never into a checkpoint: the export would truncate a shard it is reading, or leave a stray file where the
  // checkpoints' own files live.
  const fs::path step = fs::absolute(normalized(dir)), target = fs::absolute(normalized(out));
  const fs::path root = step.parent_path(), out_dir = target.parent_path();
  if (within(target, step))
    throw std::runtime_error(fmt::format("{}: inside the checkpoint {}; write the export outside it", out, dir));
  if (fs::exists(root / "latest") && within(target, root))
    throw std::runtime_error(fmt::format("{}: inside {}, the checkpoint directory holding {}; write the export "
                                         "outside it",
                                         out, root.string(), dir));
  if (fs::exists(out_dir / "index.json"))
    throw std::runtime_error(fmt::format("{}: inside the checkpoint {}; write the export outside it", out,
                                         out_dir.string()));
  if (fs::exists(out_dir / "latest"))
    throw std::runtime_error(fmt::format("{}: inside the checkpoint directory {}; write the export outside it", out,
                                         out_dir.string()));
  if (fs::is_directory(target))
    throw std::runtime_error(fmt::format("{}: a directory; --out names the HDF5 file to write", out));
  if (!fs::is_directory(out_dir))
    throw std::runtime_error(fmt::format("{}: no directory {} to write it in", out, out_dir.string()));
  Checkpoint ck(dir);
  // Written beside `out` and renamed over it once complete: a failed export leaves whatever was there before.
  fs::path tmp = target;
  tmp += fmt::format(".tmp-{}", ::getpid());
  int64_t n = 0;
  try {
    H5File file = H5File::create(tmp.string());
    for (const auto& name : ck.names()) {
      if (name.rfind("model/", 0) != 0) continue;
      file.write("/" + name.substr(6), ck.read(name));
      ++n;
    }
    file.close_durably();
    fs::rename(tmp, target);
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
  fsync_path(out_dir.string());
  return fmt::format("{}: {} model tensors from {}", out, n, dir);
}

}  // namespace moetrain::checkpoints
