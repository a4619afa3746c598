#include "checkpoints/checkpoint.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>
#include <thread>

namespace moetrain::checkpoints {
namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "moetrain-checkpoint-1";

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
    if (e.is_directory() && n.rfind("step_", 0) == 0 && n.find('.') == std::string::npos)
      steps.push_back(std::stoll(n.substr(5)));
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

}  // namespace

uint64_t checksum(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return XXH64(c.data_ptr(), c.nbytes(), 0);
}

std::string step_dir_name(int64_t step) { return fmt::format("step_{:07}", step); }

ShardResult write_shard(const SaveRequest& req, int rank) {
  const fs::path tmp = fs::path(req.root) / (step_dir_name(req.step) + ".tmp");
  const std::string shard = fmt::format("shard_{:05}.h5", rank);
  ShardResult out;
  try {
    fs::create_directories(tmp);
    H5File file = H5File::create((tmp / shard).string());
    for (const auto& e : req.tensors) {
      if (!e.write) continue;
      at::Tensor t = e.tensor.detach().to(at::kCPU).contiguous();
      file.write("/" + e.name, t);
      nlohmann::json slice = nlohmann::json::array();
      for (int64_t d : t.sizes()) slice.push_back({0, d});
      out.entries[e.name] = {{"file", shard},         {"dataset", "/" + e.name},
                             {"shape", t.sizes().vec()}, {"dtype", dtype_name(t.scalar_type())},
                             {"slice", slice},        {"xxh64", hex(checksum(t))}};
    }
    file.close_durably();
  } catch (const std::exception& ex) {
    out.error = ex.what();
  }
  return out;
}

std::string commit(const SaveRequest& req, const ShardResult& mine, const Collective& coll) {
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
      for (const auto& part : all) {
        const nlohmann::json entries = nlohmann::json::parse(part);
        for (auto& [name, entry] : entries.items()) {
          if (index["tensors"].contains(name))
            throw std::runtime_error(fmt::format("checkpoint: tensor {} written by two ranks", name));
          index["tensors"][name] = entry;
        }
      }
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
  if (!coll.all_ok(error.empty()))
    throw std::runtime_error(error.empty() ? fmt::format("checkpoint {}: another rank failed to write its shard; "
                                                         "the previous checkpoint stays current",
                                                         tmp.string())
                                           : error);
  maybe_pause(coll.rank(), req.step);

  // One rename makes the checkpoint; then `latest` moves to it.
  if (coll.rank() == 0) {
    if (fs::exists(final_dir)) fs::remove_all(final_dir);
    fs::rename(tmp, final_dir);
    fsync_path(root.string());
    write_file_durably(root / "latest.tmp", step_dir_name(req.step) + "\n");
    fs::rename(root / "latest.tmp", root / "latest");
    fsync_path(root.string());
    if (req.keep_last > 0) {
      auto steps = committed_steps(root);
      for (size_t i = 0; i + static_cast<size_t>(req.keep_last) < steps.size(); ++i)
        fs::remove_all(root / step_dir_name(steps[i]));
    }
  }
  coll.barrier();
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
    throw std::runtime_error(fmt::format("{}: not a {} index", index_path.string(), kFormat));
}

H5File& Checkpoint::shard(const std::string& file) {
  auto it = shards_.find(file);
  if (it == shards_.end())
    it = shards_.emplace(file, std::make_unique<H5File>(H5File::open((fs::path(dir_) / file).string()))).first;
  return *it->second;
}

at::Tensor Checkpoint::read(const std::string& name) {
  if (!has(name)) throw std::runtime_error(fmt::format("{}: the checkpoint has no tensor {}", dir_, name));
  const auto& e = index_["tensors"][name];
  const std::string file = e.at("file"), dataset = e.at("dataset");
  H5File& h5 = shard(file);
  at::Tensor t = h5.read(dataset);
  if (t.sizes().vec() != e.at("shape").get<std::vector<int64_t>>())
    throw std::runtime_error(fmt::format("{}/{}: dataset {} has shape {} but the index says {}", dir_, file, dataset,
                                         nlohmann::json(t.sizes().vec()).dump(), e.at("shape").dump()));
  if (hex(checksum(t)) != e.at("xxh64").get<std::string>())
    throw std::runtime_error(fmt::format("{}/{}: checksum mismatch in dataset {} (the shard is corrupt)", dir_, file,
                                         dataset));
  return t;
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
    out += fmt::format("{:<60} {:>18} {:>10} {:>12}  {}\n", name, fmt::format("{}", fmt::join(shape, "×")),
                       e.at("dtype").get<std::string>(), bytes, e.at("file").get<std::string>());
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
    files.insert(ck.index()["tensors"][name].at("file").get<std::string>());
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
