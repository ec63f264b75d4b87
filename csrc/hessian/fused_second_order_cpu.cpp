// CPU kernels of optim::fused_sophia_ and optim::fused_adahessian_ (schemas and references: optim/hessian/_ops.py).
// Both ops live in one translation unit (compile time on small machines). As in the AdamW kernel, every tensor of
// the call is cut into chunks of at most kChunk elements and one at::parallel_for spreads the chunks over threads,
// so many small tensors parallelize as well as one large one. The per-element math is fused_second_order.h's,
// shared with the CUDA kernels. The per-chunk loops live in fused_second_order_cpu_kernels.inc, stamped out once
// per instruction set (cpu_isa.h): the build is baseline x86-64, and with AVX2 or AVX-512 the same loops run
// vectorized for it.
#include "fused_second_order.h"
#include "../common/cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace optim {

#define OPTIM_ISA_KERNELS "../hessian/fused_second_order_cpu_kernels.inc"  // relative to csrc/common
#include "../common/cpu_isa_variants.inc"

namespace {

constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& params) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(numel, begin + kChunk)});
    }
  }
  return chunks;
}

template <typename Scalar>
const Scalar* maybe_data(const std::vector<std::vector<at::Tensor>>& work, size_t list, int64_t i, int64_t begin) {
  return list < work.size() ? work[list][i].data_ptr<Scalar>() + begin : nullptr;
}

// The state (and arithmetic) type of a param type.
template <typename param_t>
using StateType = std::conditional_t<std::is_same_v<param_t, double>, double, float>;

// Compile-time arguments for generic lambdas (C++17 has no template lambdas): a type travels as a TypeTag<T>
// value, a bool or enum as a std::integral_constant; both are empty, so passing them costs nothing.
template <typename T>
struct TypeTag {
  using type = T;
};

// Runs body(TypeTag<curv_t>{}) with curv_t the C++ type of the curvature lists (param or state type).
template <typename param_t, typename Body>
void dispatch_curvature(bool curvature_has_param_dtype, Body&& body) {
  using T = StateType<param_t>;
  if (curvature_has_param_dtype) {
    body(TypeTag<param_t>{});
  } else {
    body(TypeTag<T>{});
  }
}

// ------------------------------------------------------------------------------------------------------ Sophia

template <bool kRefresh, ProbeSource kProbes, typename param_t, typename curv_t, typename T>
using SophiaChunk = void (*)(param_t*, const param_t*, T*, T*, const curv_t*, const curv_t*, uint64_t, uint64_t, int64_t,
                             const SophiaCoefficients<T>&);

template <bool kRefresh, ProbeSource kProbes, typename param_t, typename curv_t, typename T>
SophiaChunk<kRefresh, kProbes, param_t, curv_t, T> sophia_chunk_function() {
#if OPTIM_X86_DISPATCH
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return &avx512::sophia_chunk<kRefresh, kProbes, param_t, curv_t, T>;
    case CpuIsa::kAvx2:
      return &avx2::sophia_chunk<kRefresh, kProbes, param_t, curv_t, T>;
    case CpuIsa::kBaseline:
      break;
  }
#endif
  return &baseline::sophia_chunk<kRefresh, kProbes, param_t, curv_t, T>;
}

template <bool kRefresh, ProbeSource kProbes, typename param_t, typename curv_t>
void sophia_cpu(const ElementwiseOperands& operands, const SophiaHyperparameters& hyper,
                const std::vector<uint64_t>& mixed_seeds, at::IntArrayRef probe_offsets) {
  using T = StateType<param_t>;
  const auto& work = operands.work;
  const auto coefficients = sophia_coefficients<T>(hyper);
  const std::vector<Chunk> chunks = make_chunks(work[0]);
  const auto sophia_chunk = sophia_chunk_function<kRefresh, kProbes, param_t, curv_t, T>();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Chunk& chunk = chunks[k];
      const int64_t i = chunk.tensor;
      uint64_t mixed_seed = 0;
      uint64_t first_counter = 0;
      if constexpr (kProbes == ProbeSource::kCounter) {
        mixed_seed = mixed_seeds[i];
        first_counter = static_cast<uint64_t>(probe_offsets[i] + chunk.begin);
      }
      sophia_chunk(
          work[0][i].data_ptr<param_t>() + chunk.begin, work[1][i].data_ptr<param_t>() + chunk.begin,
          work[2][i].data_ptr<T>() + chunk.begin, work[3][i].data_ptr<T>() + chunk.begin,
          kRefresh ? maybe_data<curv_t>(work, 4, i, chunk.begin) : nullptr,
          kProbes == ProbeSource::kTensor ? maybe_data<curv_t>(work, 5, i, chunk.begin) : nullptr, mixed_seed,
          first_counter, chunk.end - chunk.begin, coefficients);
    }
  });
}

void fused_sophia_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                      at::TensorList hessian_products, at::TensorList probes, double lr, double beta1, double beta2,
                      double rho, double weight_decay, double eps, bool maximize, at::IntArrayRef probe_seeds,
                      at::IntArrayRef probe_offsets) {
  const SophiaHyperparameters hyper{lr, beta1, beta2, rho, weight_decay, eps, maximize};
  check_fused_sophia_args(params, grads, exp_avgs, hessians, hessian_products, probes, probe_seeds, probe_offsets,
                          hyper, c10::DeviceType::CPU);
  if (params.empty()) return;
  const bool refresh = !hessian_products.empty();
  const ProbeSource source = probe_source(probes, probe_seeds);
  std::vector<at::TensorList> lists{params, grads, exp_avgs, hessians};
  std::vector<bool> written{true, false, true, true};
  if (refresh) lists.push_back(hessian_products), written.push_back(false);
  if (source == ProbeSource::kTensor) lists.push_back(probes), written.push_back(false);
  // A regenerated probe is indexed by the row-major position, so the kernel must walk every tensor in that order.
  ElementwiseOperands operands = elementwise_operands(lists, written, /*row_major=*/source == ProbeSource::kCounter);
  std::vector<uint64_t> mixed_seeds;
  for (const int64_t seed : probe_seeds) mixed_seeds.push_back(mix64(static_cast<uint64_t>(seed)));
  const bool curvature_has_param_dtype = refresh && hessian_products[0].scalar_type() == params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_sophia_cpu", [&] {
    dispatch_curvature<scalar_t>(curvature_has_param_dtype, [&](auto curv_tag) {
      using curv_t = typename decltype(curv_tag)::type;
      const auto run = [&](auto refresh_tag, auto probes_tag) {
        sophia_cpu<decltype(refresh_tag)::value, decltype(probes_tag)::value, scalar_t, curv_t>(
            operands, hyper, mixed_seeds, probe_offsets);
      };
      using NoProbes = std::integral_constant<ProbeSource, ProbeSource::kNone>;
      if (!refresh) {
        run(std::false_type{}, NoProbes{});
      } else if (source == ProbeSource::kNone) {
        run(std::true_type{}, NoProbes{});
      } else if (source == ProbeSource::kTensor) {
        run(std::true_type{}, std::integral_constant<ProbeSource, ProbeSource::kTensor>{});
      } else {
        run(std::true_type{}, std::integral_constant<ProbeSource, ProbeSource::kCounter>{});
      }
    });
  });
  operands.copy_back();
}

// -------------------------------------------------------------------------------------------------- AdaHessian

template <bool kRefresh, typename param_t, typename curv_t, typename T>
using AdaHessianChunk = void (*)(param_t*, const param_t*, T*, T*, const curv_t*, int64_t,
                                 const AdaHessianCoefficients<T>&);

template <bool kRefresh, typename param_t, typename curv_t, typename T>
AdaHessianChunk<kRefresh, param_t, curv_t, T> adahessian_chunk_function() {
#if OPTIM_X86_DISPATCH
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return &avx512::adahessian_chunk<kRefresh, param_t, curv_t, T>;
    case CpuIsa::kAvx2:
      return &avx2::adahessian_chunk<kRefresh, param_t, curv_t, T>;
    case CpuIsa::kBaseline:
      break;
  }
#endif
  return &baseline::adahessian_chunk<kRefresh, param_t, curv_t, T>;
}

template <bool kRefresh, typename param_t, typename curv_t>
void adahessian_cpu(const ElementwiseOperands& operands, const AdaHessianHyperparameters& hyper) {
  using T = StateType<param_t>;
  const auto& work = operands.work;
  const auto coefficients = adahessian_coefficients<T>(hyper);
  const std::vector<Chunk> chunks = make_chunks(work[0]);
  const auto adahessian_chunk = adahessian_chunk_function<kRefresh, param_t, curv_t, T>();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Chunk& chunk = chunks[k];
      const int64_t i = chunk.tensor;
      adahessian_chunk(
          work[0][i].data_ptr<param_t>() + chunk.begin, work[1][i].data_ptr<param_t>() + chunk.begin,
          work[2][i].data_ptr<T>() + chunk.begin, work[3][i].data_ptr<T>() + chunk.begin,
          kRefresh ? maybe_data<curv_t>(work, 4, i, chunk.begin) : nullptr, chunk.end - chunk.begin, coefficients);
    }
  });
}

void fused_adahessian_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_hessian_diag_sqs, at::TensorList hessian_diagonals, double lr,
                          double beta1, double beta2, double weight_decay, double eps, double hessian_power,
                          int64_t step, int64_t hessian_step, bool maximize) {
  const AdaHessianHyperparameters hyper{lr, beta1, beta2, weight_decay, eps, hessian_power, step, hessian_step,
                                        maximize};
  check_fused_adahessian_args(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diagonals, hyper,
                              c10::DeviceType::CPU);
  if (params.empty()) return;
  const bool refresh = !hessian_diagonals.empty();
  std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_hessian_diag_sqs};
  std::vector<bool> written{true, false, true, true};
  if (refresh) lists.push_back(hessian_diagonals), written.push_back(false);
  ElementwiseOperands operands = elementwise_operands(lists, written);
  const bool curvature_has_param_dtype = refresh && hessian_diagonals[0].scalar_type() == params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_adahessian_cpu", [&] {
    dispatch_curvature<scalar_t>(curvature_has_param_dtype, [&](auto curv_tag) {
      using curv_t = typename decltype(curv_tag)::type;
      if (refresh) {
        adahessian_cpu<true, scalar_t, curv_t>(operands, hyper);
      } else {
        adahessian_cpu<false, scalar_t, curv_t>(operands, hyper);
      }
    });
  });
  operands.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) {
  m.impl("fused_sophia_", &fused_sophia_cpu);
  m.impl("fused_adahessian_", &fused_adahessian_cpu);
}

}  // namespace optim
