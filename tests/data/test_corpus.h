// Helpers for the data tests: a scratch directory per test, small corpora written with TokenShardWriter, and a config
// that reads them.
#pragma once

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/shards.h"

namespace moetrain::data::testing {

namespace fs = std::filesystem;

inline const std::string kRoot = MOETRAIN_SOURCE_DIR;

// A directory of its own for each test (tests run in parallel under ctest -j).
class ScratchDir {
 public:
  // Named after the running test and `name` (a suite's set-up runs outside any test: `name` alone).
  explicit ScratchDir(const std::string& name = "") {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    const std::string tag = info ? fmt::format("{}_{}_{}", info->test_suite_name(), info->name(), name) : name;
    path_ = fs::temp_directory_path() / fmt::format("moetrain_data_{}_{}", tag, ::getpid());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A corpus whose text tokens count up (1, 2, 3, ...; never the end token): every window is different, so a window
// identifies its position. Documents have the given lengths (end token not included).
inline void write_counting_corpus(const std::string& prefix, const std::vector<int64_t>& doc_lengths,
                                  uint64_t vocab_size = uint64_t{1} << 20, uint64_t shard_tokens = uint64_t{1} << 28) {
  const uint64_t eos = vocab_size - 1;
  TokenShardWriter w(prefix, vocab_size, eos, 0, shard_tokens);
  int32_t next = 1;
  for (int64_t len : doc_lengths) {
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < len; ++i) {
      ids.push_back(next);
      next = static_cast<int32_t>(next + 1 == static_cast<int64_t>(eos) ? 1 : next + 1);
    }
    w.append(ids);
    w.end_document();
  }
  w.finish();
}

// A config reading `path` with the given batch layout: window = seq_len + 1 + mtp_depth.
inline config::Config shard_config(const std::string& path, int64_t dp, int64_t micro_batch_size,
                                   int64_t micro_batches, int64_t seq_len = 7, int64_t vocab = int64_t{1} << 20) {
  config::Config c;
  c.data.source = config::DataSource::kShards;
  c.data.path = path;
  c.data.valid_fraction = 0.1;
  c.data.prefetch = 0;
  c.model.vocab_size = vocab;
  c.model.mtp_depth = 1;
  c.train.seq_len = seq_len;
  c.train.seed = 42;
  c.train.micro_batch_size = micro_batch_size;
  c.train.micro_batches = micro_batches;
  c.parallel.dp = dp;
  c.parallel.world_size = dp;
  return c;
}

// The message of the std::exception `f` throws ("" if none).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace moetrain::data::testing
