// The argument checks of the small list ops (optim::all_finite, optim::add_to_counts_): check_tensor_list in
// optim/fused/_ops.py, the same order and messages.
#pragma once

#include <ATen/ATen.h>

namespace optim {

inline void check_tensor_list(const char* op, const char* name, at::TensorList tensors, bool floating) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].layout() == at::kStrided, op, ": ", name, "[", i, "] is not strided; dense tensors are ",
                "required");
    TORCH_CHECK(!floating || at::isFloatingType(tensors[i].scalar_type()), op, ": ", name, "[", i, "] is not ",
                "floating point; floating-point tensors are required");
    TORCH_CHECK(tensors[i].device() == tensors[0].device(), op, ": every tensor of ", name, " must be on one device; ",
                name, "[0] is on ", tensors[0].device(), " and ", name, "[", i, "] on ", tensors[i].device());
  }
}

}  // namespace optim
