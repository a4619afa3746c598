#include "checkpoints/hdf5_file.h"

#include <ATen/ops/empty.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <hdf5.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <stdexcept>

namespace moetrain::checkpoints {
namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(fmt::format("{}: {}", path, what));
}

// HDF5 prints its own error stack by default; we report errors ourselves, once.
void quiet() {
  static bool done = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)done;
}

hid_t file_type(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return H5T_IEEE_F32LE;
    case at::kDouble: return H5T_IEEE_F64LE;
    case at::kLong: return H5T_STD_I64LE;
    case at::kInt: return H5T_STD_I32LE;
    case at::kBFloat16:
    case at::kHalf: return H5T_STD_U16LE;
    case at::kByte:
    case at::kBool:
    case at::kFloat8_e4m3fn: return H5T_STD_U8LE;
    default: break;
  }
  throw std::runtime_error(fmt::format("checkpoint: no HDF5 type for dtype {}", c10::toString(t)));
}

hid_t memory_type(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return H5T_NATIVE_FLOAT;
    case at::kDouble: return H5T_NATIVE_DOUBLE;
    case at::kLong: return H5T_NATIVE_INT64;
    case at::kInt: return H5T_NATIVE_INT32;
    case at::kBFloat16:
    case at::kHalf: return H5T_NATIVE_UINT16;
    default: return H5T_NATIVE_UINT8;
  }
}

struct Handle {  // closes an HDF5 object id with its close function
  hid_t id;
  herr_t (*close)(hid_t);
  ~Handle() {
    if (id >= 0) close(id);
  }
};

}  // namespace

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    default: break;
  }
  throw std::runtime_error(fmt::format("checkpoint: unsupported dtype {}", c10::toString(t)));
}

c10::ScalarType dtype_from_name(const std::string& name, const std::string& context) {
  for (auto t : {at::kFloat, at::kDouble, at::kLong, at::kInt, at::kBFloat16, at::kHalf, at::kByte, at::kBool,
                 at::kFloat8_e4m3fn})
    if (dtype_name(t) == name) return t;
  throw std::runtime_error(fmt::format("{}: unknown dtype '{}'", context, name));
}

H5File H5File::create(const std::string& path) {
  quiet();
  // The latest file format: compact and fast link storage for the thousands of datasets of a large model.
  Handle fapl{H5Pcreate(H5P_FILE_ACCESS), H5Pclose};
  H5Pset_libver_bounds(fapl.id, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST);
  // Metadata in 64 KiB blocks rather than 2 KiB ones: the datasets' bytes lie in long contiguous runs between them.
  H5Pset_meta_block_size(fapl.id, 64 << 10);
  errno = 0;
  hid_t id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.id);
  if (id < 0)
    fail(path, errno ? fmt::format("cannot create the HDF5 file: {}", std::strerror(errno)) : "cannot create the HDF5 file");
  return H5File(id, path);
}

H5File H5File::open(const std::string& path) {
  quiet();
  if (access(path.c_str(), R_OK) != 0) fail(path, fmt::format("cannot open checkpoint shard: {}", std::strerror(errno)));
  hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (id < 0) fail(path, "not a readable HDF5 file (truncated or corrupt shard)");
  return H5File(id, path);
}

H5File::H5File(H5File&& o) noexcept : id_(o.id_), path_(std::move(o.path_)) { o.id_ = -1; }

H5File& H5File::operator=(H5File&& o) noexcept {
  if (this != &o) {
    if (id_ >= 0) H5Fclose(static_cast<hid_t>(id_));
    id_ = o.id_;
    path_ = std::move(o.path_);
    o.id_ = -1;
  }
  return *this;
}

namespace {
// Closes an HDF5 file; returns 0 or the errno of the failure. A close that fails (a full disk: the metadata
// cannot be written) would leave the file half-closed in HDF5's tables, and HDF5's own teardown at exit (or
// MPI_Finalize) then crashes on it. So the metadata is flushed first, where a failure is safe: the file is then
// worthless, its bytes are freed, and the close has room for what HDF5 still writes.
int close_file(hid_t id, const std::string& path) {
  errno = 0;
  if (H5Fflush(id, H5F_SCOPE_LOCAL) < 0) {
    const int err = errno ? errno : EIO;
    if (::truncate(path.c_str(), 0) != 0) {
    }
    H5Fclose(id);
    return err;
  }
  errno = 0;
  return H5Fclose(id) >= 0 ? 0 : (errno ? errno : EIO);
}
}  // namespace

H5File::~H5File() {
  if (id_ >= 0) close_file(static_cast<hid_t>(id_), path_);
}

namespace {

// Creates dataset `name` of `shape` and `dtype` in `file` (intermediate groups created), tagged with its dtype where HDF5 has no
// such type. `early`: storage allocated now and never filled, so that the caller may write the bytes itself at
// H5Dget_offset. Returns the open dataset.
hid_t create_dataset(hid_t file, const std::string& path, const std::string& name, const std::vector<int64_t>& shape,
                     c10::ScalarType dtype, bool early) {
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  Handle space{dims.empty() ? H5Screate(H5S_SCALAR) : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
               H5Sclose};
  Handle lcpl{H5Pcreate(H5P_LINK_CREATE), H5Pclose};
  H5Pset_create_intermediate_group(lcpl.id, 1);
  Handle dcpl{H5Pcreate(H5P_DATASET_CREATE), H5Pclose};
  H5Pset_obj_track_times(dcpl.id, 0);  // no timestamps: identical content gives identical files
  if (early) {
    H5Pset_alloc_time(dcpl.id, H5D_ALLOC_TIME_EARLY);
    H5Pset_fill_time(dcpl.id, H5D_FILL_TIME_NEVER);
  }
  hid_t ds = H5Dcreate2(file, name.c_str(), file_type(dtype), space.id, lcpl.id, dcpl.id, H5P_DEFAULT);
  if (ds < 0) fail(path, fmt::format("cannot create dataset {}", name));
  // Types HDF5 has describe themselves; BF16, FP16, FP8 and bool are stored as raw integers and tagged.
  const bool tagged =
      dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat8_e4m3fn || dtype == at::kBool;
  if (!tagged) return ds;
  const std::string dt = dtype_name(dtype);
  Handle str{H5Tcopy(H5T_C_S1), H5Tclose};
  H5Tset_size(str.id, dt.size() + 1);  // with its terminating NUL
  Handle aspace{H5Screate(H5S_SCALAR), H5Sclose};
  Handle attr{H5Acreate2(ds, "dtype", str.id, aspace.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose};
  if (attr.id < 0 || H5Awrite(attr.id, str.id, dt.c_str()) < 0) {
    H5Dclose(ds);
    fail(path, fmt::format("cannot tag dataset {}", name));
  }
  return ds;
}

}  // namespace

void H5File::write(const std::string& name, const at::Tensor& t) {
  if (!t.device().is_cpu() || !t.is_contiguous()) fail(path_, fmt::format("{}: tensor must be contiguous on CPU", name));
  Handle ds{create_dataset(static_cast<hid_t>(id_), path_, name, t.sizes().vec(), t.scalar_type(), /*early=*/false),
            H5Dclose};
  if (t.numel() > 0 && H5Dwrite(ds.id, memory_type(t.scalar_type()), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) < 0)
    fail(path_, fmt::format("cannot write dataset {}", name));
}

namespace {

hid_t open_dataset(hid_t file, const std::string& path, const std::string& name) {
  hid_t ds = H5Dopen2(file, name.c_str(), H5P_DEFAULT);
  if (ds < 0) fail(path, fmt::format("dataset {} is missing or unreadable", name));
  return ds;
}

std::vector<int64_t> shape_of(hid_t ds, const std::string& path, const std::string& name) {
  Handle space{H5Dget_space(ds), H5Sclose};
  int rank = H5Sget_simple_extent_ndims(space.id);
  if (rank < 0) fail(path, fmt::format("dataset {}: unreadable shape", name));
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  H5Sget_simple_extent_dims(space.id, dims.data(), nullptr);
  return std::vector<int64_t>(dims.begin(), dims.end());
}

std::string dtype_of(hid_t ds, const std::string& path, const std::string& name) {
  if (H5Aexists(ds, "dtype") <= 0) {  // a self-describing HDF5 type
    Handle type{H5Dget_type(ds), H5Tclose};
    const size_t size = H5Tget_size(type.id);
    switch (H5Tget_class(type.id)) {
      case H5T_FLOAT: return size == 8 ? "float64" : "float32";
      case H5T_INTEGER:
        if (size == 8) return "int64";
        if (size == 4) return "int32";
        if (size == 1) return "uint8";
        break;
      default: break;
    }
    fail(path, fmt::format("dataset {}: unsupported HDF5 type", name));
  }
  Handle attr{H5Aopen(ds, "dtype", H5P_DEFAULT), H5Aclose};
  if (attr.id < 0) fail(path, fmt::format("dataset {}: unreadable dtype attribute", name));
  Handle type{H5Aget_type(attr.id), H5Tclose};
  std::string out(H5Tget_size(type.id), '\0');
  if (H5Aread(attr.id, type.id, out.data()) < 0) fail(path, fmt::format("dataset {}: unreadable dtype", name));
  return out.substr(0, out.find('\0'));
}

}  // namespace

std::vector<int64_t> H5File::shape(const std::string& name) const {
  Handle ds{open_dataset(static_cast<hid_t>(id_), path_, name), H5Dclose};
  return shape_of(ds.id, path_, name);
}

std::string H5File::dtype(const std::string& name) const {
  Handle ds{open_dataset(static_cast<hid_t>(id_), path_, name), H5Dclose};
  return dtype_of(ds.id, path_, name);
}

at::Tensor H5File::read(const std::string& name) const {
  Handle ds{open_dataset(static_cast<hid_t>(id_), path_, name), H5Dclose};  // opened once for all three
  const auto dt = dtype_from_name(dtype_of(ds.id, path_, name), path_ + ": " + name);
  at::Tensor t = at::empty(shape_of(ds.id, path_, name), at::TensorOptions().dtype(dt));
  if (t.numel() > 0 && H5Dread(ds.id, memory_type(dt), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) < 0)
    fail(path_, fmt::format("cannot read dataset {} (truncated or corrupt shard)", name));
  return t;
}

void H5File::close_durably() {
  if (id_ < 0) return;
  if (const int err = close_file(static_cast<hid_t>(id_), path_)) {  // closing flushes every buffer to the file
    id_ = -1;
    fail(path_, fmt::format("cannot flush the HDF5 file: {}", std::strerror(err)));
  }
  id_ = -1;
  fsync_path(path_);
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "CheckpointShardWriter writes native bytes into little-endian datasets");

uint64_t checksum_bytes(const void* data, size_t bytes) { return XXH64(data, bytes, 0); }

namespace {
constexpr int64_t kBatchBytes = 4 << 20;  // a batch: started once this much is queued, about this much at most
constexpr int64_t kFolioBytes = 2 << 20;  // the largest page-cache folio (x86-64): runs are cut at its multiples

// The part [from, to) of a run of buffers laid end to end from file offset `start`.
std::vector<iovec> slice(const std::vector<iovec>& run, int64_t start, int64_t from, int64_t to) {
  std::vector<iovec> out;
  int64_t at = start;
  for (const iovec& v : run) {
    const int64_t b = std::max(at, from), e = std::min(at + static_cast<int64_t>(v.iov_len), to);
    if (b < e) out.push_back({static_cast<char*>(v.iov_base) + (b - at), static_cast<size_t>(e - b)});
    at += static_cast<int64_t>(v.iov_len);
    if (at >= to) break;
  }
  return out;
}

// Writes every byte of `iov` at `offset` through `fd`, going on after short writes. Returns "" or what went wrong.
std::string write_all(int fd, std::vector<iovec> iov, int64_t offset) {
  size_t k = 0;
  while (k < iov.size() && iov[k].iov_len == 0) ++k;
  while (k < iov.size()) {
    const int count = static_cast<int>(std::min<size_t>(iov.size() - k, IOV_MAX));
    const ssize_t n = ::pwritev(fd, iov.data() + k, count, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? std::strerror(errno) : "no progress";
    offset += n;
    for (size_t left = static_cast<size_t>(n); left > 0;) {
      const size_t step = std::min(left, iov[k].iov_len);
      iov[k].iov_base = static_cast<char*>(iov[k].iov_base) + step;
      iov[k].iov_len -= step;
      left -= step;
      if (iov[k].iov_len == 0) ++k;
    }
    while (k < iov.size() && iov[k].iov_len == 0) ++k;
  }
  return "";
}
}

CheckpointShardWriter::CheckpointShardWriter(std::string path) : file_(H5File::create(path)) {
  fd_ = ::open(file_.path().c_str(), O_WRONLY | O_CLOEXEC);
  if (fd_ < 0) fail(file_.path(), fmt::format("cannot open for writing: {}", std::strerror(errno)));
  thread_ = std::thread([this] { run(); });
  try {
    kicker_ = std::thread([this] { kick(); });
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closing_ = true;
    }
    cv_.notify_all();
    thread_.join();
    ::close(fd_);
    throw;
  }
}

// Starts the writeback of each written range. sync_file_range(SYNC_FILE_RANGE_WRITE) blocks while the disk's queue
// is full: on a thread of its own it never holds up the copying. Advisory: an error surfaces at the final fsync.
void CheckpointShardWriter::kick() {
  for (;;) {
    std::pair<int64_t, int64_t> range;
    {
      std::unique_lock<std::mutex> lock(kick_mu_);
      kick_cv_.wait(lock, [this] { return kick_stop_ || !kick_queue_.empty(); });
      if (kick_stop_) return;  // what is left, the fsync writes
      range = kick_queue_.front();
      kick_queue_.pop_front();
    }
    ::sync_file_range(fd_, range.first, range.second, SYNC_FILE_RANGE_WRITE);
  }
}

void CheckpointShardWriter::stop_kicker() {
  {
    std::lock_guard<std::mutex> lock(kick_mu_);
    kick_stop_ = true;
  }
  kick_cv_.notify_all();
  if (kicker_.joinable()) kicker_.join();
}

CheckpointShardWriter::~CheckpointShardWriter() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
    queue_.clear();  // abandoned: nothing more is written
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  stop_kicker();
  if (fd_ >= 0) {
    // An abandoned shard (a failed write, e.g. a full disk): its bytes are worthless, and freeing them lets HDF5
    // write its metadata and close the file. A file HDF5 failed to close would stay in its tables and crash the
    // library's own teardown at exit (or MPI_Finalize) after the error was reported.
    if (::ftruncate(fd_, 0) != 0) {
    }
    ::close(fd_);
  }
  for (auto& [index, state] : states_) XXH64_freeState(static_cast<XXH64_state_t*>(state));
}

void CheckpointShardWriter::add(const std::string& name, const at::Tensor& t) { add_rows(name, {t}, t.sizes().vec()); }

void CheckpointShardWriter::add_stacked(const std::string& name, const std::vector<at::Tensor>& rows) {
  if (rows.empty()) fail(file_.path(), fmt::format("dataset {}: no rows to stack", name));
  std::vector<int64_t> shape = rows[0].sizes().vec();
  shape.insert(shape.begin(), static_cast<int64_t>(rows.size()));
  for (const auto& r : rows)
    if (r.sizes() != rows[0].sizes() || r.scalar_type() != rows[0].scalar_type())
      fail(file_.path(), fmt::format("dataset {}: rows of different shapes or dtypes", name));
  add_rows(name, rows, shape);
}

void CheckpointShardWriter::add_rows(const std::string& name, const std::vector<at::Tensor>& rows,
                           const std::vector<int64_t>& shape) {
  for (const auto& r : rows)
    if (!r.device().is_cpu() || !r.is_contiguous())
      fail(file_.path(), fmt::format("{}: tensor must be contiguous on CPU", name));
  Handle ds{create_dataset(static_cast<hid_t>(file_.id_), file_.path(), name, shape, rows[0].scalar_type(),
                           /*early=*/true),
            H5Dclose};
  const size_t index = sums_.size();
  sums_.push_back(checksum_bytes(nullptr, 0));  // an empty dataset's; the writer checksums the others
  int64_t bytes = 0;
  for (const auto& r : rows) bytes += static_cast<int64_t>(r.nbytes());
  if (bytes == 0) return;
  const haddr_t offset = H5Dget_offset(ds.id);
  if (offset == HADDR_UNDEF) fail(file_.path(), fmt::format("dataset {}: no storage allocated", name));
  {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t at = static_cast<int64_t>(offset);
    for (const auto& r : rows) {
      queue_.push_back({at, r, index});
      at += static_cast<int64_t>(r.nbytes());
    }
    queued_bytes_ += bytes;
    if (queued_bytes_ < kBatchBytes) return;
  }
  cv_.notify_one();
}

void CheckpointShardWriter::run() {
  for (;;) {
    std::vector<Piece> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return closing_ || queued_bytes_ >= kBatchBytes; });
      if (queue_.empty() && closing_) {
        lock.unlock();
        try {
          write_batch(batch, /*last=*/true);  // what the batches before held back
        } catch (const std::exception& e) {
          if (error_.empty()) error_ = fmt::format("{}: writing failed: {}", file_.path(), e.what());
        }
        return;
      }
      // At most about kBatchBytes at a time, so that the disk writes one batch back while the next is copied.
      int64_t taken = 0;
      while (!queue_.empty() && taken < kBatchBytes) {
        taken += static_cast<int64_t>(queue_.front().tensor.nbytes());
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      queued_bytes_ -= taken;
    }
    try {
      write_batch(batch, /*last=*/false);
    } catch (const std::exception& e) {  // an exception must not leave the thread: finish() reports it
      if (error_.empty()) error_ = fmt::format("{}: writing failed: {}", file_.path(), e.what());
    }
  }
}

// Checksums the pieces (a stacked dataset's rows in order, so its checksum is that of its bytes) and writes each run
// of adjacent ones with vectored writes. The last run is written up to a 2 MiB boundary of the file and the rest held
// back for the next batch: each 2 MiB of the file is then written by one call, which lets the kernel put it in one
// large page-cache folio, as it does for a plain sequential write. (Written in pieces, the same bytes took small
// pages that were at times 20× slower to fill on the VM this was measured on.)
void CheckpointShardWriter::write_batch(std::vector<Piece>& batch, bool last) {
  std::stable_sort(batch.begin(), batch.end(), [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
  for (const Piece& p : batch) {
    void*& state = states_[p.index];
    if (!state) {
      state = XXH64_createState();
      if (!state) throw std::bad_alloc();
      XXH64_reset(static_cast<XXH64_state_t*>(state), 0);
    }
    XXH64_update(static_cast<XXH64_state_t*>(state), p.tensor.data_ptr(), p.tensor.nbytes());
  }
  if (!error_.empty()) return;
  using Run = Carry;  // a run of adjacent bytes: file offsets, buffers, the tensors they are in
  std::vector<Run> runs;
  if (!carry_.iov.empty()) runs.push_back(std::move(carry_));
  carry_ = {};
  for (const Piece& p : batch) {
    if (runs.empty() || runs.back().end != p.offset) runs.push_back(Run{p.offset, p.offset, {}, {}});
    runs.back().iov.push_back({p.tensor.data_ptr(), p.tensor.nbytes()});
    runs.back().keep.push_back(p.tensor);
    runs.back().end += static_cast<int64_t>(p.tensor.nbytes());
  }
  for (size_t i = 0; i < runs.size(); ++i) {
    Run& r = runs[i];
    int64_t cut = r.end;
    if (!last && i + 1 == runs.size()) {
      cut = r.end / kFolioBytes * kFolioBytes;
      if (cut <= r.start) cut = r.start;
      carry_ = Run{cut, r.end, slice(r.iov, r.start, cut, r.end), r.keep};
    }
    if (cut > r.start) write_run(cut == r.end ? r.iov : slice(r.iov, r.start, r.start, cut), r.start, cut);
    if (!error_.empty()) return;
  }
}

// Writes one run of the file through the page cache, then hands its whole pages to the writeback starter.
void CheckpointShardWriter::write_run(const std::vector<iovec>& run, int64_t start, int64_t end) {
  const std::string e = write_all(fd_, run, start);
  if (!e.empty()) {
    if (error_.empty()) error_ = fmt::format("{}: write failed: {}", file_.path(), e);
    return;
  }
  // Only the whole pages inside the run: a page it shares with HDF5's metadata, once under writeback, would make
  // the metadata writes at close wait for the disk (measured: 11-17 ms at close for a 40 MiB shard, 1 ms without).
  const int64_t page = 4096, first = (start + page - 1) / page * page, last = end / page * page;
  if (last > first) {
    {
      std::lock_guard<std::mutex> lock(kick_mu_);
      kick_queue_.emplace_back(first, last - first);
    }
    kick_cv_.notify_one();
  }
}

std::vector<uint64_t> CheckpointShardWriter::finish() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
  }
  cv_.notify_all();
  thread_.join();
  stop_kicker();
  if (!error_.empty()) throw std::runtime_error(error_);
  for (const auto& [index, state] : states_) sums_[index] = XXH64_digest(static_cast<XXH64_state_t*>(state));
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) fail(file_.path(), fmt::format("close failed: {}", std::strerror(errno)));
  file_.close_durably();
  return sums_;
}

void start_hdf5_without_teardown() {
  H5dont_atexit();
  H5open();
}

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, fmt::format("cannot open for fsync: {}", std::strerror(errno)));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) fail(path, fmt::format("fsync failed: {}", std::strerror(err)));
}

}  // namespace moetrain::checkpoints
