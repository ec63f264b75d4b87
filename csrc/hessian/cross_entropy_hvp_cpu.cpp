// CPU kernel of optim::cross_entropy_hvp: rows in parallel; per row one pass for max, one for the softmax
// normalizer and ⟨exp(z − max), u⟩, one to write scale · p ⊙ (u − ⟨p, u⟩); an ignored row is only zeroed.
#include "cross_entropy_hvp.h"
#include "../common/cpu_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace optim {
namespace {

// Float rows (float, bfloat16, half): the exponentials are computed once into a per-thread buffer of V floats (in
// cache for any vocabulary), with vectorizable sums in double lanes. Double rows keep libm's exp.
template <typename scalar_t>
void cross_entropy_hvp_rows(const scalar_t* logits, const scalar_t* tangent, scalar_t* out, int64_t rows,
                            int64_t classes, double scale, const int64_t* target, int64_t ignore_index) {
  const int64_t grain = std::max<int64_t>(1, 32768 / classes);
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    std::vector<float> exps(static_cast<size_t>(classes));
    float* e = exps.data();
    for (int64_t row = first; row < last; ++row) {
      const scalar_t* z = logits + row * classes;
      const scalar_t* u = tangent + row * classes;
      scalar_t* y = out + row * classes;
      if (cross_entropy_row_ignored(target, row, ignore_index)) {
        std::fill(y, y + classes, static_cast<scalar_t>(0));
        continue;
      }
      float max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max)
      for (int64_t j = 0; j < classes; ++j) max = std::max(max, static_cast<float>(z[j]));
      // A row of -inf logits has no softmax: z - max would be NaN everywhere, as in the reference.
      // The sums run in double lanes: float lanes over a 50k vocabulary lose ~1e-5 of ⟨p, u⟩, and every entry of
      // the output carries that error.
      double normalizer = 0.0;
      double weighted = 0.0;
#pragma omp simd reduction(+ : normalizer, weighted)
      for (int64_t j = 0; j < classes; ++j) {
        const float ej = exp_nonpositive(static_cast<float>(z[j]) - max);
        e[j] = ej;
        normalizer += ej;
        weighted += static_cast<double>(ej) * static_cast<double>(static_cast<float>(u[j]));
      }
      const float mean_tangent = static_cast<float>(weighted / normalizer);  // ⟨p, u⟩
      const float factor = static_cast<float>(scale / normalizer);
#pragma omp simd
      for (int64_t j = 0; j < classes; ++j) {
        y[j] = static_cast<scalar_t>(factor * e[j] * (static_cast<float>(u[j]) - mean_tangent));
      }
    }
  });
}

template <>
void cross_entropy_hvp_rows<double>(const double* logits, const double* tangent, double* out, int64_t rows,
                                    int64_t classes, double scale, const int64_t* target, int64_t ignore_index) {
  const int64_t grain = std::max<int64_t>(1, 32768 / classes);
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const double* z = logits + row * classes;
      const double* u = tangent + row * classes;
      double* y = out + row * classes;
      if (cross_entropy_row_ignored(target, row, ignore_index)) {
        std::fill(y, y + classes, 0.0);
        continue;
      }
      double max = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < classes; ++j) max = std::max(max, z[j]);
      double normalizer = 0.0;
      double weighted = 0.0;
      for (int64_t j = 0; j < classes; ++j) {
        const double e = std::exp(z[j] - max);
        normalizer += e;
        weighted += e * u[j];
      }
      const double mean_tangent = weighted / normalizer;
      const double factor = scale / normalizer;
      for (int64_t j = 0; j < classes; ++j) y[j] = factor * std::exp(z[j] - max) * (u[j] - mean_tangent);
    }
  });
}

at::Tensor cross_entropy_hvp_cpu(const at::Tensor& logits, const at::Tensor& tangent, double scale,
                                 const c10::optional<at::Tensor>& target, int64_t ignore_index) {
  check_cross_entropy_hvp_args(logits, tangent, scale, target, c10::DeviceType::CPU);
  if (target.has_value()) check_cross_entropy_targets(*target, logits.size(-1), ignore_index);
  const at::Tensor z = logits.contiguous();
  const at::Tensor u = tangent.contiguous();
  const at::Tensor y = target.has_value() ? target->contiguous() : at::Tensor();
  const int64_t* target_ptr = y.defined() ? y.data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t classes = logits.size(-1);
  const int64_t rows = classes == 0 ? 0 : logits.numel() / classes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_hvp_cpu", [&] {
    cross_entropy_hvp_rows(z.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, classes,
                           scale, target_ptr, ignore_index);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("cross_entropy_hvp", &cross_entropy_hvp_cpu); }

}  // namespace optim
