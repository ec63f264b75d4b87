// CPU kernel of optim::all_finite (schema and reference: optim/fused/_ops.py): whether every element of every
// tensor is finite, in one read of each tensor and no temporary tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

namespace optim {
namespace {

constexpr int64_t kGrain = 1 << 16;

// float and double: x - x is +0 for a finite x and NaN for ±inf and NaN, and a sum of +0 stays +0, so the sum is 0
// exactly when every element is finite. No branch, so the loop vectorizes (the build has no -ffast-math, which
// would fold x - x to 0).
template <typename scalar_t>
bool floats_finite(const scalar_t* data, int64_t n) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += data[i] - data[i];
  return sum == 0;
}

// bfloat16 and half by their bits: non-finite exactly when every exponent bit is set, i.e. when the bits without
// the sign are >= the exponent mask (0x7f80 for bfloat16, 0x7c00 for half).
bool halves_finite(const uint16_t* bits, int64_t n, uint16_t exponent_mask) {
  uint16_t largest = 0;
#pragma omp simd reduction(max : largest)
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t magnitude = bits[i] & 0x7fff;
    largest = magnitude > largest ? magnitude : largest;
  }
  return largest < exponent_mask;
}

template <typename element_t, typename Check>
bool chunks_finite(const at::Tensor& t, Check check) {
  const element_t* data = static_cast<const element_t*>(t.const_data_ptr());
  std::atomic<bool> finite{true};
  at::parallel_for(0, t.numel(), kGrain, [&](int64_t first, int64_t last) {
    if (finite.load(std::memory_order_relaxed) && !check(data + first, last - first)) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

bool tensor_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  // a dense tensor of any strides (channels_last, a transpose) is one block of numel elements from its data pointer
  if (!t.is_non_overlapping_and_dense()) return tensor_finite(t.contiguous());
  switch (t.scalar_type()) {
    case at::kDouble:
      return chunks_finite<double>(t, floats_finite<double>);
    case at::kFloat:
      return chunks_finite<float>(t, floats_finite<float>);
    case at::kBFloat16:
      return chunks_finite<uint16_t>(t, [](const uint16_t* bits, int64_t n) { return halves_finite(bits, n, 0x7f80); });
    case at::kHalf:
      return chunks_finite<uint16_t>(t, [](const uint16_t* bits, int64_t n) { return halves_finite(bits, n, 0x7c00); });
    default:
      if (!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type())) return true;
      return at::isfinite(t).all().item<bool>();
  }
}

at::Tensor all_finite_cpu(at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    // check_all_finite_args in optim/fused/_ops.py: the same order and messages
    TORCH_CHECK(tensors[i].layout() == at::kStrided, "all_finite: tensor ", i, " is not strided",
                "; dense tensors are required");
    TORCH_CHECK(tensors[i].device() == tensors[0].device(), "all_finite: every tensor must be on one device; tensor 0 ",
                "is on ", tensors[0].device(), " and tensor ", i, " on ", tensors[i].device());
  }
  bool finite = true;
  for (const at::Tensor& t : tensors) {
    if (!tensor_finite(t)) {
      finite = false;
      break;
    }
  }
  return at::scalar_tensor(finite, at::TensorOptions().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("all_finite", &all_finite_cpu); }

}  // namespace optim
