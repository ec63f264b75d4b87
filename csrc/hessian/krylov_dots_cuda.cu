// CUDA kernel of optim::krylov_dots: c[b, i] = Σ_j basis[b, i, j] · w[b, j] with float64 products and sums.
// Grid (B·m rows, column slices): each block strides over its slice of one row, accumulates in double, reduces
// across the block and writes one partial; the partials of a row are then summed by at::sum over a fixed slice
// count, so the result does not depend on scheduling (no atomics). One launch for all rows of all batches
// (every Krylov vector, every parameter tensor: the vectors are flat) instead of a product kernel and a sum
// kernel per row, and no float64 copy of basis.
#include "krylov_dots.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace optim {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSlices = 64;

template <typename scalar_t>
__device__ __forceinline__ double widen(scalar_t x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double widen<double>(double x) {
  return x;
}

template <typename scalar_t>
__global__ void krylov_dots_kernel(const scalar_t* __restrict__ basis, const scalar_t* __restrict__ w, double* partial,
                                   int64_t rows, int64_t n, int64_t basis_batch_stride, int64_t basis_row_stride,
                                   int64_t w_batch_stride, int64_t slices) {
  const int64_t row = blockIdx.x;  // b * rows + i
  const int64_t b = row / rows, i = row % rows;
  const scalar_t* v = basis + b * basis_batch_stride + i * basis_row_stride;
  const scalar_t* wb = w + b * w_batch_stride;
  double sum = 0.0;
  for (int64_t j = blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x; j < n;
       j += slices * static_cast<int64_t>(kThreads)) {
    sum += widen(v[j]) * widen(wb[j]);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) partial[row * slices + blockIdx.y] = sum;
  }
}

at::Tensor krylov_dots_cuda(const at::Tensor& basis_in, const at::Tensor& w_in) {
  check_krylov_dots_args(basis_in, w_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(basis_in.device());
  const at::Tensor basis = unit_stride_rows(basis_in);
  const at::Tensor w = unit_stride_rows(w_in);
  const int64_t batch = basis.size(0), rows = basis.size(1), n = basis.size(2);
  if (batch * rows == 0 || n == 0) return at::zeros({batch, rows}, basis.options().dtype(at::kDouble));
  // Enough blocks to fill the device for a handful of rows, never more slices than there are column tiles.
  const int64_t slices = std::min<int64_t>(kMaxSlices, (n + kThreads - 1) / kThreads);
  at::Tensor partial = at::empty({batch * rows, slices}, basis.options().dtype(at::kDouble));
  const dim3 grid(static_cast<unsigned>(batch * rows), static_cast<unsigned>(slices));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, basis.scalar_type(), "krylov_dots_cuda", [&] {
    krylov_dots_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        basis.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), partial.data_ptr<double>(), rows, n, basis.stride(0),
        basis.stride(1), w.stride(0), slices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum(1).view({batch, rows});
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CUDA, m) { m.impl("krylov_dots", &krylov_dots_cuda); }

}  // namespace optim
