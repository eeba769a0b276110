// One layer's NAMM state in the original's own terms (namm-spec.md Appendix B): every KV head keeps its own
// retained tokens, in chronological order, with their absolute positions, un-normalised spectrogram EMA (17) and
// the last 16 attention values each received. float32, laid out [head][token][...].
//
// Streaming use (what the engine does as attention arrives, spec §2.3):
//   state.append(positions, count)    when tokens enter the cache: E = 0 and history = 0 (spec §2.1, §2.3). Append
//                                     a token no later than the frame whose 16 rows first attend to it; appending
//                                     earlier changes nothing, because a token that got no attention keeps E = 0.
//   fold_frame(model, state, rows16)  every 16 queries, with their attention on all the state's tokens
//                                     ([head][16][n_tokens], 0 for tokens that did not exist yet).
//   model.scores(state) -> select_tokens -> keep_indices -> state.gather(keep)   every `delay` tokens.
// One-invocation use (the reference's API): step(), which appends, folds the window, scores, selects and gathers.
#pragma once

#include "namm_model.h"

#include <cstdint>
#include <vector>

namespace pm::namm {

struct LayerState : LayerInput {
    std::vector<float> history;  // [head][token][16]

    explicit LayerState(int32_t n_heads);
    // From arrays (positions [head][token], ema [head][token][17], history [head][token][16]); checked.
    LayerState(int32_t n_heads, int32_t n_tokens, std::vector<int32_t> positions, std::vector<float> ema,
               std::vector<float> history);

    // Adds `count` new tokens to every head, after the newest retained one: E = 0, history = 0.
    void append(const int32_t * new_positions, int32_t count);
    // Keeps only keep[head][0..k) (increasing token indices per head), with their EMA, history and position.
    void gather(const std::vector<int64_t> & keep, int32_t k);
};

// Streaming form of the features, one STFT frame: rows16 [head][16][n_tokens] (the attention of the 16 newest
// queries); E <- a·E + (1 - a)·|DFT(hann ⊙ [history ‖ rows16])|, history <- rows16.
void fold_frame(const NammModel & model, LayerState & state, const float * rows16, ScorerTimings * timings = nullptr);

// Window form (spec §2.3): attn [head][n_rows][n_tokens], n_rows a multiple of 16; the last n_new tokens of the
// state were appended for this window, new token t being query row t. Equal to n_rows / 16 fold_frame() calls.
void fold_window(const NammModel & model, LayerState & state, const float * attn, int32_t n_rows, int32_t n_new,
                 ScorerTimings * timings = nullptr);

// Checks one invocation's inputs against the state (throws invalid_argument): attention [head][n_rows][n_old +
// n_rows] finite, >= 0 and causal over the new tokens; new positions increasing after the newest retained one.
void check_invocation(const LayerState & state, const float * attn, int32_t n_rows, const int64_t * new_pos);

// The state after appending an invocation's n_rows new tokens at new_pos and folding its window (inputs checked
// as above); `state` is not changed. step() continues from it; tests compare it with the reference's features.
LayerState folded_invocation(const NammModel & model, const LayerState & state, const float * attn, int32_t n_rows,
                             const int64_t * new_pos, ScorerTimings * timings = nullptr);

struct StepResult {
    LayerScores scored;           // scores [head][n_old + n_rows] and the keep mask
    std::vector<int64_t> keep;    // [head][K]: retained token indices per head, chronological
};

// One invocation: appends the n_rows new tokens at new_pos, folds the window, scores, selects and keeps only each
// head's retained tokens in `state`. Inputs as check_invocation() (called first; a rejected call changes nothing).
StepResult step(const NammModel & model, LayerState & state, const float * attn, int32_t n_rows,
                const int64_t * new_pos, ScorerTimings * timings = nullptr);

}  // namespace pm::namm
