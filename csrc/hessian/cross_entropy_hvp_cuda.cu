// CUDA kernel of optim::cross_entropy_hvp: one block per row (grid-stride over rows). Pass 1 reads z and u once,
// keeping per thread an online softmax state (running max m, Σ exp(z − m), Σ exp(z − m)·u) that is merged across
// the block; pass 2 reads them again and writes scale · p ⊙ (u − ⟨p, u⟩). Math in float32 (float64 for double).
#include "cross_entropy_hvp.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace optim {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct SoftmaxState {
  T max;
  T normalizer;  // Σ exp(z − max)
  T weighted;    // Σ exp(z − max) · u
};

template <typename T>
__device__ __forceinline__ T exponential(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return ::exp(x);
  } else {
    return ::expf(x);
  }
}

// Merge two partial states; an empty state has max = −inf and must not produce exp(−inf − (−inf)) = NaN.
template <typename T>
__device__ __forceinline__ SoftmaxState<T> merge(SoftmaxState<T> a, SoftmaxState<T> b) {
  const T max = a.max > b.max ? a.max : b.max;
  if (max == -std::numeric_limits<T>::infinity()) return a;
  const T scale_a = exponential(a.max - max);
  const T scale_b = exponential(b.max - max);
  return {max, a.normalizer * scale_a + b.normalizer * scale_b, a.weighted * scale_a + b.weighted * scale_b};
}

template <typename T>
__device__ __forceinline__ SoftmaxState<T> warp_merge(SoftmaxState<T> state) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    SoftmaxState<T> other{__shfl_xor_sync(0xffffffffu, state.max, offset),
                          __shfl_xor_sync(0xffffffffu, state.normalizer, offset),
                          __shfl_xor_sync(0xffffffffu, state.weighted, offset)};
    state = merge(state, other);
  }
  return state;
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_hvp_kernel(const scalar_t* __restrict__ logits,
                                                                    const scalar_t* __restrict__ tangent,
                                                                    scalar_t* __restrict__ out, int64_t rows,
                                                                    int64_t classes, T scale) {
  __shared__ SoftmaxState<T> warp_states[kWarps];
  __shared__ SoftmaxState<T> row_state;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* z = logits + row * classes;
    const scalar_t* u = tangent + row * classes;
    SoftmaxState<T> state{-std::numeric_limits<T>::infinity(), T(0), T(0)};
    for (int64_t j = threadIdx.x; j < classes; j += kThreads) {
      const T zj = static_cast<T>(z[j]);
      const T uj = static_cast<T>(u[j]);
      if (zj > state.max) {
        const T rescale = exponential(state.max - zj);  // 0 while the state is empty
        state = {zj, state.normalizer * rescale + T(1), state.weighted * rescale + uj};
      } else if (zj != -std::numeric_limits<T>::infinity()) {  // a masked class adds nothing (and no NaN)
        const T e = exponential(zj - state.max);
        state.normalizer += e;
        state.weighted += e * uj;
      }
    }
    state = warp_merge(state);
    if (lane == 0) warp_states[warp] = state;
    __syncthreads();
    if (warp == 0) {
      state = lane < kWarps ? warp_states[lane] : SoftmaxState<T>{-std::numeric_limits<T>::infinity(), T(0), T(0)};
      state = warp_merge(state);
      if (lane == 0) row_state = state;
    }
    __syncthreads();
    const T max = row_state.max;
    const T factor = scale / row_state.normalizer;
    const T mean_tangent = row_state.weighted / row_state.normalizer;  // ⟨p, u⟩
    scalar_t* y = out + row * classes;
    for (int64_t j = threadIdx.x; j < classes; j += kThreads) {
      y[j] = static_cast<scalar_t>(factor * exponential(static_cast<T>(z[j]) - max) *
                                   (static_cast<T>(u[j]) - mean_tangent));
    }
    __syncthreads();  // row_state and warp_states are rewritten for the next row
  }
}

at::Tensor cross_entropy_hvp_cuda(const at::Tensor& logits, const at::Tensor& tangent, double scale) {
  check_cross_entropy_hvp_args(logits, tangent, scale, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const at::Tensor u = tangent.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t classes = logits.size(-1);
  const int64_t rows = logits.numel() / classes;
  if (rows == 0) return out;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const unsigned blocks = static_cast<unsigned>(rows < max_blocks ? rows : max_blocks);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_hvp_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cross_entropy_hvp_kernel<scalar_t, T><<<blocks, kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, classes,
        static_cast<T>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CUDA, m) { m.impl("cross_entropy_hvp", &cross_entropy_hvp_cuda); }

}  // namespace optim
