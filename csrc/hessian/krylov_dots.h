// Shared parts of the optim::krylov_dots kernels (schema, math and reference: optim/hessian/_ops.py).
#pragma once

#include "../common/checks.h"

namespace optim {

inline void check_krylov_dots_args(const at::Tensor& basis, const at::Tensor& w, c10::DeviceType device_type) {
  constexpr const char* op = "krylov_dots";
  TORCH_CHECK_VALUE(basis.dim() == 3, op, ": basis must have shape (B, m, n), got ", basis.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == basis.size(0) && w.size(1) == basis.size(2), op,
                    ": w must have shape (B, n) = (", basis.size(0), ", ", basis.size(2), ") to match basis ",
                    basis.sizes(), ", got ", w.sizes());
  const auto dtype = basis.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": basis must be floating point, got ", dtype_name(dtype));
  TORCH_CHECK_VALUE(w.scalar_type() == dtype && w.device() == basis.device(), op, ": w is ", dtype_name(w.scalar_type()),
              " on ", w.device(), " but basis is ", dtype_name(dtype), " on ", basis.device());
  TORCH_CHECK(basis.device().type() == device_type, op, ": basis is on ", basis.device(), " but this kernel runs on ",
              device_type);
}

// Rows of basis and w with unit stride along n (a slice basis[:, :m] of a larger buffer qualifies as is).
inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace optim
