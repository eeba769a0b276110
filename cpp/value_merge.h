// Merging evicted tokens' values into kept ones: what an eviction otherwise throws away whole survives in part.
//
// Per (layer, KV head), each token given up joins the running mean of the value of the kept token whose key is most
// like its own, when that likeness reaches a threshold: the cosine of the cached (rotated) keys after the mean key
// of the cached non-sink tokens is taken away (raw cosines are 0.8-0.95 for most pairs of tokens, one shared
// direction dominating). Keys are left as they are, so what attention finds does not move; the value it reads
// then carries the evicted tokens most like it. The idea is CaM's and D2O's (value/key merging for KV eviction);
// this form, its threshold and its gain were measured in docs/results.md ("Merged values"). The reference
// implementation is tools/kv_merge.py (the probes' harness), which tests/test_value_merge.py checks this against.
#pragma once

#include "kv_state_view.h"

#include <cstdint>
#include <vector>

namespace pm {

enum class MergeRole : uint8_t {
    kept,   // stays, and may take in values
    gone,   // given up: its value joins a kept one
    fixed,  // a sink or pinned token: stays as it is, never takes in values, not in the keys' mean
};

struct MergeStats {
    int64_t offered = 0;  // (token, layer, KV head) values given up
    int64_t merged = 0;   // ... that joined a kept value
};

// Edits the values in `data` (a llama.cpp sequence state that `view` parsed). role: per cell of the view.
// weights: [cell][layer * n_head_kv + head], how many tokens each value stands for (1 for a value never merged
// into); the kept cells' entries are updated. n_head_kv: KV heads per layer (a head's keys are k_width /
// n_head_kv elements, its values v_width / n_head_kv).
MergeStats merge_values(uint8_t * data, const KvStateView & view, const std::vector<MergeRole> & role,
                        std::vector<float> & weights, int32_t n_head_kv, float threshold);

}  // namespace pm
