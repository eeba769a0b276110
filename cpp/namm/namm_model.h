// NAMM model: the weights of a NAMM GGUF (docs/namm-gguf.md) on a ggml backend, and the scorer — token features
// (z-normalised spectrum, recency embedding), the BAM network (namm-spec.md §3) as a ggml graph, and the selection
// rule (§4.1). Immutable once loaded: any number of states and engines share one model (whisper.cpp's model/state
// split).
#pragma once

#include "spectrogram.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct ggml_backend;
struct ggml_backend_buffer;
struct ggml_context;
struct ggml_tensor;

namespace pm::namm {

constexpr uint32_t kFormatVersion = 1;

struct NammHparams {
    uint32_t format_version = kFormatVersion;
    int32_t delay = 512;               // tokens between invocations
    float ema_coefficient = 0.99f;     // per token; a = ema^hop per frame
    int32_t recency_dim = kRecency;
    float recency_max_freq = 50000.0f;
    int32_t recency_start = 0;
    int32_t hidden = 32;               // BAM attention width
    float threshold = 0.0f;            // scores below are evicted
    float norm_eps = 1e-7f;
    std::string weight_type;           // f32, f16, q8_0, q4_0 (of the two matrices)
    std::string source;                // provenance written by the converter
};

// One layer's tokens for scoring: per KV head, chronological positions and un-normalised EMAs.
struct LayerInput {
    int32_t n_heads = 0;
    int32_t n_tokens = 0;
    std::vector<int32_t> positions;  // [head][token] absolute positions, increasing within a head
    std::vector<float> ema;          // [head][token][17]
};

struct LayerScores {
    std::vector<float> scores;       // [head][token]
    std::vector<uint8_t> keep;       // [head][token] 1 = retained by the selection
    int32_t n_keep = 0;              // K: tokens every head keeps
};

struct ScorerTimings {
    double features_ms = 0, bam_ms = 0, selection_ms = 0;
};

class NammModel {
public:
    // device: "cpu", "gpu" (first GPU ggml knows), or "auto" (GPU if any). Throws pm::Error.
    static std::shared_ptr<NammModel> load(const std::string & path, const std::string & device = "cpu",
                                           int32_t n_threads = 0);
    ~NammModel();
    NammModel(const NammModel &) = delete;
    NammModel & operator=(const NammModel &) = delete;

    const NammHparams & hparams() const { return hparams_; }
    const StftTables & stft() const { return stft_; }
    std::string device_name() const;

    // Features (normalisation + recency) and BAM on the backend, selection on the host.
    LayerScores score_layer(const LayerInput & input, ScorerTimings * timings = nullptr) const;
    // The 25 features of every token (recency || normalised spectrum), [head][token][25], for tests/tools.
    std::vector<float> features(const LayerInput & input) const;

    void set_threads(int32_t n_threads);

private:
    NammModel() = default;
    std::vector<float> recency_rows(const LayerInput & input, bool reversed) const;
    std::vector<float> run_bam(const LayerInput & input, ScorerTimings * timings) const;

    NammHparams hparams_;
    StftTables stft_;
    ggml_backend * backend_ = nullptr;
    ggml_backend_buffer * weights_buffer_ = nullptr;
    ggml_context * weights_ctx_ = nullptr;
    // Weights in ggml layout (ne0 = input features).
    ggml_tensor * w_qkv_ = nullptr;   // [32, 96]
    ggml_tensor * b_qkv_ = nullptr;   // [96]
    ggml_tensor * w_o_ = nullptr;     // [32, 50]
    ggml_tensor * b_o_ = nullptr;     // [50]
    ggml_tensor * w_out_ = nullptr;   // [25, 1]
    ggml_tensor * b_out_ = nullptr;   // [1]
    ggml_tensor * mean_ = nullptr;    // [17]
    ggml_tensor * inv_std_ = nullptr; // [17] 1 / max(sqrt(var), eps)
    std::vector<float> mean_host_, inv_std_host_;
};

// Selection (spec §4.1) on scores [head][token]: the newest token is forced to +inf, K = n - min_h #(s < thr),
// each head keeps its own top-K (ties: the newer token wins), reported as a mask. Pure, shared by everything.
LayerScores select_tokens(std::vector<float> scores, int32_t n_heads, int32_t n_tokens, float threshold);

}  // namespace pm::namm
