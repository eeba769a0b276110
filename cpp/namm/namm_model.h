// NAMM model: the weights of a NAMM GGUF (docs/namm-gguf.md) on a ggml backend, and the three computations of one
// invocation as the engine calls them (namm-spec.md, Appendix B):
//   1. features  fold_frames()    STFT frames of attention folded into each token's EMA (§2.2-2.3), a ggml graph;
//   2. scores    scores()         normalisation, recency, the BAM network (§2.4-§3), a ggml graph;
//   3. selection select_tokens()  K per layer and each head's top-K (§4.1), on the host from the n scores per head.
// Any number of states and engines share one model (whisper.cpp's model/state split). Computations on one model are
// serialised by a mutex (a ggml CPU backend runs one graph at a time). The weights change only through
// set_parameters() (a trainer scoring CMA-ES candidates in memory), under the same mutex.
#pragma once

#include "spectrogram.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <limits>
#include <string>
#include <vector>

struct ggml_backend;
struct ggml_backend_buffer;
struct ggml_gallocr;
struct ggml_context;
struct ggml_tensor;

namespace pm::namm {

constexpr uint32_t kFormatVersion = 1;
constexpr int32_t kHidden = 32;  // BAM attention width (hidden_dim)

struct NammHparams {
    uint32_t format_version = kFormatVersion;
    int32_t delay = 512;               // tokens between invocations = attention rows per invocation
    float ema_coefficient = 0.99f;     // per token; a = ema_coefficient^16 per frame
    // namm.ema_bias_correction (pymemory extension, absent = false): the EMA is divided by the weight the token's
    // queries carry, 1 - c^max(queries, 16), before normalisation, so that a token's spectrum is a recency-weighted
    // average over its lifetime instead of one that starts at zero (see spectrum_input()).
    bool ema_bias_correction = false;
    float recency_max_freq = 50000.0f; // ω_i = max_freq^(-i/4)
    int32_t recency_start = 0;         // age = p_now - p + start
    float threshold = 0.0f;            // scores below are evicted
    float norm_eps = 1e-7f;            // (E - μ) / max(√σ², eps)
    std::string weight_type;           // f32, f16, q8_0 or q4_0: type of the two weight matrices
    std::string source;                // provenance written by the converter
    // How the engine uses this NAMM unless told otherwise: the settings it was trained with (pymemory train-namm
    // writes them; "" / 1.0 for converted checkpoints).
    std::string deploy_mode;           // namm.deploy.mode: one of the deploy modes below
    float deploy_quorum = 1.0f;        // namm.deploy.quorum
    // namm.deploy.delay: tokens between invocations when deployed, chosen by measurement after training (0 = absent:
    // `delay`). The features do not depend on it (frames fold in every hop tokens); only how often they are read.
    int32_t deploy_delay = 0;
    // namm.deploy.neighbours: in the budget modes a token ranks by the highest score among itself and this many
    // nearest cached tokens on each side (0 = absent: each by its own score), chosen by measurement.
    int32_t deploy_neighbours = 0;
    // namm.deploy.key_weight: in the budget modes a token's ranked score gains this many standard deviations of its
    // keys' distinctiveness (KeyDiff's score on the keys before RoPE; docs/namm.md, "Keys"); 0 = absent: none.
    float deploy_key_weight = 0.0f;
    // namm.deploy.merge_threshold: the values of the tokens it gives up merge into the kept token of the most similar
    // key at this centred cosine or more (value_merge.h); NaN = absent: no merging.
    float deploy_merge_threshold = std::numeric_limits<float>::quiet_NaN();
};
constexpr int32_t kMaxNeighbours = 64;  // more than any measured choice; bounds the ranking's cost
constexpr float kMaxKeyWeight = 100.0f;  // far past where the keys outweigh the attention

// The shared-cell rules a NAMM can be deployed with (what each does: namm_policy.h).
bool is_deploy_mode(const std::string & mode);
extern const char * const kDeployModes;  // "'quorum', 'budget', ... or 'budget_mix'", for messages

// One layer's tokens to score: per KV head, chronological absolute positions and un-normalised EMAs.
struct LayerInput {
    int32_t n_heads = 0;
    int32_t n_tokens = 0;            // per head
    std::vector<int32_t> positions;  // [head][token], increasing within a head
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
    // Reads and validates the file and puts the weights on a backend this model owns. device: "cpu", "gpu" (the
    // first GPU ggml knows) or "auto" (best available); n_threads <= 0: all hardware threads. Throws pm::Error.
    static std::shared_ptr<NammModel> load(const std::string & path, const std::string & device = "cpu",
                                           int32_t n_threads = 0);
    // The same on the caller's backend (e.g. the one the LLM runs on), which must outlive the model.
    static std::shared_ptr<NammModel> load(const std::string & path, ggml_backend * backend);
    ~NammModel();
    NammModel(const NammModel &) = delete;
    NammModel & operator=(const NammModel &) = delete;

    const NammHparams & hparams() const { return hparams_; }
    // The EMA coefficient as the decimal the converter wrote (0.99, not the float 0.9900000095), as the readers use.
    double ema_coefficient() const;
    std::string device_name() const;
    void set_threads(int32_t n_threads);

    // Step 1. Folds n_rows / 16 STFT frames into the EMA of n_tokens tokens per head (spec §2.2-2.3):
    //   E <- a^T E + Σ_j (1 - a) a^(T-1-j) m[j,k] |DFT(hann ⊙ [history ‖ rows] frame j)|,   T = n_rows / 16,
    // ema [head][token][17] updated in place; history [head][token][16] the 16 values before `rows` (the caller
    // replaces it with the last 16 rows afterwards); rows [head][n_rows][token] the attention the tokens received
    // from n_rows consecutive queries. Tokens first_new..n_tokens-1 joined at window index k - first_new: frames
    // that ended before they existed are skipped (m = 0); pass n_tokens when no token is new.
    void fold_frames(float * ema, const float * history, int32_t n_heads, int32_t n_tokens, const float * rows,
                     int32_t n_rows, int32_t first_new, ScorerTimings * timings = nullptr) const;

    // Step 2. Scores [head][token] of chronological tokens: features (§2.4-2.6) and BAM (§3) in one graph.
    std::vector<float> scores(const LayerInput & tokens, ScorerTimings * timings = nullptr) const;
    // The 25 features [head][token][25] (recency ‖ normalised spectrum) that scores() feeds to BAM.
    std::vector<float> features(const LayerInput & tokens) const;
    // BAM alone on given features X [head][token][25].
    std::vector<float> scores_from_features(const float * x, int32_t n_heads, int32_t n_tokens) const;

    // Replaces the learned parameters in place, without a file: the eight tensors of a NAMM GGUF by name, in ggml
    // layout (docs/namm-gguf.md; pymemory.namm.convert.ggml_tensors builds them from the flat vector θ), feat_var as
    // variances. Only for a model whose weights are f32 (a trainer's template file). Validated like a file; a
    // failure leaves the old parameters in place. Throws pm::Error (invalid_argument).
    void set_parameters(const std::vector<std::pair<std::string, std::vector<float>>> & tensors);

    // How BAM computes its attention: ggml's flash attention (fused, tiled, masked tiles skipped) where the backend
    // runs it on f32 K/V, as the CPU does; else, or when asked, matmul + softmax (the reference form the tests compare
    // the fused one with). Throws unsupported when `flash` is asked of a backend without it.
    enum class BamAttention { automatic, flash, matmul };
    void set_bam_attention(BamAttention kind);
    bool bam_uses_flash_attention() const;

    // Steps 2 and 3: scores() then select_tokens() with this model's threshold.
    LayerScores score_layer(const LayerInput & tokens, ScorerTimings * timings = nullptr) const;

private:
    NammModel() = default;
    void load_file(const std::string & path);
    std::vector<float> recency(const LayerInput & tokens, bool reversed) const;
    // The un-normalised spectrum BAM's features start from, [head][token][17] (reversed token order when asked):
    // the tokens' EMAs, bias-corrected when the file says so.
    std::vector<float> spectrum_input(const LayerInput & tokens, bool reversed) const;
    ggml_tensor * build_features(ggml_context * ctx, ggml_tensor * ema, ggml_tensor * recency) const;
    std::vector<float> run_bam(const LayerInput * tokens, const float * x, int32_t n_heads, int32_t n_tokens) const;
    bool backend_has_flash_attention() const;

    NammHparams hparams_;
    ggml_backend * backend_ = nullptr;
    bool owns_backend_ = false;
    ggml_backend_buffer * weights_buffer_ = nullptr;
    ggml_context * weights_ctx_ = nullptr;
    mutable std::mutex compute_mutex_;  // guards the backend, allocator_ and use_flash_
    bool use_flash_ = false;
    // Backend memory for the graphs' intermediate tensors, kept between calls: a graph that fits reuses it.
    ggml_gallocr * allocator_ = nullptr;
    // Weights in ggml layout (ne0 = input features).
    ggml_tensor * w_qkv_ = nullptr;    // [32, 96]  inputs 25..31 are zero padding
    ggml_tensor * b_qkv_ = nullptr;    // [96]
    ggml_tensor * w_o_ = nullptr;      // [32, 50]
    ggml_tensor * b_o_ = nullptr;      // [50]
    ggml_tensor * w_out_ = nullptr;    // [25, 1]
    ggml_tensor * b_out_ = nullptr;    // [1]
    ggml_tensor * mean_ = nullptr;     // [17] μ
    ggml_tensor * inv_std_ = nullptr;  // [17] 1 / max(√σ², eps), so the graph multiplies instead of dividing
    ggml_tensor * dft_ = nullptr;      // [32, 34] Hann-windowed DFT (StftTables): rows 0-16 cos, 17-33 sin
};

// Selection (spec §4.1) on scores [head][token]: the newest token is forced kept, K = n - min_h #(s < threshold),
// each head keeps its own top-K; among equal scores the newer token wins (the reference's tie rule).
LayerScores select_tokens(std::vector<float> scores, int32_t n_heads, int32_t n_tokens, float threshold);
// The kept tokens' indices, [head][K], chronological.
std::vector<int64_t> keep_indices(const LayerScores & selection, int32_t n_heads);

}  // namespace pm::namm
