// Text input for the tokenizer trainer and the shard builder: the files named on the command line (directories
// expand to the regular files under them, sorted), read in bounded memory, checked to be UTF-8, split into
// documents. Every error names the file (and line) and what is wrong.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace moetrain::data {

struct InputFile {
  std::string path;
  uint64_t bytes = 0;
};

// FILES|DIR arguments -> the files they name: a directory contributes every regular file below it (hidden names
// skipped), sorted by path, so the order (and the shards built from it) does not depend on the filesystem. Throws
// when an argument does not exist or nothing is left.
std::vector<InputFile> expand_inputs(const std::vector<std::string>& args);

// How the text splits into documents. Each document gets an end-of-document token in the shards.
enum class DocumentSplit {
  blank,  // paragraphs: runs of non-blank lines (blank = only whitespace), their newlines kept
  line,   // every non-blank line, without its line break (one document per line, e.g. JSONL-like corpora)
  file,   // every non-empty file, byte for byte
};
DocumentSplit parse_document_split(const std::string& name);  // "blank" | "line" | "file"

// Lines of a set of files, each with its line break, read in blocks of a fixed size: a line longer than
// `max_piece_bytes` comes in several pieces cut at UTF-8 character boundaries, so memory stays bounded whatever
// the input. Throws on invalid UTF-8 with the file, line and byte offset.
class LineReader {
 public:
  struct Piece {
    std::string text;       // the bytes, including the '\n' when `line_end`
    bool line_end = false;  // the last piece of its line
    bool file_end = false;  // the last piece of its file
    size_t file = 0;        // index into the input files
    uint64_t line = 0;      // 1-based line number
  };

  explicit LineReader(std::vector<InputFile> files, size_t max_piece_bytes = size_t{1} << 20);
  ~LineReader();
  bool next(Piece& piece);  // false at the end of the last file
  uint64_t bytes_read() const { return bytes_read_; }  // over all files so far
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  bool open_next();
  bool fill();

  std::vector<InputFile> files_;
  size_t max_piece_;
  size_t current_ = 0;
  bool open_ = false;
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> fp_{nullptr, nullptr};
  std::string buffer_;
  size_t pos_ = 0;
  bool eof_ = false;
  uint64_t line_ = 1, offset_ = 0, bytes_read_ = 0, total_bytes_ = 0;
};

// Documents, in pieces of at most about `max_piece_bytes` (long documents are cut at line or character
// boundaries): the builder encodes each piece and appends an end-of-document token after a document's last one.
class DocumentReader {
 public:
  struct Piece {
    std::string text;
    bool document_end = false;
  };
  DocumentReader(std::vector<InputFile> files, DocumentSplit split, size_t max_piece_bytes = size_t{1} << 20);
  bool next(Piece& piece);  // false after the last document
  const LineReader& lines() const { return lines_; }

 private:
  LineReader lines_;
  DocumentSplit split_;
  size_t max_piece_;
  std::string pending_;
  bool in_document_ = false;
};

// The first invalid UTF-8 sequence in `text` (overlong forms, surrogates and code points above U+10FFFF count as
// invalid), or npos. `incomplete_tail` receives how many bytes at the end start a character that is cut off
// (not an error for a block of a longer stream).
size_t find_invalid_utf8(const std::string& text, size_t* incomplete_tail = nullptr);

// True when the line (with or without its line break) holds only spaces, tabs and '\r'.
bool is_blank(const std::string& line);

}  // namespace moetrain::data
