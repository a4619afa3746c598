// Facts about the HDF5 library checkpoints are written with (for `moetrain version`).
#pragma once

#include <string>

namespace moetrain::checkpoints {

std::string hdf5_version();  // "1.10.8 (parallel)" — the library loaded at run time
bool hdf5_parallel();        // built with MPI-IO support

}  // namespace moetrain::checkpoints
