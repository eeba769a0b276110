// llama.cpp's serialised sequence state (llama_state_seq_get_data) read as arrays that can be edited in place and
// written back (llama_state_seq_set_data): the one way the public API lets a caller change cached keys or values.
// Used by value merging (value_merge.h).
//
// Layout (llama.cpp's KV cache serialisation, one stream, text models; checked against the buffer's length, and
// anything else is refused): u64 header (kept as is) | u32 streams (1) | u32 cells | per cell: i32 position, u32
// sequences (1), i32 sequence | u32 V transposed, u32 layers | per layer: i32 K type, u64 K row bytes, the cells' K
// rows | per layer: i32 V type, then either u64 V row bytes and the cells' V rows, or (V transposed) u32 element
// bytes, u32 V width and, per V component, the cells' elements.
#pragma once

#include "kv_policy.h"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pm {

struct KvStateView {
    struct Layer {
        size_t k_offset = 0;   // [cells][k_width] elements of k_type
        int32_t k_type = 0;    // ggml_type (f16 or f32)
        int32_t k_width = 0;   // n_embd_k_gqa
        size_t v_offset = 0;   // [cells][v_width], or [v_width][cells] when v_transposed
        int32_t v_type = 0;
        int32_t v_width = 0;
    };
    std::vector<Pos> positions;  // per cell, in the buffer's (cell) order
    bool v_transposed = false;
    std::vector<Layer> layers;

    int32_t n_cells() const { return int32_t(positions.size()); }
};

// Parses without copying; throws pm::Error(unsupported) naming what differs (another layout, several streams or
// sequences per cell, key or value types other than f16/f32).
KvStateView parse_kv_state(const uint8_t * data, size_t size);

// Element access by (cell, component) for one layer's keys or values, as f32.
float kv_get(const uint8_t * data, size_t offset, int32_t type, size_t index);
void kv_set(uint8_t * data, size_t offset, int32_t type, size_t index, float value);

}  // namespace pm
