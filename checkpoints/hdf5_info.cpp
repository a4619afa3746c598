#include "checkpoints/hdf5_info.h"

#include <fmt/format.h>
#include <hdf5.h>

namespace moetrain::checkpoints {

bool hdf5_parallel() {
#ifdef H5_HAVE_PARALLEL
  return true;
#else
  return false;
#endif
}

std::string hdf5_version() {
  unsigned major = 0, minor = 0, release = 0;
  H5get_libversion(&major, &minor, &release);
  return fmt::format("{}.{}.{}{}", major, minor, release, hdf5_parallel() ? " (parallel)" : " (serial)");
}

}  // namespace moetrain::checkpoints
