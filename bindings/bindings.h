// Registration functions of the pymemory._core module, one per bound concept.
#pragma once

#include <pybind11/pybind11.h>

namespace pm::py_bindings {

void register_errors(pybind11::module_ & m);
void register_engine(pybind11::module_ & m);
void register_namm(pybind11::module_ & m);

}  // namespace pm::py_bindings
