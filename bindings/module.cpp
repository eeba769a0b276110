// pymemory._core: the compiled half of pymemory. The package re-exports what users need (pymemory/__init__.py);
// the stub pymemory/_core.pyi documents the signatures.
#include "bindings.h"

PYBIND11_MODULE(_core, m) {
    m.doc() = "pymemory C++ core: llama.cpp adapter, streaming engine and memory policies";
    pm::py_bindings::register_errors(m);
    pm::py_bindings::register_engine(m);
    pm::py_bindings::register_namm(m);
}
