// Error type of the pymemory core.
//
// The core throws pm::Error with a kind; bindings/errors.cpp maps each kind to one Python exception class
// in a single place, so every message a user sees says what went wrong and what to do about it.
#pragma once

#include <stdexcept>
#include <string>

namespace pm {

enum class ErrorKind {
    invalid_argument,  // a parameter or input the caller can fix  -> ValueError
    file_not_found,    // a path that does not exist                 -> FileNotFoundError
    bad_model_file,    // not a GGUF, truncated, unreadable model     -> pymemory.ModelLoadError
    unsupported,       // the model/backend cannot do what was asked -> pymemory.UnsupportedModelError
    capacity,          // the cache would overflow (policy "none")    -> pymemory.CacheFullError
    closed,            // use after close()                          -> pymemory.ClosedError
    runtime,           // llama.cpp reported a failure                -> RuntimeError
};

class Error : public std::runtime_error {
public:
    Error(ErrorKind kind, const std::string & message) : std::runtime_error(message), kind_(kind) {}
    ErrorKind kind() const { return kind_; }

private:
    ErrorKind kind_;
};

[[noreturn]] inline void fail(ErrorKind kind, const std::string & message) { throw Error(kind, message); }

}  // namespace pm
