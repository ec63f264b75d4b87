// A multi-tensor launcher: applies one elementwise functor to many tensors (lists of equal-length tensor lists)
// with as few kernel launches as possible.
//
// Every tensor is cut into chunks of kChunkSize elements; one thread block handles one chunk. The addresses and
// sizes of up to kMaxTensors tensors and the (tensor, chunk) pair of up to kMaxBlocks blocks travel in the kernel's
// parameter buffer (under the 4 KiB limit), so a launch needs no host-to-device copy. When either table is full the
// batch is launched and a tensor whose chunks are not all launched yet is carried into the next batch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <vector>

namespace optim {
namespace mta {

constexpr int kBlockSize = 512;
constexpr int kChunkSize = 65536;
constexpr int kMaxBlocks = 320;

// Tensor count per launch for a given list depth, chosen so that the metadata stays under 4 KiB.
constexpr int max_tensors(int depth) {
  return depth <= 1 ? 56 : depth <= 2 ? 48 : depth <= 3 ? 36 : depth <= 4 ? 30 : 24;
}

template <int kDepth>
struct TensorListMetadata {
  static_assert(kDepth * max_tensors(kDepth) * 8 + 3 * max_tensors(kDepth) * 8 + kMaxBlocks * 5 <= 4000,
                "kernel parameters must stay under 4 KiB");
  static constexpr int kMaxTensors = max_tensors(kDepth);
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  // Elements of the list before this tensor: a global element index is first_index[t] + index within tensor t.
  int64_t first_index[kMaxTensors];
  // One optional pointer per tensor to per-tensor state the functor reads (e.g. AdamW's step count).
  const void* per_tensor[kMaxTensors];
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

template <typename Metadata, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize) multi_tensor_kernel(const Metadata metadata, Functor functor,
                                                                  Args... args) {
  const int tensor = metadata.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(metadata.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t remaining = metadata.numel[tensor] - start;
  const int64_t count = remaining < kChunkSize ? remaining : kChunkSize;
  functor(metadata, tensor, start, count, args...);
}

// lists[d][i] is tensor i of list d; all lists have the same length and lists[d][i] has lists[0][i]'s number of
// elements. per_tensor (may be empty) gives one extra pointer per tensor.
template <int kDepth, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, const std::vector<const void*>& per_tensor,
                        Functor functor, Args... args) {
  static_assert(kDepth >= 1, "at least one tensor list");
  using Metadata = TensorListMetadata<kDepth>;
  TORCH_INTERNAL_ASSERT(lists.size() == kDepth);
  const size_t count = lists[0].size();
  if (count == 0) return;
  int64_t elements_before = 0;
  const c10::cuda::CUDAGuard guard(lists[0][0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  Metadata metadata{};
  int tensors = 0;
  int blocks = 0;
  auto launch = [&] {
    multi_tensor_kernel<<<blocks, kBlockSize, 0, stream>>>(metadata, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blocks = 0;
  };
  for (size_t i = 0; i < count; ++i) {
    const int64_t numel = lists[0][i].numel();
    const int64_t first_index = elements_before;
    elements_before += numel;
    if (numel == 0) continue;
    for (int d = 0; d < kDepth; ++d) metadata.addresses[d][tensors] = lists[d][i].data_ptr();
    metadata.numel[tensors] = numel;
    metadata.first_index[tensors] = first_index;
    metadata.per_tensor[tensors] = per_tensor.empty() ? nullptr : per_tensor[i];
    ++tensors;
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      metadata.block_to_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      metadata.block_to_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool last_chunk = chunk == chunks - 1;
      if (blocks == kMaxBlocks || (tensors == Metadata::kMaxTensors && last_chunk)) {
        launch();
        if (last_chunk) {
          tensors = 0;
        } else {  // the current tensor continues in the next batch, in slot 0
          for (int d = 0; d < kDepth; ++d) metadata.addresses[d][0] = metadata.addresses[d][tensors - 1];
          metadata.numel[0] = metadata.numel[tensors - 1];
          metadata.first_index[0] = metadata.first_index[tensors - 1];
          metadata.per_tensor[0] = metadata.per_tensor[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch();
}

// N elements of T as one aligned vector, so that one thread moves them with one (or, for 32 bytes, two) wide
// memory instructions.
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T value[N];
};

template <int N, typename T>
__device__ __forceinline__ bool is_aligned(const T* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % (sizeof(T) * N) == 0;
}

}  // namespace mta
}  // namespace optim
