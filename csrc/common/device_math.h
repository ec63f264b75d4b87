// Elementwise optimizer math shared by the CPU and CUDA kernels, so both compute the same function.
#pragma once

#include <cmath>

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
  m = m + c.one_minus_beta1 * (g - m);
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  const T denom = square_root(v) / c.bias_correction2_sqrt + c.eps;
  p = p - c.step_size * m / denom;
}

}  // namespace optim
