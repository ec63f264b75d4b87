// CUDA kernels of optim::fused_sophia_ and optim::fused_adahessian_ (schemas and references:
// optim/hessian/_ops.py). One multi-tensor launch per batch of tensors (csrc/common/multi_tensor_apply.cuh); each
// thread moves kILP elements of every operand per iteration with aligned vector loads (16 bytes for float32),
// computes in float32 (float64 for float64 params) with fused_second_order.h's math, and stores p and the two state
// tensors. Steps without a curvature update read p, g, m, h and write p, m, h (28 B per float32 element, as AdamW);
// refresh steps also read the Hessian-vector product and, for Sophia, the probe, unless the probe is regenerated
// from its counters (32 B per float32 element then, against 36).
#include "fused_second_order.h"
#include "../common/multi_tensor_apply.cuh"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>

namespace optim {
namespace {

constexpr int kILP = 4;

template <typename param_t>
using StateType = std::conditional_t<std::is_same_v<param_t, double>, double, float>;

template <typename Scalar>
using Vector = mta::AlignedVector<Scalar, kILP>;

template <typename Scalar>
__device__ __forceinline__ Vector<Scalar> load_vector(const Scalar* pointer, int64_t k) {
  return reinterpret_cast<const Vector<Scalar>*>(pointer)[k];
}

template <typename Scalar>
__device__ __forceinline__ void store_vector(Scalar* pointer, int64_t k, const Vector<Scalar>& value) {
  reinterpret_cast<Vector<Scalar>*>(pointer)[k] = value;
}

// The operand lists are, in order: p, g, m, h (or v), then the curvature lists the step reads. kCurvatureLists is
// 0 (no refresh), 1 (a diagonal estimate or Hz) or 2 (Hz and the probe z, multiplied here). With kCounterProbes
// (and one curvature list, Hz) the probe is regenerated: the tensor's per_tensor pointer holds (mix64(seed),
// offset) and element i's probe is the Rademacher value of counter offset + i (i row-major).
template <int kCurvatureLists, bool kCounterProbes, typename param_t, typename curv_t, typename Update>
struct SecondOrderFunctor {
  static_assert(!kCounterProbes || kCurvatureLists == 1, "regenerated probes multiply the one list Hz");

  template <typename Metadata>
  __device__ __forceinline__ void operator()(const Metadata& metadata, int tensor, int64_t start, int64_t count,
                                             Update update) const {
    using T = StateType<param_t>;
    uint64_t mixed_seed = 0;
    uint64_t first_counter = 0;
    if constexpr (kCounterProbes) {
      const auto* counter = static_cast<const uint64_t*>(metadata.per_tensor[tensor]);
      mixed_seed = counter[0];
      first_counter = counter[1] + static_cast<uint64_t>(start);
    }
    param_t* p = static_cast<param_t*>(metadata.addresses[0][tensor]) + start;
    const param_t* g = static_cast<const param_t*>(metadata.addresses[1][tensor]) + start;
    T* m = static_cast<T*>(metadata.addresses[2][tensor]) + start;
    T* h = static_cast<T*>(metadata.addresses[3][tensor]) + start;
    const curv_t* c0 = nullptr;
    const curv_t* c1 = nullptr;
    if constexpr (kCurvatureLists >= 1) c0 = static_cast<const curv_t*>(metadata.addresses[4][tensor]) + start;
    if constexpr (kCurvatureLists >= 2) c1 = static_cast<const curv_t*>(metadata.addresses[5][tensor]) + start;

    int64_t scalar_begin = 0;
    bool aligned = mta::is_aligned<kILP>(p) && mta::is_aligned<kILP>(g) && mta::is_aligned<kILP>(m) &&
                   mta::is_aligned<kILP>(h);
    if constexpr (kCurvatureLists >= 1) aligned = aligned && mta::is_aligned<kILP>(c0);
    if constexpr (kCurvatureLists >= 2) aligned = aligned && mta::is_aligned<kILP>(c1);
    if (aligned) {
      const int64_t vectors = count / kILP;
      for (int64_t k = threadIdx.x; k < vectors; k += blockDim.x) {
        Vector<param_t> p_vec = load_vector(p, k);
        const Vector<param_t> g_vec = load_vector(g, k);
        Vector<T> m_vec = load_vector(m, k);
        Vector<T> h_vec = load_vector(h, k);
        Vector<curv_t> c0_vec{};
        Vector<curv_t> c1_vec{};
        if constexpr (kCurvatureLists >= 1) c0_vec = load_vector(c0, k);
        if constexpr (kCurvatureLists >= 2) c1_vec = load_vector(c1, k);
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          T p_wide = static_cast<T>(p_vec.value[j]);
          T u = T(0);
          if constexpr (kCurvatureLists >= 1) u = static_cast<T>(c0_vec.value[j]);
          if constexpr (kCurvatureLists >= 2) u = u * static_cast<T>(c1_vec.value[j]);
          if constexpr (kCounterProbes) u = u * rademacher_value<T>(mixed_seed, first_counter + k * kILP + j);
          update(p_wide, static_cast<T>(g_vec.value[j]), m_vec.value[j], h_vec.value[j], u);
          p_vec.value[j] = static_cast<param_t>(p_wide);
        }
        store_vector(p, k, p_vec);
        store_vector(m, k, m_vec);
        store_vector(h, k, h_vec);
      }
      scalar_begin = vectors * kILP;
    }
    for (int64_t i = scalar_begin + threadIdx.x; i < count; i += blockDim.x) {
      T p_wide = static_cast<T>(p[i]);
      T u = T(0);
      if constexpr (kCurvatureLists >= 1) u = static_cast<T>(c0[i]);
      if constexpr (kCurvatureLists >= 2) u = u * static_cast<T>(c1[i]);
      if constexpr (kCounterProbes) u = u * rademacher_value<T>(mixed_seed, first_counter + i);
      update(p_wide, static_cast<T>(g[i]), m[i], h[i], u);
      p[i] = static_cast<param_t>(p_wide);
    }
  }
};

template <bool kRefresh, typename T>
struct SophiaUpdate {
  SophiaCoefficients<T> c;
  __device__ __forceinline__ void operator()(T& p, T g, T& m, T& h, T u) const {
    sophia_update<kRefresh>(p, g, m, h, u, c);
  }
};

template <bool kRefresh, typename T>
struct AdaHessianUpdate {
  AdaHessianCoefficients<T> c;
  __device__ __forceinline__ void operator()(T& p, T g, T& m, T& v, T d) const {
    adahessian_update<kRefresh>(p, g, m, v, d, c);
  }
};

template <int kCurvatureLists, typename param_t, typename curv_t, bool kCounterProbes = false, typename Update>
void launch(const ElementwiseOperands& operands, Update update, const std::vector<const void*>& per_tensor = {}) {
  mta::multi_tensor_apply<4 + kCurvatureLists>(
      operands.work, per_tensor, SecondOrderFunctor<kCurvatureLists, kCounterProbes, param_t, curv_t, Update>{},
      update);
}

template <typename param_t, typename curv_t>
void sophia_launch(const ElementwiseOperands& operands, const SophiaHyperparameters& hyper, bool refresh,
                   ProbeSource source, const std::vector<const void*>& counters) {
  using T = StateType<param_t>;
  const auto c = sophia_coefficients<T>(hyper);
  if (!refresh) {
    launch<0, param_t, curv_t>(operands, SophiaUpdate<false, T>{c});
  } else if (source == ProbeSource::kNone) {
    launch<1, param_t, curv_t>(operands, SophiaUpdate<true, T>{c});
  } else if (source == ProbeSource::kTensor) {
    launch<2, param_t, curv_t>(operands, SophiaUpdate<true, T>{c});
  } else {
    launch<1, param_t, curv_t, /*kCounterProbes=*/true>(operands, SophiaUpdate<true, T>{c}, counters);
  }
}

// One (mix64(seed), offset) pair per tensor on the device, for SecondOrderFunctor's per_tensor pointers. The pinned
// staging buffer lets the copy run asynchronously on the current stream (the caching host allocator keeps it alive
// until the copy is done).
at::Tensor probe_counters_on_device(at::IntArrayRef seeds, at::IntArrayRef offsets, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(seeds.size());
  at::Tensor host = at::empty({n, 2}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  auto* values = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    values[2 * i] = static_cast<int64_t>(mix64(static_cast<uint64_t>(seeds[i])));
    values[2 * i + 1] = offsets[i];
  }
  return host.to(device, /*non_blocking=*/true);
}

template <typename param_t, typename curv_t>
void adahessian_launch(const ElementwiseOperands& operands, const AdaHessianHyperparameters& hyper, bool refresh) {
  using T = StateType<param_t>;
  const auto c = adahessian_coefficients<T>(hyper);
  if (refresh) {
    launch<1, param_t, curv_t>(operands, AdaHessianUpdate<true, T>{c});
  } else {
    launch<0, param_t, curv_t>(operands, AdaHessianUpdate<false, T>{c});
  }
}

void fused_sophia_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                       at::TensorList hessian_products, at::TensorList probes, double lr, double beta1, double beta2,
                       double rho, double weight_decay, double eps, bool maximize, at::IntArrayRef probe_seeds,
                       at::IntArrayRef probe_offsets) {
  const SophiaHyperparameters hyper{lr, beta1, beta2, rho, weight_decay, eps, maximize};
  check_fused_sophia_args(params, grads, exp_avgs, hessians, hessian_products, probes, probe_seeds, probe_offsets,
                          hyper, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool refresh = !hessian_products.empty();
  const ProbeSource source = probe_source(probes, probe_seeds);
  std::vector<at::TensorList> lists{params, grads, exp_avgs, hessians};
  std::vector<bool> written{true, false, true, true};
  if (refresh) lists.push_back(hessian_products), written.push_back(false);
  if (source == ProbeSource::kTensor) lists.push_back(probes), written.push_back(false);
  // A regenerated probe is indexed by the row-major position, so every tensor is walked in that order.
  ElementwiseOperands operands = elementwise_operands(lists, written, /*row_major=*/source == ProbeSource::kCounter);
  at::Tensor counters_buffer;
  std::vector<const void*> counters;
  if (source == ProbeSource::kCounter) {
    counters_buffer = probe_counters_on_device(probe_seeds, probe_offsets, params[0].device());
    for (size_t i = 0; i < params.size(); ++i) counters.push_back(counters_buffer.data_ptr<int64_t>() + 2 * i);
  }
  const bool curvature_has_param_dtype = refresh && hessian_products[0].scalar_type() == params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_sophia_cuda", [&] {
    using T = StateType<scalar_t>;
    if (curvature_has_param_dtype) {
      sophia_launch<scalar_t, scalar_t>(operands, hyper, refresh, source, counters);
    } else {
      sophia_launch<scalar_t, T>(operands, hyper, refresh, source, counters);
    }
  });
  operands.copy_back();
}

void fused_adahessian_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_hessian_diag_sqs, at::TensorList hessian_diagonals, double lr,
                           double beta1, double beta2, double weight_decay, double eps, double hessian_power,
                           int64_t step, int64_t hessian_step, bool maximize) {
  const AdaHessianHyperparameters hyper{lr, beta1, beta2, weight_decay, eps, hessian_power, step, hessian_step,
                                        maximize};
  check_fused_adahessian_args(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, hyper,
                              c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool refresh = !hessian_diagonals.empty();
  std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_hessian_diag_sqs};
  std::vector<bool> written{true, false, true, true};
  if (refresh) lists.push_back(hessian_diagonals), written.push_back(false);
  ElementwiseOperands operands = elementwise_operands(lists, written);
  const bool curvature_has_param_dtype = refresh && hessian_diagonals[0].scalar_type() == params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_adahessian_cuda", [&] {
    using T = StateType<scalar_t>;
    if (curvature_has_param_dtype) {
      adahessian_launch<scalar_t, scalar_t>(operands, hyper, refresh);
    } else {
      adahessian_launch<scalar_t, T>(operands, hyper, refresh);
    }
  });
  operands.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CUDA, m) {
  m.impl("fused_sophia_", &fused_sophia_cuda);
  m.impl("fused_adahessian_", &fused_adahessian_cuda);
}

}  // namespace optim
