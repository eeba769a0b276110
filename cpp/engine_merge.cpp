// The engine's side of value merging (value_merge.h): the tokens a NAMM invocation gives up pass their values to
// the kept tokens of the most similar keys before they are evicted. llama.cpp's public API writes cached values
// only through a sequence's whole state, so the engine reads that state, merges, writes it back (the cells move:
// the cell mirror and the policy's per-cell state follow), then evicts as it would have.
#include "engine.h"

#include "errors.h"
#include "kv_state_view.h"
#include "value_merge.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace pm {

namespace {

// Why merging at `threshold` cannot run with these settings ("" when it can), and the error kind to raise.
std::pair<ErrorKind, std::string> merge_unsupported(const EngineParams & p, const ModelInfo & model, float threshold) {
    if (p.policy.kind != PolicyKind::namm) {
        return {ErrorKind::invalid_argument, "namm_merge_threshold merges the values of the tokens a NAMM gives up; "
                                             "policy '" + policy_kind_name(p.policy.kind) +
                                                 "' gives none up that way (use policy='namm', or leave it unset)"};
    }
    if (!(threshold >= -1.0f && threshold <= 1.0f)) {
        return {ErrorKind::invalid_argument,
                "namm_merge_threshold is a cosine between -1 and 1 (got " + std::to_string(threshold) + ")"};
    }
    for (const std::string & type : {p.type_k, p.type_v}) {
        if (type != "f16" && type != "f32") {
            return {ErrorKind::invalid_argument, "namm_merge_threshold edits cached values, which it reads as f16 or "
                                                 "f32 only: use type_k and type_v 'f16' (got '" + type + "')"};
        }
    }
    if (model.n_swa > 0 || model.uses_mrope || model.is_recurrent || model.is_hybrid) {
        return {ErrorKind::unsupported, "namm_merge_threshold is not supported for model '" + model.path +
                                            "' (architecture " + model.architecture +
                                            "): its KV state has another layout (sliding-window or multi-axis "
                                            "positions); run it without merging"};
    }
    return {ErrorKind::invalid_argument, ""};
}

}  // namespace

void check_merge_supported(const EngineParams & p, const ModelInfo & model) {
    if (std::isnan(p.attention.namm_merge_threshold)) return;
    const auto [kind, why] = merge_unsupported(p, model, p.attention.namm_merge_threshold);
    if (!why.empty()) fail(kind, why);
}

float default_merge_threshold(const EngineParams & p, const ModelInfo & model, float file_threshold) {
    if (std::isnan(file_threshold) || !merge_unsupported(p, model, file_threshold).second.empty()) {
        return std::numeric_limits<float>::quiet_NaN();
    }
    return file_threshold;
}

void Engine::merge_given_up(const std::vector<int32_t> & given_up) {
    const float threshold = params_.attention.namm_merge_threshold;
    if (given_up.empty() || std::isnan(threshold)) return;
    const int32_t n = int32_t(cache_.positions.size());
    std::vector<MergeRole> role_of(static_cast<size_t>(n), MergeRole::kept);  // chronological
    for (int32_t i = 0; i < std::min(n_pinned(), n); ++i) role_of[size_t(i)] = MergeRole::fixed;
    for (int32_t i : given_up) {
        if (i < 0 || i >= n) fail(ErrorKind::runtime, "internal: the policy gave up a token the cache does not hold");
        role_of[size_t(i)] = MergeRole::gone;
    }
    const std::vector<int32_t> cells_before = cache_view().cells;
    const int32_t n_head_kv = model_->info().n_head_kv;
    bool moved = false;
    try {
        ctx_->edit_kv_state([&](uint8_t * data, size_t size) {
            const KvStateView view = parse_kv_state(data, size);
            const size_t n_pairs = view.layers.size() * size_t(n_head_kv);
            std::vector<int32_t> index_of(size_t(view.n_cells()));  // state cell -> chronological index
            std::vector<MergeRole> roles(size_t(view.n_cells()));
            std::vector<float> weights(size_t(view.n_cells()) * n_pairs, 1.0f);
            for (int32_t c = 0; c < view.n_cells(); ++c) {
                const auto it = std::lower_bound(cache_.positions.begin(), cache_.positions.end(),
                                                 view.positions[size_t(c)]);
                if (it == cache_.positions.end() || *it != view.positions[size_t(c)]) {
                    fail(ErrorKind::runtime, "internal: llama.cpp's KV state holds a position the cache mirror does not");
                }
                const size_t i = size_t(it - cache_.positions.begin());
                index_of[size_t(c)] = int32_t(i);
                roles[size_t(c)] = role_of[i];
                if (merge_weights_[i].size() == n_pairs) {
                    std::copy(merge_weights_[i].begin(), merge_weights_[i].end(), weights.begin() + ptrdiff_t(c * n_pairs));
                }
            }
            const MergeStats stats = merge_values(data, view, roles, weights, n_head_kv, threshold);
            counters_.values_offered += stats.offered;
            counters_.values_merged += stats.merged;
            if (stats.merged == 0) return false;
            for (int32_t c = 0; c < view.n_cells(); ++c) {
                if (roles[size_t(c)] != MergeRole::kept) continue;
                const auto row = weights.begin() + ptrdiff_t(size_t(c) * n_pairs);
                if (std::any_of(row, row + ptrdiff_t(n_pairs), [](float w) { return w != 1.0f; })) {
                    merge_weights_[size_t(index_of[size_t(c)])].assign(row, row + ptrdiff_t(n_pairs));
                }
            }
            moved = true;
            return true;
        });
        if (moved) attention_->move_cells(CacheView{cache_, cells_before, capacity(params_.policy)}, cache_view());
    } catch (...) {
        reset();  // the cache may be half rewritten: start the stream afresh rather than decode from it
        throw;
    }
}

}  // namespace pm
