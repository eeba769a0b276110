#include "engine.h"

#include "errors.h"
#include "namm/namm_model.h"
#include "namm_policy.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

namespace pm {
namespace {

bool policy_shifts_positions(const PolicyParams & p) {
    switch (p.kind) {
        case PolicyKind::sink:
        case PolicyKind::window:
        case PolicyKind::context_shift: return true;
        case PolicyKind::h2o:
        case PolicyKind::tova:
        case PolicyKind::namm: return p.reindex;
        default: return false;
    }
}

// Refuses model/policy combinations that llama.cpp cannot run, naming the model and what works instead.
void check_model_supports(const LlamaModel & model, const LlamaContext & ctx, const PolicyParams & policy) {
    const ModelInfo & info = model.info();
    const std::string who = "model '" + info.path + "' (architecture " + info.architecture + ")";
    if ((info.is_recurrent || info.is_hybrid) && policy.kind != PolicyKind::none &&
        policy.kind != PolicyKind::recompute) {
        fail(ErrorKind::unsupported,
             who + " keeps a recurrent state that cannot drop old tokens, so policy '" + policy_kind_name(policy.kind) +
                 "' cannot run on it; use policy='recompute' (rebuilds the state from the recent tokens) or "
                 "policy='none'");
    }
    if ((!ctx.can_shift() || info.uses_mrope) && policy_shifts_positions(policy)) {
        fail(ErrorKind::unsupported,
             who + " cannot shift cached positions (" +
                 std::string(info.uses_mrope ? "multi-axis M-RoPE positions" : "llama.cpp reports no shift support") +
                 "), which policy '" + policy_kind_name(policy.kind) +
                 "' needs; use policy='recompute' (re-decodes the recent window, slower but exact) or policy='none'");
    }
}

// Attention-scored policies on iSWA models (Gemma 2/3): the tap scores the global layers and mirrors both caches
// (docs/namm.md, "Sliding-window models"). Refused, before a context is made, where that cannot work.
void check_iswa_supported(const ModelInfo & info, const PolicyParams & policy) {
    if (!is_attention_scored(policy.kind) || info.n_swa <= 0) return;
    const std::string who = "model '" + info.path + "' (architecture " + info.architecture + ")";
    const std::string name = policy_kind_name(policy.kind);
    if (info.swa_layers.size() != size_t(info.n_layer)) {
        fail(ErrorKind::unsupported,
             who + " has sliding-window attention layers, but pymemory does not know which ones (no " +
                 info.architecture + ".attention.sliding_window_pattern in the GGUF and no built-in pattern for "
                 "this architecture; known: gemma2, gemma3), so the attention tap cannot tell their cache from the "
                 "global one; policy '" + name + "' is not available for it — use policy='sink'");
    }
    if (std::find(info.swa_layers.begin(), info.swa_layers.end(), uint8_t(0)) == info.swa_layers.end()) {
        fail(ErrorKind::unsupported,
             who + " has only sliding-window attention layers: none sees tokens older than its window of " +
                 std::to_string(info.n_swa) + " positions, so policy '" + name +
                 "' would have nothing to score them by — use policy='sink'");
    }
}

// Refuses KV cache types and flash-attention settings that cannot run with this policy, before llama.cpp allocates
// anything (it would abort inside ggml on the first K-shift, or fail to create the context). README "KV cache types".
void check_cache_types(const EngineParams & p) {
    const auto quantized = [](const std::string & t) { return t == "q8_0" || t == "q4_0"; };
    const std::string policy = policy_kind_name(p.policy.kind);
    if (p.type_k == "bf16" && policy_shifts_positions(p.policy)) {
        fail(ErrorKind::invalid_argument,
             "type_k='bf16' cannot be used with policy '" + policy + "'" +
                 (is_attention_scored(p.policy.kind) ? " and reindex=True" : "") +
                 ": shifting cached positions re-rotates the keys, and ggml's RoPE has no bf16 kernel; use "
                 "type_k='f16' (same size), 'f32' or 'q8_0', or a policy that never shifts (recompute, none)");
    }
    if (is_attention_scored(p.policy.kind) && p.flash_attention == FlashAttention::enabled) {
        fail(ErrorKind::invalid_argument,
             "policy '" + policy + "' reads attention probabilities, which llama.cpp computes only without flash "
                                   "attention; use flash_attention='auto' (the default: off for this policy) or 'off'");
    }
    const bool flash_off = is_attention_scored(p.policy.kind) || p.flash_attention == FlashAttention::disabled;
    if (quantized(p.type_v) && flash_off) {
        fail(ErrorKind::invalid_argument,
             "type_v='" + p.type_v + "' needs flash attention (llama.cpp stores a quantized V cache only for it), " +
                 (is_attention_scored(p.policy.kind)
                      ? "which policy '" + policy + "' turns off to read attention probabilities; use type_v='f16'"
                      : std::string("but flash_attention is 'off'; use flash_attention='on' or 'auto', or "
                                    "type_v='f16'")));
    }
}

std::unique_ptr<AttentionPolicy> make_attention_policy(const EngineParams & p, const ModelInfo & model,
                                                       uint32_t n_cells) {
    switch (p.policy.kind) {
        case PolicyKind::h2o:
        case PolicyKind::tova: {
            const bool h2o = p.policy.kind == PolicyKind::h2o;
            CellScoreParams h;
            h.n_sink = p.policy.n_sink;
            // h2o keeps half its window recent by default (the paper's split); TOVA ranks every token by the newest
            // query alone (the paper keeps no recent window).
            h.recent = p.attention.h2o_recent >= 0 ? p.attention.h2o_recent : (h2o ? p.policy.window / 2 : 0);
            h.evict_chunk = p.policy.evict_chunk;
            if (h.recent >= p.policy.window) {
                fail(ErrorKind::invalid_argument, "h2o_recent (" + std::to_string(h.recent) +
                                                      ") must be smaller than window (" +
                                                      std::to_string(p.policy.window) +
                                                      "): the rest of the window holds the tokens " +
                                                      policy_kind_name(p.policy.kind) + " keeps by attention");
            }
            if (h2o) return std::make_unique<H2oPolicy>(h, n_cells);
            return std::make_unique<TovaPolicy>(h, n_cells);
        }
        case PolicyKind::namm:
            // BAM runs where the model runs: on the GPU when layers are offloaded (llama-cpp-python's backend).
            return make_namm_policy(p.attention, p.policy, model, n_cells, p.model.n_gpu_layers != 0 ? "auto" : "cpu",
                                    p.n_threads);
        default: return nullptr;
    }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

float negative_log_prob(const float * logits, int32_t n_vocab, Token target) {
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int32_t i = 0; i < n_vocab; ++i) max_logit = std::max(max_logit, logits[i]);
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) sum += std::exp(double(logits[i] - max_logit));
    return float(std::log(sum) + double(max_logit) - double(logits[target]));
}

}  // namespace

Engine::Engine(std::shared_ptr<LlamaModel> model, const EngineParams & params)
    : model_(std::move(model)), params_(params) {
    validate(params_.policy);
    if (params_.prefill_chunk < 0) fail(ErrorKind::invalid_argument, "prefill_chunk must be >= 0 (0 = auto)");
    check_cache_types(params_);
    check_iswa_supported(model_->info(), params_.policy);
    check_merge_supported(params_, model_->info());
    const int32_t cap = capacity(params_.policy);
    n_batch_ = std::min(cap, 512);

    ContextParams cparams;
    cparams.n_ctx = uint32_t(cap);
    cparams.n_batch = uint32_t(n_batch_);
    cparams.n_threads = params_.n_threads;
    cparams.n_threads_batch = params_.n_threads_batch;
    cparams.flash_attention = params_.flash_attention;
    // iSWA models (Gemma 2/3) can only shift positions when the SWA cache is as large as the base cache.
    cparams.swa_full = model_->info().n_swa > 0;
    cparams.type_k = params_.type_k;
    cparams.type_v = params_.type_v;
    if (is_attention_scored(params_.policy.kind)) {
        // The tap forces flash attention off: llama.cpp only materialises attention probabilities without it.
        cparams.on_attention = [this](const AttentionView & view) {
            ++tap_layers_seen_;
            attention_->observe(view);  // timed by the tap, with its own reading of the attention
        };
    }
    ctx_ = std::make_unique<LlamaContext>(model_, cparams);
    check_model_supports(*model_, *ctx_, params_.policy);
    attention_ = make_attention_policy(params_, model_->info(), ctx_->n_ctx());
    if (attention_ && attention_->namm_scorer() && std::isnan(params_.attention.namm_merge_threshold)) {
        params_.attention.namm_merge_threshold = default_merge_threshold(
            params_, model_->info(), attention_->namm_scorer()->hparams().deploy_merge_threshold);
    }
    if (attention_) {
        const ModelInfo & info = model_->info();
        if (attention_->scored_layers().empty()) attention_->set_scored_layers(info.global_layers());
        // The tap reads the scored layers, and an iSWA model's sliding layers (their cache's mirror is checked on
        // the first of them in every batch).
        std::vector<uint8_t> observed(size_t(info.n_layer), 0);
        for (int32_t l = 0; l < info.n_layer; ++l) observed[size_t(l)] = info.is_sliding(l);
        for (int32_t l : attention_->scored_layers()) observed[size_t(l)] = 1;
        n_observed_layers_ = int32_t(std::count(observed.begin(), observed.end(), uint8_t(1)));
        ctx_->set_observed_layers(std::move(observed));
        ctx_->set_attention_totals(!attention_->needs_cell_totals()     ? AttentionTotals::none
                                   : attention_->cell_totals_last_row() ? AttentionTotals::last_row
                                                                        : AttentionTotals::all_rows);
        ctx_->set_device_reductions(params_.attention.device_reductions);
        if (attention_->needs_keys()) {
            ctx_->set_key_callback([this](const KeyView & view) { attention_->observe_keys(view); });
        }
    }
    counters_.capacity = cap;
}

int32_t Engine::n_pinned() const {
    const PolicyKind kind = params_.policy.kind;
    // recompute keeps its n_sink first tokens too (0 in the paper's baseline; 1 keeps the BOS that models such as
    // Gemma need in every rebuilt cache).
    const bool has_sinks = kind == PolicyKind::sink || kind == PolicyKind::context_shift ||
                           kind == PolicyKind::recompute || is_attention_scored(kind);
    const int32_t sinks = has_sinks ? params_.policy.n_sink : 0;
    return std::min<int32_t>(std::max(sinks, pinned_prefix_), int32_t(cache_.positions.size()));
}

int32_t Engine::resolved_prefill_chunk() const {
    const int32_t room = capacity(params_.policy) - std::max(n_pinned(), pinned_prefix_);
    // Auto: a quarter of the window, so a streamed prompt never sees less than 3/4 of the window, but at least 16
    // tokens per decode for throughput and at most 256.
    const int32_t wanted =
        params_.prefill_chunk > 0 ? params_.prefill_chunk : std::clamp(params_.policy.window / 4, 16, 256);
    return std::max(1, std::min({wanted, room, n_batch_}));
}

void Engine::pin_prefix(int32_t n_tokens) {
    if (n_tokens < 0) fail(ErrorKind::invalid_argument, "cannot pin a negative number of tokens");
    const int32_t cap = capacity(params_.policy);
    if (n_tokens >= cap) {
        fail(ErrorKind::invalid_argument, "cannot pin " + std::to_string(n_tokens) + " tokens in a cache of " +
                                              std::to_string(cap) +
                                              " cells: nothing would be left for the conversation; raise window or "
                                              "shorten the system prompt");
    }
    if (n_tokens > int32_t(cache_.positions.size()) || (n_tokens > 0 && cache_.positions[size_t(n_tokens - 1)] !=
                                                                            Pos(n_tokens - 1))) {
        fail(ErrorKind::invalid_argument, "can only pin tokens at the start of the stream that are still cached");
    }
    pinned_prefix_ = n_tokens;
    cache_.n_pinned = n_pinned();
    counters_.n_pinned = cache_.n_pinned;
}

void Engine::apply(const EvictionPlan & plan) {
    if (plan.empty()) return;
    const CacheState after = apply_plan(cache_, plan);
    // Mirror: keep the token ids (and merge weights) of the surviving cells.
    std::vector<Token> kept_tokens;
    std::vector<std::vector<float>> kept_weights;
    kept_tokens.reserve(after.positions.size());
    for (size_t i = 0; i < cache_.positions.size(); ++i) {
        const Pos p = cache_.positions[i];
        bool removed = false;
        for (const auto & r : plan.remove) removed |= (p >= r.p0 && p < r.p1);
        if (removed) continue;
        kept_tokens.push_back(cached_tokens_[i]);
        kept_weights.push_back(std::move(merge_weights_[i]));
    }
    merge_weights_ = std::move(kept_weights);

    if (plan.recompute) {
        ctx_->memory_clear();  // (recompute is never an attention-scored policy: no tap state to keep in sync)
    } else {
        for (const auto & r : plan.remove) ctx_->memory_remove(r.p0, r.p1);
        for (const auto & s : plan.shift) ctx_->memory_shift(s.p0, s.p1, s.delta);
    }
    cache_ = after;
    cached_tokens_ = std::move(kept_tokens);
    if (plan.next_pos >= 0) next_pos_ = plan.next_pos;
    if (!plan.remove.empty() || plan.recompute) counters_.evictions += 1;  // a compaction alone evicts nothing
    counters_.tokens_evicted += plan.n_evicted;

    if (plan.recompute && !cached_tokens_.empty()) {
        // Rebuild the retained tokens' KV at their new positions; llama.cpp batches must not exceed n_batch.
        std::vector<Token> tokens = cached_tokens_;
        std::vector<Pos> positions = cache_.positions;
        for (size_t start = 0; start < tokens.size(); start += size_t(n_batch_)) {
            const int32_t n = int32_t(std::min(tokens.size() - start, size_t(n_batch_)));
            ctx_->decode(tokens.data() + start, positions.data() + start, n, false);
        }
        counters_.tokens_recomputed += int64_t(tokens.size());
        has_logits_ = false;
    }
}

CacheView Engine::cache_view() {
    // Invert the adapter's cell mirror: position -> cell, then the cell of each cached token in order.
    const std::vector<Pos> & cell_pos = ctx_->cell_positions();
    std::vector<std::pair<Pos, int32_t>> by_pos;
    by_pos.reserve(cache_.positions.size());
    for (size_t c = 0; c < cell_pos.size(); ++c) {
        if (cell_pos[c] >= 0) by_pos.emplace_back(cell_pos[c], int32_t(c));
    }
    std::sort(by_pos.begin(), by_pos.end());
    if (by_pos.size() != cache_.positions.size()) {
        fail(ErrorKind::runtime, "internal: the cell mirror holds " + std::to_string(by_pos.size()) +
                                     " tokens but the cache mirror " + std::to_string(cache_.positions.size()));
    }
    cache_cells_.resize(by_pos.size());
    for (size_t i = 0; i < by_pos.size(); ++i) cache_cells_[i] = by_pos[i].second;
    return CacheView{cache_, cache_cells_, capacity(params_.policy)};
}

void Engine::evict(const std::vector<int32_t> & indices) {
    if (indices.empty()) return;
    apply(plan_removal(cache_, indices, params_.policy.reindex));
}

void Engine::make_room(int32_t n_incoming) {
    cache_.n_pinned = n_pinned();
    if (!attention_) {
        apply(plan_eviction(params_.policy, cache_, n_incoming));
    } else if (int32_t(cache_.positions.size()) + n_incoming > capacity(params_.policy)) {
        evict(attention_->make_room(cache_view(), n_incoming));
    }
    // Room in positions too: absolute positions past the model's training context make its output collapse, so
    // close the cache's gaps before the incoming tokens would reach compact_at.
    const Pos limit = params_.policy.compact_at;
    if (limit > 0 && !params_.policy.reindex && next_pos_ + n_incoming > limit) apply(plan_compaction(cache_));
}

void Engine::decode_append(const Token * tokens, int32_t n, bool logits_all) {
    std::vector<Pos> positions(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) positions[size_t(i)] = next_pos_ + i;
    if (attention_) {
        attention_->begin_batch(counters_.tokens_seen, n);
        tap_layers_seen_ = 0;
    }
    ctx_->decode(tokens, positions.data(), n, logits_all);
    if (attention_) attention_->observe_seconds += ctx_->take_attention_seconds();
    if (attention_ && tap_layers_seen_ != n_observed_layers_) {
        // Attention-scored eviction without attention would silently degrade to noise: refuse.
        fail(ErrorKind::runtime, "the attention tap saw " + std::to_string(tap_layers_seen_) + " of " +
                                     std::to_string(n_observed_layers_) +
                                     " layers (llama.cpp no longer names its attention tensor 'kq_soft_max-<layer>', "
                                     "or flash attention was forced on); policy '" +
                                     policy_kind_name(params_.policy.kind) + "' cannot run with this llama.cpp");
    }
    for (int32_t i = 0; i < n; ++i) {
        cache_.positions.push_back(positions[size_t(i)]);
        cached_tokens_.push_back(tokens[i]);
    }
    merge_weights_.resize(cached_tokens_.size());
    next_pos_ += n;
    counters_.tokens_seen += n;
    counters_.peak_cells = std::max<int32_t>(counters_.peak_cells, int32_t(cache_.positions.size()));
    has_logits_ = true;
    if (attention_) {
        cache_.n_pinned = n_pinned();
        const auto t0 = std::chrono::steady_clock::now();
        const std::vector<int32_t> evicted_now = attention_->after_decode(cache_view(), counters_.tokens_seen);
        merge_given_up(attention_->take_given_up());
        evict(evicted_now);
        attention_->decide_seconds += seconds_since(t0);
    }
}

void Engine::feed(const std::vector<Token> & tokens) {
    if (tokens.empty()) return;
    for (Token t : tokens) {
        if (!model_->is_valid_token(t)) {
            fail(ErrorKind::invalid_argument, "token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                                  std::to_string(model_->info().n_vocab) + ")");
        }
    }
    if (params_.policy.kind == PolicyKind::none) {
        // Refuse up front so that a prompt that does not fit leaves the cache untouched.
        cache_.n_pinned = n_pinned();
        plan_eviction(params_.policy, cache_, int32_t(std::min<size_t>(tokens.size(), size_t(INT32_MAX))));
    }
    const int32_t chunk = resolved_prefill_chunk();
    for (size_t start = 0; start < tokens.size();) {
        const int32_t n = std::min(int32_t(std::min(tokens.size() - start, size_t(chunk))), batch_limit());
        make_room(n);
        decode_append(tokens.data() + start, n, false);
        start += size_t(n);
    }
}

std::vector<float> Engine::score(const std::vector<Token> & tokens, int32_t chunk) {
    if (chunk < 1) fail(ErrorKind::invalid_argument, "score chunk must be at least 1");
    for (Token t : tokens) {
        if (!model_->is_valid_token(t)) fail(ErrorKind::invalid_argument, "token id out of vocabulary in score()");
    }
    const int32_t n_vocab = model_->info().n_vocab;
    chunk = std::min({chunk, resolved_prefill_chunk(), n_batch_});
    std::vector<float> nll(tokens.size(), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> previous;  // logits of the token before the current chunk
    if (has_logits_) previous.assign(ctx_->logits(-1), ctx_->logits(-1) + n_vocab);
    for (size_t start = 0; start < tokens.size();) {
        const int32_t n = std::min(int32_t(std::min(tokens.size() - start, size_t(chunk))), batch_limit());
        make_room(n);
        decode_append(tokens.data() + start, n, true);
        if (!previous.empty()) nll[start] = negative_log_prob(previous.data(), n_vocab, tokens[start]);
        for (int32_t i = 1; i < n; ++i) {
            nll[start + size_t(i)] = negative_log_prob(ctx_->logits(i - 1), n_vocab, tokens[start + size_t(i)]);
        }
        previous.assign(ctx_->logits(n - 1), ctx_->logits(n - 1) + n_vocab);
        start += size_t(n);
    }
    return nll;
}

Token Engine::sample(Sampler & sampler) {
    if (!has_logits_) fail(ErrorKind::invalid_argument, "nothing to sample from: feed a prompt first");
    return sampler.sample(*ctx_, -1);
}

std::vector<float> Engine::last_logits() const {
    if (!has_logits_) fail(ErrorKind::invalid_argument, "no logits: feed tokens first");
    const float * logits = ctx_->logits(-1);
    return std::vector<float>(logits, logits + model_->info().n_vocab);
}

std::vector<double> Engine::token_scores() {
    const auto * scored = dynamic_cast<const CellScorePolicy *>(attention_.get());
    if (!scored) return {};
    const CacheView view = cache_view();
    std::vector<double> out;
    out.reserve(view.cells.size());
    for (int32_t cell : view.cells) out.push_back(scored->cell_scores()[size_t(cell)]);
    return out;
}

int32_t Engine::batch_limit() const {
    return attention_ ? std::max(1, attention_->batch_limit(counters_.tokens_seen)) : INT32_MAX;
}

void Engine::reset() {
    ctx_->memory_clear();
    if (attention_) {
        attention_->reset();
        attention_->observe_seconds = attention_->decide_seconds = 0.0;
    }
    cache_ = CacheState{};
    cached_tokens_.clear();
    merge_weights_.clear();
    pinned_prefix_ = 0;
    next_pos_ = 0;
    has_logits_ = false;
    counters_ = EngineStats{};
    counters_.capacity = capacity(params_.policy);
}

void Engine::set_threads(int32_t n_threads, int32_t n_threads_batch) {
    params_.n_threads = n_threads;
    params_.n_threads_batch = n_threads_batch;
    ctx_->set_threads(n_threads, n_threads_batch);
    if (attention_) attention_->set_threads(n_threads);
}

EngineStats Engine::stats() const {
    EngineStats s = counters_;
    s.cells_used = int32_t(cache_.positions.size());
    s.n_ctx_physical = int32_t(ctx_->n_ctx());
    s.n_pinned = n_pinned();
    s.max_pos = cache_.positions.empty() ? -1 : cache_.positions.back();
    s.next_pos = next_pos_;
    return s;
}

}  // namespace pm
