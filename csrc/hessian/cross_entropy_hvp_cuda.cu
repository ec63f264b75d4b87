// CUDA kernel of optim::cross_entropy_hvp: one block per row (grid-stride over rows). Pass 1 reads z and u once,
// keeping per thread an online softmax state (running max m, Σ exp(z − m), Σ exp(z − m)·u) that is merged across
// the block; pass 2 reads them again and writes scale · p ⊙ (u − ⟨p, u⟩). The state is double for every dtype (as
// the CPU kernel's sums); the per-element exponentials and pass 2 run in float32 (float64 for double). A row whose
// target is ignore_index is only zeroed.
#include "cross_entropy_hvp.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

namespace optim {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// --- math (per element and per row; no memory access) -------------------------------------------------------

template <typename T>
__device__ __forceinline__ T exponential(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return ::exp(x);
  } else {
    return ::expf(x);
  }
}

// The online softmax state of (part of) a row, in double for every input dtype, as the CPU kernel's sums: float
// sums over a 50k vocabulary lose ~1e-5 of ⟨p, u⟩, and every output entry carries that error. max is exact in
// double (it is one of the logits, or −inf for an empty state).
struct SoftmaxState {
  double max;
  double normalizer;  // Σ exp(z − max)
  double weighted;    // Σ exp(z − max) · u
};

__device__ __forceinline__ SoftmaxState empty_state() {
  return {-std::numeric_limits<double>::infinity(), 0.0, 0.0};
}

// Adds one class (z, u) to a state. T is the arithmetic type of the elements (float for float, bfloat16 and half;
// double for double): exp(z − max) is computed in T as in the CPU kernel, and summed in double. Rescaling the sums
// to a new maximum is rare (a few times per thread and row), so it runs in double.
template <typename T>
__device__ __forceinline__ void absorb(SoftmaxState& state, T z, T u) {
  if (static_cast<double>(z) > state.max) {
    const double rescale = ::exp(state.max - static_cast<double>(z));  // 0 while the state is empty
    state = {static_cast<double>(z), state.normalizer * rescale + 1.0,
             state.weighted * rescale + static_cast<double>(u)};
  } else if (z != -std::numeric_limits<T>::infinity()) {  // a masked class adds nothing (and no NaN)
    const T e = exponential(z - static_cast<T>(state.max));  // state.max is a T value: the cast is exact
    state.normalizer += static_cast<double>(e);
    state.weighted += static_cast<double>(e) * static_cast<double>(u);
  }
}

// Merges two partial states; an empty state has max = −inf and must not produce exp(−inf − (−inf)) = NaN.
__device__ __forceinline__ SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  const double max = a.max > b.max ? a.max : b.max;
  if (max == -std::numeric_limits<double>::infinity()) return a;
  const double scale_a = ::exp(a.max - max);
  const double scale_b = ::exp(b.max - max);
  return {max, a.normalizer * scale_a + b.normalizer * scale_b, a.weighted * scale_a + b.weighted * scale_b};
}

// What the second pass needs of a row, rounded once to T (as the CPU kernel rounds them to float).
template <typename T>
struct RowFactors {
  T max;
  T factor;        // scale / Σ exp(z − max)
  T mean_tangent;  // ⟨p, u⟩
};

template <typename T>
__device__ __forceinline__ RowFactors<T> row_factors(const SoftmaxState& state, double scale) {
  return {static_cast<T>(state.max), static_cast<T>(scale / state.normalizer),
          static_cast<T>(state.weighted / state.normalizer)};
}

template <typename T>
__device__ __forceinline__ T hvp_entry(const RowFactors<T>& row, T z, T u) {
  return row.factor * exponential(z - row.max) * (u - row.mean_tangent);
}

// --- data movement ----------------------------------------------------------------------------------------------

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState state) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const SoftmaxState other{__shfl_xor_sync(0xffffffffu, state.max, offset),
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
                                                                    int64_t classes, double scale,
                                                                    const int64_t* __restrict__ target,
                                                                    int64_t ignore_index) {
  __shared__ SoftmaxState warp_states[kWarps];
  __shared__ SoftmaxState row_state;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* z = logits + row * classes;
    const scalar_t* u = tangent + row * classes;
    if (cross_entropy_row_ignored(target, row, ignore_index)) {  // the whole block takes this branch together
      scalar_t* y = out + row * classes;
      for (int64_t j = threadIdx.x; j < classes; j += kThreads) y[j] = static_cast<scalar_t>(0);
      continue;
    }
    SoftmaxState state = empty_state();
    for (int64_t j = threadIdx.x; j < classes; j += kThreads) {
      absorb(state, static_cast<T>(z[j]), static_cast<T>(u[j]));
    }
    state = warp_merge(state);
    if (lane == 0) warp_states[warp] = state;
    __syncthreads();
    if (warp == 0) {
      state = lane < kWarps ? warp_states[lane] : empty_state();
      state = warp_merge(state);
      if (lane == 0) row_state = state;
    }
    __syncthreads();
    const RowFactors<T> factors = row_factors<T>(row_state, scale);
    scalar_t* y = out + row * classes;
    for (int64_t j = threadIdx.x; j < classes; j += kThreads) {
      y[j] = static_cast<scalar_t>(hvp_entry(factors, static_cast<T>(z[j]), static_cast<T>(u[j])));
    }
    __syncthreads();  // row_state and warp_states are rewritten for the next row
  }
}

at::Tensor cross_entropy_hvp_cuda(const at::Tensor& logits, const at::Tensor& tangent, double scale,
                                  const c10::optional<at::Tensor>& target, int64_t ignore_index) {
  check_cross_entropy_hvp_args(logits, tangent, scale, target, c10::DeviceType::CUDA);
  if (target.has_value()) check_cross_entropy_targets(*target, logits.size(-1), ignore_index);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const at::Tensor u = tangent.contiguous();
  const at::Tensor y = target.has_value() ? target->contiguous() : at::Tensor();
  const int64_t* target_ptr = y.defined() ? y.data_ptr<int64_t>() : nullptr;
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
        z.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, classes, scale, target_ptr,
        ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CUDA, m) { m.impl("cross_entropy_hvp", &cross_entropy_hvp_cuda); }

}  // namespace optim
