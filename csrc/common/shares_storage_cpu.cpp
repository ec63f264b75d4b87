// CPU kernel of optim::shares_storage (schema and reference: optim/_overlap.py): whether two written tensors, or a
// written and a read one, share a storage, compared by the storages' data pointers as the reference does. The
// optimizers ask it on every step over every parameter, state and gradient tensor; from Python each storage pointer
// costs a storage object.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace optim {
namespace {

const void* storage_pointer(const at::Tensor& t) { return t.storage().data(); }

bool any_shared(at::TensorList written, at::TensorList read) {
  std::vector<const void*> storages;
  storages.reserve(written.size());
  for (const at::Tensor& t : written) storages.push_back(storage_pointer(t));
  std::sort(storages.begin(), storages.end());
  if (std::adjacent_find(storages.begin(), storages.end()) != storages.end()) return true;
  for (const at::Tensor& t : read) {
    if (std::binary_search(storages.begin(), storages.end(), storage_pointer(t))) return true;
  }
  return false;
}

at::Tensor shares_storage_cpu(at::TensorList written, at::TensorList read) {
  return at::scalar_tensor(any_shared(written, read), at::TensorOptions().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(optim, CPU, m) { m.impl("shares_storage", &shares_storage_cpu); }

}  // namespace optim
