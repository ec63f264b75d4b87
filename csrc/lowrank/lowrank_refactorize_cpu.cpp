// CPU kernel of optim::lowrank_refactorize_ (schema, math and reference: optim/lowrank/_ops.py). ATen computes the
// QRs, the small SVDs and the two batched products (lowrank_refactorize.h); this file's loop scales the columns of
// Q_B U and the rows of Vᵀ Q_Aᵀ by sign·√σ, rounds once to the factors' dtype and stores into every B[l] and A[l]
// through their strides, one at::parallel_for over all rows of all layers.
#include "lowrank_refactorize.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace optim {
namespace {

template <typename out_t, typename T>
void store_balanced_factors(const BalancedFactorParts& parts, at::TensorList B, at::TensorList A) {
  const int64_t layers = static_cast<int64_t>(B.size());
  const int64_t m = B[0].size(0), r = B[0].size(1), n = A[0].size(1);
  const T* left = parts.left.data_ptr<T>();
  const T* right = parts.right.data_ptr<T>();
  const T* sigma = parts.sigma.data_ptr<T>();
  const T* largest = parts.largest.data_ptr<T>();
  std::vector<T> coefficient(layers * r);
  for (int64_t k = 0; k < layers * r; ++k) {
    coefficient[k] = (largest[k] < T(0) ? T(-1) : T(1)) * std::sqrt(sigma[k]);
  }
  std::vector<out_t*> b_data(layers), a_data(layers);
  for (int64_t l = 0; l < layers; ++l) {
    b_data[l] = B[l].data_ptr<out_t>();
    a_data[l] = A[l].data_ptr<out_t>();
  }
  // Rows 0 .. layers*m-1 are the rows of the B's, then layers*r rows of the A's.
  const int64_t b_rows = layers * m;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(std::max(r, n), 1));
  at::parallel_for(0, b_rows + layers * r, grain, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      if (row < b_rows) {
        const int64_t l = row / m, i = row % m;
        const int64_t s0 = B[l].stride(0), s1 = B[l].stride(1);
        const T* source = left + row * r;
        const T* c = coefficient.data() + l * r;
        out_t* out = b_data[l] + i * s0;
        for (int64_t k = 0; k < r; ++k) out[k * s1] = static_cast<out_t>(source[k] * c[k]);
      } else {
        const int64_t a_row = row - b_rows;
        const int64_t l = a_row / r, k = a_row % r;
        const int64_t s0 = A[l].stride(0), s1 = A[l].stride(1);
        const T* source = right + a_row * n;
        const T c = coefficient[a_row];
        out_t* out = a_data[l] + k * s0;
        if (s1 == 1) {
          for (int64_t j = 0; j < n; ++j) out[j] = static_cast<out_t>(c * source[j]);
        } else {
          for (int64_t j = 0; j < n; ++j) out[j * s1] = static_cast<out_t>(c * source[j]);
        }
      }
    }
  });
}

void lowrank_refactorize_cpu(at::TensorList B, at::TensorList A) {
  check_lowrank_refactorize_args(B, A, c10::DeviceType::CPU);
  if (B.empty()) return;
  const BalancedFactorParts parts = balanced_factor_parts(B, A);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, B[0].scalar_type(), "lowrank_refactorize_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    store_balanced_factors<scalar_t, T>(parts, B, A);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("lowrank_refactorize_", &lowrank_refactorize_cpu); }

}  // namespace optim
