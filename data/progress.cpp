#include "data/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>

namespace moetrain::data {
namespace {

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

}  // namespace

std::string human_bytes(double b) {
  if (b >= 1e9) return fmt::format("{:.1f} GB", b / 1e9);
  if (b >= 1e6) return fmt::format("{:.1f} MB", b / 1e6);
  if (b >= 1e3) return fmt::format("{:.1f} kB", b / 1e3);
  return fmt::format("{:.0f} B", b);
}

std::string human_count(double n) {
  if (n >= 1e9) return fmt::format("{:.2f} G", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f} M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.1f} k", n / 1e3);
  return fmt::format("{:.0f}", n);
}

Progress::Progress(std::string label, uint64_t total, Unit unit, bool large, bool allowed, std::FILE* out)
    : label_(std::move(label)), total_(total), unit_(unit), out_(out) {
  tty_ = ::isatty(::fileno(out_)) != 0;
  enabled_ = allowed && (tty_ || large);
  start_ = last_ = std::chrono::steady_clock::now();
}

void Progress::update(uint64_t done, uint64_t tokens) {
  done_ = done;
  tokens_ = tokens;
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_).count();
  if (since < (tty_ ? 0.2 : 10.0)) return;
  last_ = now;
  draw(false);
}

void Progress::finish() {
  if (enabled_ && shown_) draw(true);
}

void Progress::draw(bool final) {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = total_ > 0 ? std::min(1.0, static_cast<double>(done_) / static_cast<double>(total_)) : 1.0;
  const double rate = elapsed > 0 ? static_cast<double>(tokens_) / elapsed : 0.0;
  const double eta = frac > 0 ? elapsed * (1 - frac) / frac : NAN;
  const int width = 24, filled = static_cast<int>(frac * width);
  const auto amount = [&](uint64_t v) {
    return unit_ == Unit::bytes ? human_bytes(static_cast<double>(v)) : human_count(static_cast<double>(v));
  };
  std::string line = fmt::format("{} [{}{}] {:3.0f}% {}/{} | {} tokens | {} tokens/s | {} {}", label_,
                                 std::string(filled, '#'), std::string(width - filled, '.'), 100 * frac,
                                 amount(done_), amount(total_), human_count(static_cast<double>(tokens_)),
                                 human_count(rate), final ? "took" : "ETA", duration(final ? elapsed : eta));
  if (tty_) fmt::print(out_, "\r{}\033[K{}", line, final ? "\n" : "");
  else fmt::print(out_, "{}\n", line);
  std::fflush(out_);
  shown_ = true;
}

}  // namespace moetrain::data
