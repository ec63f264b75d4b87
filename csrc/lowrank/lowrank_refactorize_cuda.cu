// CUDA kernel of optim::lowrank_refactorize_ (schema, math and reference: optim/lowrank/_ops.py). ATen computes the
// batched QRs, the small SVDs and the two batched products (lowrank_refactorize.h; cuSOLVER and cuBLAS); this file's
// single launch scales the columns of Q_B U and the rows of Vᵀ Q_Aᵀ by sign·√σ, rounds once to the factors' dtype
// and stores into every B[l] and A[l] through their own strides, instead of L stacked copy-backs and scalings.
#include "lowrank_refactorize.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace optim {
namespace {

constexpr int kThreads = 256;
// Per layer, in the device table: B's address and strides, then A's.
constexpr int kTableWidth = 6;

template <typename T>
__device__ __forceinline__ T signed_root(T sigma, T largest) {
  return (largest < T(0) ? T(-1) : T(1)) * sqrt(sigma);
}

template <typename out_t, typename T>
__global__ void __launch_bounds__(kThreads)
    store_balanced_factors_kernel(const T* __restrict__ left, const T* __restrict__ right,
                                  const T* __restrict__ sigma, const T* __restrict__ largest,
                                  const int64_t* __restrict__ table, int64_t layers, int64_t m, int64_t r,
                                  int64_t n) {
  const int64_t b_total = layers * m * r;
  const int64_t total = b_total + layers * r * n;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (index < b_total) {
      const int64_t l = index / (m * r);
      const int64_t within = index - l * m * r;
      const int64_t i = within / r, k = within - i * r;
      const int64_t* entry = table + l * kTableWidth;
      out_t* out = reinterpret_cast<out_t*>(entry[0]);
      out[i * entry[1] + k * entry[2]] = static_cast<out_t>(left[index] * signed_root(sigma[l * r + k],
                                                                                      largest[l * r + k]));
    } else {
      const int64_t a_index = index - b_total;
      const int64_t l = a_index / (r * n);
      const int64_t within = a_index - l * r * n;
      const int64_t k = within / n, j = within - k * n;
      const int64_t* entry = table + l * kTableWidth;
      out_t* out = reinterpret_cast<out_t*>(entry[3]);
      out[k * entry[4] + j * entry[5]] = static_cast<out_t>(signed_root(sigma[l * r + k], largest[l * r + k]) *
                                                            right[a_index]);
    }
  }
}

void lowrank_refactorize_cuda(at::TensorList B, at::TensorList A) {
  check_lowrank_refactorize_args(B, A, c10::DeviceType::CUDA);
  if (B.empty()) return;
  const c10::cuda::CUDAGuard guard(B[0].device());
  const BalancedFactorParts parts = balanced_factor_parts(B, A);
  const int64_t layers = static_cast<int64_t>(B.size());
  const int64_t m = B[0].size(0), r = B[0].size(1), n = A[0].size(1);
  at::Tensor host_table = at::empty({layers * kTableWidth}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* entries = host_table.data_ptr<int64_t>();
  for (int64_t l = 0; l < layers; ++l) {
    entries[l * kTableWidth + 0] = reinterpret_cast<int64_t>(B[l].data_ptr());
    entries[l * kTableWidth + 1] = B[l].stride(0);
    entries[l * kTableWidth + 2] = B[l].stride(1);
    entries[l * kTableWidth + 3] = reinterpret_cast<int64_t>(A[l].data_ptr());
    entries[l * kTableWidth + 4] = A[l].stride(0);
    entries[l * kTableWidth + 5] = A[l].stride(1);
  }
  // A stream-ordered copy from pinned memory: the caching host allocator keeps host_table alive until it is done.
  const at::Tensor table = host_table.to(B[0].device(), /*non_blocking=*/true);
  const int64_t total = layers * (m * r + r * n);
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads,
                                           at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, B[0].scalar_type(), "lowrank_refactorize_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    store_balanced_factors_kernel<scalar_t, T><<<blocks, kThreads, 0, stream>>>(
        parts.left.data_ptr<T>(), parts.right.data_ptr<T>(), parts.sigma.data_ptr<T>(), parts.largest.data_ptr<T>(),
        table.data_ptr<int64_t>(), layers, m, r, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CUDA, m) { m.impl("lowrank_refactorize_", &lowrank_refactorize_cuda); }

}  // namespace optim
