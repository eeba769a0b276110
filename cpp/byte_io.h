// Little helpers to write and read the binary session state (engine_state.cpp, llama_adapter.cpp): plain values
// and length-prefixed strings appended to a std::string, read back with bounds checks. A read past the end is a
// damaged file, reported as pm::Error(invalid_argument) with the caller's `what`.
#pragma once

#include "errors.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace pm {

class ByteWriter {
public:
    template <typename T>
    void put(const T & value) {
        static_assert(std::is_trivially_copyable<T>::value, "plain values only");
        out_.append(reinterpret_cast<const char *>(&value), sizeof(T));
    }
    void put_string(const std::string & s) {
        put(uint64_t(s.size()));
        out_.append(s);
    }
    template <typename T>
    void put_vector(const std::vector<T> & v) {
        put(uint64_t(v.size()));
        if (!v.empty()) out_.append(reinterpret_cast<const char *>(v.data()), v.size() * sizeof(T));
    }
    std::string & bytes() { return out_; }

private:
    std::string out_;
};

class ByteReader {
public:
    ByteReader(const std::string & in, std::string what) : in_(in), what_(std::move(what)) {}

    template <typename T>
    T get() {
        static_assert(std::is_trivially_copyable<T>::value, "plain values only");
        need(sizeof(T));
        T value;
        std::memcpy(&value, in_.data() + at_, sizeof(T));
        at_ += sizeof(T);
        return value;
    }
    std::string get_string() {
        const uint64_t n = get<uint64_t>();
        need(n);
        std::string s = in_.substr(at_, size_t(n));
        at_ += size_t(n);
        return s;
    }
    template <typename T>
    std::vector<T> get_vector() {
        const uint64_t n = get<uint64_t>();
        if (n > remaining() / sizeof(T)) truncated();
        std::vector<T> v(static_cast<size_t>(n));
        if (n) std::memcpy(v.data(), in_.data() + at_, size_t(n) * sizeof(T));
        at_ += size_t(n) * sizeof(T);
        return v;
    }
    size_t remaining() const { return in_.size() - at_; }
    size_t offset() const { return at_; }

private:
    void need(uint64_t n) const {
        if (n > remaining()) truncated();
    }
    [[noreturn]] void truncated() const {
        fail(ErrorKind::invalid_argument, what_ + " is truncated or damaged");
    }
    const std::string & in_;
    std::string what_;
    size_t at_ = 0;
};

}  // namespace pm
