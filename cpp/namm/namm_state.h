// One layer's NAMM state in the original's own terms (namm-spec.md Appendix B): every KV head keeps its own
// retained tokens, in chronological order, with their absolute positions, spectrogram EMA and last 16 attention
// values. step() runs one invocation exactly as the original does. This is the API the tests and tools use to
// compare the C++ scorer with the PyTorch reference; the streaming engine keeps the same quantities per KV cell
// instead (namm_policy.cpp) and shares fold_frame() and NammModel::score_layer() with it.
#pragma once

#include "namm_model.h"

#include <cstdint>
#include <vector>

namespace pm::namm {

struct LayerState {
    int32_t n_heads = 0;
    int32_t n_tokens = 0;              // tokens each head retains (equal across heads after an invocation)
    std::vector<int32_t> positions;    // [head][token]
    std::vector<float> ema;            // [head][token][17]
    std::vector<float> history;        // [head][token][16]

    explicit LayerState(int32_t heads = 0) : n_heads(heads) {}
};

struct StepResult {
    LayerScores scored;                // scores [head][n_old + rows] and the keep mask
    std::vector<int64_t> keep;         // [head][K]: retained column indices per head, chronological
};

// One invocation: `attn` is float32 [head][n_rows][n_old + n_rows] (GQA-averaged causal attention of the rows'
// queries over the current cache: each head's n_old retained tokens, then the n_rows new ones; zeros for keys that
// did not exist yet), `new_pos` the n_rows new absolute positions. Appends the new tokens, folds the n_rows / 16
// frames, scores, selects, and keeps only each head's retained tokens in `state`.
StepResult step(const NammModel & model, LayerState & state, const float * attn, int32_t n_rows,
                const int32_t * new_pos);

// The features/scores of the current tokens without selecting (after folding `attn` into a copy of `state`).
LayerInput fold_window(const NammModel & model, LayerState & state, const float * attn, int32_t n_rows,
                       const int32_t * new_pos);

}  // namespace pm::namm
