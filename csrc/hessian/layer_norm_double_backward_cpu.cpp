// CPU kernel of optim::layer_norm_double_backward (schema, math and reference: optim/hessian/_ops.py). Rows in
// parallel; per row one pass for the seven row means (in double) and one to write ∂g and ∂x; ∂γ is summed per
// thread into its own row of D doubles and the threads' rows are added in thread order (reproducible for a given
// thread count). One fused pass in place of the ~30 elementwise ops of torch's generic double backward, each of
// which reads and writes (N, D). The row loops are stamped out per instruction set (cpu_isa.h).
#include "../common/checks.h"
#include "../common/cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace optim {

#define OPTIM_ISA_KERNELS "../hessian/layer_norm_double_backward_cpu_kernels.inc"  // relative to csrc/common
#include "../common/cpu_isa_variants.inc"

namespace {

void check_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                const c10::optional<at::Tensor>& weight, const at::Tensor& grad_out, const at::Tensor& u_input,
                const c10::optional<at::Tensor>& u_weight, const c10::optional<at::Tensor>& u_bias) {
  constexpr const char* op = "layer_norm_double_backward";
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": input must be (N, D) rows of normalized features, got shape ",
                    shape_name(input.sizes()));
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                    ": input must be float32 or float64, got ", dtype_name(input.scalar_type()));
  TORCH_CHECK(input.device().is_cpu(), op, ": input is on ", input.device(), " but this kernel runs on cpu");
  const int64_t rows = input.size(0), features = input.size(1);
  auto check = [&](const char* name, const at::Tensor& t, std::vector<int64_t> shape) {
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " has shape ", shape_name(t.sizes()),
                      " but input ", shape_name(input.sizes()), " needs ", shape_name(shape));
    TORCH_CHECK_VALUE(t.scalar_type() == input.scalar_type() && t.device() == input.device(), op, ": ", name, " is ",
                      dtype_name(t.scalar_type()), " on ", t.device(), " but input is ",
                      dtype_name(input.scalar_type()), " on ", input.device());
  };
  check("mean", mean, {rows});
  check("rstd", rstd, {rows});
  if (weight.has_value()) check("weight", *weight, {features});
  check("grad_out", grad_out, {rows, features});
  check("u_input", u_input, {rows, features});
  if (u_weight.has_value()) check("u_weight", *u_weight, {features});
  if (u_bias.has_value()) check("u_bias", *u_bias, {features});
}

template <typename T>
void double_backward_rows(const T* x, const T* mean, const T* rstd, const T* gamma, const T* g, const T* u,
                          const T* u_gamma, const T* u_beta, T* d_g, T* d_x, T* d_gamma, int64_t rows,
                          int64_t features) {
  using Rows = void (*)(const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, T*, T*,
                        double*, int64_t, int64_t, int64_t);
  Rows rows_function = &baseline::layer_norm_double_backward_rows<T>;
#if OPTIM_X86_DISPATCH
  if (cpu_isa() == CpuIsa::kAvx512) rows_function = &avx512::layer_norm_double_backward_rows<T>;
  if (cpu_isa() == CpuIsa::kAvx2) rows_function = &avx2::layer_norm_double_backward_rows<T>;
#endif
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads * features), 0.0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, features));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    rows_function(x, mean, rstd, gamma, g, u, u_gamma, u_beta, d_g, d_x,
                  partial.data() + at::get_thread_num() * features, first, last, features);
  });
  for (int64_t j = 0; j < features; ++j) {
    double total = 0.0;
    for (int64_t t = 0; t < threads; ++t) total += partial[t * features + j];
    d_gamma[j] = static_cast<T>(total);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_double_backward_cpu(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    const at::Tensor& grad_out, const at::Tensor& u_input, const c10::optional<at::Tensor>& u_weight,
    const c10::optional<at::Tensor>& u_bias) {
  check_args(input, mean, rstd, weight, grad_out, u_input, u_weight, u_bias);
  const at::Tensor x = input.contiguous(), mu = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor g = grad_out.contiguous(), u = u_input.contiguous();
  // A missing weight is ones, a missing cotangent zeros (D values each, in cache): the loops stay branch-free.
  const int64_t features = x.size(1);
  const at::Tensor gamma = weight.has_value() ? weight->contiguous() : at::ones({features}, x.options());
  const at::Tensor u_gamma = u_weight.has_value() ? u_weight->contiguous() : at::zeros({features}, x.options());
  const at::Tensor u_beta = u_bias.has_value() ? u_bias->contiguous() : at::zeros({features}, x.options());
  at::Tensor d_g = at::empty_like(x), d_x = at::empty_like(x), d_gamma = at::empty({features}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_double_backward_cpu", [&] {
    auto data = [](const at::Tensor& t) { return t.data_ptr<scalar_t>(); };
    double_backward_rows<scalar_t>(data(x), data(mu), data(r), data(gamma), data(g), data(u), data(u_gamma),
                                   data(u_beta), data(d_g), data(d_x), data(d_gamma), x.size(0), features);
  });
  return {d_g, d_x, d_gamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("layer_norm_double_backward", &layer_norm_double_backward_cpu); }

}  // namespace optim
