// Elementwise math and argument checks of optim::fused_sophia_ and optim::fused_adahessian_, shared by their CPU
// and CUDA kernels (schemas, references and the math: the second-order block of optim/hessian/_ops.py).
#pragma once

#include "../common/checks.h"
#include "../common/device_math.h"

#include <cmath>
#include <initializer_list>
#include <utility>

namespace optim {

struct SophiaHyperparameters {
  double lr;
  double beta1;
  double beta2;
  double rho;
  double weight_decay;
  double eps;
  bool maximize;
};

struct AdaHessianHyperparameters {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  double hessian_power;
  int64_t step;
  int64_t hessian_step;
  bool maximize;
};

// Constants of one call in the arithmetic type T; the products of hyperparameters are formed in double first.
template <typename T>
struct SophiaCoefficients {
  T sign;  // -1 when maximizing: applies to the gradient and to the curvature estimate
  T beta1;
  T one_minus_beta1;
  T beta2;
  T signed_one_minus_beta2;  // sign * (1 - beta2)
  T decay_factor;            // 1 - lr * weight_decay
  T rho;
  T eps;
  T lr;
};

template <typename T>
inline SophiaCoefficients<T> sophia_coefficients(const SophiaHyperparameters& h) {
  const double sign = h.maximize ? -1.0 : 1.0;
  return {static_cast<T>(sign),
          static_cast<T>(h.beta1),
          static_cast<T>(1.0 - h.beta1),
          static_cast<T>(h.beta2),
          static_cast<T>(sign * (1.0 - h.beta2)),
          static_cast<T>(1.0 - h.lr * h.weight_decay),
          static_cast<T>(h.rho),
          static_cast<T>(h.eps),
          static_cast<T>(h.lr)};
}

// Momentum, optional curvature EMA (u is the new diagonal estimate), decay, clipped preconditioned step.
// The comparisons are written so that a NaN passes through (as torch.clamp does) instead of being replaced.
template <bool kRefresh, typename T>
OPTIM_HOST_DEVICE void sophia_update(T& p, T g, T& m, T& h, T u, const SophiaCoefficients<T>& c) {
  g = c.sign * g;
  m = m * c.beta1 + c.one_minus_beta1 * g;
  if constexpr (kRefresh) h = h * c.beta2 + c.signed_one_minus_beta2 * u;
  p = p * c.decay_factor;
  T denom = c.rho * h;
  denom = denom < c.eps ? c.eps : denom;
  T ratio = m / denom;
  ratio = ratio > T(1) ? T(1) : (ratio < T(-1) ? T(-1) : ratio);
  p = p - c.lr * ratio;
}

template <typename T>
struct AdaHessianCoefficients {
  T sign;
  T beta1;
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
  T decay_factor;           // 1 - lr * weight_decay
  T step_size;              // lr / (1 - beta1^step)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^hessian_step)
  T hessian_power;
  bool unit_power;  // hessian_power == 1: skip pow
  T eps;
};

template <typename T>
inline AdaHessianCoefficients<T> adahessian_coefficients(const AdaHessianHyperparameters& h) {
  AdaHessianCoefficients<T> c;
  c.sign = h.maximize ? T(-1) : T(1);
  c.beta1 = static_cast<T>(h.beta1);
  c.one_minus_beta1 = static_cast<T>(1.0 - h.beta1);
  c.beta2 = static_cast<T>(h.beta2);
  c.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
  c.decay_factor = static_cast<T>(1.0 - h.lr * h.weight_decay);
  c.step_size = static_cast<T>(h.lr / (1.0 - std::pow(h.beta1, static_cast<double>(h.step))));
  c.bias_correction2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(h.hessian_step))));
  c.hessian_power = static_cast<T>(h.hessian_power);
  c.unit_power = h.hessian_power == 1.0;
  c.eps = static_cast<T>(h.eps);
  return c;
}

OPTIM_HOST_DEVICE float power(float x, float y) { return ::powf(x, y); }
OPTIM_HOST_DEVICE double power(double x, double y) { return ::pow(x, y); }

template <bool kRefresh, typename T>
OPTIM_HOST_DEVICE void adahessian_update(T& p, T g, T& m, T& v, T d, const AdaHessianCoefficients<T>& c) {
  g = c.sign * g;
  m = m * c.beta1 + c.one_minus_beta1 * g;
  if constexpr (kRefresh) v = v * c.beta2 + c.one_minus_beta2 * d * d;
  p = p * c.decay_factor;
  T scaled = square_root(v) / c.bias_correction2_sqrt;
  if (!c.unit_power) scaled = power(scaled, c.hessian_power);
  p = p - c.step_size * m / (scaled + c.eps);
}

// Where a Sophia refresh step's probe z comes from: none (Hz is the estimate itself), a tensor read by the kernel, or
// regenerated in the kernel from its (seed, counter) as optim::rademacher_ draws it.
enum class ProbeSource { kNone, kTensor, kCounter };

inline ProbeSource probe_source(at::TensorList probes, at::IntArrayRef probe_seeds) {
  return !probes.empty() ? ProbeSource::kTensor : !probe_seeds.empty() ? ProbeSource::kCounter : ProbeSource::kNone;
}

// ------------------------------------------------------------------------------------------------------ checks

inline at::ScalarType second_order_state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_range(const char* op, const char* name, double value, double low, bool strict) {
  TORCH_CHECK_VALUE(std::isfinite(value) && (strict ? value > low : value >= low), op, ": ", name,
                    " must be a finite number ", strict ? "> " : ">= ", low, ", got ", value);
}

inline void check_beta(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(value >= 0.0 && value < 1.0, op, ": ", name, " must be in [0, 1), got ", value);
}

// The same rules as check_second_order_tensors in optim/hessian/_ops.py. states: written lists (state dtype);
// curvature: read-only lists, empty or one per param in the param's or the state dtype (one dtype per list).
inline void check_second_order_tensors(const char* op, at::TensorList params, at::TensorList grads,
                                       std::initializer_list<std::pair<const char*, at::TensorList>> states,
                                       std::initializer_list<std::pair<const char*, at::TensorList>> curvature,
                                       c10::DeviceType device_type) {
  const size_t n = params.size();
  check_list_length(op, "grads", grads, "params", n);
  for (const auto& [name, list] : states) check_list_length(op, name, list, "params", n);
  for (const auto& [name, list] : curvature) {
    TORCH_CHECK_VALUE(list.empty() || list.size() == n, op, ": ", name, " has ", list.size(),
                      " tensors but params has ", n,
                      "; pass one per parameter, or an empty list on steps without a curvature update");
  }
  if (n == 0) return;
  const at::Tensor& first = params[0];
  const auto dtype = first.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": params must be float64, float32, bfloat16 or float16, got ", dtype_name(dtype));
  TORCH_CHECK(first.device().type() == device_type, op, ": params[0] is on ", first.device(),
              " but this kernel runs on ", device_type);
  const auto state_dtype = second_order_state_dtype(dtype);
  for (const auto& [name, list] : curvature) {
    if (list.empty()) continue;
    const auto curvature_dtype = list[0].scalar_type();
    TORCH_CHECK_VALUE(curvature_dtype == dtype || curvature_dtype == state_dtype, op, ": ", name, "[0] is ",
                dtype_name(curvature_dtype), "; for ", dtype_name(dtype), " params it must be ", dtype_name(dtype),
                dtype == state_dtype ? "" : " or ", dtype == state_dtype ? "" : dtype_name(state_dtype));
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.device() == first.device() && p.scalar_type() == dtype, op, ": params[", i, "] is ",
                dtype_name(p.scalar_type()), " on ", p.device(), " but params[0] is ", dtype_name(dtype), " on ",
                first.device(), "; one call takes tensors of one device and dtype (the optimizers group them for you)");
    check_tensor_like(op, "grads", i, grads[i], p, dtype);
    for (const auto& [name, list] : states) check_tensor_like(op, name, i, list[i], p, state_dtype);
    for (const auto& [name, list] : curvature) {
      if (!list.empty()) check_tensor_like(op, name, i, list[i], p, list[0].scalar_type());
    }
  }
}

inline void check_fused_sophia_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                    at::TensorList hessians, at::TensorList hessian_products, at::TensorList probes,
                                    at::IntArrayRef probe_seeds, at::IntArrayRef probe_offsets,
                                    const SophiaHyperparameters& h, c10::DeviceType device_type) {
  constexpr const char* op = "fused_sophia_";
  check_range(op, "lr", h.lr, 0.0, false);
  check_beta(op, "beta1", h.beta1);
  check_beta(op, "beta2", h.beta2);
  check_range(op, "rho", h.rho, 0.0, false);
  check_range(op, "weight_decay", h.weight_decay, 0.0, false);
  check_range(op, "eps", h.eps, 0.0, true);
  check_second_order_tensors(op, params, grads, {{"exp_avgs", exp_avgs}, {"hessians", hessians}},
                             {{"hessian_products", hessian_products}, {"probes", probes}}, device_type);
  TORCH_CHECK_VALUE(probes.empty() || !hessian_products.empty(), op,
                    ": probes were given without hessian_products; the probes multiply the Hessian-vector products, "
                    "pass both or neither");
  if (!probes.empty()) {
    TORCH_CHECK_VALUE(probes[0].scalar_type() == hessian_products[0].scalar_type(), op, ": probes are ",
                dtype_name(probes[0].scalar_type()), " but hessian_products are ",
                dtype_name(hessian_products[0].scalar_type()), "; they must match");
  }
  TORCH_CHECK_VALUE(probe_seeds.size() == probe_offsets.size() &&
                        (probe_seeds.empty() || probe_seeds.size() == params.size()),
                    op, ": probe_seeds has ", probe_seeds.size(), " entries and probe_offsets ", probe_offsets.size(),
                    " but params has ", params.size(), "; give one seed and one offset per parameter, or neither");
  TORCH_CHECK_VALUE(probe_seeds.empty() || !hessian_products.empty(), op,
                    ": probe_seeds were given without hessian_products; the probes multiply the Hessian-vector "
                    "products, pass both or neither");
  TORCH_CHECK_VALUE(probe_seeds.empty() || probes.empty(), op,
                    ": both probes and probe_seeds were given; pass the probe tensors or the (seed, offset) pairs "
                    "that regenerate them, not both");
  for (size_t i = 0; i < probe_offsets.size(); ++i) {
    TORCH_CHECK_VALUE(probe_offsets[i] >= 0, op, ": probe_offsets[", i, "] must be >= 0, got ", probe_offsets[i]);
  }
  std::vector<OverlapOperand> operands;
  add_overlap_operands(operands, "params", params, true);
  add_overlap_operands(operands, "grads", grads, false);
  add_overlap_operands(operands, "exp_avgs", exp_avgs, true);
  add_overlap_operands(operands, "hessians", hessians, true);
  add_overlap_operands(operands, "hessian_products", hessian_products, false);
  add_overlap_operands(operands, "probes", probes, false);
  check_no_overlap(op, operands);
}

inline void check_fused_adahessian_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                        at::TensorList exp_hessian_diag_sqs, at::TensorList hessian_diagonals,
                                        const AdaHessianHyperparameters& h, c10::DeviceType device_type) {
  constexpr const char* op = "fused_adahessian_";
  check_range(op, "lr", h.lr, 0.0, false);
  check_beta(op, "beta1", h.beta1);
  check_beta(op, "beta2", h.beta2);
  check_range(op, "weight_decay", h.weight_decay, 0.0, false);
  check_range(op, "eps", h.eps, 0.0, true);  // the update divides by (sqrt(v)/bc2)^k + eps, 0 where v = 0
  TORCH_CHECK_VALUE(h.hessian_power >= 0.0 && h.hessian_power <= 1.0, op, ": hessian_power must be in [0, 1], got ",
                    h.hessian_power);
  TORCH_CHECK_VALUE(h.step >= 1 && h.hessian_step >= 1, op,
                    ": step and hessian_step are the counts after this step's increment and must be >= 1, got step=",
                    h.step, ", hessian_step=", h.hessian_step);
  TORCH_CHECK_VALUE(h.hessian_step <= h.step, op, ": hessian_step=", h.hessian_step, " exceeds step=", h.step,
                    "; the curvature is refreshed at most once per step, so the refreshes so far cannot outnumber ",
                    "the steps");
  check_second_order_tensors(op, params, grads, {{"exp_avgs", exp_avgs}, {"exp_hessian_diag_sqs", exp_hessian_diag_sqs}},
                             {{"hessian_diagonals", hessian_diagonals}}, device_type);
  std::vector<OverlapOperand> operands;
  add_overlap_operands(operands, "params", params, true);
  add_overlap_operands(operands, "grads", grads, false);
  add_overlap_operands(operands, "exp_avgs", exp_avgs, true);
  add_overlap_operands(operands, "exp_hessian_diag_sqs", exp_hessian_diag_sqs, true);
  add_overlap_operands(operands, "hessian_diagonals", hessian_diagonals, false);
  check_no_overlap(op, operands);
}

}  // namespace optim
