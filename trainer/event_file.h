// TensorBoard event files: TFRecord framing (a little-endian uint64 length, the masked CRC32C of those 8 bytes, the
// record, the masked CRC32C of the record) of `Event` protocol buffers. Debian packages neither TensorBoard's message
// definitions (tensorflow/core/util/event.proto, framework/summary.proto) nor a CRC32C library, so the few fields
// TensorBoard reads are encoded here by hand (tests/cli/tensorboard_test.sh reads them back with the tensorboard
// package): Event{wall_time = 1, step = 2, file_version = 3, summary = 5}, Summary{value = 1},
// Summary.Value{tag = 1, simple_value = 2, histo = 5}, HistogramProto{min, max, num, sum, sum_squares,
// bucket_limit (packed), bucket (packed)} = 1 .. 7.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace moetrain::trainer {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `n` bytes; crc32c("123456789") = 0xE3069283.
uint32_t crc32c(const void* data, size_t n);

class EventFile {
 public:
  // `path` is written from scratch (resumed_step < 0) or, for a run resumed after step `resumed_step`, kept up to its
  // last whole record of a step ≤ resumed_step (what the interrupted run wrote after its checkpoint, or a torn last
  // record, is cut off) and appended to. Throws naming the file when it cannot be opened.
  EventFile(std::string path, int64_t resumed_step);
  ~EventFile();
  EventFile(const EventFile&) = delete;
  EventFile& operator=(const EventFile&) = delete;

  void scalar(const std::string& tag, int64_t step, double value);
  // A histogram of `values` (e.g. the tokens of each expert): 30 equal buckets over [min, max].
  void histogram(const std::string& tag, int64_t step, const std::vector<double>& values);
  void flush();  // throws when what was written did not reach the file (a full disk)
  const std::string& path() const { return path_; }

 private:
  void record(const std::string& event);

  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace moetrain::trainer
