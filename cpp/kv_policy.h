// KV memory policies: given the cache's state and how many tokens are about to arrive, compute a plan
// (which positions to remove, which to shift, whether to recompute). Pure functions of their inputs: no
// llama.cpp, no model, so every policy is unit-tested on synthetic cache states (tests/test_policies.py).
// The engine applies a plan to llama.cpp's memory and to its own mirror of the cache with apply_plan().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pm {

using Pos = int32_t;

enum class PolicyKind {
    sink,           // StreamingLLM: first n_sink tokens forever + rolling window, positions re-indexed
    context_shift,  // llama.cpp's behaviour: keep n_keep, discard half of the rest when full
    window,         // rolling window without sinks (the paper's negative control)
    recompute,      // sliding window with re-computation: rebuild the cache from the n_sink first and the last tokens
                    // (the paper's quality baseline has n_sink = 0)
    none,           // full cache; error when it would overflow
    h2o,            // heavy hitters by accumulated attention + recent window (attention_policy.h)
    tova,           // the tokens the newest query attends to least go first (attention_policy.h)
    namm,           // Sakana AI's learned NAMM scorer (namm_policy.h)
};

// Policies that decide from tapped attention rather than from positions alone.
inline bool is_attention_scored(PolicyKind kind) {
    return kind == PolicyKind::h2o || kind == PolicyKind::tova || kind == PolicyKind::namm;
}

PolicyKind parse_policy_kind(const std::string & name);  // throws invalid_argument listing the valid names
std::string policy_kind_name(PolicyKind kind);

struct PolicyParams {
    PolicyKind kind = PolicyKind::sink;
    int32_t n_sink = 4;        // tokens kept forever (sink, context_shift's n_keep); 0 for window/recompute
    int32_t window = 1020;     // recent tokens kept; capacity = n_sink + window
    int32_t evict_chunk = 16;  // sink/window: tokens evicted at once when full (1 = per token, as in the paper)
    bool reindex = true;       // close the gap after evicting so positions stay inside the cache (the paper's
                               // rule); false keeps absolute positions (an ablation; positions then grow forever)
    Pos compact_at = 0;        // with reindex false: before a token would get this position, close every gap in
                               // the cache at once (plan_compaction), so positions stay below it; 0 = never. The
                               // engine's default for attention-scored policies is the model's training context:
                               // past it, absolute positions make the model's output collapse (docs/results.md §4).
};

int32_t capacity(const PolicyParams & params);
// The default evict_chunk: 1/16 of the window, at least 16 tokens, at most the window. Every eviction re-rotates all
// cached keys (llama.cpp's K-shift), so the chunk grows with the window to keep that cost per token constant, and
// the cache still holds at least 15/16 of its window. Measured in docs/results.md ("evict_chunk").
int32_t default_evict_chunk(int32_t window);
void validate(const PolicyParams & params);  // throws invalid_argument with a message that says what to change

// Positions of the cached tokens in chronological order, and how many leading tokens are pinned (sinks, a
// pinned system prompt). Positions are strictly increasing.
struct CacheState {
    std::vector<Pos> positions;
    int32_t n_pinned = 0;
};

struct PositionRange {
    Pos p0 = 0, p1 = 0;  // [p0, p1)
};

struct PositionShift {
    Pos p0 = 0, p1 = 0, delta = 0;  // positions in [p0, p1) += delta
};

struct EvictionPlan {
    std::vector<PositionRange> remove;  // applied first, in order
    std::vector<PositionShift> shift;   // then these, in order
    bool recompute = false;  // rebuild the retained tokens' KV from scratch instead of shifting keys
    int32_t n_evicted = 0;
    Pos next_pos = -1;       // position of the next token after a re-indexing plan; -1 = unchanged (absolute)
    bool empty() const { return remove.empty() && shift.empty() && !recompute; }
};

// Plan for making room for `n_incoming` tokens. An empty plan when they fit. For PolicyKind::none, throws
// pm::Error(capacity) when they do not. `n_incoming` must not exceed capacity - n_pinned.
EvictionPlan plan_eviction(const PolicyParams & params, const CacheState & state, int32_t n_incoming);

// The cache state after the plan (what llama.cpp's memory holds once remove + shift are applied).
CacheState apply_plan(const CacheState & state, const EvictionPlan & plan);

// Removes the tokens at the given chronological indices (sorted, unique) and, if `reindex`, closes the gaps so
// positions stay contiguous from the first removed one. Shared by all policies that evict arbitrary tokens.
EvictionPlan plan_removal(const CacheState & state, const std::vector<int32_t> & indices, bool reindex);

// Removes nothing and closes every gap: the cached tokens move to positions 0, 1, ... in their order, and
// next_pos becomes their count. An empty plan when there is no gap.
EvictionPlan plan_compaction(const CacheState & state);

}  // namespace pm
