// CUDA kernel of optim::fused_adamw_ (schema and reference: optim/fused/_ops.py).
// One multi-tensor launch per batch of tensors (csrc/common/multi_tensor_apply.cuh); each thread moves kILP
// elements of p, g, m, v per iteration with aligned vector loads (16 bytes for float32), computes in float32
// (float64 for float64 params) and stores p, m, v. The step counts are incremented by one foreach launch first; each
// block then reads its tensor's count and derives the bias corrections in float64. Tensors flagged by the optional
// reset list go in a launch of their own whose functor does not load m and v (it starts from zero), and their step
// counts are zeroed before the increment, so a momentum reset costs no pass of its own.
#include "fused_adamw.h"
#include "../common/multi_tensor_apply.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_zero.h>
#include <torch/library.h>

namespace optim {
namespace {

constexpr int kILP = 4;

template <typename param_t, typename T, bool kReset>
struct AdamWFunctor {
  template <typename Metadata>
  __device__ __forceinline__ void operator()(const Metadata& metadata, int tensor, int64_t start, int64_t count,
                                             AdamWHyperparameters h) const {
    param_t* p = static_cast<param_t*>(metadata.addresses[0][tensor]) + start;
    const param_t* g = static_cast<const param_t*>(metadata.addresses[1][tensor]) + start;
    T* m = static_cast<T*>(metadata.addresses[2][tensor]) + start;
    T* v = static_cast<T*>(metadata.addresses[3][tensor]) + start;
    const float step = *static_cast<const float*>(metadata.per_tensor[tensor]);
    const AdamWCoefficients<T> c = adamw_coefficients<T>(h, static_cast<double>(step));

    int64_t scalar_begin = 0;
    if (mta::is_aligned<kILP>(p) && mta::is_aligned<kILP>(g) && mta::is_aligned<kILP>(m) &&
        mta::is_aligned<kILP>(v)) {
      using ParamVector = mta::AlignedVector<param_t, kILP>;
      using StateVector = mta::AlignedVector<T, kILP>;
      const int64_t vectors = count / kILP;
      for (int64_t k = threadIdx.x; k < vectors; k += blockDim.x) {
        ParamVector p_vec = reinterpret_cast<const ParamVector*>(p)[k];
        const ParamVector g_vec = reinterpret_cast<const ParamVector*>(g)[k];
        StateVector m_vec, v_vec;
        if constexpr (kReset) {
#pragma unroll
          for (int j = 0; j < kILP; ++j) m_vec.value[j] = v_vec.value[j] = T(0);
        } else {
          m_vec = reinterpret_cast<const StateVector*>(m)[k];
          v_vec = reinterpret_cast<const StateVector*>(v)[k];
        }
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          T p_wide = static_cast<T>(p_vec.value[j]);
          adamw_update(p_wide, static_cast<T>(g_vec.value[j]), m_vec.value[j], v_vec.value[j], c);
          p_vec.value[j] = static_cast<param_t>(p_wide);
        }
        reinterpret_cast<ParamVector*>(p)[k] = p_vec;
        reinterpret_cast<StateVector*>(m)[k] = m_vec;
        reinterpret_cast<StateVector*>(v)[k] = v_vec;
      }
      scalar_begin = vectors * kILP;
    }
    for (int64_t i = scalar_begin + threadIdx.x; i < count; i += blockDim.x) {
      T p_wide = static_cast<T>(p[i]);
      T m_i = kReset ? T(0) : m[i];
      T v_i = kReset ? T(0) : v[i];
      adamw_update(p_wide, static_cast<T>(g[i]), m_i, v_i, c);
      p[i] = static_cast<param_t>(p_wide);
      m[i] = m_i;
      v[i] = v_i;
    }
  }
};

void fused_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
                      double weight_decay, double eps, bool maximize, const std::optional<c10::List<bool>>& reset) {
  const AdamWHyperparameters h{lr, beta1, beta2, weight_decay, eps, maximize};
  const std::vector<bool> reset_flags = adamw_reset_flags(reset, params.size());
  check_fused_adamw_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, h, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  ElementwiseOperands operands =
      elementwise_operands({params, grads, exp_avgs, exp_avg_sqs}, {true, false, true, true});
  // Split the tensors by their flag: one multi-tensor launch per kind (the usual call has no reset at all).
  std::vector<std::vector<at::Tensor>> kept(4), restarted(4);
  std::vector<const void*> kept_steps, restarted_steps;
  std::vector<at::Tensor> restarted_counts;
  for (size_t i = 0; i < params.size(); ++i) {
    auto& lists = reset_flags[i] ? restarted : kept;
    for (size_t list = 0; list < 4; ++list) lists[list].push_back(operands.work[list][i]);
    (reset_flags[i] ? restarted_steps : kept_steps).push_back(state_steps[i].data_ptr());
    if (reset_flags[i]) restarted_counts.push_back(state_steps[i]);
  }
  if (!restarted_counts.empty()) at::_foreach_zero_(restarted_counts);
  at::_foreach_add_(state_steps, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_adamw_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (!kept_steps.empty()) mta::multi_tensor_apply<4>(kept, kept_steps, AdamWFunctor<scalar_t, T, false>{}, h);
    if (!restarted_steps.empty()) {
      mta::multi_tensor_apply<4>(restarted, restarted_steps, AdamWFunctor<scalar_t, T, true>{}, h);
    }
  });
  operands.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CUDA, m) { m.impl("fused_adamw_", &fused_adamw_cuda); }

}  // namespace optim
