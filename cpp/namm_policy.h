// NAMM as a memory policy of the streaming engine.
//
// Spec: ../shared/docs/namm-spec.md. What happens, and where it deviates from the original (docs/namm.md):
//   - The tap delivers each layer's post-softmax attention; per KV head we average the query heads of its GQA
//     group (spec §1.1) and fold the rows into every cached token's state with the spec's streaming form (§2.3):
//     every 16 stream tokens, E <- a*E + (1-a)*|rfft(hann * [last 16 values || these 16 rows])|, a = 0.99^16.
//     Per (layer, KV head, cell) that is 17 + 16 floats of state plus the current frame's rows; no 512-row
//     attention matrix is stored.
//   - Every `delay` stream tokens (512; batches are split at those boundaries) the scorer (cpp/namm/) turns each
//     (layer, head)'s tokens, in chronological order, into scores; each layer selects as the original does
//     (newest kept, K_l = n - min_h #negatives, each head keeps its own top K_l).
//   - llama.cpp's cells are shared by every layer and head, so per-(layer, head) keep sets become one cell
//     decision: "quorum" evicts a token when at least `quorum` of the pairs drop it (1.0: all of them — never
//     removes anything some head keeps); "budget" holds the cache at `max_cells` by keep votes (then mean score);
//     "budget_max" holds it there by each token's highest score over the pairs, so one head that wants a token
//     keeps it (the union's rule at a budget: a signal that lives in a few heads is not outvoted);
//     "budget_zmax" ranks by the highest *standardised* score, each pair's scores taken relative to that pair's
//     mean and spread over the cached tokens, so a pair whose scores all run high does not outrank the rest with
//     every token it scores (what one head singles out counts, not how that head's scores are scaled);
//     "budget_mix" ranks as budget does except that the max_cells / 8 tokens with the highest standardised score
//     (budget_zmax's ranking) are kept first: most of the cache goes to what the model as a whole reads, a small
//     reserve to what single heads single out (a pass key's digits).
//     The first n_sink tokens and the newest are always kept. A cell kept for the cache stays in every head's
//     state (the original would have dropped it from the heads that evicted it).
//   - Positions stay absolute (no re-indexing) by default, as in the original.
#pragma once

#include "attention_policy.h"
#include "kv_policy.h"

#include <memory>
#include <string>
#include <vector>

namespace pm {

// The engine's factory for policy "namm" (engine.cpp hands over its settings; this unit never sees the engine):
// the NAMM file and its overrides (`attention`), the cache budget (`policy`: capacity, n_sink), the model's head
// layout, the cache's n_cells. The scorer runs on `device` ("auto": the model's GPU backend if any, or "cpu") with
// n_threads threads (0 = all cores). Throws invalid_argument for settings that cannot work.
std::unique_ptr<AttentionPolicy> make_namm_policy(const AttentionPolicyParams & attention, const PolicyParams & policy,
                                                  const ModelInfo & model, uint32_t n_cells, const std::string & device,
                                                  int32_t n_threads);

bool is_budget_mode(const std::string & mode);  // every mode but quorum: the cache is held at max_cells
constexpr int32_t kMixReserveDivisor = 8;        // budget_mix: max_cells / 8 cells kept by the standardised max

// How per-(layer, head) keep decisions become cell evictions. `drop_votes[i]` counts the (layer, head) pairs
// that drop token i (chronological), out of `n_pairs`; `scores[i]` is its score aggregated over the pairs as the
// mode ranks (budget, budget_mix: the mean; budget_max, budget_zmax: the highest; quorum reads the votes only);
// budget_mix keeps the `reserve` tokens with the highest `reserve_scores` (the standardised maximum) before any
// ranking; `neighbours` > 0 pools the ranked scores (not the votes, not the reserve's) over neighbouring
// candidates first. Returns the sorted indices
// to evict. Pure; unit-tested in tests/test_namm_policy.py.
struct SharedCellDecision {
    std::string mode = "quorum";  // "quorum" | "budget" | "budget_max" | "budget_zmax" | "budget_mix"
    float quorum = 1.0f;
    int32_t max_cells = 0;
    int32_t n_sink = 4;
    int32_t reserve = 0;          // budget_mix: tokens kept by reserve_scores first
    int32_t neighbours = 0;       // budget modes: each candidate ranks by the highest score among itself and its
                                  // `neighbours` nearest candidates on each side (chronological), so a token one
                                  // pair singles out keeps the words around it (docs/namm.md, "Neighbours")
};
std::vector<int32_t> decide_shared_evictions(const SharedCellDecision & rule, const std::vector<int32_t> & drop_votes,
                                             const std::vector<double> & scores, int32_t n_pairs,
                                             const std::vector<double> & reserve_scores = {});
// The same tokens in the order the mode gives them up (the first goes first; quorum: chronological). A policy that
// defers its evictions until new tokens need the room evicts them in this order.
std::vector<int32_t> shared_eviction_order(const SharedCellDecision & rule, const std::vector<int32_t> & drop_votes,
                                           const std::vector<double> & scores, int32_t n_pairs,
                                           const std::vector<double> & reserve_scores = {});

}  // namespace pm
