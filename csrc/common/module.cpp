// The Python module optim._C. It has no functions: importing it runs the static TORCH_LIBRARY_IMPL registrations
// of the kernels linked into it. The op schemas are defined in Python (optim/*/_ops.py).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "compiled kernels of optim", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
