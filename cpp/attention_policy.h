// Attention-scored memory policies: they watch the attention llama.cpp computes while decoding (the tap,
// attention_tap.h, driven by llama_adapter) and decide which cached tokens to evict. Three are provided:
//   - H2O (heavy hitters): keep the tokens that received the most attention plus a recent window, at a budget;
//   - TOVA (token omission via attention): keep the tokens the newest query attends to most, at a budget;
//   - NAMM (Sakana AI's learned memory, namm_policy.h): a small network scores every token every 512 tokens.
// H2O and TOVA share everything but their score (CellScorePolicy); they differ only in which rows of the attention
// a cell's score adds up: every row ever decoded (H2O) or the last row of the latest batch (TOVA).
// On iSWA models (Gemma 2/3) every policy scores the global layers only (AttentionView::sliding views are skipped):
// their cache holds every token, while a sliding-window layer sees only the last n_swa positions. Evictions remove
// the tokens from both caches (llama.cpp's seq_rm applies to both).
//
// Deviation from the papers, forced by llama.cpp: a KV *cell* is shared by every layer and KV head, so a token
// is either in the cache for all of them or for none. The papers evict per layer (and, for NAMM and TOVA, per
// head). How per-head decisions become cell decisions is each policy's documented choice (see NammPolicy;
// CellScorePolicy sums over layers and heads).
//
// The engine calls, per decoded batch: begin_batch() before llama_decode, observe() from inside it (once per
// layer and ubatch, layers in order), then after_decode(); and make_room() before a batch that would not fit.
// Policies answer with chronological indices into the cache (CacheState order); the engine turns them into a plan
// (plan_removal).
#pragma once

#include "kv_policy.h"
#include "llama_adapter.h"

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace pm {
namespace namm {
class NammModel;
}

// Settings of the attention-scored policies (ignored by the others).
struct AttentionPolicyParams {
    int32_t h2o_recent = -1;           // h2o, tova: most recent tokens always kept; -1 = window / 2 for h2o, 0 for tova
    std::string namm_path;             // namm: a NAMM GGUF (pymemory convert-namm)
    std::string namm_mode;             // namm: "quorum", "budget" or "budget_max" (namm_policy.h); "" = the file's, else quorum
    float quorum = 0.0f;               // namm quorum: evict a token when this fraction of (layer, head) pairs drop
                                       // it; 0 = the file's, else 1.0
    int32_t max_cells = 0;             // namm budget: cells kept after each invocation; 0 = capacity - delay
    int32_t namm_delay = 0;            // namm: tokens between invocations; 0 = the file's value (512)
    bool namm_defer_evictions = true;  // namm budget modes: evict an invocation's choice only as new tokens need
                                       // the room (the cache stays at its peak; the next invocation sees what an
                                       // immediate eviction would have left); false evicts at once, as the original
    int32_t namm_neighbours = -1;      // namm budget modes: a token ranks by the highest score among itself and this
                                       // many nearest cached tokens on each side; -1 = the file's value (else 0)
    float namm_key_weight = -1.0f;     // namm budget modes: a token's ranked score gains this many standard deviations of
                                       // its keys' distinctiveness (namm_policy.h); -1 = the file's value (else 0)
    float namm_merge_threshold = std::numeric_limits<float>::quiet_NaN();
                                       // namm: each token an invocation gives up has its values merged into the kept
                                       // token of the most similar key (centred cosine >= this; value_merge.h);
                                       // NaN = off
    int32_t namm_layers = 0;           // namm: attention layers scored, spread evenly over the model; 0 = all
                                       // (an iSWA model's global layers). Fewer cost less (docs/namm.md).
    bool device_reductions = false;    // reduce the tapped attention as on a GPU even when it is in host memory
                                       // (ggml graphs, totals-based mirror check): how tests check the GPU path
};

// What a policy may look at besides the attention: the cache in chronological order and each token's cell.
struct CacheView {
    const CacheState & state;               // positions (chronological), n_pinned
    const std::vector<int32_t> & cells;     // cell of each cached token (same order)
    int32_t capacity = 0;
};

// Sessions: a per-cell array read in the cache's token order (what a saved state holds), and written back into the
// cells the same tokens occupy after a restore.
std::vector<double> values_by_token(const std::vector<double> & per_cell, const CacheView & cache);
void restore_by_token(const std::vector<double> & per_token, const CacheView & cache, std::vector<double> & per_cell);

// One invocation's record, in the spirit of the original NAMM's mem_stats.
struct InvocationRecord {
    int64_t tokens_seen = 0;               // stream length when the policy ran
    bool scored = true;                    // false: nothing could be evicted, so no token was scored
    int32_t cells_before = 0;
    int32_t cells_after = 0;
    std::vector<int32_t> layer_kept;       // per layer: tokens that layer's own selection would keep (K_l)
    // Agreement of the shared-cell decision with the per-(layer, head) sets it approximates.
    int32_t union_size = 0;                // tokens kept by at least one (layer, head)
    int32_t intersection_size = 0;         // tokens kept by every (layer, head)
    double jaccard_union = 1.0;            // |kept ∩ union| / |kept ∪ union|
    double jaccard_intersection = 1.0;     // |kept ∩ intersection| / |kept ∪ intersection|
};

// What the NAMM policy saw and computed at one invocation for one layer (for fidelity tests; off by default).
struct InvocationCapture {
    int32_t layer = 0;
    int64_t tokens_seen = 0;
    int32_t n_heads = 0, n_rows = 0, n_tokens = 0;
    std::vector<int32_t> positions;  // [n] chronological
    std::vector<float> attention;    // [head][row][n] GQA-averaged rows of this window, columns chronological
    std::vector<float> ema;          // [head][n][17] un-normalised EMA the scorer received
    std::vector<float> scores;       // [head][n]
    std::vector<uint8_t> keep;       // [head][n] per-head selection
    std::vector<uint8_t> kept;       // [n] the shared-cell decision
    std::vector<double> key_distinctiveness;  // [n] what a key weight adds to, before standardising (empty without)
};

class AttentionPolicy {
public:
    virtual ~AttentionPolicy() = default;
    virtual std::string name() const = 0;

    // Forget everything (new sequence).
    virtual void reset() = 0;
    // A batch of `n_tokens` stream tokens starting at stream index `stream_begin` is about to be decoded.
    virtual void begin_batch(int64_t stream_begin, int32_t n_tokens) = 0;
    // One layer's attention for the current batch (called from inside llama_decode).
    virtual void observe(const AttentionView & view) = 0;
    // Whether the policy also reads keys before RoPE (observe_keys, called from inside llama_decode before each
    // observed layer's attention).
    virtual bool needs_keys() const { return false; }
    virtual void observe_keys(const KeyView & view) {}
    // Largest batch that may start at stream index `stream_begin` (policies that run at fixed token counts
    // split batches at those boundaries).
    virtual int32_t batch_limit(int64_t stream_begin) const { return INT32_MAX; }
    // Tokens to evict so that `n_incoming` more fit in the capacity (called only when they do not fit).
    virtual std::vector<int32_t> make_room(const CacheView & cache, int32_t n_incoming) = 0;
    // Tokens to evict now that the stream has `tokens_seen` tokens (e.g. at a NAMM invocation).
    virtual std::vector<int32_t> after_decode(const CacheView & cache, int64_t tokens_seen) { return {}; }
    // The chronological indices the last after_decode() gave up (evicted at once or deferred), once; empty after.
    // The engine merges their values into the tokens kept (value_merge.h) before they go.
    virtual std::vector<int32_t> take_given_up() { return {}; }

    const std::vector<InvocationRecord> & invocations() const { return invocations_; }
    // The model layers whose attention the policy reads, in the order of InvocationRecord::layer_kept: every layer,
    // or an iSWA model's global layers (the sliding-window layers are never scored).
    const std::vector<int32_t> & scored_layers() const { return scored_layers_; }
    void set_scored_layers(std::vector<int32_t> layers) { scored_layers_ = std::move(layers); }
    int64_t forced_evictions() const { return forced_evictions_; }
    // Wall time spent in the policy, measured by the engine: reading attention (inside llama_decode, the tap's
    // whole work for the observed layers) and deciding.
    double observe_seconds = 0.0;
    double decide_seconds = 0.0;
    // Records InvocationCapture for these layers from now on (NAMM only; costs memory: rows x cells per layer).
    virtual void capture_layers(const std::vector<int32_t> & layers) {}
    // Whether observe() reads AttentionView::cell_totals (computed by the tap where the attention lives), and over
    // which rows: every row of the batch, or the last (the newest token's query).
    virtual bool needs_cell_totals() const { return false; }
    virtual bool cell_totals_last_row() const { return false; }
    virtual void set_threads(int32_t n_threads) {}
    // Saving a session (engine_state.cpp): the policy's state of every cached token, chronological (`cache.cells`
    // gives each token's cell), as bytes, and back into the cells the tokens occupy after a restore. Policies that
    // cannot (NAMM: per-head spectrogram state) say so with can_save_state() = false.
    virtual bool can_save_state() const { return false; }
    virtual std::string save_state(const CacheView & cache) const { return {}; }
    virtual void load_state(const CacheView & cache, const std::string & bytes) {}
    // llama.cpp placed the cached tokens in other cells (a KV state written back, value_merge.h): `before` and
    // `after` hold the same tokens, each in its old and its new cell. Per-cell state follows its token.
    virtual void move_cells(const CacheView & before, const CacheView & after) { load_state(after, save_state(before)); }
    // The NAMM scorer whose parameters a trainer may replace in place (NAMM only; nullptr for the others).
    virtual namm::NammModel * namm_scorer() { return nullptr; }
    const std::vector<InvocationCapture> & captures() const { return captures_; }
    void clear_captures() { captures_.clear(); }  // after the caller has read them (they hold whole attention rows)

protected:
    std::vector<int32_t> scored_layers_;
    std::vector<InvocationRecord> invocations_;
    std::vector<InvocationCapture> captures_;
    int64_t forced_evictions_ = 0;  // evicted by make_room because the policy's own choice did not free enough
};

// ---- pure selection helpers (unit-tested without a model) -----------------------------------------------------

// Chronological indices of the `count` lowest-scoring tokens among indices [first, end) (ties: the older token
// goes first), returned sorted.
std::vector<int32_t> lowest_scoring(const std::vector<double> & scores, int32_t first, int32_t end, int32_t count);

// ---- H2O and TOVA: one score per cell ---------------------------------------------------------------------------

struct CellScoreParams {
    int32_t n_sink = 4;       // first tokens always kept (0 = pure H2O / TOVA)
    int32_t recent = 0;       // most recent tokens always kept
    int32_t evict_chunk = 16; // tokens evicted at once when full
};
using H2oParams = CellScoreParams;
using TovaParams = CellScoreParams;

// What H2O and TOVA share: a score per KV cell built from the tap's per-cell attention totals (summed over layers
// and query heads), and one eviction rule: when the cache is full, the lowest-scoring tokens outside the sinks
// (n_sink, or the pinned prefix if longer) and the `recent` newest go, at least evict_chunk at a time. A subclass
// says only how a ubatch's totals update the scores (start_ubatch, then every layer's totals are added).
class CellScorePolicy : public AttentionPolicy {
public:
    CellScorePolicy(std::string name, const CellScoreParams & params, uint32_t n_cells);
    std::string name() const override { return name_; }
    void reset() override;
    void begin_batch(int64_t stream_begin, int32_t n_tokens) override;
    // The first scored layer after begin_batch (or a layer not after the last one) starts a ubatch: start_ubatch()
    // runs, then every global layer's AttentionView::cell_totals is added to the scores. Sliding-window layers of
    // iSWA models are skipped: they only see the last n_swa positions.
    void observe(const AttentionView & view) final;
    std::vector<int32_t> make_room(const CacheView & cache, int32_t n_incoming) override;
    bool needs_cell_totals() const override { return true; }
    bool can_save_state() const override { return true; }
    std::string save_state(const CacheView & cache) const override;  // the score of each cached token
    void load_state(const CacheView & cache, const std::string & bytes) override;

    const std::vector<double> & cell_scores() const { return scores_; }  // per cell

protected:
    // Before a ubatch's first layer is added: drop whatever must not carry over.
    virtual void start_ubatch(const AttentionView & first_layer) = 0;
    std::vector<double> scores_;  // per cell

private:
    std::string name_;
    CellScoreParams params_;
    bool batch_started_ = false;
    int32_t last_layer_ = -1;  // last layer scored in this ubatch
};

// Heavy-Hitter Oracle (Zhang et al., 2023) on shared cells: every cell accumulates the attention it receives,
// summed over layers, query heads and every query (row) since it entered the cache.
class H2oPolicy : public CellScorePolicy {
public:
    H2oPolicy(const H2oParams & params, uint32_t n_cells) : CellScorePolicy("h2o", params, n_cells) {}

protected:
    void start_ubatch(const AttentionView & v) override;  // cells the ubatch's tokens now occupy start from 0
};

// TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs", §3.3) on shared cells: a cell's score is the
// attention the newest token (the last row of the latest ubatch) pays to it, summed over layers and query heads
// (the paper averages over heads and evicts per layer); when the cache is full the least attended tokens go.
class TovaPolicy : public CellScorePolicy {
public:
    TovaPolicy(const TovaParams & params, uint32_t n_cells) : CellScorePolicy("tova", params, n_cells) {}
    bool cell_totals_last_row() const override { return true; }

protected:
    void start_ubatch(const AttentionView & v) override;  // every score is replaced by the new last row's
};

}  // namespace pm
