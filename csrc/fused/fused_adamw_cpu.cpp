// CPU kernel of optim::fused_adamw_ (schema and reference: optim/fused/_ops.py).
// All tensors of the call are cut into chunks of at most kChunk elements and the chunks are spread over threads
// with one at::parallel_for, so a list of many small tensors parallelizes as well as one large tensor.
#include "fused_adamw.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace optim {
namespace {

constexpr int64_t kChunk = 16384;
// Low-precision params are widened into a stack buffer of this many elements, updated in float, then rounded back.
// The bf16 conversions are bit operations that vectorize; fp16 conversions stay scalar unless the build targets F16C.
constexpr int64_t kTile = 512;

// The update over n contiguous elements in the arithmetic type T (float or double). A plain loop over restrict
// pointers: with -O3 -fno-math-errno the compiler vectorizes it (sqrt and division included). With kReset the old
// moments are not read: the step starts from m = v = 0 (the op's reset flag), in the same single pass.
template <bool kReset, typename T>
void adamw_contiguous(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v, int64_t n,
                      const AdamWCoefficients<T> c) {
  if constexpr (kReset) {
    for (int64_t i = 0; i < n; ++i) {
      T m_i = T(0), v_i = T(0);
      adamw_update(p[i], g[i], m_i, v_i, c);
      m[i] = m_i;
      v[i] = v_i;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) adamw_update(p[i], g[i], m[i], v[i], c);
  }
}

template <bool kReset, typename param_t, typename T>
void adamw_chunk(param_t* p, const param_t* g, T* m, T* v, int64_t n, const AdamWCoefficients<T>& c) {
  if constexpr (std::is_same_v<param_t, T>) {
    adamw_contiguous<kReset>(p, g, m, v, n, c);
  } else {
    T p_wide[kTile];
    T g_wide[kTile];
    for (int64_t start = 0; start < n; start += kTile) {
      const int64_t len = std::min(kTile, n - start);
      for (int64_t i = 0; i < len; ++i) {
        p_wide[i] = static_cast<T>(p[start + i]);
        g_wide[i] = static_cast<T>(g[start + i]);
      }
      adamw_contiguous<kReset>(p_wide, g_wide, m + start, v + start, len, c);
      for (int64_t i = 0; i < len; ++i) p[start + i] = static_cast<param_t>(p_wide[i]);
    }
  }
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
  std::vector<AdamWCoefficients<T>> coefficients;
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < params.size(); ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step = reset[i] ? 1.0f : *step + 1.0f;
    coefficients.push_back(adamw_coefficients<T>(h, static_cast<double>(*step)));
    const int64_t numel = params[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(numel, begin + kChunk)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Chunk& chunk = chunks[k];
      const int64_t i = chunk.tensor;
      param_t* p = params[i].data_ptr<param_t>() + chunk.begin;
      const param_t* g = grads[i].data_ptr<param_t>() + chunk.begin;
      T* m = exp_avgs[i].data_ptr<T>() + chunk.begin;
      T* v = exp_avg_sqs[i].data_ptr<T>() + chunk.begin;
      if (reset[i]) {
        adamw_chunk<true>(p, g, m, v, chunk.end - chunk.begin, coefficients[i]);
      } else {
        adamw_chunk<false>(p, g, m, v, chunk.end - chunk.begin, coefficients[i]);
      }
    }
  });
}

void fused_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList state_steps, double lr, double beta1, double beta2, double weight_decay,
                     double eps, bool maximize, const std::optional<c10::List<bool>>& reset) {
  const AdamWHyperparameters h{lr, beta1, beta2, weight_decay, eps, maximize};
  const std::vector<bool> reset_flags = adamw_reset_flags(reset, params.size());
  check_fused_adamw_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, h, c10::DeviceType::CPU);
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
