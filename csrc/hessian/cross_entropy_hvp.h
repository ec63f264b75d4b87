// Shared parts of the optim::cross_entropy_hvp kernels (schema, math and reference: optim/hessian/_ops.py).
#pragma once

#include "../common/checks.h"

#include <cmath>

namespace optim {

inline void check_cross_entropy_hvp_args(const at::Tensor& logits, const at::Tensor& tangent, double scale,
                                         const c10::optional<at::Tensor>& target, c10::DeviceType device_type) {
  constexpr const char* op = "cross_entropy_hvp";
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) > 0, op,
                    ": logits must have a non-empty class dimension, got shape ", shape_name(logits.sizes()));
  TORCH_CHECK_VALUE(tangent.sizes() == logits.sizes(), op, ": tangent has shape ", shape_name(tangent.sizes()),
                    " but logits has shape ", shape_name(logits.sizes()), "; they must match");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": logits must be floating point, got ", dtype_name(dtype));
  TORCH_CHECK_VALUE(tangent.scalar_type() == dtype && tangent.device() == logits.device(), op, ": tangent is ",
              dtype_name(tangent.scalar_type()), " on ", tangent.device(), " but logits is ", dtype_name(dtype),
              " on ", logits.device());
  TORCH_CHECK(logits.device().type() == device_type, op, ": logits are on ", logits.device(),
              " but this kernel runs on ", device_type);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (target.has_value()) {
    const auto expected = logits.sizes().slice(0, logits.dim() - 1);
    TORCH_CHECK_VALUE(target->sizes() == expected, op, ": target has shape ", shape_name(target->sizes()),
                      " but logits of shape ", shape_name(logits.sizes()), " need ", shape_name(expected),
                      " (one class index per row)");
    TORCH_CHECK_VALUE(target->scalar_type() == at::kLong && target->device() == logits.device(), op,
                      ": target must be int64 class indices on ", logits.device(), ", got ",
                      dtype_name(target->scalar_type()), " on ", target->device());
  }
}

// check_cross_entropy_targets in optim/hessian/_ops.py, same message: every target that is not ignore_index is a
// class index in [0, classes), as F.cross_entropy requires. ATen ops on the target's device and one host read of
// the result (a synchronization on CUDA), against the op's rows x classes.
inline void check_cross_entropy_targets(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
  if (target.numel() == 0) return;
  const at::Tensor bad = target.lt(0).logical_or_(target.ge(classes)).logical_and_(target.ne(ignore_index));
  if (!bad.any().item<bool>()) return;
  TORCH_CHECK_VALUE(false, "cross_entropy_hvp: target holds class index ", target.masked_select(bad)[0].item<int64_t>(),
                    ", outside [0, ", classes, ") for logits with ", classes, " classes; give every row a class ",
                    "index in range, or ignore_index=", ignore_index, " for a row without a loss");
}

// Whether row `row` is ignored: its target (if any) equals ignore_index, so its output row is zero.
C10_HOST_DEVICE inline bool cross_entropy_row_ignored(const int64_t* target, int64_t row, int64_t ignore_index) {
  return target != nullptr && target[row] == ignore_index;
}

}  // namespace optim
