// CPU kernel of optim::cross_entropy_hvp: rows in parallel; per row one pass for max, one for the softmax
// normalizer and ⟨exp(z − max), u⟩, one to write scale · p ⊙ (u − ⟨p, u⟩); an ignored row is only zeroed. The
// float loops are stamped out per instruction set (cpu_isa.h): the build is baseline x86-64, and with AVX2 or
// AVX-512 the same loops run vectorized for it.
#include "cross_entropy_hvp.h"
#include "../common/cpu_isa.h"
#include "../common/cpu_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace optim {

#define OPTIM_ISA_KERNELS "../hessian/cross_entropy_hvp_cpu_kernels.inc"  // relative to csrc/common
#include "../common/cpu_isa_variants.inc"

namespace {

// Float, bfloat16 and half rows: the per-instruction-set loops of cross_entropy_hvp_cpu_kernels.inc, with the
// exponentials computed once into a per-thread buffer of V floats (in cache for any vocabulary).
template <typename scalar_t>
void cross_entropy_hvp_rows(const scalar_t* logits, const scalar_t* tangent, scalar_t* out, int64_t rows,
                            int64_t classes, double scale, const int64_t* target, int64_t ignore_index) {
  using Rows = void (*)(const scalar_t*, const scalar_t*, scalar_t*, int64_t, int64_t, int64_t, double,
                        const int64_t*, int64_t);
  Rows rows_function = &baseline::cross_entropy_hvp_rows<scalar_t>;
#if OPTIM_X86_DISPATCH
  if (cpu_isa() == CpuIsa::kAvx512) rows_function = &avx512::cross_entropy_hvp_rows<scalar_t>;
  if (cpu_isa() == CpuIsa::kAvx2) rows_function = &avx2::cross_entropy_hvp_rows<scalar_t>;
#endif
  const int64_t grain = std::max<int64_t>(1, 32768 / classes);
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    rows_function(logits, tangent, out, first, last, classes, scale, target, ignore_index);
  });
}

// Double rows keep libm's exp (no vector exp of ours in double).
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
