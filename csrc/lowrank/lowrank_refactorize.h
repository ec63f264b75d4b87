// optim::lowrank_refactorize_ (schema, math and reference: optim/lowrank/_ops.py), the part shared by the CPU and
// CUDA kernels: the argument checks and the factorizations, which call ATen's batched linear algebra
// (at::linalg_qr, at::linalg_svd, at::bmm; LAPACK on CPU, cuSOLVER/cuBLAS on CUDA). What the kernels add is the
// write-back: one pass that multiplies by S·√Σ, rounds to the factors' dtype and stores into every layer's B and A
// through their own strides (no stacked copy-back, no per-layer elementwise launches).
#pragma once

#include "../common/checks.h"

#include <tuple>

namespace optim {

inline void check_lowrank_refactorize_args(at::TensorList B, at::TensorList A, c10::DeviceType device_type) {
  constexpr const char* op = "lowrank_refactorize_";
  TORCH_CHECK_VALUE(B.size() == A.size(), op, ": B has ", B.size(), " tensors but A has ", A.size(),
                    "; pass one (B, A) pair per layer");
  if (B.empty()) return;
  const at::Tensor& b0 = B[0];
  const at::Tensor& a0 = A[0];
  TORCH_CHECK_VALUE(b0.dim() == 2 && a0.dim() == 2, op, ": factors must be 2-D, got B[0] of shape ",
                    shape_name(b0.sizes()), " and A[0] of shape ", shape_name(a0.sizes()));
  const int64_t m = b0.size(0), r = b0.size(1), n = a0.size(1);
  TORCH_CHECK_VALUE(a0.size(0) == r, op, ": B[0] is ", m, "x", r, " and A[0] is ", a0.size(0), "x", n,
                    "; B's columns must equal A's rows (the rank)");
  TORCH_CHECK_VALUE(r >= 1 && r <= std::min(m, n), op, ": the rank r=", r, " must satisfy 1 <= r <= min(m, n) = ",
                    std::min(m, n), " for B ", m, "x", r, " and A ", r, "x", n);
  const auto dtype = b0.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": factors must be float64, float32, bfloat16 or float16, got ", dtype_name(dtype));
  TORCH_CHECK(b0.device().type() == device_type, op, ": B[0] is on ", b0.device(), " but this kernel runs on ",
              device_type);
  const std::pair<const char*, at::TensorList> lists[] = {{"B", B}, {"A", A}};
  for (const auto& [name, tensors] : lists) {
    const at::Tensor& first = tensors[0];
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, "[", i, "] is sparse; dense factors are required");
      TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.device() == b0.device(), op, ": ", name, "[", i, "] is ",
                  dtype_name(t.scalar_type()), " on ", t.device(), " but B[0] is ", dtype_name(dtype), " on ",
                  b0.device(), "; one call takes factors of one dtype and device (group the layers by both)");
      TORCH_CHECK_VALUE(t.sizes() == first.sizes(), op, ": ", name, "[", i, "] has shape ", shape_name(t.sizes()), " but ",
                  name, "[0] has shape ", shape_name(first.sizes()),
                  "; one call takes layers of one shape (group the layers by shape)");
    }
  }
  std::vector<OverlapOperand> operands;
  add_overlap_operands(operands, "B", B, true);
  add_overlap_operands(operands, "A", A, true);
  check_no_overlap(op, operands);
}

// The balanced factors before their scaling, from ATen's batched linear algebra in the working dtype:
//   left  = Q_B U      (L x m x r)      right   = Vᵀ Q_Aᵀ (L x r x n)
//   sigma = Σ          (L x r)          largest = the entry of largest magnitude of each column of left (L x r)
// The new factors are B = left·diag(c), A = diag(c)·right with c = sign(largest)·√sigma (the kernels' pass).
struct BalancedFactorParts {
  at::Tensor left;
  at::Tensor right;
  at::Tensor sigma;
  at::Tensor largest;
};

inline BalancedFactorParts balanced_factor_parts(at::TensorList B, at::TensorList A) {
  const auto work = B[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor b = at::stack(B).to(work);
  const at::Tensor a = at::stack(A).to(work);
  TORCH_CHECK_VALUE(at::isfinite(b).all().item<bool>() && at::isfinite(a).all().item<bool>(),
                    "lowrank_refactorize_: the factors contain NaN or inf; nothing was changed (a diverged run "
                    "cannot be refactorized: restore a checkpoint or lower the learning rate)");
  const auto [q_b, r_b] = at::linalg_qr(b);
  const auto [q_a, r_a] = at::linalg_qr(a.transpose(-2, -1));
  const auto [u, sigma, vh] = at::linalg_svd(at::bmm(r_b, r_a.transpose(-2, -1)), /*full_matrices=*/false);
  BalancedFactorParts parts;
  parts.left = at::bmm(q_b, u).contiguous();
  parts.right = at::bmm(vh, q_a.transpose(-2, -1)).contiguous();
  parts.sigma = sigma.contiguous();
  parts.largest = parts.left.gather(1, parts.left.abs().argmax(1, /*keepdim=*/true)).squeeze(1).contiguous();
  return parts;
}

}  // namespace optim
