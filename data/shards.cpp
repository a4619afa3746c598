#include "data/shards.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace moetrain::data {
namespace fs = std::filesystem;

static_assert(std::endian::native == std::endian::little, "token shards are written little-endian");

namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'T', 'O', 'K', 'S', '1'};
constexpr uint32_t kVersion = 1;

template <typename T>
void put(uint8_t* buf, size_t at, T v) {
  std::memcpy(buf + at, &v, sizeof v);
}
template <typename T>
T get(const uint8_t* buf, size_t at) {
  T v;
  std::memcpy(&v, buf + at, sizeof v);
  return v;
}

void encode_header(const ShardHeader& h, uint8_t* buf) {
  std::memset(buf, 0, kShardHeaderBytes);
  std::memcpy(buf, kMagic, 8);
  put(buf, 8, h.version);
  put(buf, 12, h.token_bytes);
  put(buf, 16, h.vocab_size);
  put(buf, 24, h.eos_id);
  put(buf, 32, h.tokenizer_checksum);
  put(buf, 40, h.tokens);
  put(buf, 48, h.documents);
  put(buf, 56, h.shard_index);
  put(buf, 60, h.shard_count);
  put(buf, 64, h.total_tokens);
  put(buf, 72, h.total_documents);
  put(buf, 80, h.data_checksum);
  put(buf, 88, h.offsets_checksum);
  put(buf, 120, static_cast<uint64_t>(XXH3_64bits(buf, 120)));
}

ShardHeader decode_header(const uint8_t* buf, const std::string& path) {
  if (std::memcmp(buf, kMagic, 8) != 0)
    throw std::runtime_error(fmt::format("{}: not a moetrain token-shard index (bad magic)", path));
  if (get<uint64_t>(buf, 120) != XXH3_64bits(buf, 120))
    throw std::runtime_error(fmt::format("{}: corrupt header (checksum mismatch)", path));
  ShardHeader h;
  h.version = get<uint32_t>(buf, 8);
  if (h.version != kVersion)
    throw std::runtime_error(fmt::format("{}: format version {}, this build reads version {}", path, h.version, kVersion));
  h.token_bytes = get<uint32_t>(buf, 12);
  h.vocab_size = get<uint64_t>(buf, 16);
  h.eos_id = get<uint64_t>(buf, 24);
  h.tokenizer_checksum = get<uint64_t>(buf, 32);
  h.tokens = get<uint64_t>(buf, 40);
  h.documents = get<uint64_t>(buf, 48);
  h.shard_index = get<uint32_t>(buf, 56);
  h.shard_count = get<uint32_t>(buf, 60);
  h.total_tokens = get<uint64_t>(buf, 64);
  h.total_documents = get<uint64_t>(buf, 72);
  h.data_checksum = get<uint64_t>(buf, 80);
  h.offsets_checksum = get<uint64_t>(buf, 88);
  if (h.vocab_size < 2 || h.eos_id >= h.vocab_size || h.token_bytes != token_bytes_for(h.vocab_size) ||
      h.shard_count == 0 || h.shard_index >= h.shard_count || h.documents == 0 || h.tokens < h.documents)
    throw std::runtime_error(fmt::format(
        "{}: corrupt header (vocab {}, end token {}, {} bytes per token, shard {} of {}, {} documents, {} tokens)",
        path, h.vocab_size, h.eos_id, h.token_bytes, h.shard_index, h.shard_count, h.documents, h.tokens));
  return h;
}

using File = std::unique_ptr<std::FILE, int (*)(std::FILE*)>;
using Hash = std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)>;

Hash new_hash() {
  Hash h{XXH3_createState(), &XXH3_freeState};
  XXH3_64bits_reset(h.get());
  return h;
}

File open_write(const std::string& path) {
  File f{std::fopen(path.c_str(), "wb"), &std::fclose};
  if (!f) throw std::runtime_error(fmt::format("{}: cannot write: {}", path, std::strerror(errno)));
  return f;
}

void write_all(std::FILE* f, const void* data, size_t bytes, const std::string& path) {
  if (bytes && std::fwrite(data, 1, bytes, f) != bytes)
    throw std::runtime_error(fmt::format("{}: write error: {}", path, std::strerror(errno)));
}

void close_durably(File& f, const std::string& path) {
  if (std::fflush(f.get()) != 0 || ::fsync(::fileno(f.get())) != 0)
    throw std::runtime_error(fmt::format("{}: write error: {}", path, std::strerror(errno)));
  f.reset();
}

}  // namespace

std::string shard_path(const std::string& prefix, uint32_t index, const char* extension) {
  return fmt::format("{}.{:05}.{}", prefix, index, extension);
}

uint32_t token_bytes_for(uint64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

// ---- TokenShardWriter -------------------------------------------------------------------------------------------------

struct TokenShardWriter::Open {
  ShardHeader header;
  std::string bin_path, idx_path;
  File bin{nullptr, &std::fclose}, idx{nullptr, &std::fclose};
  Hash data = new_hash(), offsets = new_hash();
  std::vector<uint8_t> staging;
};

TokenShardWriter::TokenShardWriter(std::string prefix, uint64_t vocab_size, uint64_t eos_id, uint64_t tokenizer_checksum,
                         uint64_t shard_tokens)
    : prefix_(std::move(prefix)), shard_tokens_(std::max<uint64_t>(shard_tokens, 1)) {
  if (vocab_size < 2 || vocab_size > (uint64_t{1} << 32) || eos_id >= vocab_size)
    throw std::runtime_error(fmt::format("{}: cannot write shards with vocabulary size {} and end token {}", prefix_,
                                         vocab_size, eos_id));
  const fs::path dir = fs::path(prefix_).parent_path();
  if (!dir.empty()) fs::create_directories(dir);
  base_.vocab_size = vocab_size;
  base_.eos_id = eos_id;
  base_.tokenizer_checksum = tokenizer_checksum;
  base_.token_bytes = token_bytes_for(vocab_size);
}

TokenShardWriter::~TokenShardWriter() {
  if (finished_) return;
  open_.reset();
  std::error_code ec;
  for (uint32_t i = 0; i <= shards_.size(); ++i) {
    fs::remove(shard_path(prefix_, i, "bin.tmp"), ec);
    fs::remove(shard_path(prefix_, i, "idx.tmp"), ec);
  }
}

void TokenShardWriter::open_shard() {
  open_ = std::make_unique<Open>();
  open_->header = base_;
  open_->header.shard_index = static_cast<uint32_t>(shards_.size());
  open_->bin_path = shard_path(prefix_, open_->header.shard_index, "bin.tmp");
  open_->idx_path = shard_path(prefix_, open_->header.shard_index, "idx.tmp");
  open_->bin = open_write(open_->bin_path);
  open_->idx = open_write(open_->idx_path);
  uint8_t placeholder[kShardHeaderBytes] = {};
  write_all(open_->idx.get(), placeholder, sizeof placeholder, open_->idx_path);
  const uint64_t zero = 0;
  write_all(open_->idx.get(), &zero, sizeof zero, open_->idx_path);
  XXH3_64bits_update(open_->offsets.get(), &zero, sizeof zero);
}

void TokenShardWriter::append(std::span<const int32_t> ids) {
  if (finished_) throw std::logic_error("TokenShardWriter::append after finish");
  if (!open_) open_shard();
  auto& s = open_->staging;
  s.resize(ids.size() * base_.token_bytes);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || static_cast<uint64_t>(id) >= base_.vocab_size)
      throw std::runtime_error(fmt::format("{}: token id {} is outside the vocabulary [0, {})", open_->bin_path, id,
                                           base_.vocab_size));
    if (base_.token_bytes == 2) put(s.data(), 2 * i, static_cast<uint16_t>(id));
    else put(s.data(), 4 * i, static_cast<uint32_t>(id));
  }
  write_all(open_->bin.get(), s.data(), s.size(), open_->bin_path);
  XXH3_64bits_update(open_->data.get(), s.data(), s.size());
  open_->header.tokens += ids.size();
  total_tokens_ += ids.size();
  in_document_ = true;
}

void TokenShardWriter::end_document() {
  const int32_t eos = static_cast<int32_t>(base_.eos_id);
  append(std::span<const int32_t>(&eos, 1));
  const uint64_t end = open_->header.tokens;
  write_all(open_->idx.get(), &end, sizeof end, open_->idx_path);
  XXH3_64bits_update(open_->offsets.get(), &end, sizeof end);
  ++open_->header.documents;
  ++total_documents_;
  in_document_ = false;
  if (open_->header.tokens >= shard_tokens_) close_shard();
}

void TokenShardWriter::close_shard() {
  Open& o = *open_;
  o.header.data_checksum = XXH3_64bits_digest(o.data.get());
  o.header.offsets_checksum = XXH3_64bits_digest(o.offsets.get());
  close_durably(o.bin, o.bin_path);
  close_durably(o.idx, o.idx_path);
  shards_.push_back(o.header);
  open_.reset();
}

void TokenShardWriter::finish() {
  if (finished_) return;
  // Tokens after the last end_document() would make a document without its end token.
  if (in_document_) throw std::logic_error("TokenShardWriter::finish inside a document");
  if (open_) {
    if (open_->header.documents > 0) close_shard();
    else open_.reset();
  }
  if (shards_.empty()) throw std::runtime_error(fmt::format("{}: no documents to write", prefix_));
  const auto count = static_cast<uint32_t>(shards_.size());
  for (auto& h : shards_) {
    h.shard_count = count;
    h.total_tokens = total_tokens_;
    h.total_documents = total_documents_;
    const std::string idx_tmp = shard_path(prefix_, h.shard_index, "idx.tmp");
    File f{std::fopen(idx_tmp.c_str(), "r+b"), &std::fclose};
    if (!f) throw std::runtime_error(fmt::format("{}: cannot reopen: {}", idx_tmp, std::strerror(errno)));
    uint8_t buf[kShardHeaderBytes];
    encode_header(h, buf);
    write_all(f.get(), buf, sizeof buf, idx_tmp);
    close_durably(f, idx_tmp);
  }
  for (const auto& h : shards_)
    for (const char* ext : {"bin", "idx"})
      fs::rename(shard_path(prefix_, h.shard_index, fmt::format("{}.tmp", ext).c_str()),
                 shard_path(prefix_, h.shard_index, ext));
  for (uint32_t i = count;; ++i) {
    std::error_code ec;
    const bool a = fs::remove(shard_path(prefix_, i, "idx"), ec), b = fs::remove(shard_path(prefix_, i, "bin"), ec);
    if (!a && !b) break;
  }
  finished_ = true;
}

// ---- MappedFile --------------------------------------------------------------------------------------------------

MappedFile::MappedFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw std::runtime_error(fmt::format("{}: cannot stat: {}", path, std::strerror(err)));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      throw std::runtime_error(fmt::format("{}: cannot memory-map: {}", path, std::strerror(err)));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping stays valid
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

// ---- ShardSet ----------------------------------------------------------------------------------------------------

ShardSet::ShardSet(const std::string& prefix) : prefix_(prefix) {
  const std::string first = shard_path(prefix, 0, "idx");
  if (!fs::exists(first))
    throw std::runtime_error(fmt::format("{}: no token shards at prefix {} (build them with `moetrain data build` or "
                                         "`moetrain data synth`)",
                                         first, prefix));
  uint32_t count = 1;
  uint64_t tokens = 0, documents = 0;
  for (uint32_t i = 0; i < count; ++i) {
    Shard s;
    const std::string idx_path = shard_path(prefix, i, "idx"), bin_path = shard_path(prefix, i, "bin");
    if (!fs::exists(idx_path))
      throw std::runtime_error(fmt::format("{}: missing ({} says the corpus has {} shards)", idx_path, first, count));
    s.idx = std::make_unique<MappedFile>(idx_path);
    if (s.idx->size() < kShardHeaderBytes)
      throw std::runtime_error(fmt::format("{}: truncated ({} bytes; the header alone is {})", idx_path,
                                           s.idx->size(), kShardHeaderBytes));
    s.header = decode_header(s.idx->data(), idx_path);
    const ShardHeader& h = s.header;
    if (i == 0) {
      count = h.shard_count;
    } else {
      const ShardHeader& h0 = shards_[0].header;
      if (h.shard_count != h0.shard_count || h.vocab_size != h0.vocab_size || h.eos_id != h0.eos_id ||
          h.tokenizer_checksum != h0.tokenizer_checksum || h.total_tokens != h0.total_tokens ||
          h.total_documents != h0.total_documents)
        throw std::runtime_error(fmt::format("{}: does not belong with {} (another corpus or build: shard count, "
                                             "vocabulary, tokenizer or totals differ)",
                                             idx_path, first));
    }
    if (h.shard_index != i)
      throw std::runtime_error(fmt::format("{}: its header says shard {} (renamed file?)", idx_path, h.shard_index));
    const uint64_t want = kShardHeaderBytes + 8 * (h.documents + 1);
    if (s.idx->size() != want)
      throw std::runtime_error(fmt::format("{}: {} ({} bytes; {} documents need {})", idx_path,
                                           s.idx->size() < want ? "truncated" : "has trailing bytes", s.idx->size(),
                                           h.documents, want));
    s.offsets = reinterpret_cast<const uint64_t*>(s.idx->data() + kShardHeaderBytes);
    if (XXH3_64bits(s.offsets, 8 * (h.documents + 1)) != h.offsets_checksum)
      throw std::runtime_error(fmt::format("{}: corrupt document index (offsets checksum mismatch)", idx_path));
    if (s.offsets[0] != 0 || s.offsets[h.documents] != h.tokens)
      throw std::runtime_error(fmt::format("{}: corrupt document index (offsets span {}..{}, the shard has {} tokens)",
                                           idx_path, s.offsets[0], s.offsets[h.documents], h.tokens));
    for (uint64_t d = 0; d < h.documents; ++d)
      if (s.offsets[d + 1] <= s.offsets[d])
        throw std::runtime_error(fmt::format("{}: corrupt document index (document {} is empty or ends before it "
                                             "starts)",
                                             idx_path, d));
    if (!fs::exists(bin_path)) throw std::runtime_error(fmt::format("{}: missing (its index is {})", bin_path, idx_path));
    s.bin = std::make_unique<MappedFile>(bin_path);
    const uint64_t bin_want = h.tokens * h.token_bytes;
    if (s.bin->size() != bin_want)
      throw std::runtime_error(fmt::format("{}: {} ({} bytes; {} says {} tokens × {} bytes = {})", bin_path,
                                           s.bin->size() < bin_want ? "truncated" : "has trailing bytes",
                                           s.bin->size(), idx_path, h.tokens, h.token_bytes, bin_want));
    // Shards are read at random positions (shuffled windows): read-ahead would mostly fetch unused pages.
    if (s.bin->size() > 0) ::madvise(const_cast<uint8_t*>(s.bin->data()), s.bin->size(), MADV_RANDOM);
    s.first_document = documents;
    tokens += h.tokens;
    documents += h.documents;
    shards_.push_back(std::move(s));
  }
  const ShardHeader& h0 = shards_[0].header;
  if (tokens != h0.total_tokens || documents != h0.total_documents)
    throw std::runtime_error(fmt::format("{}: the shards hold {} tokens in {} documents; the headers say {} in {}",
                                         first, tokens, documents, h0.total_tokens, h0.total_documents));
}

void ShardSet::read(size_t shard, uint64_t first, uint64_t count, int64_t* out) const {
  const Shard& s = shards_[shard];
  if (first + count > s.header.tokens)
    throw std::out_of_range(fmt::format("{}: tokens {}..{} past its end {}", s.bin->path(), first, first + count,
                                        s.header.tokens));
  const uint64_t vocab = s.header.vocab_size;
  uint64_t bad = 0;
  if (s.header.token_bytes == 2) {
    const auto* p = reinterpret_cast<const uint16_t*>(s.bin->data()) + first;
    for (uint64_t i = 0; i < count; ++i) {
      out[i] = p[i];
      bad |= static_cast<uint64_t>(p[i] >= vocab);
    }
  } else {
    const auto* p = reinterpret_cast<const uint32_t*>(s.bin->data()) + first;
    for (uint64_t i = 0; i < count; ++i) {
      out[i] = p[i];
      bad |= static_cast<uint64_t>(p[i] >= vocab);
    }
  }
  if (bad)  // the slow path only to name the position
    for (uint64_t i = 0; i < count; ++i)
      if (static_cast<uint64_t>(out[i]) >= vocab)
        throw std::runtime_error(fmt::format("{}: token id {} at position {} is not below the vocabulary size {} "
                                             "(corrupt shard)",
                                             s.bin->path(), out[i], first + i, vocab));
}

std::vector<int64_t> ShardSet::document(uint64_t doc) const {
  if (doc >= documents())
    throw std::out_of_range(fmt::format("{}: document {} of {}", prefix_, doc, documents()));
  size_t i = 0;
  while (doc >= shards_[i].first_document + shards_[i].header.documents) ++i;
  const uint64_t local = doc - shards_[i].first_document;
  const uint64_t begin = shards_[i].offsets[local], end = shards_[i].offsets[local + 1];
  std::vector<int64_t> out(end - begin);
  read(i, begin, end - begin, out.data());
  return out;
}

void ShardSet::verify() const {
  for (size_t i = 0; i < shards_.size(); ++i) {
    const Shard& s = shards_[i];
    if (XXH3_64bits(s.bin->data(), s.bin->size()) != s.header.data_checksum)
      throw std::runtime_error(fmt::format("{}: corrupt token data (checksum mismatch with {})", s.bin->path(),
                                           s.idx->path()));
    std::vector<int64_t> block;
    const uint64_t step = uint64_t{1} << 20;
    for (uint64_t t = 0; t < s.header.tokens; t += step) {
      const uint64_t n = std::min(step, s.header.tokens - t);
      block.resize(n);
      read(i, t, n, block.data());
    }
    int64_t last;
    for (uint64_t d = 0; d < s.header.documents; ++d) {
      read(i, s.offsets[d + 1] - 1, 1, &last);
      if (static_cast<uint64_t>(last) != s.header.eos_id)
        throw std::runtime_error(fmt::format("{}: document {} ends with token {}, not the end-of-document token {}",
                                             s.bin->path(), d, last, s.header.eos_id));
    }
  }
}

void ShardSet::check_tokenizer(uint64_t checksum, const std::string& tokenizer_path) const {
  if (checksum == tokenizer_checksum()) return;
  const std::string idx = shard_path(prefix_, 0, "idx");
  if (tokenizer_checksum() == 0)
    throw std::runtime_error(fmt::format("{}: the shards were built without a tokenizer (synthetic corpus, {}); they "
                                         "cannot be decoded with it",
                                         tokenizer_path, idx));
  throw std::runtime_error(fmt::format("{}: tokenizer checksum {:016x} does not match the shards' {:016x} ({}): the "
                                       "shards were built with another tokenizer",
                                       tokenizer_path, checksum, tokenizer_checksum(), idx));
}

}  // namespace moetrain::data
