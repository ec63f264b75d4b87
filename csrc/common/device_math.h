// Elementwise optimizer math shared by the CPU and CUDA kernels, so both compute the same function.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define OPTIM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OPTIM_HOST_DEVICE inline
#endif

namespace optim {

// Hyperparameters of one AdamW call, as passed to the op (Python floats are doubles).
struct AdamWHyperparameters {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  bool maximize;
};

// Per-tensor constants of one AdamW step in the arithmetic type T. The bias corrections are computed in double from
// the step count, as torch.optim.AdamW does in Python, and only then rounded to T.
template <typename T>
struct AdamWCoefficients {
  T grad_sign;
  T decay_factor;  // 1 - lr * weight_decay
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
  T step_size;  // lr / (1 - beta1^t)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  T eps;
};

template <typename T>
OPTIM_HOST_DEVICE AdamWCoefficients<T> adamw_coefficients(const AdamWHyperparameters& h, double step) {
  AdamWCoefficients<T> c;
  c.grad_sign = h.maximize ? T(-1) : T(1);
  c.decay_factor = static_cast<T>(1.0 - h.lr * h.weight_decay);
  c.one_minus_beta1 = static_cast<T>(1.0 - h.beta1);
  c.beta2 = static_cast<T>(h.beta2);
  c.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
  c.step_size = static_cast<T>(h.lr / (1.0 - ::pow(h.beta1, step)));
  c.bias_correction2_sqrt = static_cast<T>(::sqrt(1.0 - ::pow(h.beta2, step)));
  c.eps = static_cast<T>(h.eps);
  return c;
}

OPTIM_HOST_DEVICE float square_root(float x) { return ::sqrtf(x); }
OPTIM_HOST_DEVICE double square_root(double x) { return ::sqrt(x); }

// One element of the AdamW step; p, m, v are updated in place. The order of operations follows
// torch.optim.AdamW's single-tensor path (lerp for m, addcmul for v, addcdiv for p).
template <typename T>
OPTIM_HOST_DEVICE void adamw_update(T& p, T g, T& m, T& v, const AdamWCoefficients<T>& c) {
  g = c.grad_sign * g;
  p = p * c.decay_factor;
  // torch.lerp's two forms: from m for weights below 1/2, from g above, so that beta1 = 0 gives m = g exactly
  // (m + 1·(g − m) cancels: m ≫ g in float32 lost g's low bits, 1e-4 relative at |g| = 1e-5, |m| = 0.05).
  m = (c.one_minus_beta1 < T(0.5)) ? m + c.one_minus_beta1 * (g - m) : g - (g - m) * (T(1) - c.one_minus_beta1);
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  const T denom = square_root(v) / c.bias_correction2_sqrt + c.eps;
  p = p - c.step_size * m / denom;
}

}  // namespace optim

namespace optim {

// Counter-based random numbers: the value for (seed, counter) is a pure function of the two, so any device, thread
// layout or rank produces the same stream. It is SplitMix64 (Steele, Lea, Flood 2014) with state
// mix64(seed) + (counter + 1) * golden: consecutive counters are consecutive SplitMix64 outputs.
constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;

OPTIM_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

OPTIM_HOST_DEVICE uint64_t counter_hash(uint64_t mixed_seed, uint64_t counter) {
  return mix64(mixed_seed + (counter + 1) * kGoldenGamma);
}

// A Rademacher value (±1, each with probability 1/2) from the top bit of the hash. mixed_seed is mix64(seed).
template <typename T>
OPTIM_HOST_DEVICE T rademacher_value(uint64_t mixed_seed, uint64_t counter) {
  // Branch-free: the sign bit is a coin flip, so a branch would be mispredicted half the time.
  return T(1 - 2 * static_cast<int>(counter_hash(mixed_seed, counter) >> 63));
}

}  // namespace optim
