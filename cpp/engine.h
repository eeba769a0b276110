// The streaming engine: one sequence flowing through a bounded KV cache under a memory policy.
//
// Python drives the loop (pymemory/streaming.py): feed() a prompt, then alternate sample() and feed({token}).
// Each call is one GIL-free C++ step; nothing here calls back into Python. The engine keeps a mirror of what
// the cache holds (token ids and positions in chronological order), asks the policy for a plan before tokens
// that would not fit, applies it to llama.cpp's memory and to the mirror, then decodes.
#pragma once

#include "attention_policy.h"
#include "kv_policy.h"
#include "llama_adapter.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pm {

struct EngineParams {
    ModelParams model;
    PolicyParams policy;
    AttentionPolicyParams attention;   // attention_policy.h
    int32_t n_threads = 0;        // 0 = all cores
    int32_t n_threads_batch = 0;  // 0 = n_threads
    int32_t prefill_chunk = 0;    // tokens per decode while prefilling; 0 = auto (see resolved_prefill_chunk)
    FlashAttention flash_attention = FlashAttention::automatic;
    std::string type_k = "f16";
    std::string type_v = "f16";
};

struct EngineStats {
    int32_t cells_used = 0;        // tokens in the KV cache now
    int32_t capacity = 0;          // n_sink + window: the most cells the policy ever lets the cache hold
    int32_t n_ctx_physical = 0;    // cells llama.cpp allocated (capacity padded to a multiple of 256)
    int32_t n_pinned = 0;          // leading tokens that are never evicted (sinks, pinned system prompt)
    int32_t peak_cells = 0;        // largest cells_used since reset
    int64_t tokens_seen = 0;       // tokens of the stream that went through the model (prompt + generated)
    int64_t evictions = 0;         // eviction events
    int64_t tokens_evicted = 0;
    int64_t tokens_recomputed = 0; // re-decoded by the recompute policy
    int64_t values_offered = 0;    // namm_merge_threshold: (token, layer, KV head) values given up ...
    int64_t values_merged = 0;     // ... and merged into a kept token's
    Pos max_pos = -1;              // largest position in the cache (-1 when empty)
    Pos next_pos = 0;              // position the next token gets
};

class Engine {
public:
    Engine(std::shared_ptr<LlamaModel> model, const EngineParams & params);
    explicit Engine(const EngineParams & params) : Engine(LlamaModel::load(params.model), params) {}

    const LlamaModel & model() const { return *model_; }
    std::shared_ptr<LlamaModel> shared_model() const { return model_; }
    const EngineParams & params() const { return params_; }

    // Streams tokens through the cache (chunked prefill, evicting between chunks as the policy says). Afterwards
    // the logits of the last token are available to sample(). With policy "none", throws capacity before
    // decoding anything if the tokens would not fit.
    void feed(const std::vector<Token> & tokens);

    // Like feed(), but returns -log p(token_i | everything before) for each token, in nats. The first entry is NaN
    // when nothing was fed before. `chunk` tokens are decoded per call (1 = the paper's per-token streaming:
    // every token sees exactly the cache the policy leaves).
    std::vector<float> score(const std::vector<Token> & tokens, int32_t chunk);

    Token sample(Sampler & sampler);                 // from the last token's logits; does not feed it
    std::vector<float> last_logits() const;          // n_vocab floats

    // Pins the first n cached tokens (e.g. BOS + system prompt) as sinks. They must still be in the cache.
    void pin_prefix(int32_t n_tokens);

    void reset();
    // The whole stream state as bytes (KV cells, the cache mirror, pinned prefix, counters; engine_state.cpp) and
    // back, for sessions saved to disk. load_state() checks that the bytes come from an engine of the same model
    // and memory settings and throws invalid_argument otherwise (the engine is then reset). h2o's and tova's
    // scores and namm's features (STFT frame and EMA per layer and KV head) are saved per token.
    std::string save_state() const;
    void load_state(const std::string & bytes);
    // Takes back the last n tokens of the stream (they must still be cached, after the pinned prefix): their cells
    // are freed and the next token gets the first freed position. For a reply cut by a stop string, or a reply the
    // client regenerates. Feed tokens before sampling again. Sink-style policies only (engine_state.cpp).
    void rewind(int32_t n_tokens);
    void set_threads(int32_t n_threads, int32_t n_threads_batch);

    std::vector<Token> cached_tokens() const { return cached_tokens_; }
    const AttentionPolicy * attention_policy() const { return attention_.get(); }
    // h2o / tova: each cached token's score (chronological); empty for the other policies.
    std::vector<double> token_scores();
    AttentionPolicy * attention_policy() { return attention_.get(); }
    std::vector<Pos> cached_positions() const { return cache_.positions; }
    EngineStats stats() const;
    int32_t resolved_prefill_chunk() const;

    // An engine is one stream and runs one call at a time. Its Python bindings hold this mutex around every call
    // (bindings/engine_bindings.cpp, `locked`), so two threads on one Engine take turns instead of racing; C++
    // callers sharing an engine across threads must hold it too. Engines on one shared LlamaModel run in parallel.
    std::mutex & call_mutex() const { return call_mutex_; }

private:
    int32_t n_pinned() const;
    // Makes room for n tokens under the policy (no-op if they fit): cells, and positions below compact_at.
    void make_room(int32_t n_incoming);
    void apply(const EvictionPlan & plan);
    // Decodes tokens at next_pos.. and appends them to the mirror; splits into llama.cpp batches.
    void decode_append(const Token * tokens, int32_t n, bool logits_all);
    // Evicts the given chronological indices (re-indexing positions if the policy says so).
    void evict(const std::vector<int32_t> & indices);
    CacheView cache_view();  // refreshes cache_cells_
    // namm_merge_threshold: the values of the tokens the policy just gave up join the kept tokens' (value_merge.h,
    // engine_merge.cpp), before those tokens are evicted.
    void merge_given_up(const std::vector<int32_t> & given_up);
    int32_t batch_limit() const;


    std::shared_ptr<LlamaModel> model_;
    EngineParams params_;
    std::unique_ptr<LlamaContext> ctx_;
    std::unique_ptr<AttentionPolicy> attention_;  // h2o / tova / namm only
    int32_t n_batch_ = 0;
    std::vector<int32_t> cache_cells_;            // cell of each cached token (for attention policies)
    int32_t tap_layers_seen_ = 0;                 // attention tensors observed during the last decode
    int32_t n_observed_layers_ = 0;               // ... and how many it should have been

    CacheState cache_;                  // positions (chronological) + pinned count
    std::vector<Token> cached_tokens_;  // parallel to cache_.positions
    int32_t pinned_prefix_ = 0;         // set by pin_prefix()
    Pos next_pos_ = 0;
    bool has_logits_ = false;           // the context's last output belongs to the stream's last token

    // Per cached token (parallel to cache_.positions), per (layer, KV head): how many tokens its value stands for
    // since merging began (empty = 1 each: never merged into).
    std::vector<std::vector<float>> merge_weights_;

    EngineStats counters_;
    mutable std::mutex call_mutex_;
};

// Refuses namm_merge_threshold where merging cannot run (another policy, a threshold that is no cosine, KV types
// other than f16/f32, models whose KV state has another layout), saying what to change. engine_merge.cpp.
void check_merge_supported(const EngineParams & params, const ModelInfo & model);
// The threshold a NAMM file records, where these settings can merge; NaN (off) where they cannot (a NAMM trained on
// one model runs zero-shot on models that cannot merge, as it did before it recorded one).
float default_merge_threshold(const EngineParams & params, const ModelInfo & model, float file_threshold);

}  // namespace pm
