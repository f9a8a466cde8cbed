// The Python module densenet_fused._C: importing it loads this library, whose TORCH_LIBRARY blocks
// register the C++ kernels as torch.ops.densenet_fused.*_cpp.  Each kernel lives in its own file and
// registers its schema with TORCH_LIBRARY_FRAGMENT and its CPU implementation with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(densenet_fused, m) {}
