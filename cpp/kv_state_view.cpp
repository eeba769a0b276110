#include "kv_state_view.h"

#include "errors.h"

#include <ggml.h>

#include <cstring>
#include <string>

namespace pm {
namespace {

[[noreturn]] void refuse_layout(const std::string & why) {
    fail(ErrorKind::unsupported, "llama.cpp's KV state has a layout this build does not read (" + why +
                                     "); value merging needs llama-cpp-python 0.3.36's layout");
}

class Cursor {
public:
    Cursor(const uint8_t * data, size_t size) : data_(data), size_(size) {}
    template <typename T> T get() {
        T value;
        need(sizeof(T));
        std::memcpy(&value, data_ + at_, sizeof(T));
        at_ += sizeof(T);
        return value;
    }
    size_t skip(size_t n) {
        need(n);
        const size_t start = at_;
        at_ += n;
        return start;
    }
    size_t left() const { return size_ - at_; }

private:
    void need(size_t n) const {
        if (n > size_ - at_) refuse_layout("it is shorter than its header says");
    }
    const uint8_t * data_;
    size_t size_;
    size_t at_ = 0;
};

size_t element_size(int32_t type) {
    if (type == GGML_TYPE_F16) return 2;
    if (type == GGML_TYPE_F32) return 4;
    fail(ErrorKind::unsupported, std::string("value merging reads f16 or f32 KV caches, not ") +
                                     ggml_type_name(ggml_type(type)) + " (use type_k/type_v 'f16' or 'f32')");
}

}  // namespace

KvStateView parse_kv_state(const uint8_t * data, size_t size) {
    Cursor in(data, size);
    KvStateView view;
    in.get<uint64_t>();
    if (in.get<uint32_t>() != 1) refuse_layout("several streams");
    const uint32_t n_cells = in.get<uint32_t>();
    view.positions.resize(n_cells);
    for (uint32_t c = 0; c < n_cells; ++c) {
        view.positions[c] = in.get<int32_t>();
        if (in.get<uint32_t>() != 1) refuse_layout("a cell in several sequences");
        in.get<int32_t>();
    }
    view.v_transposed = in.get<uint32_t>() != 0;
    const uint32_t n_layer = in.get<uint32_t>();
    view.layers.resize(n_layer);
    for (auto & layer : view.layers) {
        layer.k_type = in.get<int32_t>();
        const uint64_t row = in.get<uint64_t>();
        layer.k_width = int32_t(row / element_size(layer.k_type));
        layer.k_offset = in.skip(size_t(row) * n_cells);
    }
    for (auto & layer : view.layers) {
        layer.v_type = in.get<int32_t>();
        if (view.v_transposed) {
            if (in.get<uint32_t>() != element_size(layer.v_type)) refuse_layout("a V element size unlike its type");
            layer.v_width = int32_t(in.get<uint32_t>());
        } else {
            layer.v_width = int32_t(in.get<uint64_t>() / element_size(layer.v_type));
        }
        layer.v_offset = in.skip(size_t(layer.v_width) * n_cells * element_size(layer.v_type));
    }
    if (in.left() != 0) refuse_layout(std::to_string(in.left()) + " bytes after the values");
    return view;
}

float kv_get(const uint8_t * data, size_t offset, int32_t type, size_t index) {
    if (type == GGML_TYPE_F16) {
        ggml_fp16_t h;
        std::memcpy(&h, data + offset + 2 * index, 2);
        return ggml_fp16_to_fp32(h);
    }
    float f;
    std::memcpy(&f, data + offset + 4 * index, 4);
    return f;
}

void kv_set(uint8_t * data, size_t offset, int32_t type, size_t index, float value) {
    if (type == GGML_TYPE_F16) {
        const ggml_fp16_t h = ggml_fp32_to_fp16(value);
        std::memcpy(data + offset + 2 * index, &h, 2);
    } else {
        std::memcpy(data + offset + 4 * index, &value, 4);
    }
}

}  // namespace pm
