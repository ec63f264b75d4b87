// CUDA kernels of optim::rsdm_sample_rows_ and optim::rsdm_step_ (schemas, math and references:
// optim/stiefel/_ops.py).
//
// rsdm_step_ takes one of three paths, all computing the same step:
//  * fused (many matrices or little work per matrix): ONE launch, one block per matrix. The block samples its row
//    set (Floyd's algorithm on a shared-memory bitmap), gathers the r rows of X and G tile by tile into shared
//    memory to accumulate A = G_I X_Iᵀ, forms M = −lr·skew(A) and the r×r core Y in shared memory (Gauss–Jordan for
//    Cayley, Gram–Schmidt ×2 for QR, scaling-and-squaring Taylor for exp; arithmetic in X's dtype), and applies
//    X_I ← Y X_I (and G_I ← Y G_I) tile by tile, writing the rows back in place.
//  * gemm (few large matrices, where one block per matrix would leave the GPU idle): sample kernel, gather, two
//    batched matmuls (cuBLAS) around a core kernel that runs the same shared-memory core, scatter: six launches.
//  * ATen (the core does not fit in shared memory: r > 128 or fp64 at large r or exp at r = 128 in fp32, or a
//    row bitmap too large for the fused path): torch.linalg for the core. Same numbers up to rounding.
#include "rsdm.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

namespace optim {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;          // columns of X_I / G_I held in shared memory at once
constexpr int kTilePitch = kTile + 1;  // padding: row-wise and column-wise tile reads are both conflict-free
constexpr int64_t kMaxFusedRank = 128;
// Fused path when the batch alone fills the GPU, or a matrix's work (r·P) is small enough for one block.
constexpr int64_t kFusedWorkPerMatrix = 128 * 256;

// Shared-memory layout of a block, in bytes, for a given core. Offsets are multiples of 16.
struct SharedLayout {
  int64_t indices = 0, bitmap = 0, core = 0, work = 0, x_tile = 0, g_tile = 0, scratch = 0, total = 0;
};

inline int64_t round_up16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

template <typename T>
SharedLayout shared_layout(int64_t r, int64_t n_rows, RsdmCore core, bool sample, bool with_tiles) {
  SharedLayout layout;
  int64_t at = 0;
  layout.indices = at;
  at += round_up16(r * static_cast<int64_t>(sizeof(int)));
  layout.bitmap = at;
  if (sample) at += round_up16((n_rows + 31) / 32 * 4);
  layout.core = at;
  at += round_up16(r * r * static_cast<int64_t>(sizeof(T)));
  layout.work = at;
  if (core == RsdmCore::kExp) at += 2 * round_up16(r * r * static_cast<int64_t>(sizeof(T)));
  layout.x_tile = at;
  if (with_tiles) at += round_up16(r * kTilePitch * static_cast<int64_t>(sizeof(T)));
  layout.g_tile = at;
  if (with_tiles) at += round_up16(r * kTilePitch * static_cast<int64_t>(sizeof(T)));
  layout.scratch = at;
  at += round_up16(std::max<int64_t>(r, kWarps) * static_cast<int64_t>(sizeof(T)));
  layout.total = at;
  return layout;
}

int64_t shared_limit(const at::Tensor& x) {
  int device = x.get_device();
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return optin;
}

// --- block-wide r×r linear algebra in shared memory ------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename T>
__device__ __forceinline__ T identity(int i, int j) {
  return i == j ? T(1) : T(0);
}

// c = a·b (r×r, row-major, shared); c must not alias a or b.
template <typename T>
__device__ void block_matmul(const T* a, const T* b, T* c, int r) {
  for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
    const int i = e / r, j = e % r;
    T sum = 0;
    for (int l = 0; l < r; ++l) sum += a[i * r + l] * b[l * r + j];
    c[e] = sum;
  }
  __syncthreads();
}

// In-place Gauss–Jordan inversion without pivoting (see the CPU kernel for why that is safe here).
template <typename T>
__device__ void block_invert(T* b, T* column, int r) {
  for (int k = 0; k < r; ++k) {
    for (int i = threadIdx.x; i < r; i += blockDim.x) column[i] = b[i * r + k];
    __syncthreads();
    const T inverse_pivot = T(1) / column[k];
    for (int j = threadIdx.x; j < r; j += blockDim.x) b[k * r + j] = (j == k ? T(1) : b[k * r + j]) * inverse_pivot;
    __syncthreads();
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
      const int i = e / r, j = e % r;
      if (i != k) b[e] = (j == k ? T(0) : b[e]) - column[i] * b[k * r + j];
    }
    __syncthreads();
  }
}

// Y = core(M) in place; m holds the skew M on entry. work: two more r×r buffers (exp only); scratch: >= max(r, 32).
template <typename T>
__device__ void block_core(T* m, T* work, T* scratch, int r, RsdmCore core) {
  const int rr = r * r;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (core == RsdmCore::kCayley) {
    for (int e = threadIdx.x; e < rr; e += blockDim.x) m[e] = identity<T>(e / r, e % r) - T(0.5) * m[e];
    __syncthreads();
    block_invert(m, scratch, r);
    for (int e = threadIdx.x; e < rr; e += blockDim.x) m[e] = T(2) * m[e] - identity<T>(e / r, e % r);
    __syncthreads();
  } else if (core == RsdmCore::kQR) {
    // Gram–Schmidt with re-orthogonalization on the rows of C = I − M (the columns of I + M); Y = Cᵀ.
    for (int e = threadIdx.x; e < rr; e += blockDim.x) m[e] = identity<T>(e / r, e % r) - m[e];
    __syncthreads();
    for (int k = 0; k < r; ++k) {
      T* row_k = m + k * r;
      for (int pass = 0; pass < 2; ++pass) {
        for (int j = warp; j < k; j += kWarps) {
          T dot = 0;
          for (int c = lane; c < r; c += 32) dot += m[j * r + c] * row_k[c];
          dot = warp_sum(dot);
          if (lane == 0) scratch[j] = dot;
        }
        __syncthreads();
        for (int c = threadIdx.x; c < r; c += blockDim.x) {
          T value = row_k[c];
          for (int j = 0; j < k; ++j) value -= scratch[j] * m[j * r + c];
          row_k[c] = value;
        }
        __syncthreads();
      }
      if (warp == 0) {
        T norm2 = 0;
        for (int c = lane; c < r; c += 32) norm2 += row_k[c] * row_k[c];
        norm2 = warp_sum(norm2);
        if (lane == 0) scratch[0] = T(1) / sqrt(norm2);
      }
      __syncthreads();
      const T inverse_norm = scratch[0];
      for (int c = threadIdx.x; c < r; c += blockDim.x) row_k[c] *= inverse_norm;
      __syncthreads();
    }
    for (int e = threadIdx.x; e < rr; e += blockDim.x) {
      const int i = e / r, j = e % r;
      if (i < j) {
        const T upper = m[e];
        m[e] = m[j * r + i];
        m[j * r + i] = upper;
      }
    }
    __syncthreads();
  } else {
    // Scaling and squaring with a Taylor polynomial (Horner), as in the CPU kernel.
    T column_max = 0;
    for (int j = threadIdx.x; j < r; j += blockDim.x) {
      T column = 0;
      for (int i = 0; i < r; ++i) column += fabs(m[i * r + j]);
      column_max = column > column_max ? column : column_max;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const T other = __shfl_xor_sync(0xffffffffu, column_max, offset);
      column_max = other > column_max ? other : column_max;
    }
    if (lane == 0) scratch[warp] = column_max;
    __syncthreads();
    T norm1 = 0;
    for (int w = 0; w < kWarps; ++w) norm1 = scratch[w] > norm1 ? scratch[w] : norm1;
    int squarings = 0;
    if (norm1 > T(kExpNormBound)) squarings = static_cast<int>(ceil(log2(norm1 / T(kExpNormBound))));
    const T scale = ldexp(T(1), -squarings);
    T* power = work;
    T* product = work + rr;
    constexpr int degree = exp_taylor_degree<T>();
    for (int e = threadIdx.x; e < rr; e += blockDim.x) {
      m[e] *= scale;
      power[e] = identity<T>(e / r, e % r) + m[e] / T(degree);
    }
    __syncthreads();
    for (int k = degree - 1; k >= 1; --k) {
      block_matmul(m, power, product, r);
      for (int e = threadIdx.x; e < rr; e += blockDim.x) power[e] = identity<T>(e / r, e % r) + product[e] / T(k);
      __syncthreads();
    }
    for (int s = 0; s < squarings; ++s) {
      block_matmul(power, power, product, r);
      T* swap = power;
      power = product;
      product = swap;
    }
    for (int e = threadIdx.x; e < rr; e += blockDim.x) m[e] = power[e];
    __syncthreads();
  }
}

// m ← −lr·(m − mᵀ)/2 in place (pairs i < j are disjoint, so each thread reads both entries before writing them).
template <typename T>
__device__ void block_skew(T* m, int r, T lr) {
  for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
    const int i = e / r, j = e % r;
    if (i < j) {
      const T value = -lr * T(0.5) * (m[e] - m[j * r + i]);
      m[e] = value;
      m[j * r + i] = -value;
    } else if (i == j) {
      m[e] = T(0);
    }
  }
  __syncthreads();
}

// --- kernels ----------------------------------------------------------------------------------------------------

struct StepGeometry {
  int64_t n_rows, n_cols;           // oriented N, P
  int64_t row_stride, column_stride;  // element (i, j) of an oriented matrix
  int64_t matrix_stride;            // n·p
  int r;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rsdm_fused_kernel(T* __restrict__ x, T* __restrict__ g,
                                                              const int64_t* __restrict__ given_indices,
                                                              StepGeometry geo, SharedLayout layout,
                                                              uint64_t mixed_seed, uint64_t offset, T lr,
                                                              RsdmCore core, bool transport) {
  extern __shared__ __align__(16) unsigned char shared[];
  int* rows = reinterpret_cast<int*>(shared + layout.indices);
  T* m = reinterpret_cast<T*>(shared + layout.core);
  T* work = reinterpret_cast<T*>(shared + layout.work);
  T* x_tile = reinterpret_cast<T*>(shared + layout.x_tile);
  T* g_tile = reinterpret_cast<T*>(shared + layout.g_tile);
  T* scratch = reinterpret_cast<T*>(shared + layout.scratch);
  const int r = geo.r;
  const int64_t b = blockIdx.x;
  T* xb = x + b * geo.matrix_stride;
  T* gb = g + b * geo.matrix_stride;

  if (given_indices == nullptr) {
    uint32_t* bitmap = reinterpret_cast<uint32_t*>(shared + layout.bitmap);
    const int64_t words = (geo.n_rows + 31) / 32;
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) bitmap[w] = 0u;
    __syncthreads();
    if (threadIdx.x == 0) floyd_sample(bitmap, geo.n_rows, r, mixed_seed, offset + static_cast<uint64_t>(b * r), rows);
  } else {
    for (int a = threadIdx.x; a < r; a += blockDim.x) rows[a] = static_cast<int>(given_indices[b * r + a]);
  }
  for (int e = threadIdx.x; e < r * r; e += blockDim.x) m[e] = T(0);
  __syncthreads();

  // A = G_I X_Iᵀ, accumulated over column tiles.
  for (int64_t c0 = 0; c0 < geo.n_cols; c0 += kTile) {
    for (int e = threadIdx.x; e < r * kTile; e += blockDim.x) {
      const int a = e / kTile, c = e % kTile;
      const int64_t column = c0 + c;
      const int64_t at = static_cast<int64_t>(rows[a]) * geo.row_stride + column * geo.column_stride;
      const bool inside = column < geo.n_cols;
      x_tile[a * kTilePitch + c] = inside ? xb[at] : T(0);
      g_tile[a * kTilePitch + c] = inside ? gb[at] : T(0);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) {
      const int a = e / r, bb = e % r;
      T sum = 0;
#pragma unroll 8
      for (int c = 0; c < kTile; ++c) sum += g_tile[a * kTilePitch + c] * x_tile[bb * kTilePitch + c];
      m[e] += sum;
    }
    __syncthreads();
  }

  block_skew(m, r, lr);
  block_core(m, work, scratch, r, core);

  // X_I ← Y X_I (and G_I ← Y G_I), tile by tile: a tile is read completely into shared memory before it is written.
  for (int pass = 0; pass < (transport ? 2 : 1); ++pass) {
    T* target = pass == 0 ? xb : gb;
    for (int64_t c0 = 0; c0 < geo.n_cols; c0 += kTile) {
      for (int e = threadIdx.x; e < r * kTile; e += blockDim.x) {
        const int a = e / kTile, c = e % kTile;
        const int64_t column = c0 + c;
        x_tile[a * kTilePitch + c] =
            column < geo.n_cols ? target[static_cast<int64_t>(rows[a]) * geo.row_stride + column * geo.column_stride]
                                : T(0);
      }
      __syncthreads();
      for (int e = threadIdx.x; e < r * kTile; e += blockDim.x) {
        const int a = e / kTile, c = e % kTile;
        const int64_t column = c0 + c;
        if (column >= geo.n_cols) continue;
        T sum = 0;
        for (int l = 0; l < r; ++l) sum += m[a * r + l] * x_tile[l * kTilePitch + c];
        target[static_cast<int64_t>(rows[a]) * geo.row_stride + column * geo.column_stride] = sum;
      }
      __syncthreads();
    }
  }
}

// The core alone, for the gemm path: a (batch, r, r) holds A = G_I X_Iᵀ on entry and Y on exit.
template <typename T>
__global__ void __launch_bounds__(kThreads) rsdm_core_kernel(T* __restrict__ a, int r, SharedLayout layout, T lr,
                                                             RsdmCore core) {
  extern __shared__ __align__(16) unsigned char shared[];
  T* m = reinterpret_cast<T*>(shared + layout.core);
  T* work = reinterpret_cast<T*>(shared + layout.work);
  T* scratch = reinterpret_cast<T*>(shared + layout.scratch);
  T* ab = a + static_cast<int64_t>(blockIdx.x) * r * r;
  for (int e = threadIdx.x; e < r * r; e += blockDim.x) m[e] = ab[e];
  __syncthreads();
  block_skew(m, r, lr);
  block_core(m, work, scratch, r, core);
  for (int e = threadIdx.x; e < r * r; e += blockDim.x) ab[e] = m[e];
}

// One thread per matrix; bitmap: (batch, words) zeroed scratch in global memory.
__global__ void rsdm_sample_kernel(int64_t* __restrict__ out, uint32_t* __restrict__ bitmap, int64_t batch,
                                   int64_t n, int64_t r, uint64_t mixed_seed, uint64_t offset) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  floyd_sample(bitmap + b * ((n + 31) / 32), n, r, mixed_seed, offset + static_cast<uint64_t>(b * r), out + b * r);
}

__global__ void rsdm_sample_list_kernel(int64_t* __restrict__ out, int64_t batch, int64_t n, int64_t r,
                                        uint64_t mixed_seed, uint64_t offset) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  floyd_sample_list(n, r, mixed_seed, offset + static_cast<uint64_t>(b * r), out + b * r);
}

void launch_sample(const at::Tensor& out, int64_t batch, int64_t n, int64_t r, int64_t seed, int64_t offset) {
  if (floyd_uses_list(n, r)) {  // no (batch, n / 32) table for a huge n
    constexpr int threads = 128;
    const int blocks = static_cast<int>((batch + threads - 1) / threads);
    rsdm_sample_list_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<int64_t>(), batch, n, r, mix64(static_cast<uint64_t>(seed)), static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor bitmap = at::zeros({batch, (n + 31) / 32}, out.options().dtype(at::kInt));
  constexpr int threads = 128;
  const int blocks = static_cast<int>((batch + threads - 1) / threads);
  rsdm_sample_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<int64_t>(), reinterpret_cast<uint32_t*>(bitmap.data_ptr<int>()), batch, n, r,
      mix64(static_cast<uint64_t>(seed)), static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rsdm_sample_rows_cuda(at::Tensor out, int64_t n, int64_t seed, int64_t offset) {
  check_sample_rows_args(out, n, offset);
  TORCH_CHECK(out.is_cuda(), "rsdm_sample_rows_: out is on ", out.device(), " but this kernel runs on cuda");
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t r = out.size(-1);
  const int64_t batch = out.numel() / r;
  if (batch == 0) return;
  at::Tensor work = out.contiguous();
  launch_sample(work, batch, n, r, seed, offset);
  if (!work.is_same(out)) out.copy_(work);
}

// Y = core(−lr·skew(A)) with torch.linalg, for cores too large for shared memory.
at::Tensor aten_core(const at::Tensor& a, double lr, RsdmCore core) {
  const at::Tensor m = (a - a.mT()) * (-0.5 * lr);
  const at::Tensor eye = at::eye(a.size(-1), a.options());
  if (core == RsdmCore::kCayley) return at::linalg_solve(eye - 0.5 * m, eye + 0.5 * m);
  if (core == RsdmCore::kExp) return at::linalg_matrix_exp(m);
  auto [q, rfactor] = at::linalg_qr(eye + m);
  at::Tensor signs = at::sign(at::diagonal(rfactor, 0, -2, -1));
  signs = at::where(signs == 0, at::ones_like(signs), signs);
  return q * signs.unsqueeze(-2);
}

// Given indices, before anything is written: every value in [0, n_rows) and no row twice within a matrix, with the
// CPU kernel's messages for the first offending entry in row-major order (a range error where the value is outside,
// else a repeat). An index outside would be an illegal address that poisons the CUDA context for the process; a
// repeated one breaks orthogonality. The checks run on the device (a stable sort per matrix puts the later copies
// of a value right after its first one), then one host read of the first bad position.
void check_given_indices(const at::Tensor& indices, int64_t batch, int64_t r, int64_t n_rows) {
  const at::Tensor flat = indices.reshape({batch, r});
  at::Tensor bad = at::logical_or(flat < 0, flat >= n_rows);
  if (r > 1) {
    const auto [sorted, order] = at::sort(flat, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    at::Tensor repeated = at::zeros_like(bad);
    repeated.scatter_(1, order.slice(1, 1), sorted.slice(1, 1).eq(sorted.slice(1, 0, r - 1)));
    bad.logical_or_(repeated);
  }
  const int64_t count = batch * r;
  const int64_t first =
      at::where(bad.reshape({count}), at::arange(count, flat.options()), count).min().item<int64_t>();
  if (first == count) return;
  const int64_t b = first / r;
  const int64_t row = flat.reshape({count})[first].item<int64_t>();
  TORCH_CHECK_VALUE(row >= 0 && row < n_rows, "rsdm_step_: indices[", b, "] holds ", row, ", outside [0, ", n_rows,
                    ")");
  TORCH_CHECK_VALUE(false, "rsdm_step_: indices[", b, "] holds row ", row,
                    " twice; the r indices of a matrix must be distinct");
}

void rsdm_step_cuda(at::Tensor x, at::Tensor g, const std::optional<at::Tensor>& indices, int64_t rank, int64_t seed,
                    int64_t offset, double lr, c10::string_view core, bool transport) {
  const int64_t r = check_rsdm_step_args(x, g, indices, rank, offset, lr, c10::DeviceType::CUDA);
  const RsdmCore core_kind = parse_rsdm_core(core);
  check_rsdm_step_overlap(x, g, indices, transport);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-2), p = x.size(-1);
  if (n * p == 0) return;
  const int64_t batch = x.numel() / (n * p);
  if (batch == 0) return;
  const bool flip = n < p;
  const int64_t n_rows = flip ? p : n, n_cols = flip ? n : p;
  TORCH_CHECK_VALUE(n_rows < (int64_t{1} << 31), "rsdm_step_: max(n, p) must be below 2^31, got ", n_rows);
  if (indices.has_value()) check_given_indices(*indices, batch, r, n_rows);
  at::Tensor x_work = x.contiguous(), g_work = g.contiguous();
  const int64_t limit = shared_limit(x);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool many_matrices = batch >= sms / 2 || r * n_cols <= kFusedWorkPerMatrix;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rsdm_step_cuda", [&] {
    using T = scalar_t;
    const SharedLayout fused = shared_layout<T>(r, n_rows, core_kind, !indices.has_value(), true);
    const SharedLayout core_only = shared_layout<T>(r, n_rows, core_kind, false, false);
    auto stream = at::cuda::getCurrentCUDAStream();
    if (r <= kMaxFusedRank && many_matrices && fused.total <= limit) {
      StepGeometry geo{n_rows, n_cols, flip ? 1 : p, flip ? p : 1, n * p, static_cast<int>(r)};
      at::Tensor index_work;
      if (indices.has_value()) index_work = indices->contiguous();
      const int64_t* given = indices.has_value() ? index_work.data_ptr<int64_t>() : nullptr;
      auto kernel = rsdm_fused_kernel<T>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(fused.total)));
      kernel<<<static_cast<unsigned>(batch), kThreads, fused.total, stream>>>(
          x_work.data_ptr<T>(), g_work.data_ptr<T>(), given, geo, fused, mix64(static_cast<uint64_t>(seed)),
          static_cast<uint64_t>(offset), static_cast<T>(lr), core_kind, transport);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor index_work;
      if (indices.has_value()) {
        index_work = indices->reshape({batch, r});
      } else {
        index_work = at::empty({batch, r}, x.options().dtype(at::kLong));
        launch_sample(index_work, batch, n_rows, r, seed, offset);
      }
      at::Tensor xo = x_work.view({batch, n, p}), go = g_work.view({batch, n, p});
      if (flip) {
        xo = xo.transpose(1, 2);
        go = go.transpose(1, 2);
      }
      const at::Tensor gather = index_work.unsqueeze(-1).expand({batch, r, n_cols});
      const at::Tensor x_rows = xo.gather(1, gather), g_rows = go.gather(1, gather);
      if (std::is_same_v<T, float> && r >= kFloat64RotationMinRank) {
        // Y and the rotated rows in float64, rounded once; A in float32 (see kFloat64RotationMinRank).
        const at::Tensor a64 = at::bmm(g_rows, x_rows.transpose(1, 2)).to(at::kDouble);
        const at::Tensor y64 = aten_core(a64, lr, core_kind);
        xo.scatter_(1, gather, at::bmm(y64, x_rows.to(at::kDouble)).to(x.scalar_type()));
        if (transport) go.scatter_(1, gather, at::bmm(y64, g_rows.to(at::kDouble)).to(x.scalar_type()));
        return;
      }
      at::Tensor y = at::bmm(g_rows, x_rows.transpose(1, 2)).contiguous();
      if (r <= kMaxFusedRank && core_only.total <= limit) {
        auto kernel = rsdm_core_kernel<T>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(core_only.total)));
        kernel<<<static_cast<unsigned>(batch), kThreads, core_only.total, stream>>>(
            y.data_ptr<T>(), static_cast<int>(r), core_only, static_cast<T>(lr), core_kind);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        y = aten_core(y, lr, core_kind);
      }
      xo.scatter_(1, gather, at::bmm(y, x_rows));
      if (transport) go.scatter_(1, gather, at::bmm(y, g_rows));
    }
  });
  if (!x_work.is_same(x)) x.copy_(x_work);
  if (transport && !g_work.is_same(g)) g.copy_(g_work);
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CUDA, m) {
  m.impl("rsdm_sample_rows_", &rsdm_sample_rows_cuda);
  m.impl("rsdm_step_", &rsdm_step_cuda);
}

}  // namespace optim
