// `moetrain eval`: a checkpoint's loss and perplexity on token shards, in one process or data parallel over the
// launched ranks (each rank the whole model, saved on any layout, and a contiguous block of the windows; the sums
// are reduced, so the report is the one process's up to summation order). Windows of seq_len + 1 +
// mtp_depth tokens are read in order from each shard with a stride of seq_len (no window crosses a shard), the
// whole model runs on them without gradients, and the report gives the main loss, each MTP depth's loss and every
// MoE layer's MaxVio over all the windows. Optionally the main head's logits go to a NumPy file for exact
// comparisons with other implementations (tests/cli/hf_interop.py compares them with transformers').
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "parallel/communicator.h"

namespace moetrain::trainer {

struct EvalOptions {
  std::string checkpoint;  // a step directory or a checkpoint directory with `latest`
  std::string data;        // token shards' PREFIX
  int64_t max_windows = 64;
  int64_t batch = 8;        // windows per forward pass
  std::string dump_logits;  // "": none; else a .npy file of [windows, seq_len, vocab] FP32 logits
  // The launched ranks (null: one process): every rank calls evaluate(); each writes its windows' logits into the
  // one file at their offset.
  parallel::Communicator* world = nullptr;
};

struct CheckpointEval {
  int64_t windows = 0, tokens = 0, seq_len = 0;
  double loss = 0;                                      // mean next-token cross-entropy, nats
  std::vector<double> mtp_loss;                         // per depth
  std::vector<std::pair<std::string, double>> max_vio;  // per MoE layer over all windows
};

CheckpointEval evaluate(const EvalOptions& o);
std::string format(const CheckpointEval& r);

// `moetrain generate`: continues a prompt with a checkpoint's model in one process, FP32, with MLA's latent cache
// (model/attention.h): the prompt in one pass, then a token at a time. temperature 0: greedy; else sampling from
// softmax(logits / temperature), restricted to the smallest set of top tokens whose probability reaches top_p,
// drawn from a generator seeded with `seed`. With `mtp` (greedy only), speculative decoding as DeepSeek-V3 describes
// it: MTP module k drafts the token k + 1 ahead from the main model's (normed) hidden state, the main model checks
// the drafts in one pass and keeps the longest agreeing prefix plus its own next token; the output is greedy
// decoding's, in fewer main-model passes.
struct GenerateOptions {
  std::string checkpoint;
  std::vector<int64_t> prompt;  // token ids
  int64_t max_new_tokens = 32;
  double temperature = 0.0;
  double top_p = 1.0;
  uint64_t seed = 0;
  int64_t stop_id = -1;  // stop after generating this id (-1: none)
  bool mtp = false;      // speculative decoding: the MTP modules draft, the main model verifies (greedy only)
};

struct Generated {
  std::vector<int64_t> tokens;        // the new ones
  double seconds = 0;                 // generation time (after loading)
  int64_t drafted = 0, accepted = 0;  // with mtp: draft tokens proposed and accepted
};

Generated generate(const GenerateOptions& o);

}  // namespace moetrain::trainer
