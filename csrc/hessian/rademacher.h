// Argument checks of optim::rademacher_, shared by its CPU and CUDA kernels (same rules as check_rademacher_args
// in optim/hessian/_ops.py).
#pragma once

#include "../common/checks.h"
#include "../common/counters.h"

namespace optim {

inline void check_rademacher_args(at::TensorList out, int64_t offset, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(offset >= 0, "rademacher_: offset must be >= 0, got ", offset);
  if (out.empty()) return;
  int64_t count = 0;
  for (const at::Tensor& tensor : out) count += tensor.numel();
  check_counter_range("rademacher_", offset, count);
  const at::Tensor& first = out[0];
  TORCH_CHECK_VALUE(at::isFloatingType(first.scalar_type()), "rademacher_: out tensors must be floating point, got ",
                    dtype_name(first.scalar_type()));
  TORCH_CHECK(first.device().type() == device_type, "rademacher_: out[0] is on ", first.device(),
              " but this kernel runs on ", device_type);
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK_VALUE(out[i].device() == first.device() && out[i].scalar_type() == first.scalar_type(), "rademacher_: out[",
                i, "] is ", dtype_name(out[i].scalar_type()), " on ", out[i].device(), " but out[0] is ",
                dtype_name(first.scalar_type()), " on ", first.device(),
                "; one call fills tensors of one device and dtype");
  }
  std::vector<OverlapOperand> operands;
  add_overlap_operands(operands, "out", out, true);
  check_no_overlap("rademacher_", operands);
}

}  // namespace optim
