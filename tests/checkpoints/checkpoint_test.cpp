#include "checkpoints/checkpoint.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "checkpoints/hdf5_file.h"

namespace moetrain::checkpoints {
namespace {
namespace fs = std::filesystem;

class CheckpointDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / fmt::format("moetrain-ckpt-{}-{}", ::getpid(),
                                                    ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
  parallel::ControlPlane one_process;  // the agreements of a world of one
};

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

// Every dataset the fast writer produces reads back through plain HDF5 with its bytes, shape, dtype and checksum:
// tensors of many sizes (several writer batches), BF16 (tagged), a scalar, an empty tensor and stacked rows.
TEST_F(CheckpointDir, ShardWriterRoundTrip) {
  torch::manual_seed(0);
  std::vector<std::pair<std::string, at::Tensor>> whole;
  for (int i = 0; i < 300; ++i)
    whole.emplace_back(fmt::format("/model/t{}", i), torch::randn({1 + (i * 37) % 300, 1 + (i * 13) % 97}));
  whole.emplace_back("/model/big", torch::randn({1536, 1024}));  // 6 MiB: a batch of its own
  whole.emplace_back("/model/bf16", torch::randn({17, 5}).to(at::kBFloat16));
  whole.emplace_back("/optim/step", at::scalar_tensor(42, at::kLong));
  whole.emplace_back("/model/empty", torch::zeros({0, 4}));
  std::vector<at::Tensor> rows;
  for (int r = 0; r < 5; ++r) rows.push_back(torch::randn({3, 7}));

  const std::string path = (dir_ / "shard.h5").string();
  CheckpointShardWriter w(path);
  for (const auto& [name, t] : whole) w.add(name, t);
  w.add_stacked("/model/experts.w_up", rows);
  const std::vector<uint64_t> sums = w.finish();
  ASSERT_EQ(sums.size(), whole.size() + 1);

  H5File f = H5File::open(path);
  for (size_t i = 0; i < whole.size(); ++i) {
    const auto& [name, t] = whole[i];
    at::Tensor back = f.read(name);
    EXPECT_TRUE(same(back, t)) << name;
    EXPECT_EQ(sums[i], checksum(t)) << name;
  }
  EXPECT_EQ(f.dtype("/model/bf16"), "bfloat16");
  at::Tensor stacked = torch::stack(rows);
  EXPECT_TRUE(same(f.read("/model/experts.w_up"), stacked));
  EXPECT_EQ(sums.back(), checksum(stacked));  // the rows' bytes hashed in order: the dataset's checksum
}

TEST_F(CheckpointDir, ShardWriterRejectsRowsOfDifferentShapes) {
  CheckpointShardWriter w((dir_ / "shard.h5").string());
  EXPECT_THROW(w.add_stacked("/x", {torch::zeros({2, 3}), torch::zeros({3, 2})}), std::runtime_error);
}

SaveRequest request(const fs::path& root, int64_t step) {
  SaveRequest r;
  r.root = root.string();
  r.step = step;
  r.meta = {{"note", "test"}};
  r.tensors.push_back({"model/w", torch::arange(12, at::kFloat).reshape({3, 4})});
  return r;
}

// A tensor spread over ranks: saved as rows with the part's slice; read whole or by rows from the part.
TEST_F(CheckpointDir, StackedRowsReadWholeAndByRows) {
  SaveRequest r = request(dir_, 1);
  TensorEntry e{"model/experts.w_up", {}, true};
  for (int k = 0; k < 4; ++k) e.rows.push_back(torch::full({2, 3}, static_cast<float>(k)));
  e.row_begin = 0;
  e.rows_total = 4;
  r.tensors.push_back(e);
  const std::string dir = commit(r, write_shard(r, 0), one_process);
  Checkpoint ck(dir);
  EXPECT_EQ(ck.shape("model/experts.w_up"), (std::vector<int64_t>{4, 2, 3}));
  const auto& part = ck.index()["tensors"]["model/experts.w_up"]["parts"];
  ASSERT_EQ(part.size(), 1u);
  EXPECT_EQ(part[0]["slice"].dump(), "[[0,4],[0,2],[0,3]]");
  at::Tensor all = ck.read("model/experts.w_up");
  for (int k = 0; k < 4; ++k) EXPECT_TRUE(all[k].eq(k).all().item<bool>());
  at::Tensor mid = ck.read_rows("model/experts.w_up", 1, 3);
  ASSERT_EQ(mid.sizes(), (std::vector<int64_t>{2, 2, 3}));
  EXPECT_TRUE(mid[0].eq(1).all().item<bool>());
  EXPECT_TRUE(mid[1].eq(2).all().item<bool>());
  EXPECT_THROW(ck.read_rows("model/experts.w_up", 3, 5), std::runtime_error);
  EXPECT_TRUE(same(ck.read("model/w"), torch::arange(12, at::kFloat).reshape({3, 4})));
  EXPECT_NE(verify(dir).find("every checksum matches"), std::string::npos);
}

// Rows no rank wrote make the save fail, and the previous checkpoint stays current.
TEST_F(CheckpointDir, MissingRowsFailTheSave) {
  SaveRequest good = request(dir_, 1);
  commit(good, write_shard(good, 0), one_process);
  SaveRequest r = request(dir_, 2);
  TensorEntry e{"model/experts.w_up", {}, true};
  e.rows = {torch::zeros({2}), torch::zeros({2})};
  e.row_begin = 2;
  e.rows_total = 4;  // rows 0 and 1 are nobody's
  r.tensors.push_back(e);
  try {
    commit(r, write_shard(r, 0), one_process);
    FAIL() << "a save with missing rows committed";
  } catch (const std::runtime_error& ex) {
    EXPECT_NE(std::string(ex.what()).find("model/experts.w_up: no rank wrote the rows at row 0"), std::string::npos)
        << ex.what();
  }
  std::ifstream latest(dir_ / "latest");
  std::string name;
  latest >> name;
  EXPECT_EQ(name, "step_0000001");
  EXPECT_FALSE(fs::exists(dir_ / "step_0000002"));
}

// A corrupt part names its shard and dataset, also when only some of its rows are asked for.
TEST_F(CheckpointDir, CorruptPartNamesFileAndDataset) {
  SaveRequest r = request(dir_, 1);
  TensorEntry e{"model/experts.w_up", {}, true};
  for (int k = 0; k < 4; ++k) e.rows.push_back(torch::full({64}, 1.0f + static_cast<float>(k)));
  e.rows_total = 4;
  r.tensors.push_back(e);
  const std::string dir = commit(r, write_shard(r, 0), one_process);
  const fs::path shard = fs::path(dir) / "shard_00000.h5";
  std::string bytes;
  {
    std::ifstream f(shard, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), {});
  }
  const std::vector<float> fours(16, 4.0f);  // inside the last row's data, nowhere else
  const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(fours.data()), 16 * sizeof(float)));
  ASSERT_NE(at, std::string::npos);
  bytes[at + 1] ^= 0x40;
  std::ofstream(shard, std::ios::binary | std::ios::trunc) << bytes;
  Checkpoint ck(dir);
  try {
    ck.read_rows("model/experts.w_up", 0, 1);
    FAIL() << "a corrupt part was read";
  } catch (const std::runtime_error& ex) {
    EXPECT_NE(std::string(ex.what()).find("shard_00000.h5: checksum mismatch in dataset /model/experts.w_up"),
              std::string::npos)
        << ex.what();
  }
}

// keep_last prunes through the Remover (renamed aside at once, deleted in the background); a new save of the same
// step replaces the old one; what an earlier job left being deleted goes too.
TEST_F(CheckpointDir, PruningAndReplacementThroughTheRemover) {
  Remover remover;
  fs::create_directories(dir_ / "step_0000000.deleting-1-0");  // left by a job that ended first
  for (int64_t step : {1, 2, 3}) {
    SaveRequest r = request(dir_, step);
    r.keep_last = 2;
    commit(r, write_shard(r, 0), one_process, &remover);
  }
  SaveRequest again = request(dir_, 3);
  again.keep_last = 2;
  again.tensors[0].tensor = torch::ones({3, 4});
  commit(again, write_shard(again, 0), one_process, &remover);
  remover.wait();
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(dir_)) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"latest", "step_0000002", "step_0000003"}));
  EXPECT_TRUE(same(Checkpoint((dir_ / "step_0000003").string()).read("model/w"), torch::ones({3, 4})));
}

// keep_last never deletes the step being saved, nor later steps left by a run this one was resumed before.
TEST_F(CheckpointDir, PruningKeepsTheCurrentAndLaterSteps) {
  for (int64_t step : {10, 20, 30}) {
    SaveRequest r = request(dir_, step);
    r.keep_last = 0;
    commit(r, write_shard(r, 0), one_process);
  }
  SaveRequest r = request(dir_, 15);
  r.keep_last = 2;
  commit(r, write_shard(r, 0), one_process);
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(dir_)) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"latest", "step_0000010", "step_0000015", "step_0000020", "step_0000030"}));
  EXPECT_EQ(resolve_resume(dir_.string(), "auto"), (dir_ / "step_0000015").string());
}

// A commit that fails on rank 0 (here: `latest` cannot be replaced) throws, naming the checkpoint.
TEST_F(CheckpointDir, AFailedCommitThrows) {
  fs::create_directories(dir_ / "latest" / "in-the-way");
  SaveRequest r = request(dir_, 1);
  try {
    commit(r, write_shard(r, 0), one_process);
    FAIL() << "the commit did not fail";
  } catch (const std::runtime_error& ex) {
    EXPECT_NE(std::string(ex.what()).find("step_0000001: the commit failed"), std::string::npos) << ex.what();
  }
}

// A tensor with no rows saves, verifies and reads back.
TEST_F(CheckpointDir, EmptyTensorReadsBack) {
  SaveRequest r = request(dir_, 1);
  r.tensors.push_back({"model/none", torch::zeros({0, 5})});
  const std::string dir = commit(r, write_shard(r, 0), one_process);
  Checkpoint ck(dir);
  EXPECT_EQ(ck.read("model/none").sizes(), (std::vector<int64_t>{0, 5}));
  EXPECT_NE(verify(dir).find("every checksum matches"), std::string::npos);
}

}  // namespace
}  // namespace moetrain::checkpoints
