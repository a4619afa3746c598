// Writing corpora as token shards (data/shards.h): text through a tokenizer (`moetrain data build`) and a
// synthetic Markov corpus (`moetrain data synth`: data/synthetic.h over vocab_size − 1 states plus an end token).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/text_input.h"

namespace moetrain::data {

struct BuildOptions {
  std::string tokenizer;            // SentencePiece model (data/tokenizer.h)
  std::vector<std::string> inputs;  // files or directories
  std::string out;                  // shard prefix
  DocumentSplit split = DocumentSplit::blank;
  uint64_t shard_tokens = uint64_t{1} << 28;
  bool progress = true;  // a progress bar on stderr when it is a terminal or the input is large
};

struct BuildSummary {
  int64_t files = 0;
  uint64_t bytes = 0, documents = 0, tokens = 0;
  uint32_t shards = 0, token_bytes = 0;
  int64_t vocab_size = 0;
  uint64_t tokenizer_checksum = 0;
  double seconds = 0;
};

// Streams the inputs (bounded memory: documents are encoded in pieces of at most about 1 MiB), appends the
// end-of-document token after each document and writes the shards, and a copy of the tokenizer next to them
// (tokenizer_copy_path(PREFIX)) so the shards can be decoded without knowing where the model came from. Throws on
// missing, empty or non-UTF-8 input.
BuildSummary build_shards(const BuildOptions& options);

// PREFIX.tokenizer.model
std::string tokenizer_copy_path(const std::string& prefix);

struct SynthOptions {
  std::string out;
  uint64_t tokens = 1000000;      // at least this many tokens are written (whole documents)
  int64_t vocab_size = 256;       // ids 0..vocab_size-2 are Markov text; vocab_size-1 is the end-of-document token
  int64_t branching = 4;
  uint64_t seed = 0;
  int64_t order = 1;              // the Markov source's order k (data/synthetic.h)
  int64_t document_tokens = 512;  // Markov tokens per document (the end token comes on top)
  uint64_t shard_tokens = uint64_t{1} << 28;
  bool progress = true;
};

// The synthetic corpus written as shards, and the entropies that bound a model's loss on it (nats/token):
//   rate            H = Σ_i π_i H(P_i): a Markov token whose k predecessors are in the same document
//   start           H(π) = −Σ_i π_i ln π_i: the first k tokens of a document jointly (documents are independent)
//   per text token  (H(π) + (L−k)·H) / L over the L Markov tokens of a document (end tokens excluded)
struct SynthSummary {
  uint64_t documents = 0, tokens = 0;
  uint32_t shards = 0;
  int64_t eos_id = 0;
  double entropy_rate = 0, start_entropy = 0, text_token_entropy = 0;
};
SynthSummary synth_shards(const SynthOptions& options);

}  // namespace moetrain::data
