// The single place where C++ errors become Python exceptions. The exception classes live in pure Python
// (pymemory/errors.py) so they can be imported and caught without the extension.
#include "bindings.h"

#include "errors.h"

namespace py = pybind11;

namespace pm::py_bindings {

void register_errors(py::module_ & m) {
    // Deliberately leaked: a static py::object would be destroyed by the C++ runtime after the interpreter has
    // finalized, which crashes at exit.
    static py::object * errors_module = new py::object(py::module_::import("pymemory.errors"));
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const pm::Error & e) {
            const char * cls = "LlamaError";
            switch (e.kind()) {
                case ErrorKind::invalid_argument: cls = "InvalidArgumentError"; break;
                case ErrorKind::file_not_found: cls = "ModelNotFoundError"; break;
                case ErrorKind::bad_model_file: cls = "ModelLoadError"; break;
                case ErrorKind::unsupported: cls = "UnsupportedModelError"; break;
                case ErrorKind::capacity: cls = "CacheFullError"; break;
                case ErrorKind::closed: cls = "ClosedError"; break;
                case ErrorKind::runtime: cls = "LlamaError"; break;
            }
            py::object type = errors_module->attr(cls);
            // Messages may quote bytes from a damaged file: invalid UTF-8 becomes U+FFFD instead of a
            // UnicodeDecodeError in place of the typed error.
            const std::string message = e.what();
            PyObject * text = PyUnicode_DecodeUTF8(message.data(), Py_ssize_t(message.size()), "replace");
            PyErr_SetObject(type.ptr(), text);
            Py_XDECREF(text);
        }
    });
}

}  // namespace pm::py_bindings
