// The shard format: what the writer writes is what the reader reads (uint16 and uint32 ids, several shards), and
// every kind of damage gets an error naming the file: truncation, corrupt headers, indexes and tokens, ids beyond
// the vocabulary, missing shards, another tokenizer.
#include "data/shards.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <stdexcept>

#include "data/builder.h"
#include "data/synthetic.h"
#include "tests/data/test_corpus.h"

namespace moetrain::data {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::read_file;
using testing::ScratchDir;
using testing::write_counting_corpus;
using testing::write_file;

// Overwrites bytes of a file in place.
void poke(const std::string& path, size_t at, const std::string& bytes) {
  std::string data = read_file(path);
  ASSERT_LE(at + bytes.size(), data.size());
  data.replace(at, bytes.size(), bytes);
  write_file(path, data);
}

void truncate_by(const std::string& path, size_t bytes) { fs::resize_file(path, fs::file_size(path) - bytes); }

TEST(Shards, WriteReadRoundTrip) {
  ScratchDir dir;
  for (uint64_t vocab : {uint64_t{300}, uint64_t{65536}, uint64_t{70000}}) {
    const std::string prefix = dir / fmt::format("v{}", vocab);
    // Three documents; a 7-token shard limit makes three shards (documents never span shards).
    TokenShardWriter w(prefix, vocab, vocab - 1, 0xABCDEF, /*shard_tokens=*/7);
    const std::vector<std::vector<int32_t>> docs = {
        {0, 1, 2}, {static_cast<int32_t>(vocab - 2), 5, 6, 7, 8, 9, 10}, {static_cast<int32_t>(vocab - 1)}};
    for (const auto& d : docs) {
      w.append(std::span<const int32_t>(d).first(d.size() / 2));
      w.append(std::span<const int32_t>(d).subspan(d.size() / 2));  // a document may come in pieces
      w.end_document();
    }
    w.finish();
    EXPECT_EQ(w.shards(), 2u);  // 4 tokens < 7, then 4 + 8 ≥ 7 closes shard 0; shard 1: 8 + 2
    ShardSet set(prefix);
    EXPECT_EQ(set.vocab_size(), vocab);
    EXPECT_EQ(set.eos_id(), vocab - 1);
    EXPECT_EQ(set.tokenizer_checksum(), 0xABCDEFu);
    EXPECT_EQ(set.token_bytes(), vocab <= 65536 ? 2u : 4u);
    EXPECT_EQ(set.documents(), 3u);
    EXPECT_EQ(set.tokens(), 3u + 7u + 1u + 3u);
    EXPECT_EQ(fs::file_size(shard_path(prefix, 0, "bin")), set.shards()[0].header.tokens * set.token_bytes());
    for (size_t d = 0; d < docs.size(); ++d) {
      std::vector<int64_t> want(docs[d].begin(), docs[d].end());
      want.push_back(static_cast<int64_t>(vocab - 1));
      EXPECT_EQ(set.document(d), want);
    }
    set.verify();
  }
}

TEST(Shards, WriterRejectsIdsOutsideTheVocabulary) {
  ScratchDir dir;
  TokenShardWriter w(dir / "c", 300, 299, 0);
  const int32_t bad[] = {5, 300};
  EXPECT_NE(error_of([&] { w.append(bad); }).find("token id 300 is outside the vocabulary [0, 300)"),
            std::string::npos);
  const int32_t negative[] = {-1};
  EXPECT_NE(error_of([&] { w.append(negative); }).find("token id -1"), std::string::npos);
}

TEST(Shards, UnfinishedWriterLeavesNothing) {
  ScratchDir dir;
  {
    TokenShardWriter w(dir / "c", 300, 299, 0);
    const int32_t ids[] = {1, 2};
    w.append(ids);
    w.end_document();
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(Shards, RebuildRemovesStaleShards) {
  ScratchDir dir;
  write_counting_corpus(dir / "c", {10, 10, 10}, 1000, /*shard_tokens=*/5);
  EXPECT_TRUE(fs::exists(shard_path(dir / "c", 2, "bin")));
  write_counting_corpus(dir / "c", {10}, 1000);
  EXPECT_FALSE(fs::exists(shard_path(dir / "c", 1, "bin")));
  EXPECT_FALSE(fs::exists(shard_path(dir / "c", 2, "idx")));
  EXPECT_EQ(ShardSet(dir / "c").documents(), 1u);
}

class DamagedShards : public ::testing::Test {
 protected:
  void SetUp() override { write_counting_corpus(prefix_, {5, 6, 7, 8}, 1000, /*shard_tokens=*/12); }
  std::string open_error() const {
    return error_of([&] { ShardSet s(prefix_); });
  }
  ScratchDir dir_;
  const std::string prefix_ = dir_ / "c";
  const std::string bin0_ = shard_path(prefix_, 0, "bin"), idx0_ = shard_path(prefix_, 0, "idx");
  const std::string bin1_ = shard_path(prefix_, 1, "bin"), idx1_ = shard_path(prefix_, 1, "idx");
};

TEST_F(DamagedShards, NoShards) {
  EXPECT_EQ(error_of([&] { ShardSet s(dir_ / "other"); }),
            shard_path(dir_ / "other", 0, "idx") + ": no token shards at prefix " + dir_ / "other" +
                " (build them with `moetrain data build` or `moetrain data synth`)");
}

TEST_F(DamagedShards, TruncatedBin) {
  truncate_by(bin1_, 2);
  EXPECT_EQ(open_error(), bin1_ + ": truncated (32 bytes; " + idx1_ + " says 17 tokens × 2 bytes = 34)");
}

TEST_F(DamagedShards, MissingBinAndShard) {
  fs::remove(bin0_);
  EXPECT_EQ(open_error(), bin0_ + ": missing (its index is " + idx0_ + ")");
  write_counting_corpus(prefix_, {5, 6, 7, 8}, 1000, 12);
  fs::remove(idx1_);
  EXPECT_EQ(open_error(), idx1_ + ": missing (" + idx0_ + " says the corpus has 2 shards)");
}

TEST_F(DamagedShards, TruncatedIndex) {
  truncate_by(idx0_, 8);
  EXPECT_EQ(open_error(), idx0_ + ": truncated (144 bytes; 2 documents need 152)");
  fs::resize_file(idx0_, 100);
  EXPECT_EQ(open_error(), idx0_ + ": truncated (100 bytes; the header alone is 128)");
}

TEST_F(DamagedShards, CorruptHeader) {
  poke(idx0_, 40, "\x01");  // the token count
  EXPECT_EQ(open_error(), idx0_ + ": corrupt header (checksum mismatch)");
  poke(idx0_, 0, "XXXX");
  EXPECT_EQ(open_error(), idx0_ + ": not a moetrain token-shard index (bad magic)");
}

TEST_F(DamagedShards, CorruptOffsets) {
  poke(idx0_, kShardHeaderBytes + 8, "\x04");  // document 0 now ends at 4, not 6
  EXPECT_EQ(open_error(), idx0_ + ": corrupt document index (offsets checksum mismatch)");
}

TEST_F(DamagedShards, ShardsOfAnotherCorpus) {
  ScratchDir other("other");
  write_counting_corpus(other / "c", {5, 6, 7, 9}, 1000, 12);
  testing::write_file(idx1_, read_file(shard_path(other / "c", 1, "idx")));
  EXPECT_EQ(open_error(), idx1_ + ": does not belong with " + idx0_ +
                              " (another corpus or build: shard count, vocabulary, tokenizer or totals differ)");
}

TEST_F(DamagedShards, TokenBeyondTheVocabulary) {
  poke(bin1_, 2 * 3, std::string("\xe8\x03", 2));  // id 1000 at position 3 of shard 1
  ShardSet set(prefix_);                           // opening reads no tokens...
  std::vector<int64_t> out(17);
  EXPECT_EQ(error_of([&] { set.read(1, 0, 17, out.data()); }),  // ...reading does
            bin1_ + ": token id 1000 at position 3 is not below the vocabulary size 1000 (corrupt shard)");
  EXPECT_EQ(error_of([&] { set.verify(); }), bin1_ + ": corrupt token data (checksum mismatch with " + idx1_ + ")");
}

TEST_F(DamagedShards, FlippedTokenFoundByVerify) {
  poke(bin0_, 0, "\x07");
  ShardSet set(prefix_);
  EXPECT_EQ(error_of([&] { set.verify(); }), bin0_ + ": corrupt token data (checksum mismatch with " + idx0_ + ")");
}

TEST_F(DamagedShards, AnotherTokenizer) {
  ShardSet set(prefix_);
  EXPECT_EQ(error_of([&] { set.check_tokenizer(0x1234, "tok.model"); }),
            "tok.model: the shards were built without a tokenizer (synthetic corpus, " + idx0_ +
                "); they cannot be decoded with it");
  TokenShardWriter w(dir_ / "t", 1000, 999, 0x1111);
  const int32_t ids[] = {1};
  w.append(ids);
  w.end_document();
  w.finish();
  EXPECT_EQ(error_of([&] { ShardSet(dir_ / "t").check_tokenizer(0x2222, "tok.model"); }),
            "tok.model: tokenizer checksum 0000000000002222 does not match the shards' 0000000000001111 (" +
                shard_path(dir_ / "t", 0, "idx") + "): the shards were built with another tokenizer");
  ShardSet(dir_ / "t").check_tokenizer(0x1111, "tok.model");
}

TEST(Synth, WritesTheMarkovCorpusWithItsEntropy) {
  ScratchDir dir;
  SynthOptions o;
  o.out = dir / "s";
  o.tokens = 10000;
  o.vocab_size = 64;
  o.branching = 3;
  o.document_tokens = 99;
  o.progress = false;
  const SynthSummary s = synth_shards(o);
  EXPECT_EQ(s.documents, 100u);
  EXPECT_EQ(s.tokens, 10000u);
  EXPECT_EQ(s.eos_id, 63);
  ShardSet set(o.out);
  set.verify();
  EXPECT_EQ(set.vocab_size(), 64u);
  // The documents are the Markov source's sequences of stream 0; the rate is the source's.
  const MarkovSource source(63, 3, 0);
  std::vector<int32_t> seq(99);
  source.sequence(0, 7, 99, seq.data());
  std::vector<int64_t> want(seq.begin(), seq.end());
  want.push_back(63);
  EXPECT_EQ(set.document(7), want);
  EXPECT_DOUBLE_EQ(s.entropy_rate, source.entropy_rate());
  EXPECT_GT(s.entropy_rate, 0);
  EXPECT_LE(s.entropy_rate, std::log(3.0) + 1e-12);  // at most log(branching)
  EXPECT_LE(s.start_entropy, std::log(63.0) + 1e-12);
  EXPECT_NEAR(s.text_token_entropy, (s.start_entropy + 98 * s.entropy_rate) / 99, 1e-12);
}

// Order 2: the next token depends on the last two. Measured on a long stretch of sequences, the conditional entropy
// given the last two tokens matches the exact rate, and given the current token alone it stays well above it (what a
// model without attention could at best reach); order 1 is the first-order source unchanged.
TEST(Synth, OrderTwoSourceNeedsTheTokenBefore) {
  const int64_t V = 12, branching = 3;
  const MarkovSource two(V, branching, /*seed=*/5, /*order=*/2);
  EXPECT_EQ(two.stationary().size(), static_cast<size_t>(V * V));
  double total = 0;
  for (double p : two.stationary()) total += p;
  EXPECT_NEAR(total, 1.0, 1e-9);
  std::map<std::pair<int32_t, int32_t>, std::map<int32_t, int64_t>> by_two;
  std::map<int32_t, std::map<int32_t, int64_t>> by_one;
  std::vector<int32_t> seq(256);
  for (uint64_t i = 0; i < 2000; ++i) {
    two.sequence(0, i, 256, seq.data());
    for (size_t t = 2; t < seq.size(); ++t) {
      ++by_two[{seq[t - 2], seq[t - 1]}][seq[t]];
      ++by_one[seq[t - 1]][seq[t]];
    }
  }
  auto conditional_entropy = [](const auto& counts) {
    double n = 0, h = 0;
    for (const auto& [context, next] : counts) {
      double m = 0;
      for (const auto& kv : next) m += static_cast<double>(kv.second);
      for (const auto& kv : next) h -= static_cast<double>(kv.second) * std::log(static_cast<double>(kv.second) / m);
      n += m;
    }
    return h / n;
  };
  for (const auto& [context, next] : by_two) EXPECT_LE(next.size(), static_cast<size_t>(branching));
  const double h2 = conditional_entropy(by_two), h1 = conditional_entropy(by_one);
  EXPECT_NEAR(h2, two.entropy_rate(), 0.02) << "empirical H(next | last two) against the exact rate";
  EXPECT_GT(h1, two.entropy_rate() + 0.3) << "the current token alone already tells the next one";
  EXPECT_NEAR(two.entropy_given(1), h1, 0.02) << "exact H(next | current token) against the measured one";
  EXPECT_DOUBLE_EQ(two.entropy_given(2), two.entropy_rate());
  EXPECT_GT(two.entropy_given(0), two.entropy_given(1));  // the unconditional letter entropy
  EXPECT_LE(two.entropy_given(0), std::log(static_cast<double>(V)) + 1e-12);

  // Order 1 as before: the default and an explicit 1 give the same sequences.
  const MarkovSource a(V, branching, 5), b(V, branching, 5, 1);
  std::vector<int32_t> sa(64), sb(64);
  a.sequence(1, 3, 64, sa.data());
  b.sequence(1, 3, 64, sb.data());
  EXPECT_EQ(sa, sb);
  EXPECT_DOUBLE_EQ(a.entropy_rate(), b.entropy_rate());
  try {
    MarkovSource(1024, 4, 0, 3);
    FAIL() << "1024^3 states accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("order 3 over a vocabulary of 1024"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moetrain::data
