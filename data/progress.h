// A progress bar on stderr for long data commands: done/total, tokens/s and ETA. On a terminal it redraws one
// line a few times a second; otherwise (a log file) it prints a line every 10 s, and only for large inputs, so
// short runs under tests or scripts stay quiet.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace moetrain::data {

class Progress {
 public:
  enum class Unit { bytes, tokens };
  // `large`: the work is big enough to report even when `out` is not a terminal; `allowed` false: never report.
  Progress(std::string label, uint64_t total, Unit unit, bool large, bool allowed = true, std::FILE* out = stderr);
  void update(uint64_t done, uint64_t tokens);  // cheap when nothing is due
  void finish();                                // the final line (when anything was shown)
  bool enabled() const { return enabled_; }

 private:
  void draw(bool final);

  std::string label_;
  uint64_t total_;
  Unit unit_;
  std::FILE* out_;
  bool tty_ = false, enabled_ = false, shown_ = false;
  uint64_t done_ = 0, tokens_ = 0;
  std::chrono::steady_clock::time_point start_, last_;
};

// "1.5 GB", "12.0 MB", "900 B"; "1.20 M", "3.4 k" for counts.
std::string human_bytes(double bytes);
std::string human_count(double n);

}  // namespace moetrain::data
