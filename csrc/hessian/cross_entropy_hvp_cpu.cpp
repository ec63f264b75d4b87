// CPU kernel of optim::cross_entropy_hvp: rows in parallel; per row one pass for max, one for the softmax
// normalizer and ⟨exp(z − max), u⟩ (accumulated in double), one to write scale · p ⊙ (u − ⟨p, u⟩).
#include "cross_entropy_hvp.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace optim {
namespace {

template <typename scalar_t>
void cross_entropy_hvp_rows(const scalar_t* logits, const scalar_t* tangent, scalar_t* out, int64_t rows,
                            int64_t classes, double scale) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t grain = std::max<int64_t>(1, 32768 / classes);
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const scalar_t* z = logits + row * classes;
      const scalar_t* u = tangent + row * classes;
      scalar_t* y = out + row * classes;
      T max = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < classes; ++j) max = std::max(max, static_cast<T>(z[j]));
      double normalizer = 0.0;
      double weighted = 0.0;
      for (int64_t j = 0; j < classes; ++j) {
        const double e = std::exp(static_cast<T>(z[j]) - max);
        normalizer += e;
        weighted += e * static_cast<double>(u[j]);
      }
      const T mean_tangent = static_cast<T>(weighted / normalizer);  // ⟨p, u⟩
      const T factor = static_cast<T>(scale / normalizer);
      for (int64_t j = 0; j < classes; ++j) {
        y[j] = static_cast<scalar_t>(factor * std::exp(static_cast<T>(z[j]) - max) *
                                     (static_cast<T>(u[j]) - mean_tangent));
      }
    }
  });
}

at::Tensor cross_entropy_hvp_cpu(const at::Tensor& logits, const at::Tensor& tangent, double scale) {
  check_cross_entropy_hvp_args(logits, tangent, scale, c10::DeviceType::CPU);
  const at::Tensor z = logits.contiguous();
  const at::Tensor u = tangent.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t classes = logits.size(-1);
  const int64_t rows = classes == 0 ? 0 : logits.numel() / classes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_hvp_cpu", [&] {
    cross_entropy_hvp_rows(z.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, classes,
                           scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("cross_entropy_hvp", &cross_entropy_hvp_cpu); }

}  // namespace optim
