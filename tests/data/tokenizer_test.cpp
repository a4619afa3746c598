// Text input, the tokenizer and the shard builder: exact round trips (multilingual, byte fallback), document
// splitting, and the bad inputs (missing, empty, invalid UTF-8, a vocabulary too small).
#include "data/tokenizer.h"

#include <gtest/gtest.h>

#include "data/builder.h"
#include "data/shards.h"
#include "data/text_input.h"
#include "tests/data/test_corpus.h"

namespace moetrain::data {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::kRoot;
using testing::read_file;
using testing::ScratchDir;
using testing::write_file;

const std::string kLicenses = kRoot + "/tests/data/text/licenses.txt";
const std::string kMultilingual = kRoot + "/tests/data/text/multilingual.txt";

std::vector<int> without_eos(const std::vector<int64_t>& doc, int64_t eos) {
  std::vector<int> ids;
  for (int64_t id : doc)
    if (id != eos) ids.push_back(static_cast<int>(id));
  return ids;
}

TEST(Utf8, ValidAndInvalidSequences) {
  EXPECT_EQ(find_invalid_utf8("plain ascii"), std::string::npos);
  EXPECT_EQ(find_invalid_utf8("grüße 你好 🦊"), std::string::npos);
  EXPECT_EQ(find_invalid_utf8("ab\xff"), 2u);           // never valid
  EXPECT_EQ(find_invalid_utf8("a\x80z"), 1u);           // continuation without a lead
  EXPECT_EQ(find_invalid_utf8("\xc0\xaf"), 0u);         // overlong '/'
  EXPECT_EQ(find_invalid_utf8("x\xed\xa0\x80"), 1u);    // a UTF-16 surrogate
  EXPECT_EQ(find_invalid_utf8("\xf4\x90\x80\x80"), 0u); // above U+10FFFF
  EXPECT_EQ(find_invalid_utf8("ok\xe4\xbd"), 2u);       // a cut-off character is invalid at the end of text...
  size_t tail = 0;
  EXPECT_EQ(find_invalid_utf8("ok\xe4\xbd", &tail), std::string::npos);  // ...unless more text may follow
  EXPECT_EQ(tail, 2u);
}

TEST(TextInput, DocumentSplits) {
  ScratchDir dir;
  write_file(dir / "a.txt", "first para\nstill first\n\n  \nsecond para\n");
  write_file(dir / "b.txt", "");  // empty files add nothing
  write_file(dir / "c.txt", "last file, no newline");
  const std::vector<InputFile> files = expand_inputs({dir.path().string()});
  ASSERT_EQ(files.size(), 3u);  // sorted: a, b, c
  EXPECT_EQ(files[0].path, dir / "a.txt");
  const auto docs = [&](DocumentSplit split) {
    DocumentReader r(files, split);
    std::vector<std::string> out;
    std::string doc;
    DocumentReader::Piece p;
    while (r.next(p)) {
      doc += p.text;
      if (p.document_end) out.push_back(std::exchange(doc, ""));
    }
    return out;
  };
  EXPECT_EQ(docs(DocumentSplit::blank),
            (std::vector<std::string>{"first para\nstill first\n", "second para\n", "last file, no newline"}));
  EXPECT_EQ(docs(DocumentSplit::line),
            (std::vector<std::string>{"first para", "still first", "second para", "last file, no newline"}));
  EXPECT_EQ(docs(DocumentSplit::file),
            (std::vector<std::string>{read_file(dir / "a.txt"), "last file, no newline"}));
}

TEST(TextInput, LongLinesComeInBoundedPiecesAtCharacterBoundaries) {
  ScratchDir dir;
  std::string line;
  for (int i = 0; i < 3000; ++i) line += "ü€";  // 2- and 3-byte characters: cuts must not split them
  write_file(dir / "long.txt", line + "\nnext\n");
  LineReader r(expand_inputs({dir / "long.txt"}), 64);
  LineReader::Piece p;
  std::string rebuilt;
  int pieces = 0;
  while (r.next(p)) {
    EXPECT_LE(p.text.size(), 64u);
    EXPECT_EQ(find_invalid_utf8(p.text), std::string::npos);
    rebuilt += p.text;
    ++pieces;
  }
  EXPECT_EQ(rebuilt, line + "\nnext\n");
  EXPECT_GT(pieces, 15000 / 64);
}

TEST(TextInput, BadInputsNameTheFile) {
  ScratchDir dir;
  EXPECT_EQ(error_of([&] { expand_inputs({dir / "nope.txt"}); }), dir / "nope.txt" + ": no such file or directory");
  fs::create_directories(dir / "empty_dir");
  EXPECT_EQ(error_of([&] { expand_inputs({dir / "empty_dir"}); }), dir / "empty_dir" + ": the directory holds no files");
  write_file(dir / "bad.txt", "line one\nline two \xff\xfe here\n");
  DocumentReader r(expand_inputs({dir / "bad.txt"}), DocumentSplit::line);
  DocumentReader::Piece p;
  const std::string err = error_of([&] {
    while (r.next(p)) {
    }
  });
  EXPECT_EQ(err, dir / "bad.txt" + ":2: invalid UTF-8 (byte 0xFF at byte offset 18 of the file); the input must be "
                                   "UTF-8 text");
}

// One tokenizer for the tests below (training takes a fraction of a second).
class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ScratchDir("TokenizerTest");
    TokenizerTrainOptions o;
    o.inputs = {kLicenses};
    o.vocab_size = 400;
    o.out = *dir_ / "licenses.model";
    summary_ = train_tokenizer(o);
  }
  static void TearDownTestSuite() { delete dir_; }
  static inline ScratchDir* dir_ = nullptr;
  static inline TokenizerTrainSummary summary_;
};

TEST_F(TokenizerTest, TrainsTheRequestedVocabulary) {
  Tokenizer tok(*dir_ / "licenses.model");
  EXPECT_EQ(summary_.vocab_size, 400);
  EXPECT_EQ(tok.vocab_size(), 400);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.checksum(), file_checksum(*dir_ / "licenses.model"));
  EXPECT_EQ(summary_.files, 1);
  EXPECT_GT(summary_.lines, 1000);
  // English text compresses: fewer tokens than bytes.
  std::vector<int> ids;
  const std::string text = "This License applies to any program or other work.";
  tok.encode(text, ids);
  EXPECT_LT(ids.size(), text.size() * 2 / 3);
}

TEST_F(TokenizerTest, MultilingualRoundTripThroughByteFallback) {
  // Trained on English only: most characters of the sample are not pieces and go through byte fallback.
  Tokenizer tok(*dir_ / "licenses.model");
  const std::string text = read_file(kMultilingual);
  ASSERT_GT(text.size(), 2000u);
  std::vector<int> ids;
  tok.encode(text, ids);
  int bytes = 0;
  for (int id : ids) bytes += tok.piece(id).rfind("<0x", 0) == 0;
  EXPECT_GT(bytes, 500);  // byte pieces really were used
  EXPECT_EQ(tok.decode(ids), text);
  for (const std::string& s : {std::string(""), std::string(" leading and trailing  "), std::string("\n\n\t\r\n"),
                              std::string("a\0b", 3)}) {
    ids.clear();
    tok.encode(s, ids);
    EXPECT_EQ(tok.decode(ids), s);
  }
}

TEST_F(TokenizerTest, BuildDecodesBackToTheFiles) {
  // text -> tokenizer-train -> build (one document per file) -> shards -> decode: the files byte for byte.
  TokenizerTrainOptions to;
  to.inputs = {kMultilingual};
  to.vocab_size = 700;  // the sample has many distinct characters
  to.model_type = "unigram";
  to.character_coverage = 0.98;
  to.out = *dir_ / "multi.model";
  train_tokenizer(to);
  for (const std::string model : {"licenses.model", "multi.model"}) {
    BuildOptions o;
    o.tokenizer = *dir_ / model;
    o.inputs = {kMultilingual, kLicenses};
    o.out = *dir_ / ("shards_" + model);
    o.split = DocumentSplit::file;
    o.progress = false;
    const BuildSummary s = build_shards(o);
    EXPECT_EQ(s.documents, 2u);
    EXPECT_EQ(s.token_bytes, 2u);
    ShardSet set(o.out);
    set.verify();
    EXPECT_EQ(set.tokens(), s.tokens);
    Tokenizer tok(o.tokenizer);
    set.check_tokenizer(tok.checksum(), o.tokenizer);
    EXPECT_EQ(file_checksum(tokenizer_copy_path(o.out)), tok.checksum());  // the copy next to the shards
    EXPECT_EQ(tok.decode(without_eos(set.document(0), tok.eos_id())), read_file(kMultilingual)) << model;
    EXPECT_EQ(tok.decode(without_eos(set.document(1), tok.eos_id())), read_file(kLicenses)) << model;
  }
}

TEST_F(TokenizerTest, LongDocumentsAreEncodedInPiecesAndStillRoundTrip) {
  // A 3 MB one-line document: the builder encodes it in ~1 MiB pieces (bounded memory).
  std::string big;
  const std::string line = read_file(kMultilingual);
  while (big.size() < (3u << 20)) big += line;
  std::replace(big.begin(), big.end(), '\n', ' ');
  write_file(*dir_ / "big.txt", big);
  BuildOptions o;
  o.tokenizer = *dir_ / "licenses.model";
  o.inputs = {*dir_ / "big.txt"};
  o.out = *dir_ / "big";
  o.split = DocumentSplit::line;
  o.progress = false;
  build_shards(o);
  ShardSet set(o.out);
  ASSERT_EQ(set.documents(), 1u);
  Tokenizer tok(o.tokenizer);
  EXPECT_EQ(tok.decode(without_eos(set.document(0), tok.eos_id())), big);
}

TEST_F(TokenizerTest, BadInputs) {
  ScratchDir dir;
  TokenizerTrainOptions o;
  o.vocab_size = 400;
  o.out = dir / "t.model";
  o.inputs = {dir / "missing.txt"};
  EXPECT_EQ(error_of([&] { train_tokenizer(o); }), dir / "missing.txt" + ": no such file or directory");
  write_file(dir / "empty.txt", "\n  \n\n");
  o.inputs = {dir / "empty.txt"};
  EXPECT_EQ(error_of([&] { train_tokenizer(o); }),
            dir / "empty.txt" + ": the input is empty (no non-blank line to train on)");
  write_file(dir / "latin1.txt", "caf\xe9 au lait\n");  // Latin-1, not UTF-8
  o.inputs = {dir / "latin1.txt"};
  EXPECT_EQ(error_of([&] { train_tokenizer(o); }),
            dir / "latin1.txt" + ":1: invalid UTF-8 (byte 0xE9 at byte offset 3 of the file); the input must be "
                                 "UTF-8 text");
  o.inputs = {kLicenses};
  o.vocab_size = 200;
  EXPECT_NE(error_of([&] { train_tokenizer(o); }).find("--vocab-size 200: byte fallback needs more than 259 pieces"),
            std::string::npos);
  o.vocab_size = 60000;  // more pieces than the text can make
  const std::string too_many = error_of([&] { train_tokenizer(o); });
  EXPECT_EQ(too_many.rfind("tokenizer-train --vocab-size 60000 --character-coverage 0.9995: sentencepiece: ", 0), 0u);
  EXPECT_NE(too_many.find("Vocabulary size too high (60000). Please set it to a value <= "),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir / "t.model"));

  write_file(dir / "not.model", "this is not a model");
  EXPECT_NE(error_of([&] { Tokenizer t(dir / "not.model"); }).find(dir / "not.model" + ": not a SentencePiece model"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { Tokenizer t(dir / "none.model"); }), dir / "none.model" + ": tokenizer model not found");

  BuildOptions b;
  b.tokenizer = *dir_ / "licenses.model";
  b.out = dir / "shards";
  b.progress = false;
  b.inputs = {dir / "empty.txt"};
  EXPECT_EQ(error_of([&] { build_shards(b); }), dir / "empty.txt" + ": the input is empty (no document to tokenize)");
  b.inputs = {dir / "latin1.txt"};
  EXPECT_NE(error_of([&] { build_shards(b); }).find(dir / "latin1.txt" + ":1: invalid UTF-8"), std::string::npos);
  // Nothing half-written is left behind.
  EXPECT_FALSE(fs::exists(shard_path(dir / "shards", 0, "bin")));
  EXPECT_FALSE(fs::exists(shard_path(dir / "shards", 0, "bin.tmp")));
}

}  // namespace
}  // namespace moetrain::data
