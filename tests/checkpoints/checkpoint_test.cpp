#include "checkpoints/checkpoint.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include "checkpoints/checkpointer.h"
#include "checkpoints/hdf5_file.h"
#include "config/loader.h"
#include "model/param_roles.h"

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

// A checkpoint as the trainer writes one (checkpoints::Checkpointer), in small: a parameter with its two moments, a
// buffer (no moments), AdamW's step, the RNG state of the one rank, and the config, layout and trainer state.
SaveRequest request(const fs::path& root, int64_t step) {
  SaveRequest r;
  r.root = root.string();
  r.step = step;
  r.meta = {{"config", "model: {}\n"},
            {"layout", {{"pp", 1}, {"dp", 1}, {"ep", 1}, {"world_size", 1}}},
            {"trainer", {{"step", step}, {"samples_consumed", 8 * step}, {"tokens_seen", 64 * step},
                         {"data", {{"step", step}, {"samples_consumed", 8 * step}, {"epochs", {0}},
                                   {"samples_in_epoch", {8 * step}}, {"seed", 1}, {"fingerprint", 2}}}}}};
  r.tensors.push_back({"model/w", torch::arange(12, at::kFloat).reshape({3, 4})});
  r.tensors.push_back({"optim/exp_avg/w", torch::zeros({3, 4})});
  r.tensors.push_back({"optim/exp_avg_sq/w", torch::zeros({3, 4})});
  r.tensors.push_back({"model/router.bias", torch::zeros({4})});
  r.tensors.push_back({"optim/step", at::scalar_tensor(step, at::kLong)});
  r.tensors.push_back({"rng/0", torch::zeros({16}, at::kByte)});
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

// ZeRO-1's optimizer pieces: element ranges of one tensor (two of them from one rank) tile it; it reads back whole,
// by rows and by any element range, across the parts; a gap or an overlap fails the save, naming the element.
TEST_F(CheckpointDir, FlatPartsTileTheTensorAndReadAnyWay) {
  const at::Tensor whole = torch::arange(100, 112, at::kFloat).reshape({3, 4});
  auto piece = [&](int64_t b, int64_t e) {
    TensorEntry t{"optim/exp_avg/w", whole.view({-1}).narrow(0, b, e - b).clone(), true};
    t.flat_begin = b;
    t.global_shape = {3, 4};
    return t;
  };
  // The request's whole optim/exp_avg/w replaced by three element ranges.
  auto without_whole = [&](int64_t step) {
    SaveRequest r = request(dir_, step);
    r.tensors.erase(std::remove_if(r.tensors.begin(), r.tensors.end(),
                                   [](const TensorEntry& t) { return t.name == "optim/exp_avg/w"; }),
                    r.tensors.end());
    return r;
  };
  SaveRequest r = without_whole(1);
  for (auto [b, e] : {std::pair{0, 5}, std::pair{5, 9}, std::pair{9, 12}}) r.tensors.push_back(piece(b, e));
  const std::string dir = commit(r, write_shard(r, 0), one_process);
  Checkpoint ck(dir);
  const auto& parts = ck.index()["tensors"]["optim/exp_avg/w"]["parts"];
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[1]["flat"].dump(), "[5,9]");
  EXPECT_TRUE(same(ck.read("optim/exp_avg/w"), whole));
  EXPECT_TRUE(same(ck.read_rows("optim/exp_avg/w", 1, 3), whole.narrow(0, 1, 2)));
  EXPECT_TRUE(same(ck.read_elements("optim/exp_avg/w", 3, 11), whole.view({-1}).narrow(0, 3, 8)));
  EXPECT_TRUE(same(ck.read_elements("model/w", 2, 9), torch::arange(2, 9, at::kFloat)));  // a row part, by elements
  EXPECT_THROW(ck.read_elements("optim/exp_avg/w", 10, 13), std::runtime_error);
  EXPECT_NE(verify(dir).find("every checksum matches"), std::string::npos);

  SaveRequest gap = without_whole(2);
  gap.tensors.push_back(piece(0, 5));
  gap.tensors.push_back(piece(6, 12));
  try {
    commit(gap, write_shard(gap, 0), one_process);
    ADD_FAILURE() << "a gap between the element ranges was accepted";
  } catch (const std::runtime_error& ex) {
    EXPECT_NE(std::string(ex.what()).find("optim/exp_avg/w: no rank wrote the elements at element 5"),
              std::string::npos)
        << ex.what();
  }
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

using json = nlohmann::json;

json read_index(const fs::path& dir) {
  std::ifstream f(dir / "index.json");
  return json::parse(f);
}

void write_index(const fs::path& dir, const json& index) {
  std::ofstream(dir / "index.json", std::ios::trunc) << index.dump(1);
}

std::string slurp(const fs::path& file) {
  std::ifstream f(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

struct Corruption {
  std::function<void(json&)> edit;
  std::string error;  // after "<dir>/index.json: "
};

// A parseable index with a key missing or of the wrong type, a bad shape, slice, dtype or file name: opening the
// checkpoint fails with one line naming index.json and the tensor, part or key.
TEST_F(CheckpointDir, MalformedIndexNamesTheFileAndTheKey) {
  SaveRequest r = request(dir_, 1);
  const fs::path dir = commit(r, write_shard(r, 0), one_process);
  const json good = read_index(dir);
  const std::string at = (dir / "index.json").string() + ": ";
  auto w = [](json& j) -> json& { return j["tensors"]["model/w"]; };
  auto part = [&](json& j) -> json& { return w(j)["parts"][0]; };
  const std::vector<Corruption> cases = {
      {[](json& j) { j.erase("format"); }, "`format` is missing"},
      {[](json& j) { j["format"] = 2; }, "`format` must be a string, not 2"},
      {[](json& j) { j["format"] = "moetrain-checkpoint-1"; },
       "not a moetrain-checkpoint-2 index (`format` is \"moetrain-checkpoint-1\")"},
      {[](json& j) { j.erase("step"); }, "`step` is missing"},
      {[](json& j) { j["step"] = "1"; }, "`step` must be a non-negative integer, not \"1\""},
      {[](json& j) { j.erase("shards"); }, "`shards` is missing"},
      {[](json& j) { j["shards"] = 0; }, "`shards` must be a positive integer, not 0"},
      {[](json& j) { j.erase("meta"); }, "`meta` is missing"},
      {[](json& j) { j["meta"] = json::array(); }, "`meta` must be an object, not []"},
      {[](json& j) { j.erase("tensors"); }, "`tensors` is missing"},
      {[&](json& j) { w(j) = 5; }, "tensor model/w: its entry must be an object, not 5"},
      {[&](json& j) { w(j).erase("shape"); }, "tensor model/w: `shape` is missing"},
      {[&](json& j) { w(j)["shape"] = {3, -4}; },
       "tensor model/w: `shape` must be an array of non-negative integers, not [3,-4]"},
      {[&](json& j) { w(j).erase("dtype"); }, "tensor model/w: `dtype` is missing"},
      {[&](json& j) { w(j)["dtype"] = "float33"; },
       "tensor model/w: `dtype` \"float33\" is not a dtype a checkpoint holds"},
      {[&](json& j) { w(j).erase("parts"); }, "tensor model/w: `parts` is missing"},
      {[&](json& j) { w(j)["parts"] = json::array(); }, "tensor model/w: `parts` is empty (no shard holds it)"},
      {[&](json& j) { part(j).erase("file"); }, "tensor model/w, part 0: `file` is missing"},
      {[&](json& j) { part(j)["file"] = "../step_0000002/shard_00000.h5"; },
       "tensor model/w, part 0: `file` must be a shard of this checkpoint (shard_NNNNN.h5, NNNNN below 1), not "
       "\"../step_0000002/shard_00000.h5\""},
      {[&](json& j) { part(j)["file"] = "shard_00001.h5"; },
       "tensor model/w, part 0: `file` must be a shard of this checkpoint (shard_NNNNN.h5, NNNNN below 1), not "
       "\"shard_00001.h5\""},
      {[&](json& j) { part(j).erase("dataset"); }, "tensor model/w, part 0: `dataset` is missing"},
      {[&](json& j) { part(j)["dataset"] = "model/w"; },
       "tensor model/w, part 0: `dataset` must be an HDF5 path starting with /, not \"model/w\""},
      {[&](json& j) { part(j).erase("slice"); }, "tensor model/w, part 0: `slice` is missing"},
      {[&](json& j) { part(j)["slice"] = "x"; },
       "tensor model/w, part 0: `slice` must be an array of [begin, end] pairs of non-negative integers, not \"x\""},
      {[&](json& j) { part(j)["slice"] = {{0, 3}}; },
       "tensor model/w, part 0: `slice` [[0,3]] has 1 dimensions, `shape` [3,4] has 2"},
      {[&](json& j) { part(j)["slice"] = {{0, 3}, {0, 5}}; },
       "tensor model/w, part 0: `slice` [[0,3],[0,5]] does not fit in `shape` [3,4]"},
      {[&](json& j) { part(j)["slice"] = {{0, 3}, {1, 4}}; },
       "tensor model/w, part 0: `slice` [[0,3],[1,4]] does not hold dimension 1 whole"},
      {[&](json& j) { part(j)["slice"] = {{0, 2}, {0, 4}}; }, "tensor model/w: no rank wrote rows 2 to 3"},
      {[&](json& j) { part(j).erase("xxh64"); }, "tensor model/w, part 0: `xxh64` is missing"},
      {[&](json& j) { part(j)["xxh64"] = "abc"; },
       "tensor model/w, part 0: `xxh64` must be 16 hexadecimal digits, not \"abc\""},
  };
  for (const auto& c : cases) {
    json j = good;
    c.edit(j);
    write_index(dir, j);
    EXPECT_EQ(error_of([&] { Checkpoint ck(dir.string()); }), at + c.error);
    EXPECT_EQ(error_of([&] { verify(dir.string()); }), at + c.error);
  }
  std::ofstream(dir / "index.json", std::ios::trunc) << R"({"format": "moetrain-checkpoint-2", "step": )";
  const std::string unparseable = error_of([&] { Checkpoint ck(dir.string()); });
  EXPECT_EQ(unparseable.rfind(at + "not valid JSON (a syntax error at byte ", 0), 0u) << unparseable;
  EXPECT_EQ(unparseable.find("json.exception"), std::string::npos) << unparseable;
  write_index(dir, good);
  EXPECT_NE(verify(dir.string()).find("every checksum matches"), std::string::npos);
}

// An index that opens but lacks what a trainer checkpoint holds (a tensor dropped, a moment without its pair or
// its parameter, an RNG state, the config, layout or trainer state): verify names the tensor or key.
TEST_F(CheckpointDir, VerifyChecksEveryTensorAndTheTrainerState) {
  SaveRequest r = request(dir_, 1);
  const fs::path dir = commit(r, write_shard(r, 0), one_process);
  const json good = read_index(dir);
  const std::string at = (dir / "index.json").string() + ": ";
  auto tensors = [](json& j) -> json& { return j["tensors"]; };
  auto meta = [](json& j) -> json& { return j["meta"]; };
  const std::vector<Corruption> cases = {
      {[&](json& j) { tensors(j).erase("optim/exp_avg_sq/w"); },
       "tensor optim/exp_avg_sq/w is missing (optim/exp_avg/w is there)"},
      {[&](json& j) { tensors(j).erase("optim/exp_avg/w"); },
       "tensor optim/exp_avg/w is missing (optim/exp_avg_sq/w is there)"},
      {[&](json& j) { tensors(j).erase("model/w"); }, "tensor model/w is missing (optim/exp_avg/w is there)"},
      {[&](json& j) { tensors(j).erase("optim/step"); }, "tensor optim/step is missing (AdamW's step count)"},
      {[&](json& j) { tensors(j)["optim/step"]["dtype"] = "float32"; },
       "tensor optim/step must be an int64 scalar, not float32 of shape []"},
      {[&](json& j) { tensors(j).erase("rng/0"); }, "tensor rng/0 is missing (the RNG state of rank 0 of 1)"},
      {[&](json& j) {
         tensors(j)["optim/exp_avgX/w"] = tensors(j)["optim/exp_avg/w"];
         tensors(j).erase("optim/exp_avg/w");
       },
       "tensor optim/exp_avgX/w: not a tensor a checkpoint holds (model/…, optim/exp_avg/…, optim/exp_avg_sq/…, "
       "optim/step, rng/<rank>)"},
      {[&](json& j) {
         tensors(j)["optim/exp_avg/w"]["shape"] = {4, 3};
         tensors(j)["optim/exp_avg/w"]["parts"][0]["slice"] = {{0, 4}, {0, 3}};
       },
       "tensor optim/exp_avg/w has shape [4,3] but model/w has [3,4]"},
      {[&](json& j) { tensors(j)["optim/exp_avg_sq/w"]["dtype"] = "bfloat16"; },
       "tensors optim/exp_avg/w and optim/exp_avg_sq/w differ in dtype (float32 and bfloat16)"},
      {[&](json& j) { meta(j).erase("config"); }, "`meta.config` is missing"},
      {[&](json& j) { meta(j).erase("layout"); }, "`meta.layout` is missing"},
      {[&](json& j) { meta(j)["layout"]["dp"] = "1"; }, "`meta.layout.dp` must be a positive integer, not \"1\""},
      {[&](json& j) { meta(j)["layout"]["ep"] = 0; }, "`meta.layout.ep` must be a positive integer, not 0"},
      {[&](json& j) { meta(j).erase("trainer"); }, "`meta.trainer` is missing"},
      {[&](json& j) { meta(j)["trainer"].erase("step"); }, "`meta.trainer.step` is missing"},
      {[&](json& j) { meta(j)["trainer"]["step"] = 2; }, "`meta.trainer.step` is 2 but `step` is 1"},
      {[&](json& j) { meta(j)["trainer"]["tokens_seen"] = -1; },
       "`meta.trainer.tokens_seen` must be a non-negative integer, not -1"},
      {[&](json& j) { meta(j)["trainer"]["data"] = "x"; }, "`meta.trainer.data` must be an object, not \"x\""},
      {[&](json& j) { meta(j)["trainer"]["data"].erase("seed"); }, "`meta.trainer.data.seed` is missing"},
      {[&](json& j) { meta(j)["trainer"]["data"]["epochs"] = {0, 1}; },
       "`meta.trainer.data.epochs` and `meta.trainer.data.samples_in_epoch` differ in length (2 and 1)"},
  };
  for (const auto& c : cases) {
    json j = good;
    c.edit(j);
    write_index(dir, j);
    EXPECT_EQ(error_of([&] { verify(dir.string()); }), at + c.error);
  }
  json two_shards = good;
  two_shards["shards"] = 2;
  write_index(dir, two_shards);
  EXPECT_EQ(error_of([&] { verify(dir.string()); }), at + "tensor rng/1 is missing (the RNG state of rank 1 of 2)");
  write_index(dir, good);
  EXPECT_NE(verify(dir.string()).find("every checksum matches"), std::string::npos);
}

// A trainer's checkpoint (parameters with moments, router biases without) verifies; a moment dropped fails verify
// and a resume, and a trainer state without a key stops the resume naming index.json and the key.
TEST_F(CheckpointDir, TrainerCheckpointVerifiesAndABadIndexStopsTheResume) {
  config::Config c = config::load_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml",
                                         {{"parallel.pp=1", "parallel.dp=1", "parallel.ep=1"}, 0});
  model::Transformer m(c.model, model::StageSpec::whole(c.model));
  model::init_parameters(*m, 1, c.model.init_std);
  std::vector<StateTensor> state;
  std::string router_weight;
  for (const auto& p : model::parameter_roles(*m)) {
    state.push_back({"model/", p, p.tensor});
    state.push_back({"optim/exp_avg/", p, torch::zeros_like(p.tensor)});
    state.push_back({"optim/exp_avg_sq/", p, torch::zeros_like(p.tensor)});
    if (p.name.find("router.weight") != std::string::npos) router_weight = p.name;
  }
  ASSERT_FALSE(router_weight.empty());
  const auto buffers = model::buffer_roles(*m);
  ASSERT_FALSE(buffers.empty());  // the router biases: saved without moments
  for (const auto& b : buffers) state.push_back({"model/", b, b.tensor});
  parallel::ControlPlane one;
  Checkpointer checkpointer(c, dir_.string(), one, nullptr, state, false);
  TrainerState s;
  s.step = s.optimizer_steps = 3;
  s.data.epochs = {0};
  s.data.samples_in_epoch = {24};
  checkpointer.save(s);
  checkpointer.settle();
  const fs::path dir = resolve_resume(dir_.string(), "auto");
  EXPECT_NE(verify(dir.string()).find("every checksum matches"), std::string::npos);
  const json good = read_index(dir);
  const std::string at = (dir / "index.json").string() + ": ";

  json j = good;
  j["tensors"].erase("optim/exp_avg_sq/" + router_weight);
  write_index(dir, j);
  const std::string dropped = fmt::format("tensor optim/exp_avg_sq/{0} is missing (optim/exp_avg/{0} is there)",
                                          router_weight);
  EXPECT_EQ(error_of([&] { verify(dir.string()); }), at + dropped);
  EXPECT_EQ(error_of([&] { checkpointer.load(dir.string()); }), at + dropped);

  j = good;
  j["meta"]["trainer"]["data"].erase("seed");
  write_index(dir, j);
  EXPECT_EQ(error_of([&] { checkpointer.load(dir.string()); }), at + "`meta.trainer.data.seed` is missing");
  j = good;
  j["meta"]["layout"].erase("pp");
  write_index(dir, j);
  EXPECT_EQ(error_of([&] { checkpointer.load(dir.string()); }), at + "`meta.layout.pp` is missing");

  write_index(dir, good);
  EXPECT_EQ(checkpointer.load(dir.string()).step, 3);
}

// `ckpt export` never writes into a checkpoint: not into the one it exports (whose shard it would truncate), not
// into the directory holding it, not over a file of another checkpoint; a failed export leaves no partial file.
TEST_F(CheckpointDir, ExportNeverWritesIntoACheckpoint) {
  SaveRequest r = request(dir_, 1);
  const fs::path ck = commit(r, write_shard(r, 0), one_process);
  const fs::path other_root = dir_.parent_path() / (dir_.filename().string() + "-other");  // another run's
  fs::remove_all(other_root);
  SaveRequest o = request(other_root, 2);
  const fs::path other = commit(o, write_shard(o, 0), one_process);
  const std::string shard = slurp(ck / "shard_00000.h5");
  const std::string inside = fmt::format(": inside the checkpoint {}; write the export outside it", ck.string());
  const std::string in_root = fmt::format(
      ": inside {}, the checkpoint directory holding {}; write the export outside it", dir_.string(), ck.string());
  const std::vector<std::pair<fs::path, std::string>> cases = {
      {ck / "shard_00000.h5", inside},
      {ck / "model.h5", inside},
      {ck / "." / "sub" / ".." / "shard_00000.h5", inside},
      {ck, inside},
      {dir_ / "model.h5", in_root},
      {dir_ / "latest", in_root},
      {other / "shard_00000.h5",
       fmt::format(": inside the checkpoint {}; write the export outside it", other.string())},
      {dir_ / ".." / "no-such-dir" / "model.h5",
       fmt::format(": no directory {} to write it in", (dir_.parent_path() / "no-such-dir").string())},
      {other_root / "model.h5",
       fmt::format(": inside the checkpoint directory {}; write the export outside it", other_root.string())},
  };
  for (const auto& [out, error] : cases) {
    EXPECT_EQ(error_of([&] { export_weights(ck.string(), out.string()); }), out.string() + error);
  }
  EXPECT_EQ(slurp(ck / "shard_00000.h5"), shard);
  EXPECT_FALSE(fs::exists(ck / "model.h5"));
  EXPECT_FALSE(fs::exists(dir_ / "model.h5"));
  EXPECT_NE(verify(ck.string()).find("every checksum matches"), std::string::npos);
  EXPECT_NE(verify(other.string()).find("every checksum matches"), std::string::npos);

  const fs::path out_dir = dir_ / ".." / (dir_.filename().string() + "-export");
  fs::remove_all(out_dir);
  fs::create_directories(out_dir);
  const fs::path out = out_dir / "model.h5";
  export_weights(ck.string(), out.string());
  EXPECT_TRUE(same(H5File::open(out.string()).read("/w"), torch::arange(12, at::kFloat).reshape({3, 4})));
  const std::string exported = slurp(out);
  // A failed export (a corrupt checkpoint) leaves the earlier export as it was, and no partial file beside it.
  json index = read_index(ck);
  index["tensors"]["model/w"]["parts"][0]["xxh64"] = "0000000000000000";
  write_index(ck, index);
  EXPECT_NE(error_of([&] { export_weights(ck.string(), out.string()); }).find("checksum mismatch"), std::string::npos);
  EXPECT_EQ(slurp(out), exported);
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(out_dir)) left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"model.h5"});
  fs::remove_all(out_dir);
  fs::remove_all(other_root);
}

// A save that did not finish (step_N.tmp, also written with a trailing slash) and a checkpoint set aside for
// deletion are never resumed from, whether named directly or by `latest`.
TEST_F(CheckpointDir, ResumeRefusesUncommittedCheckpoints) {
  SaveRequest r = request(dir_, 1);
  const std::string ck = commit(r, write_shard(r, 0), one_process);
  fs::copy(ck, dir_ / "step_0000002.tmp", fs::copy_options::recursive);  // its index written, not yet renamed
  fs::copy(ck, dir_ / "step_0000000.deleting-1-2-0", fs::copy_options::recursive);
  EXPECT_EQ(resolve_resume(dir_.string(), ck + "/"), ck);
  const std::string tmp = (dir_ / "step_0000002.tmp").string(), aside = (dir_ / "step_0000000.deleting-1-2-0").string();
  const std::string unfinished = ": an uncommitted checkpoint (a save that did not finish), never loaded";
  const std::string doomed = ": a checkpoint set aside for deletion (pruned or replaced), never loaded";
  for (const std::string& what : {tmp, tmp + "/", tmp + "//", tmp + "/."})
    EXPECT_EQ(error_of([&] { resolve_resume(dir_.string(), what); }), tmp + unfinished) << what;
  EXPECT_EQ(error_of([&] { resolve_resume(dir_.string(), aside + "/"); }), aside + doomed);
  const std::string latest = (dir_ / "latest").string();
  for (const std::string name : {"step_0000002.tmp", "step_0000000.deleting-1-2-0"}) {
    std::ofstream(dir_ / "latest", std::ios::trunc) << name << "\n";
    const std::string why = name == std::string("step_0000002.tmp") ? unfinished : doomed;
    EXPECT_EQ(error_of([&] { resolve_resume(dir_.string(), "auto"); }),
              fmt::format("{}: `latest` names '{}'{}", latest, name, why));
    EXPECT_EQ(error_of([&] { resolve_resume(dir_.string(), dir_.string() + "/"); }),
              fmt::format("{}: `latest` names '{}'{}", latest, name, why));
  }
}

}  // namespace
}  // namespace moetrain::checkpoints
