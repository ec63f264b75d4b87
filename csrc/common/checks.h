// Input checks shared by the kernels. Every check runs before any tensor is written, so a rejected call changes
// nothing. TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK raises RuntimeError.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace optim {

// "torch.float32", as Python prints it, so C++ and Python errors read the same.
inline std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// "(4, 5)", "(3,)", "()": a shape as Python prints a tuple, so C++ and Python errors read the same.
inline std::string shape_name(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

inline void check_list_length(const char* op, const char* name, at::TensorList tensors, const char* reference_name,
                              size_t expected) {
  TORCH_CHECK_VALUE(tensors.size() == expected, op, ": ", name, " has ", tensors.size(), " tensors but ",
                    reference_name, " has ", expected, "; pass one entry per parameter in every list");
}

inline void check_tensor_like(const char* op, const char* name, size_t i, const at::Tensor& tensor,
                              const at::Tensor& param, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(tensor.layout() == at::kStrided, op, ": ", name, "[", i, "] is sparse; dense tensors are required");
  TORCH_CHECK_VALUE(tensor.device() == param.device() && tensor.scalar_type() == dtype, op, ": ", name, "[", i, "] is ",
              dtype_name(tensor.scalar_type()), " on ", tensor.device(), "; it must be ", dtype_name(dtype), " on ",
              param.device());
  TORCH_CHECK_VALUE(tensor.sizes() == param.sizes(), op, ": ", name, "[", i, "] has shape ", shape_name(tensor.sizes()),
              " but params[", i, "] has shape ", shape_name(param.sizes()));
}

// One tensor argument of an op for check_no_overlap: its name as the messages print it ("params[3]", "X") and
// whether the op writes it. The name is assembled only for a message (list name + index), and the tensor is
// referenced, not copied: a call over thousands of tensors builds no strings and touches no reference counts.
struct OverlapOperand {
  OverlapOperand(const char* name, const at::Tensor& tensor, bool written)
      : list(name), index(-1), tensor(&tensor), written(written) {}
  OverlapOperand(const char* list, int64_t index, const at::Tensor& tensor, bool written)
      : list(list), index(index), tensor(&tensor), written(written) {}
  std::string name() const { return index < 0 ? std::string(list) : list + ("[" + std::to_string(index) + "]"); }

  const char* list;
  int64_t index;  // -1: a single tensor argument
  const at::Tensor* tensor;  // the caller's argument, alive for the whole check
  bool written;
};

inline void add_overlap_operands(std::vector<OverlapOperand>& operands, const char* name, at::TensorList tensors,
                                 bool written) {
  operands.reserve(operands.size() + tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    operands.emplace_back(name, static_cast<int64_t>(i), tensors[i], written);
  }
}

// The same rule, in the same order and with the same messages, as optim/_overlap.py's check_no_overlap (the
// references call that one; tests assert that the messages are equal): before anything is written,
//   1. no written tensor overlaps itself (an expand()ed tensor: several elements at one address), and
//   2. no written tensor shares memory with another argument of the call,
// each tensor covering the bytes [data_ptr, data_ptr + (1 + sum((size_d - 1)·stride_d))·itemsize). Empty tensors
// cover nothing. Rule 2 sorts the intervals by (start, position) and sweeps them once, keeping the furthest end of
// every tensor and of the written ones: O(k log k) for k tensors.
inline void check_no_overlap(const char* op, const std::vector<OverlapOperand>& operands) {
  for (const auto& operand : operands) {
    const at::Tensor& t = *operand.tensor;
    if (!operand.written || !t.defined() || t.numel() == 0) continue;
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", operand.name(),
                      " has internally overlapping memory (e.g. an expand()ed tensor); the op writes it, so every "
                      "element needs its own memory: pass ", operand.name(), ".clone()");
  }
  std::vector<std::tuple<uintptr_t, uintptr_t, size_t>> intervals;  // (start, end, position)
  intervals.reserve(operands.size());
  for (size_t k = 0; k < operands.size(); ++k) {
    const at::Tensor& t = *operands[k].tensor;
    if (!t.defined() || t.numel() == 0) continue;
    int64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    intervals.emplace_back(start, start + static_cast<uintptr_t>(extent) * t.element_size(), k);
  }
  std::sort(intervals.begin(), intervals.end(), [](const auto& a, const auto& b) {
    return std::get<0>(a) != std::get<0>(b) ? std::get<0>(a) < std::get<0>(b) : std::get<2>(a) < std::get<2>(b);
  });
  bool any = false, any_written = false;
  uintptr_t end_all = 0, end_written = 0;
  size_t owner_all = 0, owner_written = 0;
  for (const auto& [start, end, k] : intervals) {
    const bool written = operands[k].written;
    size_t other = k;
    if (written && any && start < end_all) {
      other = owner_all;
    } else if (!written && any_written && start < end_written) {
      other = owner_written;
    }
    if (other != k) {
      const size_t first = std::min(other, k), second = std::max(other, k);
      TORCH_CHECK_VALUE(false, op, ": ", operands[first].name(), " and ", operands[second].name(),
                        " share memory; the op writes ", operands[written ? k : other].name(),
                        ", so it must not overlap another argument: pass separate tensors (.clone() one of them)");
    }
    if (!any || end > end_all) {
      end_all = end;
      owner_all = k;
    }
    any = true;
    if (written && (!any_written || end > end_written)) {
      end_written = end;
      owner_written = k;
    }
    any_written = any_written || written;
  }
}

// The tensors a kernel writes through raw pointers: either the caller's own tensors (dense, with the parameter's
// strides, the usual case) or contiguous copies that are written back after the kernel ran.
struct ElementwiseOperands {
  std::vector<std::vector<at::Tensor>> work;  // work[list][i]
  std::vector<std::vector<at::Tensor>> originals;
  std::vector<bool> written;  // per list: does the kernel write it (copy back) or only read it

  void copy_back() {
    for (size_t list = 0; list < work.size(); ++list) {
      if (!written[list]) continue;
      for (size_t i = 0; i < work[list].size(); ++i) {
        if (!work[list][i].is_same(originals[list][i])) originals[list][i].copy_(work[list][i]);
      }
    }
  }
};

// Makes every tensor i of every list addressable with one flat index over lists[0][i]'s dense layout, or, with
// row_major, over the row-major (logical) order, for kernels whose result depends on the element's index.
inline ElementwiseOperands elementwise_operands(std::vector<at::TensorList> lists, std::vector<bool> written,
                                               bool row_major = false) {
  ElementwiseOperands operands;
  operands.written = std::move(written);
  for (auto list : lists) {
    operands.originals.emplace_back(list.begin(), list.end());
    operands.work.emplace_back(list.begin(), list.end());
  }
  const size_t count = lists.empty() ? 0 : lists[0].size();
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& param = lists[0][i];
    bool shared_layout = row_major ? param.is_contiguous() : param.is_non_overlapping_and_dense();
    for (size_t list = 1; list < lists.size() && shared_layout; ++list) {
      if (operands.written[list]) shared_layout = lists[list][i].strides() == param.strides();
    }
    for (size_t list = 0; list < lists.size(); ++list) {
      at::Tensor& tensor = operands.work[list][i];
      if (shared_layout) {
        // Read-only operands with another layout are copied into the parameter's layout.
        if (tensor.strides() != param.strides()) tensor = at::empty_like(param, tensor.options()).copy_(tensor);
      } else {
        tensor = tensor.contiguous();
      }
    }
  }
  return operands;
}

}  // namespace optim
