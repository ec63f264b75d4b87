// Shared parts of the optim::cross_entropy_hvp kernels (schema, math and reference: optim/hessian/_ops.py).
#pragma once

#include "../common/checks.h"

#include <cmath>

namespace optim {

inline void check_cross_entropy_hvp_args(const at::Tensor& logits, const at::Tensor& tangent, double scale,
                                         c10::DeviceType device_type) {
  constexpr const char* op = "cross_entropy_hvp";
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) > 0, op,
                    ": logits must have a non-empty class dimension, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(tangent.sizes() == logits.sizes(), op, ": tangent has shape ", tangent.sizes(),
                    " but logits has shape ", logits.sizes(), "; they must match");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": logits must be floating point, got ", dtype_name(dtype));
  TORCH_CHECK(tangent.scalar_type() == dtype && tangent.device() == logits.device(), op, ": tangent is ",
              dtype_name(tangent.scalar_type()), " on ", tangent.device(), " but logits is ", dtype_name(dtype),
              " on ", logits.device());
  TORCH_CHECK(logits.device().type() == device_type, op, ": logits are on ", logits.device(),
              " but this kernel runs on ", device_type);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

}  // namespace optim
