// CPU kernels of optim::rsdm_sample_rows_ and optim::rsdm_step_ (schemas, math and references:
// optim/stiefel/_ops.py). Matrices of a batch are spread over threads; each matrix gathers its r rows of X and G
// into contiguous buffers, forms A = G_I X_Iᵀ and X_I ← Y X_I with at::mm (BLAS) and computes the r×r core Y with
// the loops below (the same algorithms as the CUDA kernel), then scatters the rows back.
#include "rsdm.h"
#include "../common/cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define OPTIM_RSDM_MXCSR 1
#endif

namespace optim {

// The CholeskyQR2 core's triangular loops, stamped out per instruction set (the build is baseline x86-64): at r = 64
// they were most of the op's time outside BLAS.
#define OPTIM_ISA_KERNELS "../stiefel/rsdm_cpu_cholqr_kernels.inc"  // relative to csrc/common
#include "../common/cpu_isa_variants.inc"

namespace {

constexpr int64_t kGrainWork = 1 << 17;
// Tile edge of the loops that read an r×r matrix and its transpose (A and Aᵀ for M).
constexpr int64_t kTransposeTile = 32;

// Flush-to-zero and denormals-are-zero for the current thread while in scope, restored on exit (the caller's
// floating-point mode is never changed). Near convergence Ω is tiny (~1e-8 in float32): the Gram–Schmidt dots of
// I − M and the products in the core then fall below 1.2e-38, and x86 handles such subnormals in microcode,
// 3–4× slower per step (measured: 0.30 ms vs 0.08 ms at r = 40). Values that small are far below the rounding of
// the O(1) entries they are added to, so flushing them leaves the result unchanged at fp32/fp64 precision.
class FlushDenormalsGuard {
 public:
  FlushDenormalsGuard() {
#if defined(OPTIM_RSDM_MXCSR)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t flushed = saved_ | (uint64_t(1) << 24);  // FZ
    __asm__ __volatile__("msr fpcr, %0" : : "r"(flushed));
#endif
  }
  ~FlushDenormalsGuard() {
#if defined(OPTIM_RSDM_MXCSR)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushDenormalsGuard(const FlushDenormalsGuard&) = delete;
  FlushDenormalsGuard& operator=(const FlushDenormalsGuard&) = delete;

 private:
#if defined(OPTIM_RSDM_MXCSR)
  unsigned int saved_ = 0;
#elif defined(__aarch64__)
  uint64_t saved_ = 0;
#endif
};

void sample_rows_into(int64_t* out, int64_t batch, int64_t n, int64_t r, int64_t seed, int64_t offset) {
  const uint64_t mixed_seed = mix64(static_cast<uint64_t>(seed));
  // Small problems stay on one thread: waking a thread pool costs more than sampling a few hundred indices.
  const int64_t work = floyd_uses_list(n, r) ? r * r / 8 + r : r + n / 32;
  const int64_t grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(work, 1));
  const bool list = floyd_uses_list(n, r);
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    if (list) {
      for (int64_t b = begin; b < end; ++b) {
        floyd_sample_list(n, r, mixed_seed, static_cast<uint64_t>(offset) + static_cast<uint64_t>(b * r), out + b * r);
      }
      return;
    }
    std::vector<uint32_t> bitmap((n + 31) / 32);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(bitmap.begin(), bitmap.end(), 0u);
      floyd_sample(bitmap.data(), n, r, mixed_seed, static_cast<uint64_t>(offset) + static_cast<uint64_t>(b * r),
                   out + b * r);
    }
  });
}

void rsdm_sample_rows_cpu(at::Tensor out, int64_t n, int64_t seed, int64_t offset) {
  check_sample_rows_args(out, n, offset);
  TORCH_CHECK(out.device().is_cpu(), "rsdm_sample_rows_: out is on ", out.device(), " but this kernel runs on cpu");
  const int64_t r = out.size(-1);
  at::Tensor work = out.contiguous();
  sample_rows_into(work.data_ptr<int64_t>(), work.numel() / r, n, r, seed, offset);
  if (!work.is_same(out)) out.copy_(work);
}

// C = A·B for row-major r×r matrices, through BLAS.
template <typename T>
void matmul(const T* a, const T* b, T* c, int64_t r, const at::TensorOptions& options) {
  at::Tensor out = at::from_blob(c, {r, r}, options);
  at::mm_out(out, at::from_blob(const_cast<T*>(a), {r, r}, options), at::from_blob(const_cast<T*>(b), {r, r}, options));
}

// In-place Gauss–Jordan inversion without pivoting; valid here because I − M/2 (M skew) has identity symmetric
// part, so every pivot is >= 1 in the Schur-complement sense.
template <typename T>
void invert_in_place(T* b, int64_t r) {
  for (int64_t k = 0; k < r; ++k) {
    T* row_k = b + k * r;
    const T inverse_pivot = T(1) / row_k[k];
    row_k[k] = T(1);
    for (int64_t j = 0; j < r; ++j) row_k[j] *= inverse_pivot;
    for (int64_t i = 0; i < r; ++i) {
      if (i == k) continue;
      T* row_i = b + i * r;
      const T factor = row_i[k];
      if (factor == T(0)) continue;
      row_i[k] = T(0);
      for (int64_t j = 0; j < r; ++j) row_i[j] -= factor * row_k[j];
    }
  }
}

// Above this rank the QR and Cayley cores go to LAPACK (torch.linalg, as the CUDA kernel does above r = 128):
// the loops below are unblocked O(r³) with serial dot products, 3–7× slower than LAPACK from r ≈ 64 on, and at the
// paper's r = 700 they made a step 0.6 s against 0.14 s for the naive PyTorch step. Below it the loops win (no
// ATen dispatch, no temporaries). The exponential core already multiplies through BLAS.
constexpr int64_t kLapackCoreMinRank = 48;

// Y = core(M) with torch.linalg (the same formulas as the reference), for large r.
template <typename T>
void lapack_core_in_place(T* m, int64_t r, RsdmCore core, const at::TensorOptions& options) {
  at::Tensor skew = at::from_blob(m, {r, r}, options);
  const at::Tensor eye = at::eye(r, options);
  at::Tensor y;
  if (core == RsdmCore::kCayley) {
    y = at::linalg_solve(eye - 0.5 * skew, eye + 0.5 * skew);
  } else {
    auto [q, rfactor] = at::linalg_qr(eye + skew);
    at::Tensor signs = at::sign(at::diagonal(rfactor, 0, -2, -1));
    signs = at::where(signs == 0, at::ones_like(signs), signs);
    y = q * signs.unsqueeze(-2);
  }
  skew.copy_(y);
}

// Cholesky QR twice (CholeskyQR2, Fukaya et al. 2014) for the QR core at kCholQRMinRank <= r <= kCholQRMaxRank:
// A = I + M has AᵀA = I − M² (M skew), so cond(A) = √(1 + ‖M‖₂²) is close to 1 for the steps RSDM takes, and
// Q = A·R⁻¹ with R the Cholesky factor of AᵀA is the Q of A's QR with diag(R) > 0 (the factorization is unique),
// as LAPACK's Householder Q with the sign fix. The second pass re-orthogonalizes Q to rounding level. In float64 it
// runs only where ‖M‖_F > kCholQROnePassMaxNorm: below that one pass leaves ‖QᵀQ − I‖_F at Householder's level
// (4–5e-15 for both at r = 64, ‖M‖_F from 0.01 to 10; a session measurement), and the pass it saves was a tenth of
// the float64-rotation step at 512×512, r = 64. The Gram matrices go through BLAS, the Cholesky and triangular
// solves are row-axpy loops the compiler vectorizes: at r = 64 in float32 a step's core then costs a fraction of
// torch.linalg.qr's (~120 µs there, most of it ATen and LAPACK set-up), which is what kept the fused step behind a
// naive PyTorch one at small shapes. cond(A) is bounded with ‖M‖_F: beyond cholqr_max_norm (a Gram condition number
// the first pass could not resolve in float32), or if a pivot is not positive, the Householder QR runs instead.
// Below r = 48 it replaces the Gram–Schmidt loops from r = 24 on, where it is faster (a whole step, one thread:
// 120×120 at r = 40 125 → 85 µs, 400×60 at r = 40 104 → 81, 256×256 at r = 24 69 → 54; at r = 16 it lost, 33 → 37).
constexpr int64_t kCholQRMinRank = 24;
constexpr int64_t kCholQRMaxRank = 128;
constexpr double kCholQROnePassMaxNorm = 10.0;
template <typename T>
constexpr double cholqr_max_norm() {
  return sizeof(T) == 8 ? 1e4 : 30.0;
}

// Pivots [begin, end) of cholesky_upper_in_place (the fastest instruction set).
template <bool kIncrement, typename T>
bool cholesky_panel(T* gram, int64_t r, int64_t begin, int64_t end) {
#if OPTIM_X86_DISPATCH
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return avx512::cholesky_upper_in_place<kIncrement>(gram, r, begin, end);
    case CpuIsa::kAvx2:
      return avx2::cholesky_upper_in_place<kIncrement>(gram, r, begin, end);
    case CpuIsa::kBaseline:
      break;
  }
#endif
  return baseline::cholesky_upper_in_place<kIncrement>(gram, r, begin, end);
}

// Row panels of the Cholesky loops at most this tall; the update of the rows below a panel is one BLAS product.
constexpr int64_t kCholeskyPanel = 128;

// The upper triangle of gram becomes R with RᵀR = gram, or with kIncrement S with (I + S)ᵀ(I + S) = I + gram (the
// trailing updates are the same, as they involve off-diagonal entries only); false if a pivot is not > 0. Up to
// r = kCholeskyPanel one unblocked pass; above, panels of rows with the rows below updated by
// gram[end:, end:] −= R[begin:end, end:]ᵀ·R[begin:end, end:] (at r = 700 the unblocked loops took ~9 ms).
template <bool kIncrement = false, typename T>
bool cholesky_upper(T* gram, int64_t r, const at::TensorOptions& options) {
  const at::Tensor whole = at::from_blob(gram, {r, r}, options);
  for (int64_t begin = 0; begin < r; begin += kCholeskyPanel) {
    const int64_t end = std::min(r, begin + kCholeskyPanel);
    if (!cholesky_panel<kIncrement>(gram, r, begin, end)) return false;
    if (end == r) break;
    const at::Tensor panel = whole.slice(0, begin, end).slice(1, end, r);
    at::Tensor trailing = whole.slice(0, end, r).slice(1, end, r);
    trailing.addmm_(panel.t(), panel, /*beta=*/1, /*alpha=*/-1);
  }
  return true;
}

// qt = Aᵀ becomes (A·R⁻¹)ᵀ (the fastest instruction set).
template <typename T>
void solve_upper_transposed(T* qt, const T* rfactor, int64_t r) {
#if OPTIM_X86_DISPATCH
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return avx512::solve_upper_transposed_in_place(qt, rfactor, r);
    case CpuIsa::kAvx2:
      return avx2::solve_upper_transposed_in_place(qt, rfactor, r);
    case CpuIsa::kBaseline:
      break;
  }
#endif
  baseline::solve_upper_transposed_in_place(qt, rfactor, r);
}

// Y = Q of I + M (diag(R) > 0) into m by CholeskyQR2; false (m unchanged) where it does not apply.
template <typename T>
bool cholqr2_core_in_place(T* m, int64_t r, const at::TensorOptions& options) {
  const int64_t rr = r * r;
  double norm2 = 0;
  for (int64_t e = 0; e < rr; ++e) norm2 += static_cast<double>(m[e]) * static_cast<double>(m[e]);
  const double bound = cholqr_max_norm<T>();
  if (!(norm2 <= bound * bound)) return false;
  // The factor is kept transposed (qt = Qᵀ, Q = I + M first): the solve for Q·R⁻¹ then runs along contiguous rows.
  std::vector<T> qt(rr), gram(rr);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) qt[i * r + j] = (i == j ? T(1) : T(0)) + m[j * r + i];
  const at::Tensor qt_view = at::from_blob(qt.data(), {r, r}, options);
  at::Tensor gram_view = at::from_blob(gram.data(), {r, r}, options);
  const int passes = sizeof(T) == 8 && norm2 <= kCholQROnePassMaxNorm * kCholQROnePassMaxNorm ? 1 : 2;
  for (int pass = 0; pass < passes; ++pass) {
    at::mm_out(gram_view, qt_view, qt_view.t());  // QᵀQ
    if (!cholesky_upper(gram.data(), r, options)) return false;
    solve_upper_transposed(qt.data(), gram.data(), r);
  }
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) m[i * r + j] = qt[j * r + i];
  return true;
}

// D = Y − I for the QR core, Y = Q of I + M (diag(R) > 0), computed in T without forming I + M or I + MᵀM
// (CholeskyQR in increments): with R = I + S the Cholesky factor of (I + M)ᵀ(I + M) = I + MᵀM (M skew),
// Q − I = (M − S)·R⁻¹. S comes from the increment Cholesky of H = MᵀM, and the triangular solve with R formed in T
// (its diagonal 1 + s rounded) perturbs D only relatively, so every rounding is relative to ‖D‖ and not to
// ‖Y‖ = √r: in float32 at r = 700, ‖M‖_F = 1.2, ‖(I + D)ᵀ(I + D) − I‖_F is 1.4e-7 against 6.3e-6 for a float32
// Householder Q and 4.3e-8 for fl32 of the float64 Q − I (a session measurement). That lets a float32 matrix move
// by X_I + D·X_I in float32 with the drift of a float64 rotation (kIncrementMaxNorm). cond(I + M)² = 1 + ‖M‖₂²,
// so one pass suffices for the norms it is used at. m (M on entry) becomes D; false (m unchanged) if a pivot fails.
template <typename T>
bool qr_increment_core_in_place(T* m, int64_t r, const at::TensorOptions& options) {
  const int64_t rr = r * r;
  std::vector<T> h(rr);
  at::Tensor m_view = at::from_blob(m, {r, r}, options);
  at::Tensor h_view = at::from_blob(h.data(), {r, r}, options);
  // H = MᵀM, of which the Cholesky loops read the upper triangle only: above one panel, the product by row panels
  // H[b:e, b:] = M[:, b:e]ᵀ·M[:, b:] (at r = 700 ~40% fewer multiply-adds than the whole product).
  for (int64_t begin = 0; begin < r; begin += kCholeskyPanel) {
    const int64_t end = std::min(r, begin + kCholeskyPanel);
    at::Tensor block = h_view.slice(0, begin, end).slice(1, begin, r);
    at::mm_out(block, m_view.slice(1, begin, end).t(), m_view.slice(1, begin, r));
  }
  if (!cholesky_upper<true>(h.data(), r, options)) return false;
  // R = I + S (upper), and the right-hand side M − S.
  std::vector<T> rfactor(rr, T(0));
  for (int64_t i = 0; i < r; ++i) {
    rfactor[i * r + i] = T(1) + h[i * r + i];
    for (int64_t j = i + 1; j < r; ++j) rfactor[i * r + j] = h[i * r + j];
  }
  if (r <= kCholQRMaxRank) {
    // The row-axpy solve on the transpose: qt = (M − S)ᵀ becomes ((M − S)R⁻¹)ᵀ = Dᵀ.
    std::vector<T> qt(rr);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) qt[i * r + j] = m[j * r + i] - (j <= i ? h[j * r + i] : T(0));
    solve_upper_transposed(qt.data(), rfactor.data(), r);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) m[i * r + j] = qt[j * r + i];
    return true;
  }
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = i; j < r; ++j) m[i * r + j] -= h[i * r + j];
  // LAPACK's blocked triangular solve: the row loops above are O(r³/2) unblocked.
  m_view.copy_(at::linalg_solve_triangular(at::from_blob(rfactor.data(), {r, r}, options), m_view, /*upper=*/true,
                                           /*left=*/false));
  return true;
}

// Y = core(M), M skew r×r (row-major, overwritten by Y).
template <typename T>
void core_in_place(T* m, int64_t r, RsdmCore core, const at::TensorOptions& options) {
  const int64_t rr = r * r;
  if (core == RsdmCore::kQR && r >= kCholQRMinRank && r <= kCholQRMaxRank &&
      cholqr2_core_in_place(m, r, options)) {
    return;
  }
  if (r >= kLapackCoreMinRank && core != RsdmCore::kExp) {
    lapack_core_in_place(m, r, core, options);
  } else if (core == RsdmCore::kCayley) {
    // Y = (I − M/2)⁻¹(I + M/2) = 2(I − M/2)⁻¹ − I
    for (int64_t e = 0; e < rr; ++e) m[e] = (e / r == e % r ? T(1) : T(0)) - T(0.5) * m[e];
    invert_in_place(m, r);
    for (int64_t e = 0; e < rr; ++e) m[e] = T(2) * m[e] - (e / r == e % r ? T(1) : T(0));
  } else if (core == RsdmCore::kQR) {
    // Gram–Schmidt with one re-orthogonalization pass on the columns of I + M, i.e. the rows of C = I − M.
    for (int64_t e = 0; e < rr; ++e) m[e] = (e / r == e % r ? T(1) : T(0)) - m[e];
    std::vector<T> dots(r);
    for (int64_t k = 0; k < r; ++k) {
      T* row_k = m + k * r;
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t j = 0; j < k; ++j) {
          const T* row_j = m + j * r;
          T dot = 0;
          for (int64_t c = 0; c < r; ++c) dot += row_j[c] * row_k[c];
          dots[j] = dot;
        }
        for (int64_t j = 0; j < k; ++j) {
          const T* row_j = m + j * r;
          const T dot = dots[j];
          for (int64_t c = 0; c < r; ++c) row_k[c] -= dot * row_j[c];
        }
      }
      T norm2 = 0;
      for (int64_t c = 0; c < r; ++c) norm2 += row_k[c] * row_k[c];
      const T inverse_norm = T(1) / std::sqrt(norm2);
      for (int64_t c = 0; c < r; ++c) row_k[c] *= inverse_norm;
    }
    // Q's columns are C's rows: Y = Cᵀ.
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = i + 1; j < r; ++j) std::swap(m[i * r + j], m[j * r + i]);
  } else {
    // Scaling and squaring: e^M = (e^{M/2^s})^{2^s} with ‖M/2^s‖₁ <= kExpNormBound, Taylor by Horner's rule.
    T norm1 = 0;
    for (int64_t j = 0; j < r; ++j) {
      T column = 0;
      for (int64_t i = 0; i < r; ++i) column += std::abs(m[i * r + j]);
      norm1 = std::max(norm1, column);
    }
    int squarings = 0;
    if (norm1 > T(kExpNormBound)) squarings = static_cast<int>(std::ceil(std::log2(norm1 / T(kExpNormBound))));
    const T scale = std::ldexp(T(1), -squarings);
    for (int64_t e = 0; e < rr; ++e) m[e] *= scale;
    std::vector<T> power(rr), product(rr);
    constexpr int degree = exp_taylor_degree<T>();
    for (int64_t e = 0; e < rr; ++e) power[e] = (e / r == e % r ? T(1) : T(0)) + m[e] / T(degree);
    for (int k = degree - 1; k >= 1; --k) {
      matmul(m, power.data(), product.data(), r, options);
      for (int64_t e = 0; e < rr; ++e) power[e] = (e / r == e % r ? T(1) : T(0)) + product[e] / T(k);
    }
    for (int s = 0; s < squarings; ++s) {
      matmul(power.data(), power.data(), product.data(), r, options);
      std::swap(power, product);
    }
    std::copy(power.begin(), power.end(), m);
  }
}

// Row a of a gathered buffer from the oriented matrix (element j at src[j·stride]) and back (converting float64
// rows to float32 where the rotation is float64): contiguous rows (n >= p) are plain vectorizable loops.
template <typename T>
void copy_row_in(const T* src, int64_t stride, int64_t count, T* dst) {
  if (stride == 1) {
    for (int64_t j = 0; j < count; ++j) dst[j] = src[j];
  } else {
    for (int64_t j = 0; j < count; ++j) dst[j] = src[j * stride];
  }
}

template <typename S, typename D>
void copy_row_out(const S* src, D* dst, int64_t stride, int64_t count) {
  if (stride == 1) {
    for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<D>(src[j]);
  } else {
    for (int64_t j = 0; j < count; ++j) dst[j * stride] = static_cast<D>(src[j]);
  }
}

// A row of base + increment back into the oriented matrix (one rounding of the sum).
template <typename T>
void add_row_out(const T* base, const T* increment, T* dst, int64_t stride, int64_t count) {
  if (stride == 1) {
    for (int64_t j = 0; j < count; ++j) dst[j] = base[j] + increment[j];
  } else {
    for (int64_t j = 0; j < count; ++j) dst[j * stride] = base[j] + increment[j];
  }
}

// Where each matrix of a (batch of) n×p tensor lies in its storage, oriented as X̃ (N×P, N >= P): element (i, j) of
// matrix b at data[offsets[b] + i·row_stride + j·column_stride]. Read off the tensor's own strides, so that a
// column-major parameter (e.g. a QR factor, or the transpose of a contiguous one) is stepped in place: its
// contiguous() copy and the copy back were 29% of a 120×120, r = 40 step (48.6 µs against 34.7 µs without).
struct OrientedLayout {
  std::vector<int64_t> offsets;
  int64_t row_stride, column_stride;
};

OrientedLayout oriented_layout(const at::Tensor& t, bool flip) {
  const int64_t dims = t.dim();
  const int64_t n = t.size(-2), p = t.size(-1);
  const int64_t batch = t.numel() / (n * p);
  OrientedLayout layout{std::vector<int64_t>(batch, 0), flip ? t.stride(-1) : t.stride(-2),
                        flip ? t.stride(-2) : t.stride(-1)};
  for (int64_t b = 0; b < batch; ++b) {
    int64_t rest = b, offset = 0;
    for (int64_t d = dims - 3; d >= 0; --d) {
      offset += (rest % t.size(d)) * t.stride(d);
      rest /= t.size(d);
    }
    layout.offsets[b] = offset;
  }
  return layout;
}

template <typename T>
void rsdm_step_matrices(T* x, const OrientedLayout& x_layout, T* g, const OrientedLayout& g_layout,
                        const int64_t* indices, int64_t batch, int64_t n, int64_t p, int64_t r, double lr,
                        RsdmCore core, bool transport) {
  const bool flip = n < p;
  const int64_t n_rows = flip ? p : n, n_cols = flip ? n : p;
  const at::TensorOptions options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::TensorOptions wide = options.dtype(at::kDouble);
  // float32 rows where cpu_rotates_in_float64: A = G_I X_Iᵀ in float32 (its rounding only moves the direction: M is
  // exactly skew whatever A is) and M in float64. Where ‖M‖_F <= kIncrementMaxNorm the rows move by X_I ← X_I +
  // D·X_I (G_I likewise), a float32 product, D = Y − I in float32 (QR: the increment core; Cayley, exp: fl32 of the
  // float64 core's Y − I); else Y = core(M) in float64 (the float32 path's core; exp: torch.linalg's) and Y·X_I in
  // float64 rounded once (rsdm.h). Same rule in the reference.
  const bool float64_rotation = std::is_same_v<T, float> && cpu_rotates_in_float64(r, n_rows, n_cols, core);
  const T lr_t = static_cast<T>(lr);
  // Matrices are spread over threads only in chunks of at least kGrainWork multiply-adds.
  const int64_t work_per_matrix = 2 * r * r * n_cols + 2 * r * r * r + 1;
  const int64_t grain = std::max<int64_t>(1, kGrainWork / work_per_matrix);
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormalsGuard flush_denormals;  // per thread: the floating-point mode is thread-local
    at::Tensor x_rows = at::empty({r, n_cols}, options), g_rows = at::empty({r, n_cols}, options);
    at::Tensor core_matrix = at::empty({r, r}, options);
    at::Tensor moved = at::empty({r, n_cols}, options);
    at::Tensor core64, rows64, moved64;
    // rows64 and moved64 (float64 rows) only when a step is too large for the increment (allocated on first use)
    if (float64_rotation) core64 = at::empty({r, r}, wide);
    T* xr = x_rows.data_ptr<T>();
    T* gr = g_rows.data_ptr<T>();
    for (int64_t b = begin; b < end; ++b) {
      T* xb = x + x_layout.offsets[b];
      T* gb = g + g_layout.offsets[b];
      const int64_t* rows = indices + b * r;
      for (int64_t a = 0; a < r; ++a) {
        copy_row_in(xb + rows[a] * x_layout.row_stride, x_layout.column_stride, n_cols, xr + a * n_cols);
        copy_row_in(gb + rows[a] * g_layout.row_stride, g_layout.column_stride, n_cols, gr + a * n_cols);
      }
      at::mm_out(core_matrix, g_rows, x_rows.t());
      T* m = core_matrix.data_ptr<T>();
      if (float64_rotation) {
        double* m64 = core64.data_ptr<double>();
        const double step = -0.5 * lr;
        double m_norm2 = 0;
        // In square tiles, so that the transposed reads of A stay in cache at large r.
        for (int64_t i0 = 0; i0 < r; i0 += kTransposeTile) {
          for (int64_t j0 = 0; j0 < r; j0 += kTransposeTile) {
            const int64_t i1 = std::min(r, i0 + kTransposeTile), j1 = std::min(r, j0 + kTransposeTile);
            for (int64_t i = i0; i < i1; ++i) {
              for (int64_t j = j0; j < j1; ++j) {
                const double value = step * (static_cast<double>(m[i * r + j]) - static_cast<double>(m[j * r + i]));
                m64[i * r + j] = value;
                m_norm2 += value * value;
              }
            }
          }
        }
        // Where ‖M‖_F <= kIncrementMaxNorm the rows move by X_I + D·X_I in float32, D = Y − I: for QR D comes
        // from the float32 increment core, else (or if its Cholesky fails) as fl32 of the float64 Y − I.
        const bool by_increment = m_norm2 <= kIncrementMaxNorm * kIncrementMaxNorm;
        bool increment_ready = false;
        if (by_increment && core == RsdmCore::kQR) {
          for (int64_t e = 0; e < r * r; ++e) m[e] = static_cast<T>(m64[e]);  // still exactly skew
          increment_ready = qr_increment_core_in_place(m, r, options);
        }
        if (!increment_ready) {
          if (core == RsdmCore::kExp) {
            core64.copy_(at::linalg_matrix_exp(core64));
          } else {
            core_in_place(m64, r, core, wide);  // the float32 path's core (CholeskyQR at 24 <= r <= 128)
          }
          if (by_increment) {
            const double* y64 = core64.data_ptr<double>();
            for (int64_t i = 0; i < r; ++i)
              for (int64_t j = 0; j < r; ++j) m[i * r + j] = static_cast<T>(y64[i * r + j] - (i == j ? 1.0 : 0.0));
          }
        }
        for (int pass = 0; pass < (transport ? 2 : 1); ++pass) {
          const T* rows_in = pass == 0 ? xr : gr;
          T* target = pass == 0 ? xb : gb;
          const OrientedLayout& layout = pass == 0 ? x_layout : g_layout;
          if (by_increment) {
            at::mm_out(moved, core_matrix, pass == 0 ? x_rows : g_rows);  // fl32(Y − I)·X_I
            const T* increment = moved.data_ptr<T>();
            for (int64_t a = 0; a < r; ++a)
              add_row_out(rows_in + a * n_cols, increment + a * n_cols, target + rows[a] * layout.row_stride,
                          layout.column_stride, n_cols);
            continue;
          }
          if (!rows64.defined()) {
            rows64 = at::empty({r, n_cols}, wide);
            moved64 = at::empty({r, n_cols}, wide);
          }
          double* wide_rows = rows64.data_ptr<double>();
          for (int64_t e = 0; e < r * n_cols; ++e) wide_rows[e] = static_cast<double>(rows_in[e]);
          at::mm_out(moved64, core64, rows64);  // Y·X_I in float64, rounded once
          const double* source = moved64.data_ptr<double>();
          for (int64_t a = 0; a < r; ++a)
            copy_row_out(source + a * n_cols, target + rows[a] * layout.row_stride, layout.column_stride, n_cols);
        }
        continue;
      }
      // M = −lr·(A − Aᵀ)/2, written pairwise so the upper and lower triangles are read before either is written.
      for (int64_t i = 0; i < r; ++i) {
        m[i * r + i] = T(0);
        for (int64_t j = i + 1; j < r; ++j) {
          const T value = -lr_t * T(0.5) * (m[i * r + j] - m[j * r + i]);
          m[i * r + j] = value;
          m[j * r + i] = -value;
        }
      }
      core_in_place(m, r, core, options);
      for (int pass = 0; pass < (transport ? 2 : 1); ++pass) {
        at::mm_out(moved, core_matrix, pass == 0 ? x_rows : g_rows);
        T* target = pass == 0 ? xb : gb;
        const OrientedLayout& layout = pass == 0 ? x_layout : g_layout;
        const T* source = moved.data_ptr<T>();
        for (int64_t a = 0; a < r; ++a)
          copy_row_out(source + a * n_cols, target + rows[a] * layout.row_stride, layout.column_stride, n_cols);
      }
    }
  });
}

void rsdm_step_cpu(at::Tensor x, at::Tensor g, const std::optional<at::Tensor>& indices, int64_t rank, int64_t seed,
                   int64_t offset, double lr, c10::string_view core, bool transport) {
  const int64_t r = check_rsdm_step_args(x, g, indices, rank, offset, lr, c10::DeviceType::CPU);
  const RsdmCore core_kind = parse_rsdm_core(core);
  check_rsdm_step_overlap(x, g, indices, transport);
  const int64_t n = x.size(-2), p = x.size(-1);
  const int64_t batch = n * p == 0 ? 0 : x.numel() / (n * p);
  if (batch == 0 || n * p == 0) return;
  at::Tensor index_work;
  if (indices.has_value()) {
    index_work = indices->contiguous();
    const int64_t* data = index_work.data_ptr<int64_t>();
    const int64_t n_rows = std::max(n, p);
    // Validate every index set before anything is written: out-of-range or repeated rows would corrupt X.
    std::vector<uint8_t> seen(n_rows);
    for (int64_t b = 0; b < batch; ++b) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t a = 0; a < r; ++a) {
        const int64_t row = data[b * r + a];
        TORCH_CHECK_VALUE(row >= 0 && row < n_rows, "rsdm_step_: indices[", b, "] holds ", row,
                          ", outside [0, ", n_rows, ")");
        TORCH_CHECK_VALUE(!seen[row], "rsdm_step_: indices[", b, "] holds row ", row,
                          " twice; the r indices of a matrix must be distinct");
        seen[row] = 1;
      }
    }
  } else {
    index_work = at::empty({batch, r}, x.options().dtype(at::kLong));
    sample_rows_into(index_work.data_ptr<int64_t>(), batch, std::max(n, p), r, seed, offset);
  }
  // Stepped in place wherever each element has its own memory (any strides); else through a contiguous copy.
  at::Tensor x_work = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  at::Tensor g_work = g.is_non_overlapping_and_dense() ? g : g.contiguous();
  const bool flip = n < p;
  const OrientedLayout x_layout = oriented_layout(x_work, flip), g_layout = oriented_layout(g_work, flip);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rsdm_step_cpu", [&] {
    rsdm_step_matrices<scalar_t>(x_work.data_ptr<scalar_t>(), x_layout, g_work.data_ptr<scalar_t>(), g_layout,
                                 index_work.data_ptr<int64_t>(), batch, n, p, r, lr, core_kind, transport);
  });
  if (!x_work.is_same(x)) x.copy_(x_work);
  if (transport && !g_work.is_same(g)) g.copy_(g_work);
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) {
  m.impl("rsdm_sample_rows_", &rsdm_sample_rows_cpu);
  m.impl("rsdm_step_", &rsdm_step_cpu);
}

}  // namespace optim
