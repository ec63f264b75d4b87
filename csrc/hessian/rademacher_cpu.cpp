// CPU kernel of optim::rademacher_ (schema, generator and reference: optim/hessian/_ops.py).
#include "rademacher.h"
#include "../common/device_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace optim {
namespace {

constexpr int64_t kGrain = 32768;

void rademacher_cpu(at::TensorList out, int64_t seed, int64_t offset) {
  check_rademacher_args(out, offset, c10::DeviceType::CPU);
  if (out.empty()) return;
  // Counters follow the row-major (logical) order, so a non-contiguous tensor is filled through a contiguous copy.
  ElementwiseOperands operands = elementwise_operands({out}, {true}, /*row_major=*/true);
  const uint64_t mixed_seed = mix64(static_cast<uint64_t>(seed));
  uint64_t first = static_cast<uint64_t>(offset);
  for (const at::Tensor& tensor : operands.work[0]) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensor.scalar_type(), "rademacher_cpu", [&] {
      scalar_t* data = tensor.data_ptr<scalar_t>();
      at::parallel_for(0, tensor.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) data[j] = rademacher_value<scalar_t>(mixed_seed, first + j);
      });
    });
    first += static_cast<uint64_t>(tensor.numel());
  }
  operands.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("rademacher_", &rademacher_cpu); }

}  // namespace optim
