// Float math for CPU loops that the compiler can vectorize. std::exp is a libm call per element, which keeps a loop
// scalar; exp_nonpositive is branch-free arithmetic on one float, so `#pragma omp simd` loops over it vectorize.
#pragma once

#include <cstdint>
#include <cstring>

namespace optim {

// e^x for x ≤ 0 (softmax arguments z − max), relative error ≤ 2 ulp on [−87, 0]; below −87.3 (where e^x leaves the
// normal floats) and for −inf it returns exactly 0. NaN propagates. Range reduction x = n·ln2 + r, |r| ≤ ln2/2, with
// ln2 split in two so n·ln2 is exact; e^r by its degree-6 Taylor/minimax polynomial (Cephes' coefficients, a fact
// of the function, not code); 2^n assembled in the exponent bits.
#if defined(__GNUC__)
#pragma omp declare simd notinbranch
#endif
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kSmallest = -87.3f;
  const bool underflow = x < kSmallest;  // false for NaN: it flows through the arithmetic below
  const float clamped = underflow ? 0.0f : x;
  // Round to nearest by adding and subtracting 1.5·2²³ (exact for |t| < 2²²): floorf would be a libm call
  // without SSE4.1, which keeps the loop scalar in the baseline x86-64 build. Ties may go either way; either n
  // keeps |r| ≤ ln2/2.
  constexpr float kRoundMagic = 12582912.0f;
  const float n = (clamped * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? 0.0f : er * two_n;
}

}  // namespace optim
