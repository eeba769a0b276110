#include "kv_policy.h"

#include "errors.h"

#include <algorithm>

namespace pm {

PolicyKind parse_policy_kind(const std::string & name) {
    if (name == "sink") return PolicyKind::sink;
    if (name == "context_shift") return PolicyKind::context_shift;
    if (name == "window") return PolicyKind::window;
    if (name == "recompute") return PolicyKind::recompute;
    if (name == "none") return PolicyKind::none;
    if (name == "h2o") return PolicyKind::h2o;
    if (name == "tova") return PolicyKind::tova;
    if (name == "namm") return PolicyKind::namm;
    fail(ErrorKind::invalid_argument,
         "unknown policy '" + name + "'; choose one of: sink, context_shift, window, recompute, none, h2o, tova, namm");
}

std::string policy_kind_name(PolicyKind kind) {
    switch (kind) {
        case PolicyKind::sink: return "sink";
        case PolicyKind::context_shift: return "context_shift";
        case PolicyKind::window: return "window";
        case PolicyKind::recompute: return "recompute";
        case PolicyKind::none: return "none";
        case PolicyKind::h2o: return "h2o";
        case PolicyKind::tova: return "tova";
        case PolicyKind::namm: return "namm";
    }
    return "?";
}

int32_t capacity(const PolicyParams & params) { return params.n_sink + params.window; }

int32_t default_evict_chunk(int32_t window) { return std::max(1, std::min(window, std::max(16, window / 16))); }

void validate(const PolicyParams & p) {
    auto bad = [](const std::string & what) { fail(ErrorKind::invalid_argument, what); };
    if (p.window < 1) bad("window must be at least 1 (got " + std::to_string(p.window) + ")");
    if (p.n_sink < 0) bad("n_sink must be >= 0 (got " + std::to_string(p.n_sink) + ")");
    if (p.compact_at < 0) bad("compact_at must be >= 0 (got " + std::to_string(p.compact_at) + ")");
    if (p.evict_chunk < 1) bad("evict_chunk must be at least 1 (got " + std::to_string(p.evict_chunk) + ")");
    if (p.evict_chunk > p.window) {
        bad("evict_chunk (" + std::to_string(p.evict_chunk) + ") cannot exceed window (" + std::to_string(p.window) +
            ")");
    }
    if (int64_t(p.n_sink) + int64_t(p.window) > (int64_t(1) << 24)) {
        bad("n_sink + window is too large (over 16M cells)");
    }
}

namespace {

// The shifts that move the tokens from chronological index `first` on, except the `removed` ones (sorted), to
// consecutive positions from `target`; returns the position after the last. Each run of kept tokens with contiguous
// positions moves with one shift; applied from low to high positions, a range always moves into space already free.
Pos close_gaps(const std::vector<Pos> & pos, int32_t first, Pos target, const std::vector<int32_t> & removed,
               std::vector<PositionShift> & shifts) {
    const int32_t n = int32_t(pos.size());
    size_t next_removed = size_t(std::lower_bound(removed.begin(), removed.end(), first) - removed.begin());
    const auto is_removed = [&](int32_t i) { return next_removed < removed.size() && removed[next_removed] == i; };
    for (int32_t i = first; i < n;) {
        if (is_removed(i)) {
            ++next_removed;
            ++i;
            continue;
        }
        int32_t run_end = i;  // extend while kept and positions contiguous
        while (run_end + 1 < n && !is_removed(run_end + 1) && pos[run_end + 1] == pos[run_end] + 1) ++run_end;
        const Pos delta = target - pos[i];
        if (delta != 0) shifts.push_back({pos[i], pos[run_end] + 1, delta});
        target += run_end - i + 1;
        i = run_end + 1;
    }
    return target;
}

}  // namespace

EvictionPlan plan_removal(const CacheState & state, const std::vector<int32_t> & indices, bool reindex) {
    EvictionPlan plan;
    const auto & pos = state.positions;
    const int32_t n = int32_t(pos.size());
    if (indices.empty()) return plan;
    for (size_t k = 0; k < indices.size(); ++k) {
        if (indices[k] < 0 || indices[k] >= n || (k > 0 && indices[k] <= indices[k - 1])) {
            fail(ErrorKind::invalid_argument, "eviction indices must be sorted, unique and inside the cache");
        }
    }
    // Runs of consecutive indices become one position range (gaps between positions hold no tokens).
    for (size_t k = 0; k < indices.size();) {
        size_t end = k;
        while (end + 1 < indices.size() && indices[end + 1] == indices[end] + 1) ++end;
        plan.remove.push_back({pos[indices[k]], pos[indices[end]] + 1});
        k = end + 1;
    }
    plan.n_evicted = int32_t(indices.size());
    if (!reindex) return plan;
    // Kept tokens after the first removed one move down to consecutive positions.
    plan.next_pos = close_gaps(pos, indices.front(), pos[indices.front()], indices, plan.shift);
    return plan;
}

EvictionPlan plan_compaction(const CacheState & state) {
    EvictionPlan plan;
    const Pos next = close_gaps(state.positions, 0, 0, {}, plan.shift);
    if (!plan.shift.empty()) plan.next_pos = next;
    return plan;
}

CacheState apply_plan(const CacheState & state, const EvictionPlan & plan) {
    CacheState out;
    out.positions.reserve(state.positions.size());
    for (Pos p : state.positions) {
        bool removed = false;
        for (const auto & r : plan.remove) removed |= (p >= r.p0 && p < r.p1);
        if (!removed) out.positions.push_back(p);
    }
    for (const auto & s : plan.shift) {
        for (Pos & p : out.positions) {
            if (p >= s.p0 && p < s.p1) p += s.delta;
        }
    }
    out.n_pinned = std::min<int32_t>(state.n_pinned, int32_t(out.positions.size()));
    return out;
}

EvictionPlan plan_eviction(const PolicyParams & params, const CacheState & state, int32_t n_incoming) {
    const int32_t cap = capacity(params);
    const int32_t n = int32_t(state.positions.size());
    const int32_t pinned = std::min(state.n_pinned, n);
    if (n_incoming < 0) fail(ErrorKind::invalid_argument, "n_incoming must be >= 0");
    if (is_attention_scored(params.kind)) {
        fail(ErrorKind::invalid_argument, "policy '" + policy_kind_name(params.kind) +
                                              "' decides from attention; it has no position-only plan");
    }
    if (n + n_incoming <= cap) return {};
    if (params.kind == PolicyKind::none) {
        fail(ErrorKind::capacity, "the cache holds " + std::to_string(n) + " of " + std::to_string(cap) +
                                      " cells and " + std::to_string(n_incoming) +
                                      " more tokens do not fit; policy 'none' never evicts — use policy 'sink' "
                                      "to stream past the cache size, or a larger window");
    }
    if (n_incoming > cap - pinned) {
        fail(ErrorKind::invalid_argument, std::to_string(n_incoming) + " incoming tokens cannot fit next to " +
                                              std::to_string(pinned) + " pinned tokens in a cache of " +
                                              std::to_string(cap));
    }
    const int32_t needed = n + n_incoming - cap;
    const int32_t evictable = n - pinned;
    int32_t count = needed;
    switch (params.kind) {
        case PolicyKind::sink:
        case PolicyKind::window: count = std::max(needed, params.evict_chunk); break;
        case PolicyKind::context_shift: count = std::max(needed, evictable / 2); break;
        case PolicyKind::recompute: count = needed; break;
        default: break;
    }
    count = std::min(count, evictable);
    std::vector<int32_t> indices(static_cast<size_t>(count));
    for (int32_t k = 0; k < count; ++k) indices[size_t(k)] = pinned + k;
    // Recompute rebuilds the kept tokens from position 0, so it always re-indexes.
    EvictionPlan plan = plan_removal(state, indices, params.reindex || params.kind == PolicyKind::recompute);
    plan.recompute = params.kind == PolicyKind::recompute;
    return plan;
}

}  // namespace pm
