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

std::vector<int64_t> committed_steps(const fs::path& root) {
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

int64_t rows_of(const nlohmann::json& entry) {
  const auto& shape = entry.at("shape");
  return shape.empty() ? 1 : shape[0].get<int64_t>();
}

// A tensor's parts must tile its rows: [0, rows) without gaps or overlaps, each holding every other dimension whole.
void check_parts(const std::string& name, const nlohmann::json& entry) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const auto shape = entry.at("shape").get<std::vector<int64_t>>();
  for (const auto& p : entry.at("parts")) {
    const auto slice = p.at("slice").get<std::vector<std::vector<int64_t>>>();
    if (slice.size() != shape.size())
      throw std::runtime_error(fmt::format("checkpoint: a part of {} has a slice of another rank", name));
    for (size_t d = 1; d < shape.size(); ++d)
      if (slice[d] != std::vector<int64_t>{0, shape[d]})
        throw std::runtime_error(fmt::format("checkpoint: a part of {} does not hold dimension {} whole", name, d));
    ranges.emplace_back(shape.empty() ? 0 : slice[0][0], shape.empty() ? 1 : slice[0][1]);
  }
  std::sort(ranges.begin(), ranges.end());
  int64_t at = 0;
  for (const auto& [b, e] : ranges) {
    if (b != at)
      throw std::runtime_error(fmt::format("checkpoint: tensor {}: {} at row {}", name,
                                           b < at ? "two ranks wrote the rows" : "no rank wrote the rows", std::min(b, at)));
    at = e;
  }
  if (at != rows_of(entry))
    throw std::runtime_error(fmt::format("checkpoint: tensor {}: no rank wrote rows {} to {}", name, at, rows_of(entry)));
}

}  // namespace

uint64_t checksum(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return checksum_bytes(c.data_ptr(), c.nbytes());
}

std::string step_dir_name(int64_t step) { return fmt::format("step_{:07}", step); }

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
      if (e.rows.empty()) {
        at::Tensor t = host(e.tensor);
        file.add("/" + e.name, t);
        written.push_back({e.name, t.sizes().vec(), t.sizes().vec(), t.scalar_type(), 0});
        continue;
      }
      std::vector<at::Tensor> rows;
      for (const auto& r : e.rows) rows.push_back(host(r));
      file.add_stacked("/" + e.name, rows);
      std::vector<int64_t> shape = rows[0].sizes().vec();
      shape.insert(shape.begin(), static_cast<int64_t>(rows.size()));
      std::vector<int64_t> global = shape;
      global[0] = e.rows_total;
      written.push_back({e.name, shape, global, rows[0].scalar_type(), e.row_begin});
    }
    const std::vector<uint64_t> sums = file.finish();
    for (size_t i = 0; i < written.size(); ++i) {
      const Written& w = written[i];
      nlohmann::json slice = nlohmann::json::array();
      for (size_t d = 0; d < w.shape.size(); ++d) {
        const int64_t b = d == 0 ? w.row_begin : 0;
        slice.push_back({b, b + w.shape[d]});
      }
      out.entries[w.name] = {
          {"shape", w.global},
          {"dtype", dtype_name(w.dtype)},
          {"parts", {{{"file", shard}, {"dataset", "/" + w.name}, {"slice", slice}, {"xxh64", hex(sums[i])}}}}};
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

  // Rank 0 gathers the entries and writes the index; every rank must have succeeded.
  std::vector<std::string> all = coll.gather(mine.entries.dump());
  if (coll.rank() == 0 && error.empty()) {
    try {
      nlohmann::json index = {{"format", kFormat}, {"step", req.step}, {"meta", req.meta},
                              {"shards", coll.size()}, {"tensors", nlohmann::json::object()}};
      nlohmann::json& tensors = index["tensors"];
      for (const auto& part : all) {
        nlohmann::json entries = nlohmann::json::parse(part);
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
      for (auto& [name, entry] : tensors.items()) check_parts(name, entry);
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
    dir = fs::path(root);
  } else {
    dir = fs::path(what);
  }
  if (fs::exists(dir / "latest")) {
    std::ifstream f(dir / "latest");
    std::string name;
    f >> name;
    if (name.empty() || !fs::exists(dir / name / "index.json"))
      throw std::runtime_error(fmt::format("{}: `latest` names '{}', which is not a committed checkpoint",
                                           (dir / "latest").string(), name));
    return (dir / name).string();
  }
  if (dir.extension() == ".tmp")
    throw std::runtime_error(fmt::format("{}: an uncommitted checkpoint (a save that did not finish)", dir.string()));
  if (!fs::exists(dir / "index.json"))
    throw std::runtime_error(fmt::format("{}: not a checkpoint (no index.json and no `latest`)", dir.string()));
  return dir.string();
}

Checkpoint::Checkpoint(std::string dir) : dir_(std::move(dir)) {
  const fs::path index_path = fs::path(dir_) / "index.json";
  std::ifstream f(index_path);
  if (!f) throw std::runtime_error(fmt::format("{}: missing checkpoint index", index_path.string()));
  try {
    index_ = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: corrupt checkpoint index: {}", index_path.string(), e.what()));
  }
  if (index_.value("format", "") != kFormat)
    throw std::runtime_error(fmt::format("{}: not a {} index (format '{}')", index_path.string(), kFormat,
                                         index_.value("format", "")));
}

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

at::Tensor Checkpoint::read_rows(const std::string& name, int64_t begin, int64_t end) {
  std::vector<int64_t> want = shape(name);
  const auto& e = index_["tensors"][name];
  const bool scalar = want.empty();
  const int64_t rows = scalar ? 1 : want[0];
  if (begin < 0 || end > rows || begin > end)
    throw std::runtime_error(fmt::format("{}: tensor {} has {} rows; rows {} to {} asked for", dir_, name, rows, begin,
                                         end));
  if (!scalar) want[0] = end - begin;
  at::Tensor out = at::empty(want, at::TensorOptions().dtype(dtype_from_name(e.at("dtype"), dir_ + ": " + name)));
  int64_t covered = 0;
  for (const auto& p : e.at("parts")) {
    const auto slice = p.at("slice").get<std::vector<std::vector<int64_t>>>();
    const int64_t b = scalar ? 0 : slice.at(0).at(0), pe = scalar ? 1 : slice.at(0).at(1);
    if (pe <= begin || b >= end) continue;
    const std::string file = p.at("file"), dataset = p.at("dataset");
    at::Tensor t = shard(file).read(dataset);
    std::vector<int64_t> extent;
    for (const auto& d : slice) extent.push_back(d.at(1) - d.at(0));
    if (t.sizes().vec() != extent)
      throw std::runtime_error(fmt::format("{}/{}: dataset {} has shape {} but the index says {}", dir_, file, dataset,
                                           nlohmann::json(t.sizes().vec()).dump(), nlohmann::json(extent).dump()));
    if (hex(checksum(t)) != p.at("xxh64").get<std::string>())
      throw std::runtime_error(fmt::format("{}/{}: checksum mismatch in dataset {} (the shard is corrupt)", dir_, file,
                                           dataset));
    if (b == begin && pe == end) return t;  // one part holds exactly the rows asked for (a scalar too)
    const int64_t from = std::max(b, begin), to = std::min(pe, end);
    out.narrow(0, from - begin, to - from).copy_(t.narrow(0, from - b, to - from));
    covered += to - from;
  }
  if (covered != end - begin)
    throw std::runtime_error(fmt::format("{}: the parts of tensor {} do not hold rows {} to {}", dir_, name, begin, end));
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

std::string verify(const std::string& dir) {
  Checkpoint ck(dir);
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
  Checkpoint ck(dir);
  H5File file = H5File::create(out);
  int64_t n = 0;
  for (const auto& name : ck.names()) {
    if (name.rfind("model/", 0) != 0) continue;
    file.write("/" + name.substr(6), ck.read(name));
    ++n;
  }
  file.close_durably();
  return fmt::format("{}: {} model tensors from {}", out, n, dir);
}

}  // namespace moetrain::checkpoints
