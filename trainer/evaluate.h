// `moetrain eval`: a checkpoint's loss and perplexity on token shards, in one process. Windows of seq_len + 1 +
// mtp_depth tokens are read in order from each shard with a stride of seq_len (no window crosses a shard), the
// whole model runs on them without gradients, and the report gives the main loss, each MTP depth's loss and every
// MoE layer's MaxVio over all the windows. Optionally the main head's logits go to a NumPy file for exact
// comparisons with other implementations (tests/cli/hf_interop.py compares them with transformers').
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moetrain::trainer {

struct EvalOptions {
  std::string checkpoint;   // a step directory or a checkpoint directory with `latest`
  std::string data;         // token shards' PREFIX
  int64_t max_windows = 64;
  int64_t batch = 8;        // windows per forward pass
  std::string dump_logits;  // "": none; else a .npy file of [windows, seq_len, vocab] FP32 logits
};

struct CheckpointEval {
  int64_t windows = 0, tokens = 0, seq_len = 0;
  double loss = 0;                                   // mean next-token cross-entropy, nats
  std::vector<double> mtp_loss;                      // per depth
  std::vector<std::pair<std::string, double>> max_vio;  // per MoE layer over all windows
};

CheckpointEval evaluate(const EvalOptions& o);
std::string format(const CheckpointEval& r);

}  // namespace moetrain::trainer
