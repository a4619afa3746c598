// One HDF5 file of checkpoint tensors through the HDF5 C API. Datasets hold a tensor's raw elements; BF16 and FP8
// (which HDF5 1.10 has no type for) are stored as uint16 / uint8 with a `dtype` attribute naming the real type.
// Every failure throws std::runtime_error naming the file and the dataset.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
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
  bool has(const std::string& name) const;
  std::vector<int64_t> shape(const std::string& name) const;
  std::string dtype(const std::string& name) const;  // the `dtype` attribute, or the HDF5 type's name
  at::Tensor read(const std::string& name) const;
  // Every dataset's path ("/model/embed.weight"), depth first.
  std::vector<std::string> datasets() const;
  // Flushes and closes; then fsyncs the file so that it is durable.
  void close_durably();
  const std::string& path() const { return path_; }

 private:
  H5File(int64_t id, std::string path) : id_(id), path_(std::move(path)) {}
  int64_t id_ = -1;
  std::string path_;
};

// fsync a file or directory by path.
void fsync_path(const std::string& path);

}  // namespace moetrain::checkpoints
