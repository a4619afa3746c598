// bench/checkpoint: the save throughput of a sharded checkpoint next to writing and fsyncing the same number of
// bytes to the same disk, measured in the same run (target: ≥ 0.7 of it); and with checkpoint.async, the step
// time while saving every step next to the step time without saving (target: < 10% overhead).
//
//   bench_checkpoint [--config configs/small-cpu.yaml] [--dir DIR] [--repeats 3] [--steps 10] [--set k=v ...]
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "configs/loader.h"
#include "trainer/cli.h"
#include "trainer/train.h"

using namespace moetrain;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

int64_t dir_bytes(const fs::path& dir) {
  int64_t n = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) n += static_cast<int64_t>(e.file_size());
  return n;
}

// Writes `bytes` to a new file in 4 MiB blocks and fsyncs it and its directory: the disk's durable write speed.
double raw_write_seconds(const fs::path& dir, int64_t bytes) {
  const fs::path path = dir / "raw.bin";
  std::vector<char> block(4 << 20, 'x');
  auto t0 = Clock::now();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw std::runtime_error(fmt::format("{}: cannot write", path.string()));
  for (int64_t left = bytes; left > 0;) {
    ssize_t n = ::write(fd, block.data(), static_cast<size_t>(std::min<int64_t>(left, static_cast<int64_t>(block.size()))));
    if (n <= 0) throw std::runtime_error("raw write failed");
    left -= n;
  }
  ::fsync(fd);
  ::close(fd);
  checkpoints::fsync_path(dir.string());
  double s = since(t0);
  fs::remove(path);
  return s;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Checkpoint save throughput against raw durable writes; async save overhead on step time"};
  std::string file = "configs/small-cpu.yaml", dir = "runs/bench-checkpoint";
  int repeats = 3, steps = 10;
  std::vector<std::string> overrides;
  app.add_option("--config", file);
  app.add_option("--dir", dir, "Where to write (the disk under test)");
  app.add_option("--repeats", repeats, "Saves and raw writes timed (the median is reported)");
  app.add_option("--steps", steps, "Steps timed with and without asynchronous saves");
  trainer::add_set_option(&app, overrides);
  CLI11_PARSE(app, argc, argv);
  try {
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::vector<std::string> o = overrides;
    o.push_back("checkpoint.dir=" + (fs::absolute(dir) / "ckpt").string());
    o.push_back("checkpoint.keep_last=1");
    config::Config c = config::load_config(file, {o, 0});
    trainer::Trainer t(c, nullptr, "", false);
    t.step();

    // Save throughput against raw writes of the same size, alternating.
    std::vector<double> save_s, raw_s;
    int64_t bytes = 0;
    for (int i = 0; i < repeats; ++i) {
      auto t0 = Clock::now();
      t.save_checkpoint();
      save_s.push_back(since(t0));
      bytes = dir_bytes(fs::path(dir) / "ckpt" / checkpoints::step_dir_name(t.steps_done()));
      raw_s.push_back(raw_write_seconds(dir, bytes));
    }
    const double save_bw = static_cast<double>(bytes) / median(save_s), raw_bw = static_cast<double>(bytes) / median(raw_s);
    fmt::print("checkpoint of {} ({:.1f} MiB, {} tensors written)\n", file, static_cast<double>(bytes) / (1 << 20),
               checkpoints::Checkpoint((fs::path(dir) / "ckpt" / checkpoints::step_dir_name(t.steps_done())).string())
                   .names()
                   .size());
    fmt::print("save (write + fsync + commit): {:8.1f} MiB/s  (median of {})\n", save_bw / (1 << 20), repeats);
    fmt::print("raw write + fsync, same bytes: {:8.1f} MiB/s\n", raw_bw / (1 << 20));
    fmt::print("ratio save / raw:              {:8.2f}  (target ≥ 0.70)\n\n", save_bw / raw_bw);

    // Step time while an asynchronous save is being written, against steps without one.
    std::vector<double> plain, saving;
    for (int i = 0; i < steps; ++i) {
      auto t0 = Clock::now();
      t.step();
      plain.push_back(since(t0));
    }
    std::vector<std::string> oa = o;
    oa.push_back("checkpoint.async=true");
    trainer::Trainer ta(config::load_config(file, {oa, 0}), nullptr, "", false);
    ta.step();
    int saves = 0;
    for (int i = 0; i < steps; ++i) {
      auto t0 = Clock::now();
      if (i % 2 == 0) {  // a save every other step: the writer overlaps the steps that follow
        ta.save_checkpoint();
        ++saves;
      }
      ta.step();
      saving.push_back(since(t0));
    }
    ta.finish_checkpoint();
    const double a = median(plain), b = median(saving);
    fmt::print("step time, no save:                         {:.4f} s (median of {})\n", a, steps);
    fmt::print("step time, async save every other step:     {:.4f} s ({} saves; snapshot included)\n", b, saves);
    fmt::print("overhead:                                   {:+.1f}%  (target < 10%)\n", 100.0 * (b - a) / a);
    fs::remove_all(dir);
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_checkpoint: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
