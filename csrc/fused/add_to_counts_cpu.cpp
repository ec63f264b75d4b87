// CPU kernel of optim::add_to_counts_ (schema and reference: optim/fused/_ops.py): count += value for every element
// of every tensor, in one op call instead of torch._foreach_add_'s add_ per tensor on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "tensor_list_checks.h"

namespace optim {
namespace {

// The sum torch's add_ computes: in the tensor's dtype, the scalar converted to it first (exact: the checks keep
// count + value within the whole numbers the dtype holds exactly).
template <typename scalar_t>
void add_to_block(scalar_t* data, int64_t n, double value) {
  const scalar_t addend = static_cast<scalar_t>(value);
  for (int64_t i = 0; i < n; ++i) data[i] = data[i] + addend;
}

// check_add_to_counts_args, check_no_overlap and check_count_range of optim/fused/_ops.py, in that order and with
// the same messages; the counts are read straight from memory (one element each).
void check_add_to_counts(at::TensorList counts, double value) {
  constexpr const char* op = "add_to_counts_";
  check_tensor_list(op, "counts", counts, /*floating=*/true);
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, op,
                    ": value must be a finite number >= 0 (a count only grows), got ", value);
  for (size_t i = 0; i < counts.size(); ++i) {
    TORCH_CHECK_VALUE(counts[i].numel() == 1, op, ": counts[", i, "] has ", counts[i].numel(),
                      " elements; every count must be a tensor with one element");
  }
  std::vector<OverlapOperand> operands;
  add_overlap_operands(operands, "counts", counts, /*written=*/true);
  check_no_overlap(op, operands);
  for (size_t i = 0; i < counts.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, counts[i].scalar_type(), op, [&] {
      constexpr int bits = std::numeric_limits<scalar_t>::digits;  // whole numbers up to 2^bits are exact
      const double count = static_cast<double>(*counts[i].const_data_ptr<scalar_t>());
      TORCH_CHECK_VALUE(!(count + value > std::ldexp(1.0, bits)), op, ": counts[", i, "] would pass 2**", bits,
                        " with this increment; ", dtype_name(counts[i].scalar_type()),
                        " holds whole numbers exactly only up to 2**", bits, ", so the count would no longer be ",
                        "exact: keep counts that large in a wider dtype (torch.float64 is exact up to 2**53)");
    });
  }
}

void add_to_counts_cpu(at::TensorList counts, double value) {
  check_add_to_counts(counts, value);
  for (const at::Tensor& count : counts) {
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
