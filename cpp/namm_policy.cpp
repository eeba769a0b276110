#include "namm_policy.h"

#include "byte_io.h"
#include "errors.h"
#include "key_distinctiveness.h"
#include "namm/namm_model.h"
#include "namm/namm_tap.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <utility>

namespace pm {

bool is_budget_mode(const std::string & mode) { return mode != "quorum" && namm::is_deploy_mode(mode); }

namespace {
// budget_max and budget_zmax rank by a maximum over the pairs; every other mode by the mean.
bool ranks_by_max(const std::string & mode) { return mode == "budget_max" || mode == "budget_zmax"; }
// The modes that read each pair's scores standardised over the cached tokens.
bool standardises_pairs(const std::string & mode) { return mode == "budget_zmax" || mode == "budget_mix"; }

// scores[i] for i outside [first, last); inside, the highest of scores[j] over the candidates j within `radius`
// of i in that range (the candidates in chronological order).
std::vector<double> neighbour_max(const std::vector<double> & scores, int32_t first, int32_t last, int32_t radius) {
    std::vector<double> out(scores);
    for (int32_t i = first; i < last; ++i) {
        for (int32_t j = std::max(first, i - radius); j <= std::min(last - 1, i + radius); ++j) {
            out[size_t(i)] = std::max(out[size_t(i)], scores[size_t(j)]);
        }
    }
    return out;
}
}  // namespace

std::vector<int32_t> shared_eviction_order(const SharedCellDecision & rule, const std::vector<int32_t> & drop_votes,
                                           const std::vector<double> & scores, int32_t n_pairs,
                                           const std::vector<double> & reserve_scores) {
    if (scores.size() != drop_votes.size()) {
        fail(ErrorKind::invalid_argument, "drop_votes and scores must have one entry per cached token (got " +
                                              std::to_string(drop_votes.size()) + " and " +
                                              std::to_string(scores.size()) + ")");
    }
    if (rule.n_sink < 0) fail(ErrorKind::invalid_argument, "n_sink must be >= 0 (got " + std::to_string(rule.n_sink) + ")");
    if (n_pairs < 1) fail(ErrorKind::invalid_argument, "n_pairs must be >= 1 (got " + std::to_string(n_pairs) + ")");
    if (rule.mode == "quorum" && !(rule.quorum > 0.0f && rule.quorum <= 1.0f)) {
        fail(ErrorKind::invalid_argument, "quorum must be in (0, 1] (got " + std::to_string(rule.quorum) + ")");
    }
    const bool budget = is_budget_mode(rule.mode);
    if (budget && rule.max_cells < 0) {
        fail(ErrorKind::invalid_argument, "max_cells must be >= 0 (got " + std::to_string(rule.max_cells) + ")");
    }
    const bool mix = rule.mode == "budget_mix";
    if (mix && (reserve_scores.size() != drop_votes.size() || rule.reserve < 0)) {
        fail(ErrorKind::invalid_argument, "budget_mix needs reserve >= 0 (got " + std::to_string(rule.reserve) +
                                              ") and one reserve score per cached token (got " +
                                              std::to_string(reserve_scores.size()) + " for " +
                                              std::to_string(drop_votes.size()) + ")");
    }
    const int32_t n = int32_t(drop_votes.size());
    const int32_t first = std::min(rule.n_sink, n);
    const int32_t last = n - 1;  // the newest token is always kept
    std::vector<int32_t> out;
    if (rule.mode == "quorum") {
        // At least `quorum` of the pairs must drop a token; with quorum 1.0 that is every pair.
        const int32_t needed = std::max<int32_t>(1, int32_t(std::ceil(double(rule.quorum) * n_pairs - 1e-9)));
        for (int32_t i = first; i < last; ++i) {
            if (drop_votes[size_t(i)] >= needed) out.push_back(i);
        }
        return out;
    }
    if (!budget) fail(ErrorKind::invalid_argument, std::string("namm_mode must be ") + namm::kDeployModes);
    if (rule.neighbours < 0 || rule.neighbours > namm::kMaxNeighbours) {
        fail(ErrorKind::invalid_argument, "neighbours must be between 0 and " + std::to_string(namm::kMaxNeighbours) +
                                              " (got " + std::to_string(rule.neighbours) + ")");
    }
    const int32_t excess = n - rule.max_cells;
    if (excess <= 0) return out;
    std::vector<int32_t> candidates;
    for (int32_t i = first; i < last; ++i) candidates.push_back(i);
    const std::vector<double> pooled =
        rule.neighbours > 0 ? neighbour_max(scores, first, last, rule.neighbours) : std::vector<double>{};
    const std::vector<double> & ranked = rule.neighbours > 0 ? pooled : scores;
    if (mix && rule.reserve > 0) {  // the reserve's tokens leave the candidates: highest reserve score, then newer
        std::vector<int32_t> by_reserve = candidates;
        std::stable_sort(by_reserve.begin(), by_reserve.end(), [&](int32_t a, int32_t b) {
            return reserve_scores[size_t(a)] > reserve_scores[size_t(b)];
        });
        by_reserve.resize(size_t(std::min<int32_t>(rule.reserve, int32_t(by_reserve.size()))));
        std::vector<uint8_t> reserved(size_t(n), 0);
        for (int32_t i : by_reserve) reserved[size_t(i)] = 1;
        candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                        [&](int32_t i) { return reserved[size_t(i)] != 0; }),
                         candidates.end());
    }
    // budget, budget_mix: most drop votes first, then lowest mean score; budget_max, budget_zmax: lowest highest
    // score. Then older.
    const bool by_votes = !ranks_by_max(rule.mode);
    std::stable_sort(candidates.begin(), candidates.end(), [&](int32_t a, int32_t b) {
        if (by_votes && drop_votes[size_t(a)] != drop_votes[size_t(b)]) {
            return drop_votes[size_t(a)] > drop_votes[size_t(b)];
        }
        return ranked[size_t(a)] < ranked[size_t(b)];
    });
    candidates.resize(size_t(std::min<int32_t>(excess, int32_t(candidates.size()))));
    return candidates;
}

std::vector<int32_t> decide_shared_evictions(const SharedCellDecision & rule, const std::vector<int32_t> & drop_votes,
                                             const std::vector<double> & scores, int32_t n_pairs,
                                             const std::vector<double> & reserve_scores) {
    std::vector<int32_t> out = shared_eviction_order(rule, drop_votes, scores, n_pairs, reserve_scores);
    std::sort(out.begin(), out.end());
    return out;
}

namespace {

// (mean, standard deviation) of one pair's n scores; a spread of 0 (every score equal) counts as 1, so such a pair
// gives every token 0 and singles out none.
std::pair<double, double> mean_and_spread(const float * scores, int32_t n) {
    double sum = 0.0, sum_sq = 0.0;
    for (int32_t i = 0; i < n; ++i) {
        sum += scores[i];
        sum_sq += double(scores[i]) * scores[i];
    }
    const double mean = sum / std::max(n, 1);
    const double variance = std::max(sum_sq / std::max(n, 1) - mean * mean, 0.0);
    return {mean, variance > 1e-12 ? std::sqrt(variance) : 1.0};
}

class NammPolicy : public AttentionPolicy {
public:
    // scored_layers: the model's layers NAMM reads (all of them, or an iSWA model's global layers); its per-layer
    // state, selections, votes and captures are kept in that order ("slots").
    NammPolicy(std::shared_ptr<namm::NammModel> model, const SharedCellDecision & rule, int32_t delay, bool defer,
               float key_weight, std::vector<int32_t> scored_layers, int32_t n_model_layers, int32_t n_head,
               int32_t n_head_kv, uint32_t n_cells, int32_t n_threads)
        : model_(std::move(model)), rule_(rule), delay_(delay), defer_(defer && is_budget_mode(rule.mode)),
          key_weight_(key_weight),
          n_layer_(int32_t(scored_layers.size())),
          n_head_kv_(n_head_kv), n_cells_(n_cells), scored_layers_(std::move(scored_layers)),
          slot_of_layer_(size_t(n_model_layers), -1),
          tap_(namm::FeatureTapParams{n_layer_, n_head, n_head_kv, int32_t(n_cells), n_threads,
                                      model_->ema_coefficient()}),
          windows_(size_t(n_layer_)) {
        for (size_t s = 0; s < scored_layers_.size(); ++s) slot_of_layer_[size_t(scored_layers_[s])] = int32_t(s);
        set_scored_layers(scored_layers_);
    }

    std::string name() const override { return "namm"; }

    void reset() override {
        tap_.reset();
        for (auto & w : windows_) std::fill(w.begin(), w.end(), 0.0f);
        invocations_.clear();
        captures_.clear();
        forced_evictions_ = 0;
        std::fill(last_cell_scores_.begin(), last_cell_scores_.end(), kNoScore);
        std::fill(pending_rank_.begin(), pending_rank_.end(), kNotPending);
        std::fill(key_count_.begin(), key_count_.end(), 0);
        given_up_.clear();
    }

    void set_threads(int32_t n_threads) override { tap_.set_threads(n_threads); }

    namm::NammModel * namm_scorer() override { return model_.get(); }

    void capture_layers(const std::vector<int32_t> & layers) override {
        for (int32_t l : layers) {
            if (l < 0 || l >= int32_t(slot_of_layer_.size())) fail(ErrorKind::invalid_argument, "no layer " + std::to_string(l));
            const int32_t slot = slot_of_layer_[size_t(l)];
            if (slot < 0) {
                fail(ErrorKind::invalid_argument, "layer " + std::to_string(l) +
                                                      " is not scored (a sliding-window layer, or left out by "
                                                      "namm_layers)");
            }
            windows_[size_t(slot)].assign(size_t(n_head_kv_) * size_t(delay_) * n_cells_, 0.0f);
        }
    }

    bool needs_keys() const override { return key_weight_ > 0.0f; }

    // Keys before RoPE of each scored layer's new tokens, per (slot, KV head, cell); key_count_ counts the scored
    // layers whose keys a cell's token has (all of them once its batch is decoded).
    void observe_keys(const KeyView & v) override {
        if (v.sliding || v.layer < 0 || v.layer >= int32_t(slot_of_layer_.size())) return;
        const int32_t slot = slot_of_layer_[size_t(v.layer)];
        if (slot < 0) return;
        if (head_dim_ == 0) {
            head_dim_ = v.head_dim;
            keys_.assign(size_t(n_layer_) * size_t(n_head_kv_) * n_cells_ * size_t(head_dim_), 0.0f);
        }
        if (v.n_head_kv != n_head_kv_ || v.head_dim != head_dim_) {
            fail(ErrorKind::runtime, "layer " + std::to_string(v.layer) + "'s keys have " +
                                         std::to_string(v.n_head_kv) + " KV heads of " + std::to_string(v.head_dim) +
                                         " values; the NAMM policy expected " + std::to_string(n_head_kv_) + " of " +
                                         std::to_string(head_dim_));
        }
        const size_t d = size_t(head_dim_);
        for (int32_t t = 0; t < v.n_tokens; ++t) {
            const size_t cell = size_t(v.token_cell[t]);
            if (slot == 0) key_count_[cell] = 0;  // a new token in the cell
            for (int32_t g = 0; g < n_head_kv_; ++g) {
                std::copy_n(v.keys + (size_t(t) * size_t(n_head_kv_) + size_t(g)) * d, d,
                            keys_.data() + ((size_t(slot) * size_t(n_head_kv_) + size_t(g)) * n_cells_ + cell) * d);
            }
            ++key_count_[cell];
        }
    }

    void begin_batch(int64_t stream_begin, int32_t) override {
        batch_begin_ = stream_begin;
    }

    int32_t batch_limit(int64_t stream_begin) const override {
        return int32_t(delay_ - stream_begin % delay_);  // never cross an invocation boundary
    }

    void observe(const AttentionView & v) override {
        // Sliding-window layers of iSWA models are not scored (they see only the last n_swa positions).
        // Nor are layers left out by namm_layers.
        if (v.sliding || v.layer < 0 || v.layer >= int32_t(slot_of_layer_.size())) return;
        const int32_t slot = slot_of_layer_[size_t(v.layer)];
        if (slot < 0) return;
        // A cell that receives a new token no longer holds the token the last invocation scored.
        if (slot == 0) {
            for (int32_t t = 0; t < v.n_tokens; ++t) {
                last_cell_scores_[size_t(v.token_cell[t])] = kNoScore;
                pending_rank_[size_t(v.token_cell[t])] = kNotPending;
            }
        }
        std::vector<float> & window = windows_[size_t(slot)];
        tap_.observe(namm::TapBatch{slot, v.tensor, v.n_tokens, batch_begin_, v.token_cell, v.probs, v.head_stride},
                     window.empty() ? nullptr : &captured_rows_);
        if (window.empty()) return;
        // Keep this window's GQA-averaged rows, [head][row][cell], for the capture at the next invocation. A cell
        // that receives a new token forgets the rows its previous occupant got.
        for (int32_t g = 0; g < n_head_kv_; ++g) {
            for (int32_t t = 0; t < v.n_tokens; ++t) {
                for (int32_t r = 0; r < delay_; ++r) {
                    window[(size_t(g) * size_t(delay_) + size_t(r)) * n_cells_ + size_t(v.token_cell[t])] = 0.0f;
                }
            }
        }
        for (int32_t g = 0; g < n_head_kv_; ++g) {
            for (int32_t t = 0; t < v.n_tokens; ++t) {
                float * row = window.data() + (size_t(g) * size_t(delay_) + size_t((batch_begin_ + t) % delay_)) * n_cells_;
                std::fill_n(row, n_cells_, 0.0f);
                std::copy_n(captured_rows_.data() + (size_t(g) * size_t(v.n_tokens) + size_t(t)) * size_t(v.n_kv),
                            v.n_kv, row);
            }
        }
    }

    // A session holds, per cached token: its features in every scored layer and KV head (the STFT frame being
    // assembled and the EMA E, from the tap) and its score at the last invocation (make_room's fallback).
    // The invocation records and fidelity captures are diagnostics and start empty after a restore.
    bool can_save_state() const override { return true; }

    std::string save_state(const CacheView & cache) const override {
        ByteWriter out;
        out.put(n_layer_);
        out.put(n_head_kv_);
        out.put_vector(tap_.save_cells(cache.cells));
        out.put_vector(values_by_token(last_cell_scores_, cache));
        out.put_vector(values_by_token(pending_rank_, cache));
        out.put(forced_evictions_);
        // Keys (when a key weight reads them): [slot][head][token][head_dim] in the cache's token order.
        out.put(int32_t(needs_keys() ? head_dim_ : 0));
        if (needs_keys() && head_dim_ > 0) out.put_vector(keys_by_token(cache));
        return std::move(out.bytes());
    }

    void move_cells(const CacheView & before, const CacheView & after) override {
        // A restore starts the diagnostics afresh; a move keeps them (the capture windows' rows are per cell and
        // start empty: a fidelity capture across a move sees only the rows decoded after it).
        auto invocations = std::move(invocations_);
        auto captures = std::move(captures_);
        load_state(after, save_state(before));
        invocations_ = std::move(invocations);
        captures_ = std::move(captures);
    }

    void load_state(const CacheView & cache, const std::string & bytes) override {
        ByteReader in(bytes, "the saved NAMM state");
        const int32_t n_layer = in.get<int32_t>(), n_head_kv = in.get<int32_t>();
        if (n_layer != n_layer_ || n_head_kv != n_head_kv_) {
            fail(ErrorKind::invalid_argument, "the saved NAMM state has " + std::to_string(n_layer) +
                                                  " scored layers x " + std::to_string(n_head_kv) +
                                                  " KV heads; this engine scores " + std::to_string(n_layer_) + " x " +
                                                  std::to_string(n_head_kv_));
        }
        const std::vector<float> features = in.get_vector<float>();
        const std::vector<double> scores = in.get_vector<double>();
        const std::vector<double> pending = in.get_vector<double>();
        const int64_t forced = in.get<int64_t>();
        // Sessions saved before keys were kept end here.
        const int32_t head_dim = in.remaining() > 0 ? in.get<int32_t>() : 0;
        const std::vector<float> keys = head_dim > 0 ? in.get_vector<float>() : std::vector<float>{};
        if (needs_keys() && !cache.cells.empty() && head_dim == 0) {
            fail(ErrorKind::invalid_argument, "the saved NAMM state holds no keys, which namm_key_weight > 0 reads: "
                                              "restore it with namm_key_weight=0, or save it from an engine with a "
                                              "key weight");
        }
        if (keys.size() != size_t(n_layer_) * size_t(n_head_kv_) * cache.cells.size() * size_t(head_dim)) {
            fail(ErrorKind::invalid_argument, "the saved NAMM state's keys do not match its tokens (damaged session "
                                              "file)");
        }
        if (scores.size() != cache.cells.size() || pending.size() != cache.cells.size() || in.remaining() != 0) {
            fail(ErrorKind::invalid_argument, "the saved NAMM state holds " + std::to_string(scores.size()) +
                                                  " tokens but the cache " + std::to_string(cache.cells.size()) +
                                                  " (damaged session file)");
        }
        reset();
        tap_.load_cells(cache.cells, features);
        restore_by_token(scores, cache, last_cell_scores_);
        restore_by_token(pending, cache, pending_rank_);
        forced_evictions_ = forced;
        if (needs_keys() && head_dim > 0) restore_keys(keys, head_dim, cache);
    }

    std::vector<int32_t> after_decode(const CacheView & cache, int64_t tokens_seen) override {
        if (tokens_seen == 0 || tokens_seen % delay_ != 0) return {};
        return invoke(cache, tokens_seen);
    }

    std::vector<int32_t> take_given_up() override { return std::exchange(given_up_, {}); }

    std::vector<int32_t> make_room(const CacheView & cache, int32_t n_incoming) override {
        const int32_t n = int32_t(cache.state.positions.size());
        const int32_t needed = n + n_incoming - cache.capacity;
        // Deferred evictions first: the tokens the last invocation gave up, in the order it gave them up.
        std::vector<std::pair<double, int32_t>> pending;  // (rank, chronological index)
        for (int32_t i = 0; i < n; ++i) {
            const double rank = pending_rank_[size_t(cache.cells[size_t(i)])];
            if (!std::isnan(rank)) pending.emplace_back(rank, i);
        }
        std::sort(pending.begin(), pending.end());
        pending.resize(std::min(pending.size(), size_t(std::max(needed, 0))));
        for (const auto & p : pending) pending_rank_[size_t(cache.cells[size_t(p.second)])] = kNotPending;
        if (int32_t(pending.size()) == needed) {  // what a well-sized budget always meets: no scores needed
            std::vector<int32_t> out;
            for (const auto & p : pending) out.push_back(p.second);
            std::sort(out.begin(), out.end());
            return out;
        }
        // The cache would still overflow before the next invocation freed room: evict by the last invocation's
        // scores as the mode ranks them (oldest non-sink tokens if there was none). Counted: a well-sized cache never
        // needs this. Keyed by cell, not position: cells stay put when positions are re-indexed (reindex=True),
        // positions don't. Tokens decoded since the last invocation have no score yet and count as 0.
        std::vector<double> scores(static_cast<size_t>(n), 0.0);
        for (int32_t i = 0; i < n; ++i) {
            const double s = last_cell_scores_[size_t(cache.cells[size_t(i)])];
            scores[size_t(i)] = std::isnan(s) ? 0.0 : s;
        }
        for (const auto & p : pending) {
            scores[size_t(p.second)] = -std::numeric_limits<double>::infinity();  // goes before any forced choice
        }
        forced_evictions_ += needed - int32_t(pending.size());
        const int32_t first = std::min(std::max(rule_.n_sink, cache.state.n_pinned), n);
        return lowest_scoring(scores, first, n - 1, needed);
    }

private:
    std::vector<int32_t> invoke(const CacheView & cache, int64_t tokens_seen) {
        const int32_t n = int32_t(cache.state.positions.size());
        const int32_t n_pairs = n_layer_ * n_head_kv_;
        std::vector<int32_t> drop_votes(static_cast<size_t>(n), 0);
        std::vector<double> score_sum(static_cast<size_t>(n), 0.0);
        std::vector<double> score_max(static_cast<size_t>(n), -std::numeric_limits<double>::infinity());
        const bool standardise = standardises_pairs(rule_.mode);
        InvocationRecord record;
        record.tokens_seen = tokens_seen;
        record.cells_before = n;
        record.cells_after = n;
        // Budget mode evicts only above max_cells, and max_cells + delay <= capacity: at or below it nothing can
        // be evicted now nor forced before the next invocation, so the scores would go unused. Skipping the scorer
        // leaves every decision as it was and makes a cache that is not yet full cost no more than the tap.
        // Captures (diagnostics) want the scores, so they keep it on.
        if (is_budget_mode(rule_.mode) && n <= rule_.max_cells && !capturing()) {
            record.scored = false;
            invocations_.push_back(std::move(record));
            return {};
        }

        // Every scored layer's (KV head, token) rows go through the scorer as one batch of n_layer x H "heads": the
        // network is shared by all layers and heads and scores each head on its own, so one graph per invocation
        // does what one per layer did, with 1/n_layer of the graph overhead and more work per thread.
        namm::LayerInput all;
        all.n_heads = n_layer_ * n_head_kv_;
        all.n_tokens = n;
        all.ema.reserve(size_t(all.n_heads) * size_t(n) * namm::kBins);
        for (int32_t h = 0; h < all.n_heads; ++h) {  // shared cells: every head sees the same tokens
            all.positions.insert(all.positions.end(), cache.state.positions.begin(), cache.state.positions.end());
        }
        for (int32_t l = 0; l < n_layer_; ++l) {  // scored-layer slots
            const std::vector<float> ema = tap_.ema(l, cache.cells);  // [head][token][17], chronological
            all.ema.insert(all.ema.end(), ema.begin(), ema.end());
        }
        const std::vector<float> all_scores = model_->scores(all);   // [layer][head][token]
        const size_t per_layer = size_t(n_head_kv_) * size_t(n);
        for (int32_t l = 0; l < n_layer_; ++l) {
            const namm::LayerScores scored = namm::select_tokens(
                std::vector<float>(all_scores.begin() + ptrdiff_t(l * per_layer),
                                   all_scores.begin() + ptrdiff_t((l + 1) * per_layer)),
                n_head_kv_, n, model_->hparams().threshold);
            record.layer_kept.push_back(scored.n_keep);
            if (!windows_[size_t(l)].empty()) captures_.push_back(capture(l, cache, all, scored, tokens_seen));
            for (int32_t g = 0; g < n_head_kv_; ++g) {
                const float * pair = scored.scores.data() + size_t(g) * size_t(n);  // [n] this (layer, head)'s
                double centre = 0.0, scale = 1.0;
                if (standardise) std::tie(centre, scale) = mean_and_spread(pair, n);
                for (int32_t i = 0; i < n; ++i) {
                    const size_t k = size_t(g) * size_t(n) + size_t(i);
                    drop_votes[size_t(i)] += scored.keep[k] ? 0 : 1;
                    score_sum[size_t(i)] += pair[i];
                    score_max[size_t(i)] = std::max(score_max[size_t(i)], (double(pair[i]) - centre) / scale);
                }
            }
        }
        // The score the mode ranks tokens by: the mean over the pairs, or (budget_max, budget_zmax) the highest;
        // budget_mix keeps its reserve by the (standardised) highest.
        const bool by_mean = !ranks_by_max(rule_.mode);
        std::vector<double> token_scores(static_cast<size_t>(n));
        for (int32_t i = 0; i < n; ++i) {
            token_scores[size_t(i)] =
                by_mean ? score_sum[size_t(i)] / double(n_pairs) : score_max[size_t(i)];
            record.union_size += drop_votes[size_t(i)] < n_pairs;
            record.intersection_size += drop_votes[size_t(i)] == 0;
        }
        SharedCellDecision rule = rule_;
        rule.n_sink = std::max(rule.n_sink, cache.state.n_pinned);  // a pinned system prompt counts as sinks
        std::vector<double> distinct;
        if (needs_keys()) {
            // Over the candidates (neither sinks nor the newest token), the ranked score gains key_weight standard
            // deviations of the keys' distinctiveness.
            const int32_t first = std::min(rule.n_sink, n), last = std::max(first, n - 1);
            distinct = key_distinctiveness(candidate_keys(cache, first, last), n_pairs, n, head_dim_, first, last);
            add_standardised(token_scores, distinct, key_weight_, first, last);
        }
        std::fill(last_cell_scores_.begin(), last_cell_scores_.end(), kNoScore);
        for (int32_t i = 0; i < n; ++i) last_cell_scores_[size_t(cache.cells[size_t(i)])] = token_scores[size_t(i)];
        const std::vector<double> no_reserve;
        const std::vector<int32_t> order = shared_eviction_order(rule, drop_votes, token_scores, n_pairs,
                                                                 rule.reserve > 0 ? score_max : no_reserve);
        std::vector<int32_t> evict(order);
        std::sort(evict.begin(), evict.end());
        record.cells_after = n - int32_t(evict.size());  // what the invocation keeps (deferred: once the room is used)
        // Agreement of the kept set with the union / intersection of the per-(layer, head) keep sets.
        std::vector<uint8_t> kept(size_t(n), 1);
        for (int32_t i : evict) kept[size_t(i)] = 0;
        int32_t both_union = 0, either_union = 0, both_inter = 0, either_inter = 0;
        for (int32_t i = 0; i < n; ++i) {
            const bool in_union = drop_votes[size_t(i)] < n_pairs, in_inter = drop_votes[size_t(i)] == 0;
            both_union += kept[size_t(i)] && in_union;
            either_union += kept[size_t(i)] || in_union;
            both_inter += kept[size_t(i)] && in_inter;
            either_inter += kept[size_t(i)] || in_inter;
        }
        record.jaccard_union = either_union ? double(both_union) / either_union : 1.0;
        record.jaccard_intersection = either_inter ? double(both_inter) / either_inter : 1.0;
        for (auto it = captures_.end() - std::min<std::ptrdiff_t>(captures_.size(), n_layer_); it != captures_.end(); ++it) {
            if (it->tokens_seen == tokens_seen) {
                it->kept = kept;
                it->key_distinctiveness = distinct;
            }
        }
        invocations_.push_back(std::move(record));
        given_up_ = evict;
        if (!defer_) return evict;
        // Deferred: the tokens stay until new ones need their cells (make_room), then go in the mode's order. The
        // next invocation sees the cache an immediate eviction would have left (delay tokens arrive in between).
        std::fill(pending_rank_.begin(), pending_rank_.end(), kNotPending);
        for (size_t k = 0; k < order.size(); ++k) pending_rank_[size_t(cache.cells[size_t(order[k])])] = double(k);
        return {};
    }

    // [pair][token][head_dim] of the cached tokens (chronological; pairs slot-major). The candidates' keys must have
    // been observed in every scored layer.
    std::vector<float> candidate_keys(const CacheView & cache, int32_t first, int32_t last) const {
        for (int32_t i = first; i < last; ++i) {
            const int32_t seen = head_dim_ == 0 ? 0 : key_count_[size_t(cache.cells[size_t(i)])];
            if (seen != n_layer_) {
                fail(ErrorKind::runtime, "namm_key_weight reads every scored layer's keys before RoPE, but llama.cpp "
                                         "showed " + std::to_string(seen) + " of " + std::to_string(n_layer_) +
                                         " for a cached token (the keys' RoPE node 'Kcur-<layer>' was not found in "
                                         "this model's graph); use namm_key_weight=0");
            }
        }
        return keys_by_token(cache);
    }

    std::vector<float> keys_by_token(const CacheView & cache) const {
        const size_t n = cache.cells.size(), d = size_t(head_dim_), pairs = size_t(n_layer_) * size_t(n_head_kv_);
        std::vector<float> out(pairs * n * d);
        for (size_t p = 0; p < pairs; ++p) {
            for (size_t i = 0; i < n; ++i) {
                std::copy_n(keys_.data() + (p * n_cells_ + size_t(cache.cells[i])) * d, d, out.data() + (p * n + i) * d);
            }
        }
        return out;
    }

    void restore_keys(const std::vector<float> & keys, int32_t head_dim, const CacheView & cache) {
        head_dim_ = head_dim;
        const size_t n = cache.cells.size(), d = size_t(head_dim_), pairs = size_t(n_layer_) * size_t(n_head_kv_);
        keys_.assign(pairs * n_cells_ * d, 0.0f);
        for (size_t p = 0; p < pairs; ++p) {
            for (size_t i = 0; i < n; ++i) {
                std::copy_n(keys.data() + (p * n + i) * d, d, keys_.data() + (p * n_cells_ + size_t(cache.cells[i])) * d);
            }
        }
        for (size_t i = 0; i < n; ++i) key_count_[size_t(cache.cells[i])] = n_layer_;
    }

    bool capturing() const {
        return std::any_of(windows_.begin(), windows_.end(), [](const std::vector<float> & w) { return !w.empty(); });
    }

    // `all`: the invocation's batched input (every slot's heads, namm_policy.cpp invoke()).
    InvocationCapture capture(int32_t slot, const CacheView & cache, const namm::LayerInput & all,
                              const namm::LayerScores & scored, int64_t tokens_seen) {
        std::vector<float> & window = windows_[size_t(slot)];
        InvocationCapture c;
        c.layer = scored_layers_[size_t(slot)];  // the model's layer id
        c.tokens_seen = tokens_seen;
        c.n_heads = n_head_kv_;
        c.n_rows = delay_;
        c.n_tokens = all.n_tokens;
        c.positions.assign(cache.state.positions.begin(), cache.state.positions.end());
        c.attention.resize(size_t(n_head_kv_) * size_t(delay_) * size_t(c.n_tokens));
        for (int32_t g = 0; g < n_head_kv_; ++g) {
            for (int32_t r = 0; r < delay_; ++r) {
                const float * row = window.data() + (size_t(g) * size_t(delay_) + size_t(r)) * n_cells_;
                float * dst = c.attention.data() + (size_t(g) * size_t(delay_) + size_t(r)) * size_t(c.n_tokens);
                for (int32_t i = 0; i < c.n_tokens; ++i) dst[i] = row[size_t(cache.cells[size_t(i)])];
            }
        }
        std::fill(window.begin(), window.end(), 0.0f);
        const size_t per_slot = size_t(n_head_kv_) * size_t(c.n_tokens) * namm::kBins;
        c.ema.assign(all.ema.begin() + ptrdiff_t(size_t(slot) * per_slot),
                     all.ema.begin() + ptrdiff_t(size_t(slot + 1) * per_slot));
        c.scores = scored.scores;
        c.keep = scored.keep;
        return c;
    }

    std::shared_ptr<namm::NammModel> model_;
    SharedCellDecision rule_;
    int32_t delay_;
    bool defer_;  // budget modes: evict the invocation's choice only as new tokens need the room
    float key_weight_;  // budget modes: standard deviations of key distinctiveness added to the ranked score
    int32_t head_dim_ = 0;                     // of the keys, once seen
    std::vector<int32_t> given_up_;            // the last invocation's choice, until the engine takes it
    std::vector<float> keys_;                  // [slot][head][cell][head_dim] keys before RoPE (key weight only)
    int32_t n_layer_, n_head_kv_;              // n_layer_: scored layers (slots)
    size_t n_cells_;
    std::vector<int32_t> scored_layers_;       // slot -> model layer
    std::vector<int32_t> slot_of_layer_;       // model layer -> slot, -1 for sliding-window layers
    namm::FeatureTap tap_;                     // per-(layer, head, cell) features, where the attention lives
    std::vector<std::vector<float>> windows_;  // captured layers: [head][row][cell] this window's GQA rows
    std::vector<float> captured_rows_;
    int64_t batch_begin_ = 0;
    // Score of each cell's token at the last invocation as the mode ranks (mean over the pairs; budget_max: the
    // highest) for make_room's fallback; kNoScore for cells that got a new token since, or none.
    static constexpr double kNoScore = std::numeric_limits<double>::quiet_NaN();
    std::vector<double> last_cell_scores_ = std::vector<double>(n_cells_, kNoScore);
    // Deferred evictions: per cell, the order in which the last invocation gave its token up (0 first); NaN for a
    // token it keeps, one decoded since, or an empty cell.
    static constexpr double kNotPending = std::numeric_limits<double>::quiet_NaN();
    std::vector<double> pending_rank_ = std::vector<double>(n_cells_, kNotPending);
    std::vector<int32_t> key_count_ = std::vector<int32_t>(n_cells_, 0);  // per cell: scored layers with its keys
};

}  // namespace

std::unique_ptr<AttentionPolicy> make_namm_policy(const AttentionPolicyParams & a, const PolicyParams & policy,
                                                  const ModelInfo & model, uint32_t n_cells, const std::string & device,
                                                  int32_t n_threads) {
    if (a.namm_path.empty()) {
        fail(ErrorKind::invalid_argument, "policy 'namm' needs namm_path (a NAMM GGUF from pymemory convert-namm)");
    }
    auto scorer = namm::NammModel::load(a.namm_path, device, n_threads);
    if (a.namm_delay < 0) fail(ErrorKind::invalid_argument, "namm_delay must be > 0, or 0 for the file's value");
    const auto & hp = scorer->hparams();
    const int32_t delay = a.namm_delay > 0 ? a.namm_delay : hp.deploy_delay > 0 ? hp.deploy_delay : hp.delay;
    if (delay % namm::kHop != 0) {
        fail(ErrorKind::invalid_argument, "namm_delay must be a multiple of " + std::to_string(namm::kHop) +
                                              " (the STFT hop); got " + std::to_string(delay));
    }
    const int32_t cap = capacity(policy);
    if (cap < policy.n_sink + delay + 1) {
        fail(ErrorKind::invalid_argument,
             "policy 'namm' evicts every " + std::to_string(delay) + " tokens, so the cache needs room for n_sink + " +
                 std::to_string(delay) + " + the retained tokens; raise window above " + std::to_string(delay) +
                 " (e.g. window=" + std::to_string(2 * delay + 1020 - delay) + ")");
    }
    // Unset mode and quorum take the settings the NAMM was trained with (its file says), else quorum 1.0.
    SharedCellDecision rule;
    rule.mode = !a.namm_mode.empty() ? a.namm_mode : !scorer->hparams().deploy_mode.empty() ? scorer->hparams().deploy_mode
                                                                                           : "quorum";
    if (!namm::is_deploy_mode(rule.mode)) {
        fail(ErrorKind::invalid_argument, std::string("namm_mode must be ") + namm::kDeployModes + " (got '" +
                                              rule.mode + "')");
    }
    rule.quorum = a.quorum > 0.0f ? a.quorum : scorer->hparams().deploy_quorum;
    rule.n_sink = policy.n_sink;
    rule.max_cells = a.max_cells > 0 ? a.max_cells : cap - delay;
    rule.reserve = rule.mode == "budget_mix" ? std::max(1, rule.max_cells / kMixReserveDivisor) : 0;
    if (a.namm_neighbours < -1 || a.namm_neighbours > namm::kMaxNeighbours) {
        fail(ErrorKind::invalid_argument, "namm_neighbours must be between 0 and " +
                                              std::to_string(namm::kMaxNeighbours) + ", or -1 for the file's value (got " +
                                              std::to_string(a.namm_neighbours) + ")");
    }
    if (a.namm_neighbours > 0 && !is_budget_mode(rule.mode)) {
        fail(ErrorKind::invalid_argument, "namm_neighbours pools the scores a budget mode ranks by; mode '" + rule.mode +
                                              "' ranks none (use a budget mode or namm_neighbours=0)");
    }
    rule.neighbours = a.namm_neighbours >= 0 ? a.namm_neighbours : is_budget_mode(rule.mode) ? hp.deploy_neighbours : 0;
    if (a.namm_key_weight != -1.0f && !(a.namm_key_weight >= 0.0f && a.namm_key_weight <= namm::kMaxKeyWeight)) {
        fail(ErrorKind::invalid_argument, "namm_key_weight must be between 0 and " +
                                              std::to_string(int(namm::kMaxKeyWeight)) + ", or -1 for the file's value (got " +
                                              std::to_string(a.namm_key_weight) + ")");
    }
    if (a.namm_key_weight > 0.0f && !is_budget_mode(rule.mode)) {
        fail(ErrorKind::invalid_argument, "namm_key_weight adds to the scores a budget mode ranks by; mode '" + rule.mode +
                                              "' ranks none (use a budget mode or namm_key_weight=0)");
    }
    const float key_weight =
        a.namm_key_weight >= 0.0f ? a.namm_key_weight : is_budget_mode(rule.mode) ? hp.deploy_key_weight : 0.0f;
    if (is_budget_mode(rule.mode) && rule.max_cells + delay > cap) {
        fail(ErrorKind::invalid_argument, "max_cells + namm delay (" + std::to_string(rule.max_cells) + " + " +
                                              std::to_string(delay) + ") must not exceed the capacity " +
                                              std::to_string(cap));
    }
    if (!(rule.quorum > 0.0f && rule.quorum <= 1.0f)) {
        fail(ErrorKind::invalid_argument, "quorum must be in (0, 1]");
    }
    if (model.n_head_kv <= 0 || model.n_head % model.n_head_kv != 0) {
        fail(ErrorKind::unsupported, "model has an unusual head layout (n_head " + std::to_string(model.n_head) +
                                         ", n_head_kv " + std::to_string(model.n_head_kv) + ")");
    }
    // iSWA models (Gemma 2/3): only the global layers are scored; their cache holds every token, while a
    // sliding-window layer sees the last n_swa positions only. The shared-cell votes and scores are over the
    // (global layer, KV head) pairs.
    const std::vector<int32_t> global = model.global_layers();
    if (global.empty()) fail(ErrorKind::unsupported, "policy 'namm' needs at least one global attention layer");
    const int32_t n_global = int32_t(global.size());
    if (a.namm_layers < 0 || a.namm_layers > n_global) {
        fail(ErrorKind::invalid_argument, "namm_layers must be between 1 and the model's " + std::to_string(n_global) +
                                              " scored attention layers, or 0 for all (got " +
                                              std::to_string(a.namm_layers) + ")");
    }
    // A subset spread evenly over the depth: layer i of k sits at the middle of its 1/k of the model.
    std::vector<int32_t> scored;
    const int32_t k = a.namm_layers > 0 ? a.namm_layers : n_global;
    for (int32_t i = 0; i < k; ++i) scored.push_back(global[size_t((2 * int64_t(i) + 1) * n_global / (2 * int64_t(k)))]);
    return std::make_unique<NammPolicy>(std::move(scorer), rule, delay, a.namm_defer_evictions, key_weight,
                                        std::move(scored),
                                        model.n_layer, model.n_head,
                                        model.n_head_kv, n_cells, n_threads);
}

}  // namespace pm
