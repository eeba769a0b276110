// NAMM as a memory policy of the streaming engine: the tapped attention is folded into each token's spectrogram
// EMA as it arrives, and every `delay` stream tokens the NAMM scorer (cpp/namm/) scores every cached token in every
// (layer, KV head); the per-head decisions then become cell evictions (shared cells, see attention_policy.h).
#pragma once

#include "attention_policy.h"

#include <memory>

namespace pm {

struct EngineParams;

std::unique_ptr<AttentionPolicy> make_namm_policy(const EngineParams & params, uint32_t n_cells);

}  // namespace pm
