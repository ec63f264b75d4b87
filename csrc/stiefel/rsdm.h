// Shared by the CPU and CUDA kernels of optim::rsdm_step_ and optim::rsdm_sample_rows_ (schemas, math and
// references: optim/stiefel/_ops.py): argument checks that mirror the Python ones, and the row sampler.
#pragma once

#include "../common/checks.h"
#include "../common/counters.h"
#include "../common/device_math.h"

#include <c10/util/string_view.h>

#include <optional>

namespace optim {

enum class RsdmCore : int { kQR = 0, kCayley = 1, kExp = 2 };

inline RsdmCore parse_rsdm_core(c10::string_view core) {
  if (core == "qr") return RsdmCore::kQR;
  if (core == "cayley") return RsdmCore::kCayley;
  if (core == "exp") return RsdmCore::kExp;
  TORCH_CHECK_VALUE(false, "rsdm_step_: core must be one of ('qr', 'cayley', 'exp'), got '", std::string(core), "'");
}

// Taylor degree of the exponential core after scaling ‖M‖₁ below kExpNormBound: the truncation error is below
// kExpNormBound^(d+1)/(d+1)!, i.e. 5e-9 for float (d = 8) and 2e-17 for double (d = 14).
// float32 X with r above this: the core Y and the rotated rows Y·X_I are computed in float64 and rounded once (A =
// G_I X_Iᵀ stays float32: M = −lr(A − Aᵀ)/2 is exactly skew whatever A's rounding, so that rounding only moves the
// direction, never X off the manifold). In float32 throughout, the rounding of the r-term row products and of Y's
// orthogonality accumulates: at n = 1000, p = 600, r = 300, 100 PCA steps drifted to ‖XᵀX − I‖_F = 6e-5, against
// 4e-6 with this (a float64 core alone: 5e-5). At r ≤ 128 float32 stays within 1e-5 between the default
// re-orthonormalizations. Same rule in the reference (optim/stiefel/_ops.py) and both kernels; on the CPU a small
// step moves the rows by its increment instead (kIncrementMaxNorm).
constexpr int64_t kFloat64RotationMinRank = 129;

// On the CPU, where ‖M‖_F <= kIncrementMaxNorm a float64-rotated step moves the rows by X_I + D·X_I, a float32
// product, D = Y − I in float32: for the QR core from the increment CholeskyQR in float32 (rsdm_cpu.cpp), for Cayley
// and exp as fl32 of the float64 Y − I. Every rounding is then ‖D‖ times the rows' own rounding into float32
// instead of ‖Y‖ times it, so the drift stays near the float64 product's: without re-orthonormalization
// ‖XᵀX − I‖_F, increment core against the float64 product (session simulations): 4.6e-6 vs 3.8e-6 after 100 PCA
// steps at n = 1000, p = 600, r = 300 (median ‖Y − I‖_F 0.73), 4.7e-6 vs 3.4e-6 after 20 at the paper's n = 2000,
// p = 1500, r = 700 (median 2.0), against 5.9e-5 and 5.0e-5 in float32 throughout; at a median of 3.9 it was 3.7×
// the float64 product's, at 8.2 about float32's. At r = 700 (one thread) a float64 Householder core takes 43 ms
// and Y·X_I in float64 31 ms; the increment's float32 product takes 17 ms, and the whole op at the paper's PCA
// size went from 92 to 56–59 ms (a naive float32 step's share: ~60 ms).
constexpr double kIncrementMaxNorm = 2.0;

// On the CPU also float32 matrices at least half as wide as long (2·P >= N, the orthogonal group among them): there a
// float32 rotation of r = 64 rows drifts ~6e-6 in 10 steps (about √r·P/N·1e-6 per step), so the default policy ran a
// float64 QR (N·P², 25 ms at 512×512) every 10 steps. And every float32 matrix at r >= kCpuAccurateRotationMinRank:
// there a small step's increment core (one Cholesky pass) costs no more than the float32 CholeskyQR2 core it replaces
// (two), and its drift lets the optimizer's default skip the defect estimate (8·N·P work every 10 steps) and most of
// the re-orthonormalizations it asked for: a 1024×128 loop at r = 64 went from 1.08–1.19× to 0.68–0.82× the naive
// float32 step's time (session A/B runs; Cayley 0.65–0.9× its old time). Not for the exp core, whose float64
// exponential (torch.linalg) made that loop 1.4× slower. Below that rank the float32 core is Gram–Schmidt loops and
// the drift small. (The CUDA kernel keeps the rank rule.)
constexpr int64_t kCpuAccurateRotationMinRank = 24;
inline bool cpu_rotates_in_float64(int64_t r, int64_t n_rows, int64_t n_cols, RsdmCore core) {
  return r >= kFloat64RotationMinRank || 2 * n_cols >= n_rows ||
         (r >= kCpuAccurateRotationMinRank && core != RsdmCore::kExp);
}

constexpr double kExpNormBound = 0.5;
template <typename T>
constexpr int exp_taylor_degree() {
  return sizeof(T) == 8 ? 14 : 8;
}

inline void check_sample_rows_args(const at::Tensor& out, int64_t n, int64_t offset) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kLong, "rsdm_sample_rows_: out must be int64, got ",
                    dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.dim() >= 1, "rsdm_sample_rows_: out must have at least one dimension (..., r)");
  const int64_t r = out.size(-1);
  TORCH_CHECK_VALUE(r > 0 && r <= n, "rsdm_sample_rows_: the rank r = out.shape[-1] = ", r, " must be in [1, n = ",
                    n, "]");
  TORCH_CHECK_VALUE(offset >= 0, "rsdm_sample_rows_: offset must be >= 0, got ", offset);
  check_counter_range("rsdm_sample_rows_", offset, out.numel());
  check_no_overlap("rsdm_sample_rows_", {{"out", out, true}});
}

// After check_rsdm_step_args and the core's name: X is written, G too when transport is set, indices only read.
inline void check_rsdm_step_overlap(const at::Tensor& x, const at::Tensor& g, const std::optional<at::Tensor>& indices,
                                    bool transport) {
  std::vector<OverlapOperand> operands{{"X", x, true}, {"G", g, transport}};
  if (indices.has_value()) operands.push_back({"indices", *indices, false});
  check_no_overlap("rsdm_step_", operands);
}

// Returns r, the number of rows each matrix updates.
inline int64_t check_rsdm_step_args(const at::Tensor& x, const at::Tensor& g, const std::optional<at::Tensor>& indices,
                                    int64_t rank, int64_t offset, double lr, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "rsdm_step_: X has shape ", shape_name(x.sizes()),
                    "; it must be a (batch of) matrix (..., n, p)");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "rsdm_step_: X is ",
                    dtype_name(x.scalar_type()),
                    "; the step (and its r×r core) runs in float32 or float64 only (bfloat16/float16 cannot keep X "
                    "on the manifold); keep the parameter in float32");
  TORCH_CHECK(x.device().type() == device_type, "rsdm_step_: X is on ", x.device(), " but this kernel runs on ",
              device_type);
  TORCH_CHECK_VALUE(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type() && g.device() == x.device(),
              "rsdm_step_: G is ", dtype_name(g.scalar_type()), " ", shape_name(g.sizes()), " on ", g.device(),
              " but X is ", dtype_name(x.scalar_type()), " ", shape_name(x.sizes()), " on ", x.device(),
              "; they must match");
  TORCH_CHECK_VALUE(std::isfinite(lr), "rsdm_step_: lr must be finite, got ", lr);
  const int64_t n_rows = std::max(x.size(-2), x.size(-1));
  if (!indices.has_value()) {
    TORCH_CHECK_VALUE(rank > 0 && rank <= n_rows, "rsdm_step_: rank must be in [1, ", n_rows, "] (max(n, p) of X ",
                      shape_name(x.sizes()), "), got ", rank);
    TORCH_CHECK_VALUE(offset >= 0, "rsdm_step_: offset must be >= 0, got ", offset);
    return rank;
  }
  const at::Tensor& idx = *indices;
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong && idx.device() == x.device(), "rsdm_step_: indices must be int64 on ",
              x.device(), ", got ", dtype_name(idx.scalar_type()), " on ", idx.device());
  TORCH_CHECK_VALUE(idx.dim() == x.dim() - 1 && idx.sizes().slice(0, idx.dim() - 1) == x.sizes().slice(0, x.dim() - 2),
                    "rsdm_step_: indices has shape ", shape_name(idx.sizes()), "; for X ", shape_name(x.sizes()),
                    " it must be X.shape[:-2] + (r,)");
  const int64_t r = idx.size(-1);
  TORCH_CHECK_VALUE(r > 0 && r <= n_rows && r == rank, "rsdm_step_: indices.shape[-1] = ", r, " must be in [1, ",
                    n_rows, "] and equal rank = ", rank);
  return r;
}

// One draw of Floyd's algorithm: an integer uniform on [0, bound) from counter `counter` (53 high bits mod bound).
OPTIM_HOST_DEVICE uint64_t floyd_draw(uint64_t mixed_seed, uint64_t counter, uint64_t bound) {
  return (counter_hash(mixed_seed, counter) >> 11) % bound;
}

// Floyd's algorithm for r distinct indices of [0, n) using counters first_counter + k, k < r, recorded in `bitmap`
// ((n + 31) / 32 zeroed words), then written in increasing order to out[0..r). Serial: one thread per matrix.
template <typename index_t>
OPTIM_HOST_DEVICE void floyd_sample(uint32_t* bitmap, int64_t n, int64_t r, uint64_t mixed_seed,
                                    uint64_t first_counter, index_t* out) {
  for (int64_t k = 0; k < r; ++k) {
    const int64_t j = n - r + k;
    int64_t t = static_cast<int64_t>(floyd_draw(mixed_seed, first_counter + k, static_cast<uint64_t>(j + 1)));
    if (bitmap[t >> 5] & (1u << (t & 31))) t = j;
    bitmap[t >> 5] |= 1u << (t & 31);
  }
  int64_t written = 0;
  const int64_t words = (n + 31) / 32;
  for (int64_t w = 0; w < words && written < r; ++w) {
    uint32_t bits = bitmap[w];
    while (bits) {
      int bit = 0;
      while (!((bits >> bit) & 1u)) ++bit;
      out[written++] = static_cast<index_t>(w * 32 + bit);
      bits &= bits - 1;
    }
  }
}

// Whether floyd_sample keeps the chosen indices as a sorted list instead of an n-bit table: when the table would be
// much larger than the r indices (a huge n with a small r allocated n/8 bytes per matrix). Both give the same set.
OPTIM_HOST_DEVICE bool floyd_uses_list(int64_t n, int64_t r) { return n > 64 * r && r <= 4096; }

// Floyd's algorithm as floyd_sample, the chosen indices kept sorted in out[0..k) (binary search, insertion): O(r²)
// moves at worst, no table. The new candidate j = n − r + k exceeds every earlier pick, so it always appends.
template <typename index_t>
OPTIM_HOST_DEVICE void floyd_sample_list(int64_t n, int64_t r, uint64_t mixed_seed, uint64_t first_counter,
                                         index_t* out) {
  for (int64_t k = 0; k < r; ++k) {
    const int64_t j = n - r + k;
    const int64_t t = static_cast<int64_t>(floyd_draw(mixed_seed, first_counter + k, static_cast<uint64_t>(j + 1)));
    int64_t low = 0, high = k;  // first position whose value is >= t
    while (low < high) {
      const int64_t middle = (low + high) / 2;
      if (static_cast<int64_t>(out[middle]) < t) low = middle + 1; else high = middle;
    }
    if (low < k && static_cast<int64_t>(out[low]) == t) {
      out[k] = static_cast<index_t>(j);
      continue;
    }
    for (int64_t i = k; i > low; --i) out[i] = out[i - 1];
    out[low] = static_cast<index_t>(t);
  }
}

}  // namespace optim
