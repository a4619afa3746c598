// A training run's checkpoints (checkpoints/checkpoint.h has the format and the commit): what the trainer's state
// is saved as, which rank writes which tensor, synchronous and asynchronous saves, and the restore onto any layout.
//
// A checkpoint holds every parameter and buffer under "model/<global name>", the AdamW moments under
// "optim/exp_avg/<name>" and "optim/exp_avg_sq/<name>", AdamW's step count ("optim/step"), each rank's RNG state
// ("rng/<rank>"), and in the index the config, the layout and the trainer's step and data position. Routed experts
// are stored stacked (model/param_roles.h). Each unique tensor is written by exactly one rank, so a save moves
// each byte once: a dense tensor by the dp replica a hash of its name picks (spreading the writes), a routed
// expert's rows by the edp replica a hash of the stacked name picks, the shared embedding by the first stage.
// ZeRO-1's optimizer state is saved by the rank that holds each piece, as element ranges of the global tensor
// ("flat" parts); a restore reads whatever ranges it needs, so a checkpoint re-partitions onto any dp, ep or pp and
// onto ZeRO-1 on or off.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "config/config.h"
#include "data/data_state.h"
#include "model/param_roles.h"
#include "parallel/control_plane.h"
#include "parallel/topology.h"

namespace moetrain::checkpoints {

// One tensor of the training state: saved under prefix + its parameter's name (or stacked name), restored in place.
struct StateTensor {
  std::string prefix;     // "model/", "optim/exp_avg/", "optim/exp_avg_sq/"
  model::ParamInfo info;  // the parameter or buffer it belongs to: its name and role
  at::Tensor tensor;      // the live tensor
  // -1: the whole of info.tensor's shape. Else (ZeRO-1's optimizer pieces) `tensor` is flat and holds elements
  // [offset, offset + numel) of the parameter, flattened; every rank saves and restores its own pieces.
  int64_t offset = -1;
};

// The scalars saved with the tensors.
struct TrainerState {
  int64_t step = 0;             // optimizer steps done
  int64_t optimizer_steps = 0;  // AdamW's step count (its bias correction)
  int64_t samples_consumed = 0, tokens_seen = 0;
  data::DataState data;         // the data order's position before the next step
};

// What one save did on this rank: bytes copied to host memory for it and bytes handed to the shard writer. Only
// the tensors this rank writes are copied.
struct SaveStats {
  int64_t host_bytes_copied = 0;
  int64_t bytes_written = 0;
};

class Checkpointer {
 public:
  // root: where step_* and `latest` go (checkpoint_root()). coords: this rank's place in the layout, nullptr for
  // one process. verbose: print a line per committed save.
  Checkpointer(const config::Config& c, std::string root, parallel::ControlPlane& control,
               const parallel::Coords* coords, std::vector<StateTensor> state, bool verbose);
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Collective. Saves the state of step s.step; refuses (on every rank, before writing) a state with a NaN or inf. With checkpoint.async the shard is written on a background thread
  // from host copies and committed by commit() once every rank's writer is done (the trainer agrees on that in its
  // per-step vote), by the next save, or by settle().
  void save(const TrainerState& s);
  bool pending() const { return pending_ != nullptr; }
  bool busy() const;   // a pending save whose writer on this rank has not finished
  void commit();       // collective: waits for this rank's writer, then commits the pending save
  void settle();       // commit(), then waits for the background deletion of pruned checkpoints
  // Restores the state tensors in place and this rank's RNG (when the layout is the saving one) from a committed
  // checkpoint of any layout; returns the saved scalars. weights_only: the model/ tensors alone (checkpoint
  // .init_from); the rest keeps its fresh values and the returned state is step 0's.
  TrainerState load(const std::string& dir, bool weights_only = false);

  const std::string& root() const { return root_; }
  const SaveStats& last_save() const { return stats_; }

 private:
  struct Pending;
  bool writes(const model::ParamInfo& info) const;
  // The last stage's copy of the shared embedding (not its first): never saved, the first stage's is the same.
  bool embedding_copy(const model::ParamInfo& info) const;
  std::string first_nonfinite() const;  // the first state tensor of this rank with a NaN or inf, or ""

  config::Config c_;
  std::string config_yaml_;  // c_ resolved, as YAML: every checkpoint's record of the config
  std::string root_;
  parallel::ControlPlane& control_;
  std::optional<parallel::Coords> coords_;
  std::vector<StateTensor> state_;
  bool verbose_;
  std::unique_ptr<Remover> remover_;  // deletes pruned checkpoints in the background
  std::unique_ptr<Pending> pending_;
  std::vector<at::Tensor> snapshot_pool_;  // host buffers of the last asynchronous save, reused by the next
  SaveStats stats_;
};

// Where a run's checkpoints go: checkpoint.dir, inside run_dir when relative (and run_dir is given).
std::string checkpoint_root(const config::Config& c, const std::string& run_dir);

}  // namespace moetrain::checkpoints
