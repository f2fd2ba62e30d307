// The Python entry point of aim_ext._C: a plain extension module (no pybind11);
// importing it runs the static op registrations of the other translation units.
#include <Python.h>

#ifndef AIM_WITH_CUDA
#define AIM_WITH_CUDA 0
#endif

static struct PyModuleDef aim_module = {PyModuleDef_HEAD_INIT, "_C", "aim_ext compiled kernels",
                                        -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&aim_module);
  if (module != nullptr) PyModule_AddIntConstant(module, "cuda_compiled", AIM_WITH_CUDA);
  return module;
}
