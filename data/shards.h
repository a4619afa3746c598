// Token shards: the on-disk format of a tokenized corpus, its writer and its memory-mapped reader.
//
// A corpus PREFIX is a set of shards PREFIX.00000, PREFIX.00001, ...; shard i is two files:
//   PREFIX.0000i.bin  the flat token ids of its documents, each document ending with the end-of-document token,
//                     little-endian uint16 when the vocabulary fits (≤ 65536 ids), else uint32; no header, so any
//                     tool can map it (numpy.memmap(..., dtype=uint16)).
//   PREFIX.0000i.idx  a 128-byte header, then documents + 1 little-endian uint64 offsets into the .bin (in
//                     tokens): 0, the end of document 0, ..., the shard's token count.
// The header (all fields little-endian):
//   0  magic "MOETOKS1"   8 u32 format version (1)   12 u32 bytes per token (2 or 4)
//   16 u64 vocab size     24 u64 end-of-document id   32 u64 tokenizer checksum (XXH3-64 of the model file;
//                                                        0: no tokenizer, e.g. the synthetic corpus)
//   40 u64 tokens in this shard    48 u64 documents in this shard
//   56 u32 shard index    60 u32 shard count
//   64 u64 tokens of the corpus    72 u64 documents of the corpus
//   80 u64 XXH3-64 of the .bin's bytes    88 u64 XXH3-64 of the offsets
//   96..119 zero          120 u64 XXH3-64 of bytes 0..119
// Opening checks every header, the files' sizes, the offsets (checksum, monotone, ending at the token count) and
// that the shards agree with each other; it does not read the tokens (a corpus may be far larger than memory).
// verify() reads them: the .bin checksums, every id < vocab size, every document ending with the end token.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace moetrain::data {

struct ShardHeader {
  uint32_t version = 1;
  uint32_t token_bytes = 2;
  uint64_t vocab_size = 0;
  uint64_t eos_id = 0;
  uint64_t tokenizer_checksum = 0;
  uint64_t tokens = 0;
  uint64_t documents = 0;
  uint32_t shard_index = 0;
  uint32_t shard_count = 0;
  uint64_t total_tokens = 0;
  uint64_t total_documents = 0;
  uint64_t data_checksum = 0;
  uint64_t offsets_checksum = 0;
};

inline constexpr size_t kShardHeaderBytes = 128;
std::string shard_path(const std::string& prefix, uint32_t index, const char* extension);  // PREFIX.0000i.ext
uint32_t token_bytes_for(uint64_t vocab_size);  // 2 when ids fit uint16, else 4

// Writes documents into shards of about `shard_tokens` tokens (a document never spans two shards). Files are
// written as *.tmp and renamed when finish() succeeds; a writer destroyed without finish() removes them.
class TokenShardWriter {
 public:
  TokenShardWriter(std::string prefix, uint64_t vocab_size, uint64_t eos_id, uint64_t tokenizer_checksum,
              uint64_t shard_tokens = uint64_t{1} << 28);
  ~TokenShardWriter();
  TokenShardWriter(const TokenShardWriter&) = delete;
  TokenShardWriter& operator=(const TokenShardWriter&) = delete;

  // Appends tokens of the current document (ids < vocab size; throws otherwise). end_document() appends the
  // end-of-document token and closes it.
  void append(std::span<const int32_t> ids);
  void end_document();
  // Closes the last shard, writes every header (with the corpus counts) and renames the files into place;
  // removes shards PREFIX.(count).* ... left by an earlier, larger build of the same prefix.
  void finish();

  uint64_t tokens() const { return total_tokens_; }
  uint64_t documents() const { return total_documents_; }
  uint32_t shards() const { return static_cast<uint32_t>(shards_.size()); }

 private:
  struct Open;
  void open_shard();
  void close_shard();

  std::string prefix_;
  ShardHeader base_;
  uint64_t shard_tokens_;
  std::vector<ShardHeader> shards_;  // closed shards
  std::unique_ptr<Open> open_;
  uint64_t total_tokens_ = 0, total_documents_ = 0;
  bool in_document_ = false;
  bool finished_ = false;
};

// One read-only memory mapping of a file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// A corpus opened for reading: every shard's .bin and .idx memory-mapped.
class ShardSet {
 public:
  struct Shard {
    ShardHeader header;
    std::unique_ptr<MappedFile> bin, idx;
    const uint64_t* offsets = nullptr;  // header.documents + 1 entries, mapped
    uint64_t first_document = 0;        // index of its first document in the corpus
  };

  explicit ShardSet(const std::string& prefix);  // throws naming the file and what is wrong

  const std::string& prefix() const { return prefix_; }
  uint64_t vocab_size() const { return shards_[0].header.vocab_size; }
  uint64_t eos_id() const { return shards_[0].header.eos_id; }
  uint64_t tokenizer_checksum() const { return shards_[0].header.tokenizer_checksum; }
  uint32_t token_bytes() const { return shards_[0].header.token_bytes; }
  uint64_t tokens() const { return shards_[0].header.total_tokens; }
  uint64_t documents() const { return shards_[0].header.total_documents; }
  const std::vector<Shard>& shards() const { return shards_; }

  // Copies `count` tokens of shard `shard` starting at token `first` into out, checking every id < vocab size
  // (a corrupt .bin is reported with its file and position).
  void read(size_t shard, uint64_t first, uint64_t count, int64_t* out) const;
  // The tokens of document `doc` (corpus-wide index), end token included.
  std::vector<int64_t> document(uint64_t doc) const;
  // Reads everything: the .bin checksums, the id range and the end token of every document. Throws on the first
  // problem, naming the file.
  void verify() const;
  // Checks the corpus was built with the tokenizer whose checksum is given (the file named `tokenizer_path`).
  void check_tokenizer(uint64_t checksum, const std::string& tokenizer_path) const;

 private:
  std::string prefix_;
  std::vector<Shard> shards_;
};

}  // namespace moetrain::data
