// Checks of a model's GGUF file made before llama.cpp loads it, with ggml's gguf reader (no llama.cpp call): what
// llama.cpp would report vaguely, abort on, or decide privately (which layers of an iSWA model slide).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

struct gguf_context;

namespace pm {

// Existence, GGUF magic, a readable header, tensor data inside the file (a truncated download), a vocabulary
// without repeated token texts (llama.cpp asserts on those). Throws pm::Error (file_not_found, bad_model_file,
// invalid_argument) naming what to do.
void validate_gguf_file(const std::string & path);

// Where the last tensor's data ends (bytes from the file's start) by the header's offsets and sizes, saturating at
// SIZE_MAX: larger than the file when a tensor is cut off or a corrupted shape claims more data than there is.
size_t tensor_data_end(const gguf_context * gctx);

// Per layer of an iSWA model: 1 = sliding-window attention, 0 = global; empty when the architecture's pattern is
// unknown (see gguf_checks.cpp).
std::vector<uint8_t> read_swa_layers(const std::string & path, const std::string & arch, int32_t n_layer);

}  // namespace pm
