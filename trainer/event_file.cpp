#include "trainer/event_file.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

namespace moetrain::trainer {
namespace {

std::array<uint32_t, 256> crc_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}

// TFRecord's masking of a CRC (so that a CRC of data holding CRCs is not degenerate).
uint32_t masked_crc(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

// Protocol-buffer wire format: varints, fixed-width little-endian numbers, length-delimited fields.
void varint(std::string& out, uint64_t v) {
  for (; v >= 0x80; v >>= 7) out += static_cast<char>((v & 0x7F) | 0x80);
  out += static_cast<char>(v);
}
void key(std::string& out, int field, int wire) { varint(out, static_cast<uint64_t>(field) << 3 | wire); }
template <typename T>
void little_endian(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // x86-64 and aarch64 are little-endian
  out.append(b, sizeof(T));
}
void f64(std::string& out, int field, double v) { key(out, field, 1), little_endian(out, v); }
void f32(std::string& out, int field, float v) { key(out, field, 5), little_endian(out, v); }
void bytes(std::string& out, int field, const std::string& v) { key(out, field, 2), varint(out, v.size()), out += v; }

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// An Event with a step and a Summary holding one Summary.Value (`value`: its fields after the tag).
std::string summary_event(int64_t step, const std::string& tag, const std::string& value) {
  std::string v, summary, event;
  bytes(v, 1, tag);
  v += value;
  bytes(summary, 1, v);
  f64(event, 1, now_s());
  key(event, 2, 0), varint(event, static_cast<uint64_t>(step));
  bytes(event, 5, summary);
  return event;
}

// The step of an encoded Event (−1: none, as the file-version event), or −2 when it does not parse.
int64_t event_step(const std::string& e) {
  size_t i = 0;
  auto read_varint = [&](uint64_t& v) {
    v = 0;
    for (int shift = 0; i < e.size() && shift < 64; shift += 7) {
      const auto b = static_cast<uint8_t>(e[i++]);
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  };
  int64_t step = -1;
  while (i < e.size()) {
    uint64_t k = 0, v = 0;
    if (!read_varint(k)) return -2;
    switch (k & 7) {
      case 0:
        if (!read_varint(v)) return -2;
        if ((k >> 3) == 2) step = static_cast<int64_t>(v);
        break;
      case 1: i += 8; break;
      case 5: i += 4; break;
      case 2:
        if (!read_varint(v)) return -2;
        i += v;
        break;
      default: return -2;
    }
    if (i > e.size()) return -2;
  }
  return step;
}

// The byte length of `path`'s whole records of steps ≤ `last_step` (stopping at the first later or torn one), read
// one record at a time.
uint64_t kept_length(const std::string& path, int64_t last_step) {
  std::ifstream in(path, std::ios::binary);
  uint64_t pos = 0;
  std::string event;
  for (;;) {
    char header[12];
    uint64_t len = 0;
    uint32_t len_crc = 0, data_crc = 0;
    if (!in.read(header, 12)) break;
    std::memcpy(&len, header, 8);
    std::memcpy(&len_crc, header + 8, 4);
    if (len_crc != masked_crc(header, 8) || len > (uint64_t{1} << 32)) break;
    event.resize(len);
    if (!in.read(event.data(), static_cast<std::streamsize>(len)) || !in.read(reinterpret_cast<char*>(&data_crc), 4))
      break;
    if (data_crc != masked_crc(event.data(), event.size())) break;
    const int64_t step = event_step(event);
    if (step == -2 || step > last_step) break;
    pos += 12 + len + 4;
  }
  return pos;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n) {
  static const std::array<uint32_t, 256> table = crc_table();
  uint32_t c = 0xFFFFFFFFu;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

EventFile::EventFile(std::string path, int64_t resumed_step) : path_(std::move(path)) {
  const bool resume = resumed_step >= 0 && std::filesystem::exists(path_);
  if (resume) {
    std::error_code ec;
    std::filesystem::resize_file(path_, kept_length(path_, resumed_step), ec);
    if (ec) throw std::runtime_error(fmt::format("{}: cannot cut the events after step {}: {}", path_, resumed_step,
                                                 ec.message()));
  }
  f_ = std::fopen(path_.c_str(), resume ? "ab" : "wb");
  if (!f_) throw std::runtime_error(fmt::format("{}: cannot write TensorBoard events: {}", path_, std::strerror(errno)));
  if (std::ftell(f_) == 0) {  // a new file starts with the file-version event
    std::string event;
    f64(event, 1, now_s());
    bytes(event, 3, "brain.Event:2");
    record(event);
    flush();
  }
}

EventFile::~EventFile() {
  if (f_) std::fclose(f_);
}

void EventFile::record(const std::string& event) {
  std::string r;
  little_endian(r, static_cast<uint64_t>(event.size()));
  little_endian(r, masked_crc(r.data(), 8));
  r += event;
  little_endian(r, masked_crc(event.data(), event.size()));
  std::fwrite(r.data(), 1, r.size(), f_);
}

void EventFile::scalar(const std::string& tag, int64_t step, double value) {
  std::string v;
  f32(v, 2, static_cast<float>(value));
  record(summary_event(step, tag, v));
}

void EventFile::histogram(const std::string& tag, int64_t step, const std::vector<double>& values) {
  if (values.empty()) return;
  const auto [lo, hi] = std::minmax_element(values.begin(), values.end());
  constexpr int kBuckets = 30;
  const double width = (*hi - *lo) / kBuckets;
  const int buckets = width > 0 ? kBuckets : 1;
  std::vector<double> counts(static_cast<size_t>(buckets), 0.0);
  double sum = 0, sum_sq = 0;
  for (double x : values) {
    const int b = width > 0 ? std::min(buckets - 1, static_cast<int>((x - *lo) / width)) : 0;
    counts[static_cast<size_t>(b)] += 1;
    sum += x, sum_sq += x * x;
  }
  std::string limits, packed_counts, h;
  for (int b = 0; b < buckets; ++b) little_endian(limits, b + 1 == buckets ? *hi : *lo + width * (b + 1));
  for (double c : counts) little_endian(packed_counts, c);
  f64(h, 1, *lo), f64(h, 2, *hi), f64(h, 3, static_cast<double>(values.size())), f64(h, 4, sum), f64(h, 5, sum_sq);
  bytes(h, 6, limits), bytes(h, 7, packed_counts);
  std::string v;
  bytes(v, 5, h);
  record(summary_event(step, tag, v));
}

void EventFile::flush() {
  errno = 0;
  if (std::fflush(f_) != 0 || std::ferror(f_))
    throw std::runtime_error(fmt::format("{}: cannot write TensorBoard events: {}", path_,
                                         errno ? std::strerror(errno) : "write failed"));
}

}  // namespace moetrain::trainer
