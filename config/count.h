// Counts derived from config sizes (parameters, tokens, batch, activation elements): 64-bit integer arithmetic
// that remembers an overflow instead of wrapping, so formulas read as plain arithmetic and whoever needs the value
// learns once whether it fits. config::check_counts (loader.h) turns an overflow into an error naming the key.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace moetrain::config {

// Thrown by Count::value when a step of the computation overflowed; what() is the quantity ("the model's
// parameter count").
class CountOverflow : public std::overflow_error {
 public:
  using std::overflow_error::overflow_error;
};

class Count {
 public:
  constexpr Count(int64_t v = 0) : value_(v) {}  // NOLINT: implicit, so `3 * d * inter` reads as written

  friend constexpr Count operator+(Count a, Count b) {
    Count r;
    r.overflowed_ = a.overflowed_ || b.overflowed_ || __builtin_add_overflow(a.value_, b.value_, &r.value_);
    return r;
  }
  friend constexpr Count operator*(Count a, Count b) {
    Count r;
    r.overflowed_ = a.overflowed_ || b.overflowed_ || __builtin_mul_overflow(a.value_, b.value_, &r.value_);
    return r;
  }
  constexpr Count& operator+=(Count o) { return *this = *this + o; }
  constexpr Count& operator*=(Count o) { return *this = *this * o; }

  constexpr bool overflowed() const { return overflowed_; }
  // The value; throws CountOverflow(what) when a step overflowed 64 bits.
  int64_t value(std::string_view what) const {
    if (overflowed_) throw CountOverflow(std::string(what));
    return value_;
  }

 private:
  int64_t value_ = 0;
  bool overflowed_ = false;
};

}  // namespace moetrain::config
