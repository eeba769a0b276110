// What attention cannot see, read from the keys: KeyDiff's distinctiveness (Park et al., 2025, "KeyDiff: Key
// Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained Environments"), on
// shared cells.
//
// KeyDiff keeps the keys least like the others: per (layer, KV head) pair, a token's score is minus the cosine of
// its key to the mean direction of the candidates' unit keys. Here the keys are taken *before RoPE* (position-free:
// what a token says, not where it sits; after RoPE the score ranks positions, and lost text in the probe) and the
// score of a shared cell is the mean over the pairs. A NAMM budget mode adds `key_weight` standard deviations of it
// to the score it ranks by (docs/namm.md, "Keys"; measured in docs/results.md, "Keys").
#pragma once

#include <cstdint>
#include <vector>

namespace pm {

// keys [pair][token][head_dim] (chronological tokens); candidates [first, last). Returns [n_tokens]: for each
// candidate the mean over the pairs of -cos(key, anchor), anchor = the normalised mean of the candidates' unit keys
// of that pair; 0 outside the candidates. A zero key counts as orthogonal to everything. Pure.
std::vector<double> key_distinctiveness(const std::vector<float> & keys, int32_t n_pairs, int32_t n_tokens,
                                        int32_t head_dim, int32_t first, int32_t last);

// `scores` plus `weight` x `extra` standardised over [first, last) (mean 0, spread 1; no spread: 0), in place;
// scores outside the range are left alone. Pure.
void add_standardised(std::vector<double> & scores, const std::vector<double> & extra, double weight, int32_t first,
                      int32_t last);

}  // namespace pm
