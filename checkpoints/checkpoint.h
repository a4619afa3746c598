// Sharded checkpoints: a directory step_NNNNNNN/ with one HDF5 shard per rank (shard_RRRRR.h5, holding the
// tensors that rank writes) and index.json: the resolved config, the layout it was saved with, the trainer state,
// and for every tensor its global name, global shape and dtype, and its parts: the shard and dataset holding each,
// the slice of the global tensor it holds ("slice": a range of rows, every other dimension whole; or "flat": a range
// of elements of the row-major flattened tensor) and an xxHash64 checksum. Most tensors are one part; a tensor spread over
// ranks (the routed experts of a layer, stacked, rows split over the EP ranks) has one part per writer. Every unique
// tensor is written once (the caller picks one writer among the replicas), so a checkpoint saved on one layout loads
// on any other: each rank reads the rows it needs from whichever shards hold them.
//
// Commit protocol: shards and index written into step_NNNNNNN.tmp/ and fsynced; every rank reports success; rank 0
// renames the directory, fsyncs the parent, and replaces `latest` through a temporary file and a rename. A crash at
// any moment leaves the previous checkpoint and `latest` intact; a .tmp directory is never loaded.
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/hdf5_file.h"
#include "parallel/control_plane.h"

namespace moetrain::checkpoints {

struct TensorEntry {
  std::string name;  // dataset path inside the checkpoint: "model/layers.1.moe.router.weight"
  at::Tensor tensor;  // the whole tensor; unused when `rows` is set
  bool write = true;  // false: another replica writes it
  // A part of a tensor spread over ranks: `rows` (one shape) stacked along a new first dimension are rows
  // [row_begin, row_begin + rows.size()) of the global tensor `name`, which has `rows_total` rows.
  std::vector<at::Tensor> rows;
  int64_t row_begin = 0;
  int64_t rows_total = 0;
  // A part given as an element range: `tensor` (flat) is elements [flat_begin, flat_begin + numel) of the
  // row-major flattened global tensor `name` of shape `global_shape` (ZeRO-1's optimizer pieces). -1: not one.
  int64_t flat_begin = -1;
  std::vector<int64_t> global_shape;
};

struct SaveRequest {
  std::string root;  // the checkpoint directory (holds step_* and latest)
  int64_t step = 0;
  int64_t keep_last = 0;           // 0: keep all
  nlohmann::json meta;             // config, layout, trainer state: stored in the index as is
  std::vector<TensorEntry> tensors;
};

// What one rank wrote: its index entries, or the error that stopped it.
struct ShardResult {
  nlohmann::json entries = nlohmann::json::object();
  std::string error;
};

// Deletes directories on a background thread: checkpoints pruned by keep_last and a checkpoint replaced by a new
// save of its step are first renamed aside (`<name>.deleting-N`, which nothing ever loads) and then removed while
// training goes on, as torchtitan purges old checkpoints. The destructor waits for the deletions.
class Remover {
 public:
  Remover() = default;
  ~Remover();
  Remover(const Remover&) = delete;
  Remover& operator=(const Remover&) = delete;
  void remove(const std::string& dir);
  void wait();  // until every deletion asked for is done

 private:
  std::mutex mu_;
  std::vector<std::string> queue_;
  bool running_ = false;
  std::thread thread_;
};

// Writes this rank's shard into root/step_NNNNNNN.tmp/ and fsyncs it. Local (no communication), so it may run on
// a background thread while training goes on (checkpoint.async).
ShardResult write_shard(const SaveRequest& request, int rank);
// Collective over the control plane: gathers the entries, writes the index, agrees that every rank succeeded, renames, updates `latest`,
// prunes to keep_last (and deletes what a crash left being deleted) through `remover`, or at once without one.
// Returns the committed step directory; throws (on every rank) if any rank failed.
std::string commit(const SaveRequest& request, const ShardResult& mine, parallel::ControlPlane& control,
                   Remover* remover = nullptr);

std::string step_dir_name(int64_t step);  // "step_0000010"
// The steps of the committed checkpoints (step_N directories) under `root`, ascending; none when it does not exist.
std::vector<int64_t> committed_steps(const std::string& root);

// --resume: "auto" -> root/latest if it exists, else "" (start fresh); otherwise a step directory or a checkpoint
// root with a `latest` file. Throws if what is named is not a committed checkpoint: a save that did not finish
// (step_N.tmp) and a checkpoint set aside for deletion (step_N.deleting-…) are refused by name, also through `latest`.
std::string resolve_resume(const std::string& root, const std::string& what);

// A committed checkpoint opened for reading. The constructor checks the index's structure: every key with its type,
// shapes, known dtypes, parts in shards of this checkpoint whose slices tile the tensor; an error names
// "<dir>/index.json" and the tensor, part or key.
class Checkpoint {
 public:
  explicit Checkpoint(std::string dir);
  const nlohmann::json& index() const { return index_; }
  std::string index_file() const;  // "<dir>/index.json"
  const nlohmann::json& meta() const { return index_.at("meta"); }
  bool has(const std::string& name) const { return index_.at("tensors").contains(name); }
  // Reads a tensor and checks its checksums; the error names the shard and the dataset.
  at::Tensor read(const std::string& name);
  // Rows [begin, end) of a tensor's first dimension, read from the parts that hold them (each checked whole).
  at::Tensor read_rows(const std::string& name, int64_t begin, int64_t end);
  // Elements [begin, end) of the row-major flattened tensor, as a flat tensor, from whichever parts hold them.
  at::Tensor read_elements(const std::string& name, int64_t begin, int64_t end);
  std::vector<int64_t> shape(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::string& dir() const { return dir_; }

 private:
  H5File& shard(const std::string& file);
  at::Tensor read_part(const nlohmann::json& part, const std::vector<int64_t>& extent);  // checked; the last kept
  std::string dir_;
  std::string last_part_;  // "file:dataset" of last_read_
  at::Tensor last_read_;
  nlohmann::json index_;
  std::map<std::string, std::unique_ptr<H5File>> shards_;
};

// What a checkpoint the trainer saves (checkpoints::Checkpointer) holds beyond a well-formed index: optim/step; for
// every parameter both AdamW moments, of its shape and of one dtype (a model/ tensor without moments is a buffer,
// such as a router bias); rng/<r> for every shard; and in meta the config, the layout and the trainer state with
// its data position. Reads no shard. Throws "<dir>/index.json: ..." naming the tensor or key.
void check_complete(const Checkpoint& ck);

// `moetrain ckpt ...`
std::string inspect(const std::string& dir);  // a table of tensors
// check_complete, then reads every tensor and checks every checksum; returns a one-line summary, throws on the
// first problem.
std::string verify(const std::string& dir);
// One HDF5 file of the model weights under their global names (no optimizer state), written to a temporary file
// renamed into place. Refuses an `out` inside the checkpoint or the checkpoint directory holding it, or over a file
// of any checkpoint.
std::string export_weights(const std::string& dir, const std::string& out);

uint64_t checksum(const at::Tensor& t);

// Whether `path` is `dir` or inside it, both made absolute with symbolic links resolved.
bool within(const std::filesystem::path& path, const std::filesystem::path& dir);

}  // namespace moetrain::checkpoints
