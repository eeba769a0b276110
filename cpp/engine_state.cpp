// Engine::save_state / load_state: a stream's whole state as bytes, for sessions kept on disk (pymemory serve,
// pymemory chat --save/--load).
//
// Layout (all little-endian host values; a file is only read back on the machine type that wrote it):
//   "PMENGST" + u8 version | settings fingerprint (policy, n_sink, window, reindex, KV types, cell count, model
//   description and shape) | the cache mirror (token ids and positions in chronological order) | pinned prefix |
//   next position | counters | the attention policy's per-token state (h2o, tova: scores; namm: features and last
//   scores; empty for the others) | the adapter's
//   KV blob (llama_state_seq_* data + cell order, llama_adapter.cpp).
// Everything is checked before anything is applied; a mismatch names the setting that differs.
#include "byte_io.h"
#include "engine.h"
#include "errors.h"

#include <algorithm>

namespace pm {
namespace {

constexpr char kMagic[7] = {'P', 'M', 'E', 'N', 'G', 'S', 'T'};
// 2: the attention policy's per-token state; 3: the SWA cache's cells (iSWA); 4: NAMM's deferred evictions
constexpr uint8_t kVersion = 4;

struct Fingerprint {
    std::string policy;
    int32_t n_sink = 0;
    int32_t window = 0;
    uint8_t reindex = 0;
    std::string type_k, type_v;
    uint32_t n_ctx = 0;
    std::string model;  // llama_model_desc, e.g. "llama 135M Q8_0"
    int32_t n_vocab = 0, n_layer = 0, n_embd = 0;
};

void write(ByteWriter & out, const Fingerprint & f) {
    out.put_string(f.policy);
    out.put(f.n_sink);
    out.put(f.window);
    out.put(f.reindex);
    out.put_string(f.type_k);
    out.put_string(f.type_v);
    out.put(f.n_ctx);
    out.put_string(f.model);
    out.put(f.n_vocab);
    out.put(f.n_layer);
    out.put(f.n_embd);
}

Fingerprint read_fingerprint(ByteReader & in) {
    Fingerprint f;
    f.policy = in.get_string();
    f.n_sink = in.get<int32_t>();
    f.window = in.get<int32_t>();
    f.reindex = in.get<uint8_t>();
    f.type_k = in.get_string();
    f.type_v = in.get_string();
    f.n_ctx = in.get<uint32_t>();
    f.model = in.get_string();
    f.n_vocab = in.get<int32_t>();
    f.n_layer = in.get<int32_t>();
    f.n_embd = in.get<int32_t>();
    return f;
}

// Names the first setting that differs, or "" when the saved state fits this engine.
std::string mismatch(const Fingerprint & saved, const Fingerprint & here) {
    auto differs = [](const std::string & what, const std::string & a, const std::string & b) {
        return what + " " + a + " (this engine has " + b + ")";
    };
    if (saved.model != here.model || saved.n_vocab != here.n_vocab || saved.n_layer != here.n_layer ||
        saved.n_embd != here.n_embd) {
        return differs("model", "'" + saved.model + "'", "'" + here.model + "'");
    }
    if (saved.policy != here.policy) return differs("policy", saved.policy, here.policy);
    if (saved.n_sink != here.n_sink) return differs("n_sink", std::to_string(saved.n_sink), std::to_string(here.n_sink));
    if (saved.window != here.window) return differs("window", std::to_string(saved.window), std::to_string(here.window));
    if (saved.reindex != here.reindex) {
        return differs("reindex", saved.reindex ? "on" : "off", here.reindex ? "on" : "off");
    }
    if (saved.type_k != here.type_k || saved.type_v != here.type_v) {
        return differs("KV types", saved.type_k + "/" + saved.type_v, here.type_k + "/" + here.type_v);
    }
    if (saved.n_ctx != here.n_ctx) {
        return differs("cell count", std::to_string(saved.n_ctx), std::to_string(here.n_ctx));
    }
    return "";
}

void write(ByteWriter & out, const EngineStats & s) {
    out.put(s.peak_cells);
    out.put(s.tokens_seen);
    out.put(s.evictions);
    out.put(s.tokens_evicted);
    out.put(s.tokens_recomputed);
}

void read_into(ByteReader & in, EngineStats & s) {
    s.peak_cells = in.get<int32_t>();
    s.tokens_seen = in.get<int64_t>();
    s.evictions = in.get<int64_t>();
    s.tokens_evicted = in.get<int64_t>();
    s.tokens_recomputed = in.get<int64_t>();
}

Fingerprint fingerprint_of(const EngineParams & p, const ModelInfo & info, uint32_t n_ctx) {
    Fingerprint f;
    f.policy = policy_kind_name(p.policy.kind);
    f.n_sink = p.policy.n_sink;
    f.window = p.policy.window;
    f.reindex = p.policy.reindex ? 1 : 0;
    f.type_k = p.type_k;
    f.type_v = p.type_v;
    f.n_ctx = n_ctx;
    f.model = info.description;
    f.n_vocab = info.n_vocab;
    f.n_layer = info.n_layer;
    f.n_embd = info.n_embd;
    return f;
}

void refuse_unsaveable(const EngineParams & p, const AttentionPolicy * policy) {
    if (policy && !policy->can_save_state()) {
        fail(ErrorKind::unsupported, "saving or loading a session is not supported for policy '" +
                                         policy_kind_name(p.policy.kind) +
                                         "' yet: its per-token attention state is not saved; use policy 'sink', "
                                         "'h2o', 'tova' or 'namm'");
    }
}

// The cell of each cached token (chronological), from the adapter's cell mirror.
std::vector<int32_t> cells_of(const std::vector<Pos> & positions, const std::vector<Pos> & cell_pos) {
    std::vector<std::pair<Pos, int32_t>> by_pos;
    for (size_t c = 0; c < cell_pos.size(); ++c) {
        if (cell_pos[c] >= 0) by_pos.emplace_back(cell_pos[c], int32_t(c));
    }
    std::sort(by_pos.begin(), by_pos.end());
    if (by_pos.size() != positions.size()) fail(ErrorKind::runtime, "internal: cell mirror and cache disagree");
    std::vector<int32_t> cells(positions.size());
    for (size_t i = 0; i < positions.size(); ++i) cells[i] = by_pos[i].second;
    return cells;
}

}  // namespace

std::string Engine::save_state() const {
    refuse_unsaveable(params_, attention_.get());
    ByteWriter out;
    out.bytes().append(kMagic, sizeof(kMagic));
    out.put(kVersion);
    write(out, fingerprint_of(params_, model_->info(), ctx_->n_ctx()));
    out.put_vector(cached_tokens_);
    out.put_vector(cache_.positions);
    out.put(pinned_prefix_);
    out.put(next_pos_);
    write(out, counters_);
    std::string policy_state;
    if (attention_) {
        const std::vector<int32_t> cells = cells_of(cache_.positions, ctx_->cell_positions());
        policy_state = attention_->save_state(CacheView{cache_, cells, capacity(params_.policy)});
    }
    out.put_string(policy_state);
    out.put_string(ctx_->state_save());
    return std::move(out.bytes());
}

void Engine::load_state(const std::string & bytes) {
    refuse_unsaveable(params_, attention_.get());
    if (bytes.size() < sizeof(kMagic) + 1 || !std::equal(kMagic, kMagic + sizeof(kMagic), bytes.begin())) {
        fail(ErrorKind::invalid_argument, "not a pymemory engine state (the magic 'PMENGST' is missing)");
    }
    const uint8_t version = uint8_t(bytes[sizeof(kMagic)]);
    if (version != kVersion) {
        fail(ErrorKind::invalid_argument, "engine state version " + std::to_string(version) +
                                              " is not supported (this build reads version " +
                                              std::to_string(kVersion) + ")");
    }
    const std::string body = bytes.substr(sizeof(kMagic) + 1);
    ByteReader in(body, "the engine state");
    const std::string why = mismatch(read_fingerprint(in), fingerprint_of(params_, model_->info(), ctx_->n_ctx()));
    if (!why.empty()) fail(ErrorKind::invalid_argument, "the session was saved with " + why);

    std::vector<Token> tokens = in.get_vector<Token>();
    std::vector<Pos> positions = in.get_vector<Pos>();
    const int32_t pinned = in.get<int32_t>();
    const Pos next_pos = in.get<Pos>();
    EngineStats counters;
    read_into(in, counters);
    const std::string policy_state = in.get_string();
    const std::string kv = in.get_string();
    if (in.remaining() != 0) fail(ErrorKind::invalid_argument, "the engine state has trailing bytes (damaged file)");

    const int32_t cap = capacity(params_.policy);
    bool ok = tokens.size() == positions.size() && int32_t(positions.size()) <= cap && pinned >= 0 &&
              pinned <= int32_t(positions.size()) && counters.tokens_seen >= int64_t(positions.size());
    for (size_t i = 0; ok && i < tokens.size(); ++i) {
        ok = model_->is_valid_token(tokens[i]) && positions[i] >= 0 && positions[i] < next_pos &&
             (i == 0 || positions[i] > positions[i - 1]);
    }
    if (!ok) fail(ErrorKind::invalid_argument, "the engine state's cache mirror is inconsistent (damaged file)");
    if (!attention_ && !policy_state.empty()) {
        fail(ErrorKind::invalid_argument, "the engine state carries attention-policy state (damaged file)");
    }

    reset();
    try {
        ctx_->state_load(kv, positions);
        if (attention_) {
            const std::vector<int32_t> cells = cells_of(positions, ctx_->cell_positions());
            const CacheState restored{positions, 0};
            attention_->load_state(CacheView{restored, cells, cap}, policy_state);
        }
    } catch (...) {
        reset();
        throw;
    }
    cache_.positions = std::move(positions);
    cached_tokens_ = std::move(tokens);
    merge_weights_.assign(cached_tokens_.size(), {});  // not saved: merging restarts its running means
    pinned_prefix_ = pinned;
    cache_.n_pinned = n_pinned();
    next_pos_ = next_pos;
    counters_.peak_cells = counters.peak_cells;
    counters_.tokens_seen = counters.tokens_seen;
    counters_.evictions = counters.evictions;
    counters_.tokens_evicted = counters.tokens_evicted;
    counters_.tokens_recomputed = counters.tokens_recomputed;
    counters_.n_pinned = cache_.n_pinned;
    has_logits_ = false;  // logits are not part of the state: the next call must feed tokens before sampling
}

void Engine::rewind(int32_t n_tokens) {
    if (is_attention_scored(params_.policy.kind)) {
        fail(ErrorKind::unsupported, "rewind is not supported for policy '" + policy_kind_name(params_.policy.kind) +
                                         "': its attention state cannot take tokens back");
    }
    const int32_t n_cached = int32_t(cache_.positions.size());
    if (n_tokens < 0 || n_tokens > n_cached - n_pinned()) {
        fail(ErrorKind::invalid_argument, "can rewind at most the " + std::to_string(n_cached - n_pinned()) +
                                              " unpinned cached tokens (asked for " + std::to_string(n_tokens) + ")");
    }
    if (n_tokens == 0) return;
    const size_t keep = size_t(n_cached - n_tokens);
    const Pos first_removed = cache_.positions[keep];
    ctx_->memory_remove(first_removed, -1);
    cache_.positions.resize(keep);
    cached_tokens_.resize(keep);
    merge_weights_.resize(keep);
    next_pos_ = first_removed;
    counters_.tokens_seen -= n_tokens;
    has_logits_ = false;
}

}  // namespace pm
