// `moetrain version`: this build and the libraries it runs with.
#pragma once

#include <string>

namespace moetrain::cli {

std::string version_report();

}  // namespace moetrain::cli
