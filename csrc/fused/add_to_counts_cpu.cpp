// CPU kernel of optim::add_to_counts_ (schema and reference: optim/fused/_ops.py): count += value for every element
// of every tensor, in one op call instead of torch._foreach_add_'s add_ per tensor on the CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "tensor_list_checks.h"

namespace optim {
namespace {

// The sum torch's add_ computes: in the tensor's dtype, the scalar converted to it first (counts are integers far
// below 2^24, exact in float32 either way).
template <typename scalar_t>
void add_to_block(scalar_t* data, int64_t n, double value) {
  const scalar_t addend = static_cast<scalar_t>(value);
  for (int64_t i = 0; i < n; ++i) data[i] = data[i] + addend;
}

void add_to_counts_cpu(at::TensorList counts, double value) {
  check_tensor_list("add_to_counts_", "counts", counts, /*floating=*/true);
  for (const at::Tensor& count : counts) {
    if (count.numel() == 0) continue;
    // a dense tensor of any strides is one block of numel elements from its data pointer
    const bool block = count.is_non_overlapping_and_dense();
    if (block && count.scalar_type() == at::kFloat) {
      add_to_block(count.mutable_data_ptr<float>(), count.numel(), value);
    } else if (block && count.scalar_type() == at::kDouble) {
      add_to_block(count.mutable_data_ptr<double>(), count.numel(), value);
    } else {
      at::Tensor(count).add_(value);  // half, bfloat16, or a view with gaps: torch's own add_
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("add_to_counts_", &add_to_counts_cpu); }

}  // namespace optim
