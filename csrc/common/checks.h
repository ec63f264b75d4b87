// Input checks shared by the kernels. Every check runs before any tensor is written, so a rejected call changes
// nothing. TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK raises RuntimeError.
#pragma once

#include <ATen/ATen.h>

#include <string>
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
  TORCH_CHECK(tensor.layout() == at::kStrided, op, ": ", name, "[", i, "] is sparse; dense tensors are required");
  TORCH_CHECK(tensor.device() == param.device() && tensor.scalar_type() == dtype, op, ": ", name, "[", i, "] is ",
              dtype_name(tensor.scalar_type()), " on ", tensor.device(), "; it must be ", dtype_name(dtype), " on ",
              param.device());
  TORCH_CHECK(tensor.sizes() == param.sizes(), op, ": ", name, "[", i, "] has shape ", tensor.sizes(),
              " but params[", i, "] has shape ", param.sizes());
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
