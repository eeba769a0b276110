// The one place where pymemory talks to llama.cpp.
//
// Every llama.cpp call (llama_*) lives in llama_adapter.cpp, so an upstream API change breaks exactly one file. This
// header deliberately does not include llama.h: the rest of the core sees small value types and three owning classes
// (model, context, sampler), plus logging and GGUF validation behind them.
//
// Two pieces depend on llama.cpp's internals rather than its API, and are quarantined in units of their own that the
// context drives (neither calls llama.cpp):
//   kv_cell_mirror.h  which cell each token goes to (a replay of llama-kv-cache.cpp's allocator), self-checked;
//   attention_tap.h   the scheduler eval callback that finds "kq_soft_max-<layer>" and reduces it per cell.
// Data flow of one LlamaContext::decode(): mirror.place(batch) -> tap.begin_batch(cells) -> llama_decode, inside
// which the tap checks layer 0 against the mirror and hands every layer's AttentionView to the policy.
#pragma once

#include "attention_tap.h"
#include "kv_cell_mirror.h"

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

struct llama_model;
struct llama_context;
struct llama_sampler;

namespace pm {

using Token = int32_t;
using Pos = int32_t;

// ---------------------------------------------------------------------------------------------------------------
// Model: immutable weights + vocabulary, shared by any number of contexts.

struct ModelParams {
    std::string path;
    int32_t n_gpu_layers = 0;     // layers offloaded to the GPU backend llama-cpp-python was built with (-1 = all)
    bool use_mmap = true;
    bool use_extra_bufts = true;  // weight repacking; false works around ggml's AMX crash (llama.cpp #20824)
};

struct ChatMessage {
    std::string role;
    std::string content;
};

struct ModelInfo {
    std::string path;
    std::string architecture;  // general.architecture
    std::string name;          // general.name (may be empty)
    std::string description;   // llama_model_desc, e.g. "llama 135M Q4_1"
    int32_t n_vocab = 0;
    int32_t n_layer = 0;
    int32_t n_head = 0;
    int32_t n_head_kv = 0;
    int32_t n_embd = 0;
    int32_t n_ctx_train = 0;
    int32_t n_swa = 0;         // sliding-window size of SWA layers, 0 if the model has none
    // Per layer, 1 if it is a sliding-window layer (its own KV cache, attends to the last n_swa positions only).
    // From the GGUF's <arch>.attention.sliding_window_pattern, else llama.cpp's built-in pattern of the architecture
    // (known here: gemma2, gemma3); empty when the model has no SWA layers or the pattern is unknown.
    std::vector<uint8_t> swa_layers;
    bool is_sliding(int32_t layer) const {
        return swa_layers.size() == size_t(n_layer) && layer >= 0 && layer < n_layer && swa_layers[size_t(layer)] != 0;
    }
    // The layers whose cache holds every token: all of them, or an iSWA model's global layers.
    std::vector<int32_t> global_layers() const {
        std::vector<int32_t> out;
        for (int32_t l = 0; l < n_layer; ++l) {
            if (!is_sliding(l)) out.push_back(l);
        }
        return out;
    }
    bool is_recurrent = false;
    bool is_hybrid = false;
    bool uses_mrope = false;   // multi-axis RoPE (Qwen2-VL family): positions cannot be shifted
    bool add_bos = false;
    Token bos = -1;
    Token eos = -1;
    std::string chat_template;  // empty if the GGUF has none
};

class LlamaModel {
public:
    // Validates the file (exists, GGUF magic, complete) before llama.cpp sees it; throws pm::Error.
    static std::shared_ptr<LlamaModel> load(const ModelParams & params);
    ~LlamaModel();
    LlamaModel(const LlamaModel &) = delete;
    LlamaModel & operator=(const LlamaModel &) = delete;

    const ModelInfo & info() const { return info_; }

    std::vector<Token> tokenize(std::string_view text, bool add_special, bool parse_special) const;
    // Raw bytes of one token; may be an incomplete UTF-8 sequence (the caller assembles characters).
    std::string token_bytes(Token token, bool render_special) const;
    std::string detokenize(const std::vector<Token> & tokens, bool render_special) const;
    bool is_end_of_generation(Token token) const;
    bool is_valid_token(Token token) const { return token >= 0 && token < info_.n_vocab; }

    // Renders messages with the GGUF's template (or `template_override`, a template text or a built-in name such
    // as "chatml"); add_assistant appends the assistant-turn opener.
    std::string apply_chat_template(const std::vector<ChatMessage> & messages, bool add_assistant,
                                    const std::string & template_override = "") const;

    llama_model * raw() const { return model_; }

private:
    LlamaModel() = default;
    llama_model * model_ = nullptr;
    ModelInfo info_;
};

// ---------------------------------------------------------------------------------------------------------------
// Context: one KV cache (one sequence) plus the decode loop's buffers.

enum class FlashAttention { automatic, enabled, disabled };

struct ContextParams {
    uint32_t n_ctx = 1024;       // physical cells; llama.cpp pads this up to a multiple of 256
    uint32_t n_batch = 512;      // largest batch handed to decode()
    int32_t n_threads = 0;       // 0 = all cores
    int32_t n_threads_batch = 0; // 0 = n_threads
    FlashAttention flash_attention = FlashAttention::automatic;
    bool swa_full = false;       // full-size SWA cache: required to shift positions of iSWA models (Gemma 2/3)
    std::string type_k = "f16";  // KV cache element types: f32, f16, bf16, q8_0, q4_0
    std::string type_v = "f16";
    AttentionCallback on_attention;  // if set, flash attention must be disabled
};

class LlamaContext {
public:
    LlamaContext(std::shared_ptr<LlamaModel> model, const ContextParams & params);
    ~LlamaContext();
    LlamaContext(const LlamaContext &) = delete;
    LlamaContext & operator=(const LlamaContext &) = delete;

    uint32_t n_ctx() const;                 // physical cells after padding
    bool can_shift() const;                 // llama_memory_can_shift

    // Position held by each KV cell (-1 = empty), mirrored from llama.cpp's slot allocation (kv_cell_mirror.h).
    // Attention columns are cells, so attention-scored policies map them to tokens through this. The mirror is
    // checked against every batch's attention of the first layer of each kind (the first layer, and on iSWA models
    // the first sliding-window layer too): a mismatch (an upstream change) stops decoding with an error instead of
    // evicting wrongly. For iSWA models (Gemma 2/3) this is the base (non-SWA) cache, which holds every token; the
    // SWA cache, whose cells diverge (it reuses cells of tokens that left the window), has a mirror of its own
    // (swa_cell_positions). Single-sequence caches only.
    const std::vector<Pos> & cell_positions() const { return cells_.positions(); }
    // The SWA cache's cells (iSWA models with a tap; empty otherwise).
    const std::vector<Pos> & swa_cell_positions() const { return swa_cells_.positions(); }

    // Decodes `n` tokens of sequence 0 at explicit positions. With logits_all every token gets logits, otherwise
    // only the last. Throws pm::Error (capacity if no KV slot, runtime otherwise); on failure the cache is
    // restored by llama.cpp.
    void decode(const Token * tokens, const Pos * positions, int32_t n, bool logits_all);
    // Logits of token i of the last decoded batch (negative counts from the end); n_vocab floats. Without
    // logits_all only the last token has logits.
    const float * logits(int32_t i) const;

    void memory_clear();
    void memory_remove(Pos p0, Pos p1);              // [p0, p1); throws if llama.cpp refuses (recurrent memory)
    void memory_shift(Pos p0, Pos p1, Pos delta);    // positions in [p0, p1) += delta (K is re-rotated lazily)
    Pos memory_pos_min() const;
    Pos memory_pos_max() const;

    void set_threads(int32_t n_threads, int32_t n_threads_batch);

    // Sequence 0's KV cells as bytes (llama_state_seq_get_data) plus the cell mirror, for saving a session. Keys are
    // written as stored, so the caller must not have position shifts pending (every shift is applied by the next
    // decode; the engine saves only between decodes of policies that shift before decoding).
    std::string state_save() const;
    // Replaces the cache with a state_save() blob of a context of the same model, cell count and KV types. The cells
    // must hold exactly `positions` (in any order). Throws pm::Error(invalid_argument) for a damaged or mismatched
    // blob and leaves the cache empty.
    void state_load(const std::string & blob, const std::vector<Pos> & positions);
    // Reads sequence 0's cells as llama.cpp serialises them (kv_state_view.h), lets `edit` change the bytes in place
    // and, when it returns true, writes them back. llama.cpp then places the cells anew (compacted, in their old
    // order), and the cell mirror follows. Same precondition as state_save(): no position shift pending.
    void edit_kv_state(const std::function<bool(uint8_t * data, size_t size)> & edit);
    // The tap also computes AttentionView::cell_totals for every layer (where the attention lives), over the rows
    // asked for. No-op without on_attention (no tap).
    void set_attention_totals(AttentionTotals rows) {
        if (tap_) tap_->set_totals(rows);
    }
    // Only these layers' attention reaches on_attention (1 per layer; empty = all). No-op without a tap.
    void set_observed_layers(std::vector<uint8_t> observed) {
        if (tap_) tap_->set_observed_layers(std::move(observed));
    }
    // Each observed layer's keys before RoPE reach on_keys too (AttentionTap::set_key_callback). No-op without a tap.
    void set_key_callback(KeyCallback on_keys) {
        if (tap_) tap_->set_key_callback(std::move(on_keys));
    }
    // Treats tapped attention as if it lived on a device even when it is in host memory: AttentionView::probs stays
    // null, totals come from a ggml graph, the mirror check uses them (what a GPU run does; for tests).
    void set_device_reductions(bool enabled) {
        if (tap_) tap_->set_device_reductions(enabled);
    }
    // Seconds the tap spent reading attention since the last call (0 without a tap).
    double take_attention_seconds() { return tap_ ? tap_->take_observe_seconds() : 0.0; }

    const LlamaModel & model() const { return *model_; }
    llama_context * raw() const { return ctx_; }

private:
    std::shared_ptr<LlamaModel> model_;
    llama_context * ctx_ = nullptr;
    std::unique_ptr<AttentionTap> tap_;  // only with ContextParams::on_attention
    KvCellMirror cells_;                 // see cell_positions()
    KvCellMirror swa_cells_;             // the SWA cache of an iSWA model (only with a tap)
    bool mirror_swa_ = false;            // swa_cells_ is in use
    int32_t n_batch_ = 0;
    int32_t n_tokens_last_ = 0;   // size of the last decoded batch
    bool logits_all_last_ = false;

    std::string seq_state_bytes() const;  // sequence 0's cells as llama_state_seq_get_data writes them
    // Writes seq_state_bytes() back into an empty cache and places the cells in the mirrors; the cells held exactly
    // these positions (cell order, as saved). Throws, with the cache cleared, if llama.cpp or the mirror disagree.
    void place_seq_state(const uint8_t * data, size_t size, const std::vector<Pos> & in_cell_order,
                         const std::vector<Pos> & swa_in_cell_order);
};

// ---------------------------------------------------------------------------------------------------------------
// Sampling

struct SamplingParams {
    float temperature = 0.8f;    // <= 0: greedy
    int32_t top_k = 40;          // 0: off
    float top_p = 0.95f;         // in (0, 1]; 1: off
    float min_p = 0.05f;         // <= 0: off
    float repeat_penalty = 1.0f; // 1: off
    int32_t repeat_last_n = 64;
    float frequency_penalty = 0.0f;
    float presence_penalty = 0.0f;
    // DRY ("don't repeat yourself"): penalises tokens that would extend a repeat of an earlier sequence.
    float dry_multiplier = 0.0f;   // 0: off
    float dry_base = 1.75f;
    int32_t dry_allowed_length = 2;
    int32_t dry_penalty_last_n = -1;  // -1: the whole context
    uint32_t seed = 0;
};

void validate(const SamplingParams & params);  // throws invalid_argument with the offending field

// Calls on one Sampler are serialised by its mutex (it holds the random state and the penalty history), so sharing
// one between threads is safe, if rarely what you want.
class Sampler {
public:
    Sampler(const LlamaModel & model, const SamplingParams & params);
    ~Sampler();
    Sampler(const Sampler &) = delete;
    Sampler & operator=(const Sampler &) = delete;

    // Samples from the logits of output `output_index` of the context's last decode.
    Token sample(LlamaContext & ctx, int32_t output_index = -1);
    void accept(Token token);  // feeds the repetition-penalty history
    void reset();

private:
    llama_sampler * chain_ = nullptr;
    std::mutex mutex_;
};

// ---------------------------------------------------------------------------------------------------------------
// Process-wide settings

// llama.cpp logs through a callback; by default we keep only warnings and errors, and remember the last error
// lines so that exceptions can quote them.
void set_log_verbosity(int level);  // 0 = silent (errors go into exceptions), 1 = warnings + errors (default), 2 = info, 3 = debug
std::string last_llama_errors();
std::string backend_summary();      // e.g. "CPU" or "CUDA0 (NVIDIA ...), CPU"

}  // namespace pm
