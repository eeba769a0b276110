#include "attention_policy.h"

#include "byte_io.h"
#include "errors.h"

#include <algorithm>
#include <numeric>

namespace pm {

std::vector<int32_t> lowest_scoring(const std::vector<double> & scores, int32_t first, int32_t end, int32_t count) {
    first = std::max(first, 0);
    end = std::min<int32_t>(end, int32_t(scores.size()));
    std::vector<int32_t> candidates;
    for (int32_t i = first; i < end; ++i) candidates.push_back(i);
    count = std::clamp(count, 0, int32_t(candidates.size()));
    // Stable: among equal scores the older (lower index) token is evicted first.
    std::stable_sort(candidates.begin(), candidates.end(),
                     [&](int32_t a, int32_t b) { return scores[size_t(a)] < scores[size_t(b)]; });
    candidates.resize(size_t(count));
    std::sort(candidates.begin(), candidates.end());
    return candidates;
}

// ---- H2O and TOVA ------------------------------------------------------------------------------------------------

CellScorePolicy::CellScorePolicy(std::string name, const CellScoreParams & params, uint32_t n_cells)
    : scores_(n_cells, 0.0), name_(std::move(name)), params_(params) {
    if (params_.n_sink < 0 || params_.recent < 0 || params_.evict_chunk < 1) {
        fail(ErrorKind::invalid_argument, name_ + " needs n_sink >= 0, recent >= 0 and evict_chunk >= 1");
    }
}

void CellScorePolicy::reset() { std::fill(scores_.begin(), scores_.end(), 0.0); }

void CellScorePolicy::begin_batch(int64_t, int32_t) {
    batch_started_ = false;
    last_layer_ = -1;
}

void CellScorePolicy::observe(const AttentionView & v) {
    // Sliding-window layers (iSWA models) see only the last n_swa positions: their attention says nothing about
    // older tokens, so only the global layers score.
    if (v.sliding) return;
    if (v.cell_totals == nullptr) fail(ErrorKind::runtime, "internal: " + name_ + " observed no per-cell totals");
    if (v.n_kv > int32_t(scores_.size())) {
        fail(ErrorKind::runtime, "internal: attention over " + std::to_string(v.n_kv) + " cells but " + name_ +
                                     " scores " + std::to_string(scores_.size()));
    }
    // Layers arrive in order for every ubatch (llama.cpp may split a batch), so a layer that is not after the last
    // one scored opens a new one.
    if (!batch_started_ || v.layer <= last_layer_) {
        start_ubatch(v);
        batch_started_ = true;
    }
    last_layer_ = v.layer;
    for (int32_t c = 0; c < v.n_kv; ++c) scores_[size_t(c)] += v.cell_totals[c];
}

std::vector<int32_t> CellScorePolicy::make_room(const CacheView & cache, int32_t n_incoming) {
    const int32_t n = int32_t(cache.state.positions.size());
    const int32_t needed = n + n_incoming - cache.capacity;
    if (needed <= 0) return {};
    std::vector<double> scores(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) scores[size_t(i)] = scores_[size_t(cache.cells[size_t(i)])];
    const int32_t first = std::min(std::max(params_.n_sink, cache.state.n_pinned), n);
    const int32_t protected_end = std::max(first, n - params_.recent);
    const int32_t count = std::max(needed, params_.evict_chunk);
    std::vector<int32_t> out = lowest_scoring(scores, first, protected_end, count);
    if (int32_t(out.size()) < needed) {
        // The recent window alone overflows the cache: the oldest recent tokens must go too.
        for (int32_t i = protected_end; i < n && int32_t(out.size()) < needed; ++i) out.push_back(i);
        forced_evictions_ += 1;
    }
    return out;
}

std::vector<double> values_by_token(const std::vector<double> & per_cell, const CacheView & cache) {
    std::vector<double> out;
    out.reserve(cache.cells.size());
    for (int32_t cell : cache.cells) out.push_back(per_cell[size_t(cell)]);
    return out;
}

void restore_by_token(const std::vector<double> & per_token, const CacheView & cache, std::vector<double> & per_cell) {
    for (size_t i = 0; i < per_token.size(); ++i) per_cell[size_t(cache.cells[i])] = per_token[i];
}

std::string CellScorePolicy::save_state(const CacheView & cache) const {
    ByteWriter out;
    out.put_vector(values_by_token(scores_, cache));
    out.put(forced_evictions_);
    return std::move(out.bytes());
}

void CellScorePolicy::load_state(const CacheView & cache, const std::string & bytes) {
    const std::string what = "the saved " + name_ + " state";
    ByteReader in(bytes, what);
    const std::vector<double> scores = in.get_vector<double>();
    const int64_t forced = in.get<int64_t>();
    if (scores.size() != cache.cells.size() || in.remaining() != 0) {
        fail(ErrorKind::invalid_argument, what + " holds " + std::to_string(scores.size()) + " tokens but the cache " +
                                              std::to_string(cache.cells.size()) + " (damaged session file)");
    }
    reset();
    restore_by_token(scores, cache, scores_);
    forced_evictions_ = forced;
}

void H2oPolicy::start_ubatch(const AttentionView & v) {
    // Whatever these cells held before was evicted; the tokens now in them start from zero.
    for (int32_t t = 0; t < v.n_tokens; ++t) scores_[size_t(v.token_cell[t])] = 0.0;
}

void TovaPolicy::start_ubatch(const AttentionView &) {
    // Only the newest query counts: the scores of the previous ubatch are forgotten.
    std::fill(scores_.begin(), scores_.end(), 0.0);
}

}  // namespace pm
