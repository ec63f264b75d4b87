// Shared parts of the optim::sdpa_* kernels (schemas, math and references: optim/hessian/_attention_ops.py).
// The checks read as the Python ones do, so an error names the same argument whichever kernel runs.
#pragma once

#include "../common/checks.h"

#include <cmath>

namespace optim {

inline at::ScalarType attention_work_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_attention_same(const char* op, const char* name, const at::Tensor& tensor, at::IntArrayRef shape,
                                 const at::Tensor& query) {
  TORCH_CHECK_VALUE(tensor.sizes() == shape, op, ": ", name, " has shape ", shape_name(tensor.sizes()), ", expected ",
                    shape_name(shape));
  TORCH_CHECK_VALUE(tensor.scalar_type() == query.scalar_type() && tensor.device() == query.device(), op, ": ", name,
                    " is ", dtype_name(tensor.scalar_type()), " on ", tensor.device(), " but query is ",
                    dtype_name(query.scalar_type()), " on ", query.device(), "; they must match");
}

inline void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& attn_mask, double scale) {
  const char* names[3] = {"query", "key", "value"};
  const at::Tensor* tensors[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(tensors[i]->dim() == 4, op, ": ", names[i],
                      " must have shape (batch, heads, tokens, head_dim), got ", shape_name(tensors[i]->sizes()));
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": query must be float64, float32, bfloat16 or float16, got ", dtype_name(dtype));
  for (int i = 1; i < 3; ++i) {
    TORCH_CHECK_VALUE(tensors[i]->scalar_type() == dtype && tensors[i]->device() == q.device(), op, ": ", names[i],
                      " is ", dtype_name(tensors[i]->scalar_type()), " on ", tensors[i]->device(), " but query is ",
                      dtype_name(dtype), " on ", q.device(), "; they must match");
  }
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == batch && v.size(0) == batch, op, ": key ", shape_name(k.sizes()), " and value ",
                    shape_name(v.sizes()), " must have the batch size ", batch, " of query ", shape_name(q.sizes()));
  TORCH_CHECK_VALUE(k.size(1) == v.size(1) && k.size(2) == v.size(2), op, ": key ", shape_name(k.sizes()),
                    " and value ", shape_name(v.sizes()), " must have the same heads and tokens");
  TORCH_CHECK_VALUE(k.size(1) > 0 && heads % k.size(1) == 0, op, ": key has ", k.size(1),
                    " heads, which must divide the ", heads, " heads of query (grouped-query attention)");
  TORCH_CHECK_VALUE(k.size(3) == dim, op, ": key has head_dim ", k.size(3), " but query has ", dim,
                    "; they must match");
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()), op,
                      ": attn_mask must be boolean (True = attend) or floating point (added to the scores), got ",
                      dtype_name(mask.scalar_type()));
    TORCH_CHECK_VALUE(mask.device() == q.device(), op, ": attn_mask is on ", mask.device(), " but query is on ",
                      q.device());
    const std::vector<int64_t> full = {batch, heads, q.size(2), k.size(2)};
    bool ok = mask.dim() <= 4;
    for (int64_t i = 0; ok && i < mask.dim(); ++i) {
      const int64_t size = mask.size(mask.dim() - 1 - i);
      ok = size == 1 || size == full[3 - i];
    }
    TORCH_CHECK_VALUE(ok, op, ": attn_mask has shape ", shape_name(mask.sizes()),
                      ", which does not broadcast to (batch, heads, query tokens, key tokens) = ", shape_name(full));
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

inline void check_attention_saved(const char* op, const at::Tensor& q, const at::Tensor& v, const at::Tensor& out,
                                  const at::Tensor& lse) {
  check_attention_same(op, "out", out, {q.size(0), q.size(1), q.size(2), v.size(3)}, q);
  const auto work = attention_work_dtype(q.scalar_type());
  const std::vector<int64_t> shape = {q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(shape) && lse.scalar_type() == work && lse.device() == q.device(),
                    op, ": lse must be ", dtype_name(work), " of shape ", shape_name(shape), " on ", q.device(),
                    ", got ", dtype_name(lse.scalar_type()), " of shape ", shape_name(lse.sizes()), " on ",
                    lse.device());
}

}  // namespace optim
