#include "gguf_checks.h"

#include "errors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string_view>
#include <unordered_map>

#include "gguf.h"

namespace pm {

size_t tensor_data_end(const gguf_context * gctx) {
    constexpr size_t kMax = SIZE_MAX;
    const size_t data_offset = gguf_get_data_offset(gctx);
    size_t data_end = data_offset;
    for (int64_t i = 0; i < gguf_get_n_tensors(gctx); ++i) {
        const size_t offset = gguf_get_tensor_offset(gctx, i), size = gguf_get_tensor_size(gctx, i);
        if (offset > kMax - data_offset || size > kMax - data_offset - offset) return kMax;
        data_end = std::max(data_end, data_offset + offset + size);
    }
    return data_end;
}

// Checks what llama.cpp would otherwise report vaguely or not at all: existence, GGUF magic, readable header,
// and tensor data that lies inside the file (a truncated download).
void validate_gguf_file(const std::string & path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (path.empty()) fail(ErrorKind::invalid_argument, "model path is empty; pass the path of a .gguf file");
    if (!fs::exists(path, ec)) {
        fail(ErrorKind::file_not_found, "model file not found: '" + path + "'");
    }
    if (!fs::is_regular_file(path, ec)) {
        fail(ErrorKind::bad_model_file, "model path is not a regular file: '" + path + "'");
    }
    const auto file_size = fs::file_size(path, ec);
    char magic[4] = {0, 0, 0, 0};
    {
        std::ifstream in(path, std::ios::binary);
        if (!in) fail(ErrorKind::bad_model_file, "cannot open model file '" + path + "' for reading");
        in.read(magic, 4);
    }
    if (file_size < 4 || std::memcmp(magic, "GGUF", 4) != 0) {
        fail(ErrorKind::bad_model_file,
             "'" + path + "' is not a GGUF model file (no GGUF magic); pymemory runs llama.cpp GGUF models — "
             "convert other formats with llama.cpp's convert_hf_to_gguf.py");
    }
    gguf_init_params gparams{/*no_alloc=*/true, /*ctx=*/nullptr};
    gguf_context * gctx = gguf_init_from_file(path.c_str(), gparams);
    if (gctx == nullptr) {
        fail(ErrorKind::bad_model_file,
             "'" + path + "' has a GGUF magic but its header cannot be read: the file is truncated or corrupted; "
             "download it again");
    }
    const size_t data_end = tensor_data_end(gctx);
    const int64_t n_tensors = gguf_get_n_tensors(gctx);
    // llama.cpp asserts (aborts the process) on a vocabulary with a repeated token text: refuse it here.
    std::string vocab_problem;
    const int64_t vocab_key = gguf_find_key(gctx, "tokenizer.ggml.tokens");
    if (vocab_key >= 0 && gguf_get_kv_type(gctx, vocab_key) == GGUF_TYPE_ARRAY &&
        gguf_get_arr_type(gctx, vocab_key) == GGUF_TYPE_STRING) {
        const size_t n = gguf_get_arr_n(gctx, vocab_key);
        std::unordered_map<std::string_view, size_t> seen;  // views into gctx, valid until gguf_free
        seen.reserve(n);
        for (size_t i = 0; i < n && vocab_problem.empty(); ++i) {
            const auto [it, inserted] = seen.emplace(gguf_get_arr_str(gctx, vocab_key, i), i);
            if (!inserted) {
                vocab_problem = "tokens " + std::to_string(it->second) + " and " + std::to_string(i) +
                                " of its vocabulary have the same text";
            }
        }
    }
    gguf_free(gctx);
    if (!vocab_problem.empty()) {
        fail(ErrorKind::bad_model_file, "'" + path + "' is corrupted: " + vocab_problem + "; download it again");
    }
    if (n_tensors == 0) {
        fail(ErrorKind::bad_model_file, "'" + path + "' is a GGUF file without tensors, not a model");
    }
    if (data_end > file_size) {
        fail(ErrorKind::bad_model_file,
             "'" + path + "' is truncated: its tensors need " + std::to_string(data_end) + " bytes but the file has " +
                 std::to_string(file_size) + "; download it again");
    }
}

// Which layers of an iSWA model slide (1) and which attend globally (0), as llama.cpp decides it at load time:
// the GGUF key <arch>.attention.sliding_window_pattern (a per-layer bool array, or a period n: layer il slides unless
// il % n == n - 1), else the period llama.cpp hard-codes for the architecture (llama-model.cpp / src/models/*.cpp,
// load_swa_pattern). Only architectures whose default we know are listed; others get an empty vector, and the
// attention-scored policies refuse them. The tap verifies the result on every batch (layers of different kinds must
// use different attention masks, and the first layer of each kind must match its cache's cell mirror).
std::vector<uint8_t> read_swa_layers(const std::string & path, const std::string & arch, int32_t n_layer) {
    std::vector<uint8_t> out;
    if (n_layer < 1) return out;
    int64_t period = 0;
    gguf_init_params gparams{/*no_alloc=*/true, /*ctx=*/nullptr};
    gguf_context * gctx = gguf_init_from_file(path.c_str(), gparams);
    if (gctx != nullptr) {
        const std::string key = arch + ".attention.sliding_window_pattern";
        const int64_t k = gguf_find_key(gctx, key.c_str());
        if (k >= 0) {
            const gguf_type type = gguf_get_kv_type(gctx, k);
            if (type == GGUF_TYPE_ARRAY && gguf_get_arr_type(gctx, k) == GGUF_TYPE_BOOL &&
                gguf_get_arr_n(gctx, k) >= size_t(n_layer)) {
                const auto * flags = static_cast<const int8_t *>(gguf_get_arr_data(gctx, k));
                for (int32_t il = 0; il < n_layer; ++il) out.push_back(flags[il] ? 1 : 0);
            } else if (type == GGUF_TYPE_UINT32) {
                period = gguf_get_val_u32(gctx, k);
            } else if (type == GGUF_TYPE_INT32) {
                period = gguf_get_val_i32(gctx, k);
            }
        }
        gguf_free(gctx);
    }
    if (!out.empty()) return out;
    if (period <= 0) {
        if (arch == "gemma2") period = 2;        // src/models/gemma2.cpp: load_swa_pattern(ml, 2)
        else if (arch == "gemma3") period = 6;   // src/models/gemma3.cpp: load_swa_pattern(ml, 6)
        else return out;
    }
    for (int32_t il = 0; il < n_layer; ++il) out.push_back(il % period < period - 1 ? 1 : 0);
    return out;
}

}  // namespace pm
