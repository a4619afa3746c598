// One HDF5 file of checkpoint tensors through the HDF5 C API. Datasets hold a tensor's raw elements; BF16 and FP8
// (which HDF5 1.10 has no type for) are stored as uint16 / uint8 with a `dtype` attribute naming the real type.
// Every failure throws std::runtime_error naming the file and the dataset.
#pragma once

#include <ATen/core/Tensor.h>

#include <sys/uio.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace moetrain::checkpoints {

// "float32", "bfloat16", ... and back.
std::string dtype_name(c10::ScalarType t);
c10::ScalarType dtype_from_name(const std::string& name, const std::string& context);

class H5File {
 public:
  static H5File create(const std::string& path);  // truncates
  static H5File open(const std::string& path);    // read-only
  H5File(H5File&& other) noexcept;
  H5File& operator=(H5File&& other) noexcept;
  H5File(const H5File&) = delete;
  ~H5File();

  // Writes a contiguous CPU tensor as dataset `name` (intermediate groups created).
  void write(const std::string& name, const at::Tensor& t);
  std::vector<int64_t> shape(const std::string& name) const;
  std::string dtype(const std::string& name) const;  // the `dtype` attribute, or the HDF5 type's name
  at::Tensor read(const std::string& name) const;
  // Flushes and closes; then fsyncs the file so that it is durable.
  void close_durably();
  const std::string& path() const { return path_; }

 private:
  friend class CheckpointShardWriter;
  H5File(int64_t id, std::string path) : id_(id), path_(std::move(path)) {}
  int64_t id_ = -1;
  std::string path_;
};

// A new HDF5 file of many tensors, written at the disk's speed. HDF5 itself writes one small request per dataset,
// which costs more than the bytes for the thousands of small tensors of a model. Here HDF5 only creates the datasets
// (contiguous, storage allocated at creation, never filled) while a second thread writes every tensor's bytes to its
// dataset's file offset in vectored writes of about 4 MiB (cut at 2 MiB boundaries of the file, so that the kernel
// can use large page-cache folios), checksumming them on the way, and a third starts the kernel's writeback of each
// batch written, so that the disk works while the next batch is copied and the final fsync has little left to wait
// for. The result is an ordinary HDF5 file.
class CheckpointShardWriter {
 public:
  explicit CheckpointShardWriter(std::string path);
  ~CheckpointShardWriter();  // an unfinished writer stops its thread; the file is left incomplete
  CheckpointShardWriter(const CheckpointShardWriter&) = delete;
  CheckpointShardWriter& operator=(const CheckpointShardWriter&) = delete;

  // Adds `t` (contiguous, on the CPU; the writer holds a reference until it is written) as dataset `name`.
  void add(const std::string& name, const at::Tensor& t);
  // Adds `rows` (of one shape and dtype) stacked along a new first dimension as dataset `name`, without copying.
  void add_stacked(const std::string& name, const std::vector<at::Tensor>& rows);
  // Waits for every byte, closes the file and fsyncs it. Returns the tensors' checksums (checksum_bytes), in the
  // order they were added. Throws naming the file (and the dataset, where one failed).
  std::vector<uint64_t> finish();

 private:
  struct Piece {
    int64_t offset;
    at::Tensor tensor;
    size_t index;
  };
  void add_rows(const std::string& name, const std::vector<at::Tensor>& rows, const std::vector<int64_t>& shape);
  void run();
  void write_batch(std::vector<Piece>& batch, bool last);
  void write_run(const std::vector<struct iovec>& run, int64_t start, int64_t end);
  void kick();
  void stop_kicker();
  H5File file_;
  int fd_ = -1;
  std::vector<uint64_t> sums_;                           // the adding thread's
  std::map<size_t, void*> states_;                       // the writer's: each dataset's XXH64 state
  struct Carry {  // the writer's: the end of the last batch's last run, written with the next batch
    int64_t start = 0, end = 0;
    std::vector<struct iovec> iov;
    std::vector<at::Tensor> keep;
  } carry_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Piece> queue_;
  int64_t queued_bytes_ = 0;
  bool closing_ = false;
  std::string error_;
  std::thread thread_;
  // The writeback starter: ranges written, handed to sync_file_range on a thread of its own.
  std::mutex kick_mu_;
  std::condition_variable kick_cv_;
  std::deque<std::pair<int64_t, int64_t>> kick_queue_;
  bool kick_stop_ = false;
  std::thread kicker_;
};

// The checksum stored for every dataset (XXH64, seed 0, of the raw bytes).
uint64_t checksum_bytes(const void* data, size_t bytes);

// fsync a file or directory by path.
void fsync_path(const std::string& path);

// Called first thing in main(), before MPI_Init: HDF5 starts without its teardown at exit (and, being started
// before MPI, without its teardown hooked to MPI_Finalize). Every file is closed explicitly; the teardown would
// only revisit a file whose close failed (a full disk), and HDF5 1.10 crashes there after the error was reported.
void start_hdf5_without_teardown();

}  // namespace moetrain::checkpoints
