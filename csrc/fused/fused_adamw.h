// Argument checks of optim::fused_adamw_, shared by its CPU and CUDA kernels (same rules as
// check_adamw_tensors / check_adamw_hyperparameters in optim/fused/_ops.py).
#pragma once

#include "../common/checks.h"
#include "../common/device_math.h"

#include <ATen/core/List.h>

#include <cmath>
#include <optional>
#include <vector>

namespace optim {

// The optional per-tensor reset flags of the op ("treat m, v and the step as zero before this step") as a vector
// of params.size() bools, all false when reset is None.
inline std::vector<bool> adamw_reset_flags(const std::optional<c10::List<bool>>& reset, size_t count) {
  std::vector<bool> flags(count, false);
  if (!reset.has_value()) return flags;
  TORCH_CHECK_VALUE(reset->size() == count, "fused_adamw_: reset has ", reset->size(), " flags but params has ",
                    count, "; pass one flag per parameter (or reset=None)");
  for (size_t i = 0; i < count; ++i) flags[i] = reset->get(i);
  return flags;
}

inline at::ScalarType adamw_moment_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_fused_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList state_steps,
                                   const AdamWHyperparameters& h, c10::DeviceType device_type) {
  constexpr const char* op = "fused_adamw_";
  const std::pair<const char*, double> nonnegative[] = {{"lr", h.lr}, {"eps", h.eps}, {"weight_decay", h.weight_decay}};
  for (const auto& [name, value] : nonnegative) {
    TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, op, ": ", name, " must be a finite number >= 0, got ",
                      value);
  }
  const std::pair<const char*, double> betas[] = {{"beta1", h.beta1}, {"beta2", h.beta2}};
  for (const auto& [name, value] : betas) {
    TORCH_CHECK_VALUE(value >= 0.0 && value < 1.0, op, ": ", name, " must be in [0, 1), got ", value);
  }
  const size_t n = params.size();
  check_list_length(op, "grads", grads, "params", n);
  check_list_length(op, "exp_avgs", exp_avgs, "params", n);
  check_list_length(op, "exp_avg_sqs", exp_avg_sqs, "params", n);
  check_list_length(op, "state_steps", state_steps, "params", n);
  if (n == 0) return;
  const at::Tensor& first = params[0];
  const auto dtype = first.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": params must be float64, float32, bfloat16 or float16, got ", dtype_name(dtype));
  TORCH_CHECK(first.device().type() == device_type, op, ": params[0] is on ", first.device(),
              " but this kernel runs on ", device_type);
  const auto moment_dtype = adamw_moment_dtype(dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.device() == first.device() && p.scalar_type() == dtype, op, ": params[", i, "] is ",
                dtype_name(p.scalar_type()), " on ", p.device(), " but params[0] is ", dtype_name(dtype), " on ",
                first.device(),
                "; one call takes tensors of one device and dtype (optim.AdamW groups them for you)");
    check_tensor_like(op, "grads", i, grads[i], p, dtype);
    check_tensor_like(op, "exp_avgs", i, exp_avgs[i], p, moment_dtype);
    check_tensor_like(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, moment_dtype);
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK_VALUE(step.numel() == 1 && step.scalar_type() == at::kFloat && step.device() == p.device(), op,
                ": state_steps[", i, "] must be a float32 tensor with one element on ", p.device(), ", got ",
                dtype_name(step.scalar_type()), " with ", step.numel(), " elements on ", step.device());
  }
  std::vector<OverlapOperand> operands;
  add_overlap_operands(operands, "params", params, true);
  add_overlap_operands(operands, "grads", grads, false);
  add_overlap_operands(operands, "exp_avgs", exp_avgs, true);
  add_overlap_operands(operands, "exp_avg_sqs", exp_avg_sqs, true);
  add_overlap_operands(operands, "state_steps", state_steps, true);
  check_no_overlap(op, operands);
}

// check_step_counts in optim/fused/_ops.py: a count that is not reset must be >= 0 (not negative, not NaN). Read
// only where the counts live on the CPU: reading them on a GPU would synchronize every step (the reference skips
// them there too).
inline void check_adamw_step_counts(at::TensorList state_steps, const std::vector<bool>& reset) {
  for (size_t i = 0; i < state_steps.size(); ++i) {
    if (reset[i] || !state_steps[i].is_cpu()) continue;
    TORCH_CHECK_VALUE(*state_steps[i].const_data_ptr<float>() >= 0.0f, "fused_adamw_: state_steps[", i,
                      "] is negative or NaN; a step count is the number of steps taken so far and must be >= 0 ",
                      "(pass reset with a True flag to start it again from 0)");
  }
}

}  // namespace optim
