// Copies a flat std::vector into a new numpy array of the given shape (row-major).
#pragma once

#include <pybind11/numpy.h>

#include <algorithm>
#include <vector>

namespace pm::py_bindings {

template <typename T>
pybind11::array_t<T> as_numpy(const std::vector<T> & values, std::vector<pybind11::ssize_t> shape) {
    pybind11::array_t<T> out(shape);
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
}

}  // namespace pm::py_bindings
