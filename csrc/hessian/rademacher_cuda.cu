// CUDA kernel of optim::rademacher_ (schema, generator and reference: optim/hessian/_ops.py).
// One multi-tensor launch per batch of tensors; every element's value depends only on (seed, global index), so the
// thread layout does not change the result.
#include "rademacher.h"
#include "../common/device_math.h"
#include "../common/multi_tensor_apply.cuh"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace optim {
namespace {

template <typename scalar_t>
struct RademacherFunctor {
  template <typename Metadata>
  __device__ __forceinline__ void operator()(const Metadata& metadata, int tensor, int64_t start, int64_t count,
                                             uint64_t mixed_seed, uint64_t offset) const {
    scalar_t* out = static_cast<scalar_t*>(metadata.addresses[0][tensor]) + start;
    const uint64_t first = offset + static_cast<uint64_t>(metadata.first_index[tensor] + start);
    for (int64_t j = threadIdx.x; j < count; j += blockDim.x) out[j] = rademacher_value<scalar_t>(mixed_seed, first + j);
  }
};

void rademacher_cuda(at::TensorList out, int64_t seed, int64_t offset) {
  check_rademacher_args(out, offset, c10::DeviceType::CUDA);
  if (out.empty()) return;
  const c10::cuda::CUDAGuard guard(out[0].device());
  ElementwiseOperands operands = elementwise_operands({out}, {true}, /*row_major=*/true);
  const uint64_t mixed_seed = mix64(static_cast<uint64_t>(seed));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out[0].scalar_type(), "rademacher_cuda", [&] {
    mta::multi_tensor_apply<1>(operands.work, {}, RademacherFunctor<scalar_t>{}, mixed_seed,
                               static_cast<uint64_t>(offset));
  });
  operands.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CUDA, m) { m.impl("rademacher_", &rademacher_cuda); }

}  // namespace optim
