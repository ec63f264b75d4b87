// CPU kernel of optim::fused_adamw_ (schema and reference: optim/fused/_ops.py).
// All tensors of the call are cut into chunks of at most kChunk elements and the chunks are spread over threads
// with one at::parallel_for, so a list of many small tensors parallelizes as well as one large tensor.
// The per-chunk loops live in fused_adamw_cpu_kernels.inc, stamped out once per instruction set (cpu_isa.h): the
// build is baseline x86-64, and on a machine with AVX2 or AVX-512 the same loops run vectorized for it.
#include "fused_adamw.h"
#include "../common/cpu_isa.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace optim {

#define OPTIM_ISA_KERNELS "../fused/fused_adamw_cpu_kernels.inc"  // relative to csrc/common
#include "../common/cpu_isa_variants.inc"

namespace {

// Tensors are cut into chunks of at most kChunk elements, spread over the threads by one at::parallel_for.
constexpr int64_t kChunk = 16384;

template <bool kReset, typename param_t, typename T>
using ChunkFunction = void (*)(param_t*, const param_t*, T*, T*, int64_t, const AdamWCoefficients<T>&);

template <bool kReset, typename param_t, typename T>
ChunkFunction<kReset, param_t, T> chunk_function() {
#if OPTIM_X86_DISPATCH
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return &avx512::adamw_chunk<kReset, param_t, T>;
    case CpuIsa::kAvx2:
      return &avx2::adamw_chunk<kReset, param_t, T>;
    case CpuIsa::kBaseline:
      break;
  }
#endif
  return &baseline::adamw_chunk<kReset, param_t, T>;
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename param_t>
void adamw_cpu(const ElementwiseOperands& operands, at::TensorList state_steps, const std::vector<bool>& reset,
               const AdamWHyperparameters& h) {
  using T = std::conditional_t<std::is_same_v<param_t, double>, double, float>;
  const auto& params = operands.work[0];
  const auto& grads = operands.work[1];
  const auto& exp_avgs = operands.work[2];
  const auto& exp_avg_sqs = operands.work[3];
  const size_t count = params.size();
  // Per tensor: its pointers and constants, gathered once (not per chunk); the constants are recomputed only when
  // the step count differs from the previous tensor's (usually all tensors share it).
  struct TensorPointers {
    param_t* p;
    const param_t* g;
    T* m;
    T* v;
    AdamWCoefficients<T> c;
    bool reset;
  };
  std::vector<TensorPointers> tensors(count);
  std::vector<Chunk> chunks;
  chunks.reserve(count);
  float previous_step = -1.0f;
  AdamWCoefficients<T> c{};
  for (size_t i = 0; i < count; ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step = reset[i] ? 1.0f : *step + 1.0f;
    if (*step != previous_step) {
      c = adamw_coefficients<T>(h, static_cast<double>(*step));
      previous_step = *step;
    }
    tensors[i] = {params[i].data_ptr<param_t>(), grads[i].data_ptr<param_t>(), exp_avgs[i].data_ptr<T>(),
                  exp_avg_sqs[i].data_ptr<T>(), c, reset[i]};
    const int64_t numel = params[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(numel, begin + kChunk)});
    }
  }
  const auto update = chunk_function<false, param_t, T>();
  const auto update_reset = chunk_function<true, param_t, T>();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Chunk& chunk = chunks[k];
      const TensorPointers& t = tensors[chunk.tensor];
      const int64_t b = chunk.begin;
      (t.reset ? update_reset : update)(t.p + b, t.g + b, t.m + b, t.v + b, chunk.end - b, t.c);
    }
  });
}

void fused_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList state_steps, double lr, double beta1, double beta2, double weight_decay,
                     double eps, bool maximize, const std::optional<c10::List<bool>>& reset) {
  const AdamWHyperparameters h{lr, beta1, beta2, weight_decay, eps, maximize};
  const std::vector<bool> reset_flags = adamw_reset_flags(reset, params.size());
  check_fused_adamw_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, h, c10::DeviceType::CPU);
  check_adamw_step_counts(state_steps, reset_flags);
  if (params.empty()) return;
  ElementwiseOperands operands =
      elementwise_operands({params, grads, exp_avgs, exp_avg_sqs}, {true, false, true, true});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_adamw_cpu",
                                  [&] { adamw_cpu<scalar_t>(operands, state_steps, reset_flags, h); });
  operands.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("fused_adamw_", &fused_adamw_cpu); }

}  // namespace optim
