#include "data/text_input.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <system_error>

namespace moetrain::data {
namespace fs = std::filesystem;
namespace {

constexpr size_t kBlockBytes = size_t{1} << 20;

bool hidden(const fs::path& p) {
  const std::string name = p.filename().string();
  return !name.empty() && name[0] == '.';
}

// Where a cut at or before `limit` keeps whole UTF-8 characters: back over continuation bytes (10xxxxxx).
size_t char_boundary(const std::string& s, size_t from, size_t limit) {
  size_t cut = limit;
  for (int back = 0; back < 3 && cut > from && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80; ++back) --cut;
  return cut > from ? cut : limit;  // invalid text: cut anywhere, validation reports it
}

}  // namespace

std::vector<InputFile> expand_inputs(const std::vector<std::string>& args) {
  if (args.empty()) throw std::runtime_error("no input: pass --input FILE|DIR");
  std::vector<InputFile> files;
  for (const auto& arg : args) {
    std::error_code ec;
    const fs::file_status st = fs::status(arg, ec);
    if (ec || !fs::exists(st)) throw std::runtime_error(fmt::format("{}: no such file or directory", arg));
    if (fs::is_directory(st)) {
      std::vector<InputFile> found;
      for (auto it = fs::recursive_directory_iterator(arg, fs::directory_options::follow_directory_symlink, ec);
           !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (hidden(it->path())) {
          if (it->is_directory()) it.disable_recursion_pending();
          continue;
        }
        if (it->is_regular_file()) found.push_back({it->path().string(), static_cast<uint64_t>(it->file_size())});
      }
      if (ec) throw std::runtime_error(fmt::format("{}: cannot list the directory: {}", arg, ec.message()));
      if (found.empty()) throw std::runtime_error(fmt::format("{}: the directory holds no files", arg));
      std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.path < b.path; });
      files.insert(files.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(st)) {
      files.push_back({arg, static_cast<uint64_t>(fs::file_size(arg))});
    } else {
      throw std::runtime_error(fmt::format("{}: not a regular file or directory", arg));
    }
  }
  return files;
}

DocumentSplit parse_document_split(const std::string& name) {
  if (name == "blank") return DocumentSplit::blank;
  if (name == "line") return DocumentSplit::line;
  if (name == "file") return DocumentSplit::file;
  throw std::runtime_error(fmt::format("--docs {}: expected blank, line or file", name));
}

size_t find_invalid_utf8(const std::string& text, size_t* incomplete_tail) {
  if (incomplete_tail) *incomplete_tail = 0;
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
    else return i;  // a continuation byte without a lead, or 0xF8..0xFF
    size_t have = 1;
    while (have < len && i + have < n && (s[i + have] & 0xC0) == 0x80) cp = (cp << 6) | (s[i + have++] & 0x3F);
    if (have < len) {
      if (i + have == n && incomplete_tail) {
        *incomplete_tail = n - i;
        return std::string::npos;
      }
      return i;
    }
    const bool overlong = (len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string::npos;
}

bool is_blank(const std::string& line) {
  return line.find_first_not_of(" \t\r\n") == std::string::npos;
}

// ---- LineReader --------------------------------------------------------------------------------------------------

LineReader::LineReader(std::vector<InputFile> files, size_t max_piece_bytes)
    : files_(std::move(files)), max_piece_(std::max<size_t>(max_piece_bytes, 16)) {
  for (const auto& f : files_) total_bytes_ += f.bytes;
}

LineReader::~LineReader() = default;

bool LineReader::open_next() {
  while (current_ < files_.size()) {
    const std::string& path = files_[current_].path;
    fp_ = {std::fopen(path.c_str(), "rb"), &std::fclose};
    if (!fp_) throw std::runtime_error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
    open_ = true;
    buffer_.clear();
    pos_ = 0;
    eof_ = false;
    line_ = 1;
    offset_ = 0;
    if (fill() || pos_ < buffer_.size()) return true;
    fp_.reset();  // an empty file: nothing to read
    open_ = false;
    ++current_;
  }
  return false;
}

bool LineReader::fill() {
  if (eof_) return false;
  buffer_.erase(0, pos_);
  pos_ = 0;
  const size_t old = buffer_.size();
  buffer_.resize(old + kBlockBytes);
  const size_t got = std::fread(buffer_.data() + old, 1, kBlockBytes, fp_.get());
  buffer_.resize(old + got);
  if (got < kBlockBytes) {
    if (std::ferror(fp_.get()))
      throw std::runtime_error(
          fmt::format("{}: read error: {}", files_[current_].path, std::strerror(errno)));
    eof_ = true;
  }
  bytes_read_ += got;
  return got > 0;
}

bool LineReader::next(Piece& piece) {
  if (!open_ && !open_next()) return false;
  // Find the end of the next piece: a line break, the piece limit, or the end of the file.
  size_t end;
  bool line_end;
  for (;;) {
    const size_t nl = buffer_.find('\n', pos_);
    if (nl != std::string::npos && nl - pos_ < max_piece_) {
      end = nl + 1;
      line_end = true;
      break;
    }
    if (buffer_.size() - pos_ >= max_piece_) {
      end = char_boundary(buffer_, pos_, pos_ + max_piece_);
      line_end = false;
      break;
    }
    if (!fill()) {
      end = buffer_.size();
      line_end = true;  // the last line of a file without a final line break
      break;
    }
  }
  piece.text.assign(buffer_, pos_, end - pos_);
  piece.line_end = line_end;
  piece.file = current_;
  piece.line = line_;
  if (size_t bad = find_invalid_utf8(piece.text); bad != std::string::npos)
    throw std::runtime_error(fmt::format(
        "{}:{}: invalid UTF-8 (byte 0x{:02X} at byte offset {} of the file); the input must be UTF-8 text",
        files_[current_].path, line_, static_cast<unsigned char>(piece.text[bad]), offset_ + bad));
  offset_ += piece.text.size();
  pos_ = end;
  if (line_end) ++line_;
  if (pos_ == buffer_.size()) fill();
  piece.file_end = pos_ == buffer_.size() && eof_;
  if (piece.file_end) {
    fp_.reset();
    open_ = false;
    ++current_;
  }
  return true;
}

// ---- DocumentReader ----------------------------------------------------------------------------------------------

DocumentReader::DocumentReader(std::vector<InputFile> files, DocumentSplit split, size_t max_piece_bytes)
    : lines_(std::move(files), max_piece_bytes), split_(split), max_piece_(std::max<size_t>(max_piece_bytes, 16)) {}

bool DocumentReader::next(Piece& out) {
  LineReader::Piece p;
  std::string line;  // the current line when it arrives in several pieces (line mode and blank checks)
  while (lines_.next(p)) {
    bool close = false;
    if (split_ == DocumentSplit::file) {
      pending_ += p.text;
      close = p.file_end;
    } else {
      line += p.text;
      if (!p.line_end && line.size() < max_piece_) continue;
      const bool complete = p.line_end;
      if (split_ == DocumentSplit::line) {
        if (complete) {
          while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
          if (!is_blank(line) || in_document_) {
            pending_ += line;
            close = true;
          }
        } else {
          pending_ += line;
        }
      } else if (complete && is_blank(line)) {
        close = in_document_ || !pending_.empty();
      } else {
        pending_ += line;
        close = p.file_end;
      }
      line.clear();
      if (p.file_end && (in_document_ || !pending_.empty())) close = true;
    }
    if (close) {
      out.text = std::move(pending_);
      pending_.clear();
      out.document_end = true;
      in_document_ = false;
      return true;
    }
    if (pending_.size() >= max_piece_) {
      out.text = std::move(pending_);
      pending_.clear();
      out.document_end = false;
      in_document_ = true;
      return true;
    }
  }
  if (in_document_ || !pending_.empty()) {
    out.text = std::move(pending_);
    pending_.clear();
    out.document_end = true;
    in_document_ = false;
    return true;
  }
  return false;
}

}  // namespace moetrain::data
