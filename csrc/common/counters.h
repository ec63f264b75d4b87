// The range check of a counter-based draw (same rule and message as check_counter_range in optim/_counter_hash.py).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace optim {

// Counters offset .. offset + count − 1 are int64 (offset >= 0 is checked by the caller): a draw past 2⁶³ would
// wrap here and overflow in the reference, so both refuse it.
inline void check_counter_range(const char* op, int64_t offset, int64_t count) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(count <= 0 || count - 1 <= kMax - offset, op, ": offset ", offset,
                    " leaves no room below 2**63 for the ", count, " counters of out; use an offset of at most ",
                    kMax - count + 1);
}

}  // namespace optim
