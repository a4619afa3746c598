// What the benchmarks time with: seconds since a steady-clock instant, and the median of repeated timings.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace moetrain::bench {

using Clock = std::chrono::steady_clock;

inline double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The upper median (v[n/2] of the sorted values).
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace moetrain::bench
