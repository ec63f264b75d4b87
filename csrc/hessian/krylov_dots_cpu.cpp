// CPU kernel of optim::krylov_dots: c[b, i] = Σ_j basis[b, i, j] · w[b, j] with float64 products and sums, in one
// pass over basis and no float64 copy of it. The columns are split between the threads; each thread walks its
// columns in cache-sized blocks, so the block of w is read from cache by all m rows, and keeps its own float64
// partial sums, added up in thread order at the end (the same split for the same thread count: reproducible).
#include "krylov_dots.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace optim {
namespace {

constexpr int64_t kColumnBlock = 2048;

// bfloat16 and half widen through float (their conversion to double is not defined directly); products of two
// widened values are exact in double.
template <typename scalar_t>
inline double widen(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return x;
  } else {
    return static_cast<double>(static_cast<float>(x));
  }
}

template <typename scalar_t>
void krylov_dots_rows(const at::Tensor& basis, const at::Tensor& w, double* out) {
  const int64_t batch = basis.size(0), rows = basis.size(1), n = basis.size(2);
  const scalar_t* basis_data = basis.data_ptr<scalar_t>();
  const scalar_t* w_data = w.data_ptr<scalar_t>();
  const int64_t basis_batch_stride = basis.stride(0), basis_row_stride = basis.stride(1);
  const int64_t w_batch_stride = w.stride(0);
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads * batch * rows), 0.0);
  at::parallel_for(0, n, kColumnBlock, [&](int64_t first, int64_t last) {
    double* mine = partial.data() + at::get_thread_num() * batch * rows;
    for (int64_t block = first; block < last; block += kColumnBlock) {
      const int64_t end = std::min(last, block + kColumnBlock);
      for (int64_t b = 0; b < batch; ++b) {
        const scalar_t* wb = w_data + b * w_batch_stride;
        // Four rows at a time: four independent float64 accumulation chains (the add latency, not the memory,
        // bounds one chain) and one load of w for four rows.
        int64_t i = 0;
        for (; i + 4 <= rows; i += 4) {
          const scalar_t* row0 = basis_data + b * basis_batch_stride + i * basis_row_stride;
          const scalar_t* row1 = row0 + basis_row_stride;
          const scalar_t* row2 = row1 + basis_row_stride;
          const scalar_t* row3 = row2 + basis_row_stride;
          double sum0 = 0.0, sum1 = 0.0, sum2 = 0.0, sum3 = 0.0;
#pragma omp simd reduction(+ : sum0, sum1, sum2, sum3)
          for (int64_t j = block; j < end; ++j) {
            const double wj = widen(wb[j]);
            sum0 += widen(row0[j]) * wj;
            sum1 += widen(row1[j]) * wj;
            sum2 += widen(row2[j]) * wj;
            sum3 += widen(row3[j]) * wj;
          }
          mine[b * rows + i] += sum0;
          mine[b * rows + i + 1] += sum1;
          mine[b * rows + i + 2] += sum2;
          mine[b * rows + i + 3] += sum3;
        }
        for (; i < rows; ++i) {
          const scalar_t* row = basis_data + b * basis_batch_stride + i * basis_row_stride;
          double sum = 0.0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = block; j < end; ++j) {
            sum += widen(row[j]) * widen(wb[j]);
          }
          mine[b * rows + i] += sum;
        }
      }
    }
  });
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t k = 0; k < batch * rows; ++k) out[k] += partial[t * batch * rows + k];
  }
}

at::Tensor krylov_dots_cpu(const at::Tensor& basis_in, const at::Tensor& w_in) {
  check_krylov_dots_args(basis_in, w_in, c10::DeviceType::CPU);
  const at::Tensor basis = unit_stride_rows(basis_in);
  const at::Tensor w = unit_stride_rows(w_in);
  at::Tensor out = at::zeros({basis.size(0), basis.size(1)}, basis.options().dtype(at::kDouble));
  if (out.numel() == 0 || basis.size(2) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, basis.scalar_type(), "krylov_dots_cpu", [&] {
    krylov_dots_rows<scalar_t>(basis, w, out.data_ptr<double>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("krylov_dots", &krylov_dots_cpu); }

}  // namespace optim
