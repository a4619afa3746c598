// bench/checkpoint: the save throughput of a sharded checkpoint next to writing and fsyncing the same number of
// bytes to the same disk, measured in the same run (target: ≥ 0.7 of it); and with checkpoint.async, the step
// time while a save is being written next to the step time with none (target: < 10% overhead).
//
//   bench_checkpoint [--config configs/small-cpu.yaml] [--dir DIR] [--repeats 15] [--steps 6] [--set k=v ...]
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <vector>

#include "bench/timing.h"
#include "checkpoints/checkpoint.h"
#include "checkpoints/hdf5_file.h"
#include "config/loader.h"
#include "cli/cli.h"
#include "trainer/train.h"

using namespace moetrain;
namespace fs = std::filesystem;
using bench::Clock;
using bench::median;
using bench::since;

namespace {

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

// Flushes everything pending on the disk under `dir` (untimed), so that a timed write does not pay for an earlier
// one, nor for the freeing of deleted files' blocks: with the `discard` mount option the next journal commit
// discards them, which can take longer than the write itself.
void quiesce(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error(fmt::format("{}: cannot open", dir.string()));
  ::syncfs(fd);
  ::close(fd);
}

}  // namespace

int main(int argc, char** argv) {
  moetrain::checkpoints::start_hdf5_without_teardown();  // before MPI_Init (checkpoints/hdf5_file.h)
  CLI::App app{"Checkpoint save throughput against raw durable writes; async save overhead on step time"};
  std::string file = "configs/small-cpu.yaml", dir = "runs/bench-checkpoint";
  int repeats = 15, steps = 6;
  std::vector<std::string> overrides;
  app.add_option("--config", file);
  app.add_option("--dir", dir, "Where to write (the disk under test)");
  app.add_option("--repeats", repeats, "Saves and raw writes timed (the median is reported)");
  app.add_option("--steps", steps, "Asynchronous saves timed (each: two steps with the save in flight, two without)");
  cli::add_set_option(&app, overrides);
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

    // Save throughput against raw writes of the same size, alternating. Each save replaces the last one (keep_last
    // 1), whose deletion runs in the background: it is waited for, and the disk quiesced, before each timed write.
    std::vector<double> save_s, raw_s;
    int64_t bytes = 0;
    const fs::path step_dir = fs::path(dir) / "ckpt" / checkpoints::step_dir_name(t.steps_done());
    for (int i = 0; i < repeats; ++i) {
      quiesce(dir);
      auto t0 = Clock::now();
      t.save_checkpoint();
      save_s.push_back(since(t0));
      t.settle_checkpoints();
      bytes = dir_bytes(step_dir);
      quiesce(dir);
      raw_s.push_back(raw_write_seconds(dir, bytes));
    }
    const double mib = static_cast<double>(bytes) / (1 << 20);
    fmt::print("checkpoint of {} ({:.1f} MiB, {} tensors), {} saves and {} raw writes, alternating\n", file, mib,
               checkpoints::Checkpoint(step_dir.string()).names().size(), repeats, repeats);
    auto row = [&](const char* what, const std::vector<double>& s) {
      fmt::print("{:<31} {:8.1f} MiB/s  (median {:.1f} ms; min {:.1f}, max {:.1f})\n", what, mib / median(s),
                 1e3 * median(s), 1e3 * *std::min_element(s.begin(), s.end()),
                 1e3 * *std::max_element(s.begin(), s.end()));
    };
    row("save (write + fsync + commit):", save_s);
    row("raw write + fsync, same bytes:", raw_s);
    fmt::print("ratio save / raw, medians:       {:8.2f}  (target ≥ 0.70)\n", median(raw_s) / median(save_s));
    fmt::print("ratio save / raw, fastest runs:  {:8.2f}\n\n",
               *std::min_element(raw_s.begin(), raw_s.end()) / *std::min_element(save_s.begin(), save_s.end()));

    // Step time while an asynchronous save is being written against step time with none, interleaved on the same
    // trainer: a save, the step it overlaps and the next step; then two steps with no save in flight.
    if (steps < 1) {
      fs::remove_all(dir);
      return 0;
    }
    std::vector<std::string> oa = o;
    oa.push_back("checkpoint.async=true");
    trainer::Trainer ta(config::load_config(file, {oa, 0}), nullptr, "", false);
    ta.step();
    std::vector<double> plain, saving;
    int saves = 0;
    for (int i = 0; i < steps; ++i) {
      auto t0 = Clock::now();
      ta.save_checkpoint();
      ++saves;
      ta.step();
      saving.push_back(since(t0));
      t0 = Clock::now();
      ta.step();
      saving.push_back(since(t0));
      ta.settle_checkpoints();  // normally done already: the write is shorter than a step
      for (int k = 0; k < 2; ++k) {
        t0 = Clock::now();
        ta.step();
        plain.push_back(since(t0));
      }
    }
    const double a = median(plain), b = median(saving);
    fmt::print("step time, no save in flight:               {:.4f} s (median of {})\n", a, plain.size());
    fmt::print("step time, async save in flight:            {:.4f} s (median of {}; {} saves, snapshot included)\n", b,
               saving.size(), saves);
    fmt::print("overhead:                                   {:+.1f}%  (target < 10%)\n", 100.0 * (b - a) / a);
    fs::remove_all(dir);
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_checkpoint: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
