// The one file that calls llama.cpp: logging, model (its GGUF checked first, gguf_checks.h), context (driving the
// cell mirror and the attention tap, kv_cell_mirror.h and attention_tap.h), session state, sampler. See
// llama_adapter.h.
#include "llama_adapter.h"

#include "byte_io.h"
#include "errors.h"
#include "gguf_checks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <deque>
#include <iterator>
#include <mutex>
#include <string_view>
#include <thread>

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"
#include "llama.h"

namespace pm {
namespace {

// ---- logging -------------------------------------------------------------------------------------------------

std::atomic<int> g_log_verbosity{1};
std::mutex g_log_mutex;
std::deque<std::string> g_recent_errors;  // last error lines, quoted in exceptions
std::string g_partial_line;

void log_callback(ggml_log_level level, const char * text, void *) {
    if (text == nullptr) return;
    const bool is_error = level == GGML_LOG_LEVEL_ERROR;
    if (is_error) {
        std::lock_guard<std::mutex> lock(g_log_mutex);
        g_partial_line += text;
        size_t nl;
        while ((nl = g_partial_line.find('\n')) != std::string::npos) {
            g_recent_errors.push_back(g_partial_line.substr(0, nl));
            g_partial_line.erase(0, nl + 1);
            if (g_recent_errors.size() > 8) g_recent_errors.pop_front();
        }
    }
    int needed;  // errors reach the user through exceptions, so level 0 prints nothing
    switch (level) {
        case GGML_LOG_LEVEL_ERROR: needed = 1; break;
        case GGML_LOG_LEVEL_WARN: needed = 1; break;
        case GGML_LOG_LEVEL_INFO: needed = 2; break;
        case GGML_LOG_LEVEL_CONT: needed = 2; break;
        default: needed = 3; break;
    }
    if (g_log_verbosity.load() >= needed) fputs(text, stderr);
}

void ensure_backend() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

void clear_recent_errors() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_recent_errors.clear();
    g_partial_line.clear();
}

std::string with_llama_errors(const std::string & message) {
    const std::string detail = last_llama_errors();
    return detail.empty() ? message : message + " (llama.cpp said: " + detail + ")";
}

std::string meta_string(const llama_model * model, const char * key) {
    char buf[512];
    const int32_t n = llama_model_meta_val_str(model, key, buf, sizeof(buf));
    return n < 0 ? std::string() : std::string(buf, std::min<size_t>(size_t(n), sizeof(buf) - 1));
}

ggml_type parse_cache_type(const std::string & name) {
    if (name == "f32") return GGML_TYPE_F32;
    if (name == "f16") return GGML_TYPE_F16;
    if (name == "bf16") return GGML_TYPE_BF16;
    if (name == "q8_0") return GGML_TYPE_Q8_0;
    if (name == "q4_0") return GGML_TYPE_Q4_0;
    fail(ErrorKind::invalid_argument, "unknown KV cache type '" + name + "'; use one of f32, f16, bf16, q8_0, q4_0");
}

int32_t default_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 4 : int32_t(n);
}

}  // namespace

// ---- process-wide --------------------------------------------------------------------------------------------

void set_log_verbosity(int level) { g_log_verbosity.store(std::clamp(level, 0, 3)); }

std::string last_llama_errors() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    std::string out;
    for (const auto & line : g_recent_errors) {
        if (!out.empty()) out += "; ";
        out += line;
    }
    return out;
}

std::string backend_summary() {
    ensure_backend();
    std::string out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (!out.empty()) out += ", ";
        out += ggml_backend_dev_name(dev);
        const char * desc = ggml_backend_dev_description(dev);
        if (desc && *desc) out += std::string(" (") + desc + ")";
    }
    return out;
}

// ---- model ---------------------------------------------------------------------------------------------------

std::shared_ptr<LlamaModel> LlamaModel::load(const ModelParams & params) {
    ensure_backend();
    validate_gguf_file(params.path);

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = params.n_gpu_layers;
    if (!params.use_mmap) mparams.load_mode = LLAMA_LOAD_MODE_NONE;
    mparams.use_extra_bufts = params.use_extra_bufts;

    clear_recent_errors();
    llama_model * raw = llama_model_load_from_file(params.path.c_str(), mparams);
    if (raw == nullptr) {
        fail(ErrorKind::bad_model_file,
             with_llama_errors("llama.cpp could not load '" + params.path +
                               "': unsupported architecture or damaged file"));
    }

    std::shared_ptr<LlamaModel> model(new LlamaModel());
    model->model_ = raw;
    ModelInfo & info = model->info_;
    const llama_vocab * vocab = llama_model_get_vocab(raw);
    info.path = params.path;
    info.architecture = meta_string(raw, "general.architecture");
    info.name = meta_string(raw, "general.name");
    {
        char buf[256];
        llama_model_desc(raw, buf, sizeof(buf));
        info.description = buf;
    }
    info.n_vocab = llama_vocab_n_tokens(vocab);
    info.n_layer = llama_model_n_layer(raw);
    info.n_head = llama_model_n_head(raw);
    info.n_head_kv = llama_model_n_head_kv(raw);
    info.n_embd = llama_model_n_embd(raw);
    info.n_ctx_train = llama_model_n_ctx_train(raw);
    info.n_swa = llama_model_n_swa(raw);
    if (info.n_swa > 0) info.swa_layers = read_swa_layers(params.path, info.architecture, info.n_layer);
    info.is_recurrent = llama_model_is_recurrent(raw);
    info.is_hybrid = llama_model_is_hybrid(raw);
    const llama_rope_type rope = llama_model_rope_type(raw);
    info.uses_mrope = rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE || rope == LLAMA_ROPE_TYPE_VISION;
    info.add_bos = llama_vocab_get_add_bos(vocab);
    info.bos = llama_vocab_bos(vocab);
    info.eos = llama_vocab_eos(vocab);
    const char * tmpl = llama_model_chat_template(raw, nullptr);
    info.chat_template = tmpl ? tmpl : "";
    return model;
}

LlamaModel::~LlamaModel() {
    if (model_) llama_model_free(model_);
}

std::vector<Token> LlamaModel::tokenize(std::string_view text, bool add_special, bool parse_special) const {
    const llama_vocab * vocab = llama_model_get_vocab(model_);
    if (text.size() > size_t(INT32_MAX)) fail(ErrorKind::invalid_argument, "text too long to tokenize (over 2 GiB)");
    std::vector<Token> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab, text.data(), int32_t(text.size()), out.data(), int32_t(out.size()), add_special,
                               parse_special);
    if (n == INT32_MIN) fail(ErrorKind::invalid_argument, "tokenization overflow: text too long");
    if (n < 0) {
        out.resize(size_t(-n));
        n = llama_tokenize(vocab, text.data(), int32_t(text.size()), out.data(), int32_t(out.size()), add_special,
                           parse_special);
        if (n < 0) fail(ErrorKind::runtime, "llama_tokenize failed");
    }
    out.resize(size_t(n));
    return out;
}

std::string LlamaModel::token_bytes(Token token, bool render_special) const {
    if (!is_valid_token(token)) {
        fail(ErrorKind::invalid_argument,
             "token id " + std::to_string(token) + " is outside the vocabulary [0, " + std::to_string(info_.n_vocab) + ")");
    }
    const llama_vocab * vocab = llama_model_get_vocab(model_);
    char buf[128];
    int32_t n = llama_token_to_piece(vocab, token, buf, sizeof(buf), 0, render_special);
    if (n >= 0) return std::string(buf, size_t(n));
    std::string big(size_t(-n), '\0');
    n = llama_token_to_piece(vocab, token, big.data(), int32_t(big.size()), 0, render_special);
    big.resize(size_t(std::max(n, 0)));
    return big;
}

std::string LlamaModel::detokenize(const std::vector<Token> & tokens, bool render_special) const {
    for (Token t : tokens) {
        if (!is_valid_token(t)) {
            fail(ErrorKind::invalid_argument, "token id " + std::to_string(t) + " is outside the vocabulary");
        }
    }
    const llama_vocab * vocab = llama_model_get_vocab(model_);
    std::string out(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab, tokens.data(), int32_t(tokens.size()), out.data(), int32_t(out.size()), false,
                                 render_special);
    if (n < 0) {
        out.resize(size_t(-n));
        n = llama_detokenize(vocab, tokens.data(), int32_t(tokens.size()), out.data(), int32_t(out.size()), false,
                             render_special);
    }
    out.resize(size_t(std::max(n, 0)));
    return out;
}

bool LlamaModel::is_end_of_generation(Token token) const {
    return llama_vocab_is_eog(llama_model_get_vocab(model_), token);
}

std::string LlamaModel::apply_chat_template(const std::vector<ChatMessage> & messages, bool add_assistant,
                                            const std::string & template_override) const {
    const std::string & tmpl = template_override.empty() ? info_.chat_template : template_override;
    if (tmpl.empty()) {
        fail(ErrorKind::unsupported,
             "model '" + info_.path + "' has no chat template in its GGUF metadata; pass chat_template='chatml' "
             "(or another built-in name) or use generate() with your own prompt format");
    }
    std::vector<llama_chat_message> chat;
    size_t total = 0;
    for (const auto & m : messages) {
        chat.push_back({m.role.c_str(), m.content.c_str()});
        total += m.role.size() + m.content.size();
    }
    std::string buf(2 * total + 256, '\0');
    int32_t n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, buf.data(),
                                          int32_t(buf.size()));
    if (n > int32_t(buf.size())) {
        buf.resize(size_t(n));
        n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, buf.data(),
                                      int32_t(buf.size()));
    }
    if (n < 0) {
        fail(ErrorKind::unsupported,
             "llama.cpp does not support this chat template (it understands a fixed list of common templates, not "
             "arbitrary Jinja); pass chat_template='chatml' or another built-in template name");
    }
    buf.resize(size_t(n));
    return buf;
}

// ---- context -------------------------------------------------------------------------------------------------

LlamaContext::LlamaContext(std::shared_ptr<LlamaModel> model, const ContextParams & params)
    : model_(std::move(model)) {
    if (!model_) fail(ErrorKind::invalid_argument, "context needs a loaded model");
    if (params.n_ctx < 1) fail(ErrorKind::invalid_argument, "n_ctx must be at least 1");
    if (params.n_batch < 1) fail(ErrorKind::invalid_argument, "n_batch must be at least 1");
    if (params.on_attention && params.flash_attention == FlashAttention::enabled) {
        fail(ErrorKind::invalid_argument,
             "the attention tap needs flash attention off (llama.cpp only materialises attention probabilities "
             "without it)");
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = params.n_ctx;
    cparams.n_batch = params.n_batch;
    cparams.n_ubatch = params.n_batch;
    cparams.n_seq_max = 1;
    cparams.n_threads = params.n_threads > 0 ? params.n_threads : default_threads();
    cparams.n_threads_batch = params.n_threads_batch > 0 ? params.n_threads_batch : cparams.n_threads;
    cparams.swa_full = params.swa_full;
    cparams.type_k = parse_cache_type(params.type_k);
    cparams.type_v = parse_cache_type(params.type_v);
    cparams.no_perf = true;
    switch (params.on_attention ? FlashAttention::disabled : params.flash_attention) {
        case FlashAttention::automatic: cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO; break;
        case FlashAttention::enabled: cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED; break;
        case FlashAttention::disabled: cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED; break;
    }
    if (params.on_attention) {
        // The tap checks every batch's attention of the first layer of each kind against that cache's cell mirror
        // before the policy sees it.
        tap_ = std::make_unique<AttentionTap>(
            params.on_attention,
            [this](const AttentionView & first) { return (first.sliding ? swa_cells_ : cells_).check(first); },
            cparams.n_threads);
        cparams.cb_eval = &AttentionTap::eval_callback;
        cparams.cb_eval_user_data = tap_.get();
    }
    clear_recent_errors();
    ctx_ = llama_init_from_model(model_->raw(), cparams);
    if (ctx_ == nullptr) {
        fail(ErrorKind::runtime, with_llama_errors("llama.cpp could not create a context with " +
                                                   std::to_string(params.n_ctx) + " cells (out of memory, or the "
                                                   "KV cache type does not fit this model)"));
    }
    n_batch_ = int32_t(llama_n_batch(ctx_));
    cells_.reset(llama_n_ctx(ctx_));
    const ModelInfo & info = model_->info();
    if (tap_ && info.n_swa > 0) {
        // iSWA (llama-kv-cache-iswa.cpp): global layers read the base cache, sliding-window layers an SWA cache of
        // their own. With swa_full both have n_ctx cells; every batch, seq_rm and seq_add goes to both, but the SWA
        // cache reuses the cells of tokens that left the window, so it gets a mirror of its own.
        if (!params.swa_full || info.swa_layers.size() != size_t(info.n_layer)) {
            llama_free(ctx_);
            ctx_ = nullptr;
            fail(ErrorKind::unsupported,
                 "the attention tap needs a full-size SWA cache and the sliding-window layer pattern of model '" +
                     info.path + "' (architecture " + info.architecture + ")");
        }
        swa_cells_.reset(llama_n_ctx(ctx_), info.n_swa);
        tap_->set_layer_kinds(info.swa_layers);
        mirror_swa_ = true;
    }
}

LlamaContext::~LlamaContext() {
    if (ctx_) llama_free(ctx_);
}

uint32_t LlamaContext::n_ctx() const { return llama_n_ctx(ctx_); }

bool LlamaContext::can_shift() const { return llama_memory_can_shift(llama_get_memory(ctx_)); }

void LlamaContext::decode(const Token * tokens, const Pos * positions, int32_t n, bool logits_all) {
    if (n <= 0) fail(ErrorKind::invalid_argument, "decode needs at least one token");
    if (n > n_batch_) {
        fail(ErrorKind::invalid_argument, "batch of " + std::to_string(n) + " tokens exceeds n_batch " +
                                              std::to_string(n_batch_));
    }
    // One batch is one ubatch (n_ubatch == n_batch), so llama.cpp runs find_slot once per cache: mirror it first.
    const KvCellMirror before = cells_;
    const KvCellMirror swa_before = swa_cells_;
    const std::vector<int32_t> batch_cells = cells_.place(positions, n);
    std::vector<int32_t> swa_batch_cells;
    if (mirror_swa_ && !batch_cells.empty()) swa_batch_cells = swa_cells_.place(positions, n);
    if (batch_cells.empty() || (mirror_swa_ && swa_batch_cells.empty())) {
        cells_ = before;
        swa_cells_ = swa_before;
        fail(ErrorKind::capacity, "no free KV cell for " + std::to_string(n) + " tokens (the cache is full)");
    }
    if (tap_) {
        tap_->begin_batch(cells_.positions().data(), positions, batch_cells.data(), n,
                          mirror_swa_ ? swa_cells_.positions().data() : nullptr,
                          mirror_swa_ ? swa_batch_cells.data() : nullptr);
    }

    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int32_t i = 0; i < n; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = positions[i];
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = logits_all || i == n - 1;
    }
    batch.n_tokens = n;
    clear_recent_errors();
    const int32_t rc = llama_decode(ctx_, batch);
    llama_batch_free(batch);
    if (tap_ && !tap_->error().empty()) {
        // The compute was cancelled from the attention callback; the cache no longer matches any mirror.
        cells_.clear();
        swa_cells_.clear();
        llama_memory_clear(llama_get_memory(ctx_), true);
        n_tokens_last_ = 0;
        fail(ErrorKind::runtime, tap_->error() + " (the cache was cleared; reset() and start again)");
    }
    if (rc != 0) {
        cells_ = before;  // llama.cpp restores the memory on these errors
        swa_cells_ = swa_before;
        if (rc == 1) {
            fail(ErrorKind::capacity, "llama.cpp found no free KV cell for " + std::to_string(n) +
                                          " tokens (the cache is full)");
        }
        fail(ErrorKind::runtime, with_llama_errors("llama_decode failed with code " + std::to_string(rc)));
    }
    n_tokens_last_ = n;
    logits_all_last_ = logits_all;
}

const float * LlamaContext::logits(int32_t i) const {
    if (n_tokens_last_ == 0) fail(ErrorKind::invalid_argument, "no logits yet: nothing has been decoded");
    // llama_get_logits_ith indexes the tokens of the last batch; only those flagged for output have logits.
    const int32_t idx = i < 0 ? n_tokens_last_ + i : i;
    const bool has_output = logits_all_last_ ? (idx >= 0 && idx < n_tokens_last_) : idx == n_tokens_last_ - 1;
    if (!has_output) fail(ErrorKind::invalid_argument, "no logits for token " + std::to_string(i) + " of the last batch");
    const float * out = llama_get_logits_ith(ctx_, idx);
    if (out == nullptr) fail(ErrorKind::runtime, "llama.cpp returned no logits for token " + std::to_string(idx));
    return out;
}

void LlamaContext::memory_clear() {
    llama_memory_clear(llama_get_memory(ctx_), true);
    cells_.clear();
    swa_cells_.clear();
    n_tokens_last_ = 0;
}

void LlamaContext::memory_remove(Pos p0, Pos p1) {
    if (!llama_memory_seq_rm(llama_get_memory(ctx_), 0, p0, p1)) {
        fail(ErrorKind::unsupported, "llama.cpp cannot remove positions [" + std::to_string(p0) + ", " +
                                         std::to_string(p1) + ") from this model's memory (recurrent state)");
    }
    cells_.remove(p0, p1);
    swa_cells_.remove(p0, p1);  // llama_kv_cache_iswa::seq_rm removes from both caches
}

void LlamaContext::memory_shift(Pos p0, Pos p1, Pos delta) {
    llama_memory_seq_add(llama_get_memory(ctx_), 0, p0, p1, delta);
    cells_.shift(p0, p1, delta);
    swa_cells_.shift(p0, p1, delta);  // llama_kv_cache_iswa::seq_add shifts both caches
}

// ---- session state ---------------------------------------------------------------------------------------------
// Blob: "PMKV" | u32 n_ctx | i32 pos[] (base cache, cell order) | i32 swa_pos[] (an iSWA model's SWA cache, cell
// order; empty without its mirror) | u64 n_bytes | llama_state_seq data.
// llama.cpp writes sequence 0's cells in cell order and, on restore, places them with the same find_slot +
// apply_ubatch as a decode (llama-kv-cache.cpp, state_read_meta), which is what KvCellMirror::place replays; an iSWA
// cache does that for its base cache, then for its SWA cache (llama-kv-cache-iswa.cpp). The next batch's mirror
// check verifies both.

namespace {
constexpr char kStateMagic[4] = {'P', 'M', 'K', 'V'};
}  // namespace

std::string LlamaContext::state_save() const {
    ByteWriter out;
    out.bytes().append(kStateMagic, sizeof(kStateMagic));
    out.put(uint32_t(cells_.size()));
    const std::vector<Pos> in_cell_order = cells_.saved_positions();
    out.put_vector(in_cell_order);
    out.put_vector(mirror_swa_ ? swa_cells_.saved_positions() : std::vector<Pos>());
    const std::string seq = in_cell_order.empty() ? std::string() : seq_state_bytes();
    out.put(uint64_t(seq.size()));
    out.bytes().append(seq);
    return std::move(out.bytes());
}

std::string LlamaContext::seq_state_bytes() const {
    const size_t n_bytes = llama_state_seq_get_size(ctx_, 0);
    std::string bytes(n_bytes, '\0');
    const size_t written = llama_state_seq_get_data(ctx_, reinterpret_cast<uint8_t *>(bytes.data()), n_bytes, 0);
    if (written != n_bytes) {
        fail(ErrorKind::runtime, with_llama_errors("llama_state_seq_get_data wrote " + std::to_string(written) +
                                                   " of " + std::to_string(n_bytes) + " bytes"));
    }
    return bytes;
}

void LlamaContext::state_load(const std::string & blob, const std::vector<Pos> & positions) {
    memory_clear();
    if (blob.size() < sizeof(kStateMagic) || std::memcmp(blob.data(), kStateMagic, sizeof(kStateMagic)) != 0) {
        fail(ErrorKind::invalid_argument, "the saved KV state does not start with its magic (damaged session file)");
    }
    const std::string body = blob.substr(sizeof(kStateMagic));
    ByteReader in(body, "the saved KV state");
    const uint32_t n_ctx_saved = in.get<uint32_t>();
    if (n_ctx_saved != cells_.size()) {
        fail(ErrorKind::invalid_argument, "the saved KV state has " + std::to_string(n_ctx_saved) +
                                              " cells but this cache has " + std::to_string(cells_.size()) +
                                              "; load it with the same window and n_sink");
    }
    const std::vector<Pos> in_cell_order = in.get_vector<Pos>();
    const std::vector<Pos> swa_in_cell_order = in.get_vector<Pos>();
    std::vector<Pos> a = in_cell_order, b = positions;
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    if (a.size() > n_ctx_saved || a != b || (!a.empty() && a.front() < 0) ||
        std::adjacent_find(a.begin(), a.end()) != a.end()) {
        fail(ErrorKind::invalid_argument, "the saved KV cells do not hold the session's positions (damaged file)");
    }
    const uint64_t n_bytes = in.get<uint64_t>();
    if (n_bytes != in.remaining()) {
        fail(ErrorKind::invalid_argument, "the saved KV state is " + std::to_string(in.remaining()) +
                                              " bytes long but says " + std::to_string(n_bytes) +
                                              " (damaged session file)");
    }
    if (a.empty()) return;
    place_seq_state(reinterpret_cast<const uint8_t *>(body.data() + in.offset()), size_t(n_bytes), in_cell_order,
                    swa_in_cell_order);
}

void LlamaContext::place_seq_state(const uint8_t * data, size_t size, const std::vector<Pos> & in_cell_order,
                                   const std::vector<Pos> & swa_in_cell_order) {
    const auto [lowest, highest] = std::minmax_element(in_cell_order.begin(), in_cell_order.end());
    clear_recent_errors();
    const size_t read = llama_state_seq_set_data(ctx_, data, size, 0);
    if (read == 0) {
        memory_clear();
        fail(ErrorKind::invalid_argument,
             with_llama_errors("llama.cpp refused the saved KV state (a different model or KV type, or a damaged "
                               "session file)"));
    }
    const bool placed = cells_.place(in_cell_order.data(), int32_t(in_cell_order.size())).size() == in_cell_order.size();
    const bool swa_placed = !mirror_swa_ || swa_cells_.place(swa_in_cell_order.data(), int32_t(swa_in_cell_order.size()))
                                                    .size() == swa_in_cell_order.size();
    // An iSWA cache reports its SWA cache's smallest position (llama-kv-cache-iswa.cpp, seq_pos_min).
    const Pos expected_min = mirror_swa_ && !swa_in_cell_order.empty()
                                 ? *std::min_element(swa_in_cell_order.begin(), swa_in_cell_order.end())
                                 : *lowest;
    const Pos pos_min = memory_pos_min(), pos_max = memory_pos_max();
    if (!placed || !swa_placed || pos_min != expected_min || pos_max != *highest) {
        memory_clear();
        fail(ErrorKind::runtime, "the restored KV cells do not match the saved positions (llama.cpp holds " +
                                     std::to_string(pos_min) + ".." + std::to_string(pos_max) + ", the session " +
                                     std::to_string(expected_min) + ".." + std::to_string(*highest) +
                                     (placed && swa_placed ? "" : "; the cell mirror could not place them") +
                                     "); the cache was cleared");
    }
}

void LlamaContext::edit_kv_state(const std::function<bool(uint8_t * data, size_t size)> & edit) {
    const std::vector<Pos> in_cell_order = cells_.saved_positions();
    if (in_cell_order.empty()) return;
    const std::vector<Pos> swa_in_cell_order = mirror_swa_ ? swa_cells_.saved_positions() : std::vector<Pos>();
    std::string bytes = seq_state_bytes();
    if (!edit(reinterpret_cast<uint8_t *>(bytes.data()), bytes.size())) return;
    // Writing a sequence's cells back leaves llama.cpp's outputs alone: the last batch's logits stay readable.
    const int32_t n_tokens_last = n_tokens_last_;
    const bool logits_all_last = logits_all_last_;
    memory_clear();
    place_seq_state(reinterpret_cast<const uint8_t *>(bytes.data()), bytes.size(), in_cell_order, swa_in_cell_order);
    n_tokens_last_ = n_tokens_last;
    logits_all_last_ = logits_all_last;
}

Pos LlamaContext::memory_pos_min() const { return llama_memory_seq_pos_min(llama_get_memory(ctx_), 0); }
Pos LlamaContext::memory_pos_max() const { return llama_memory_seq_pos_max(llama_get_memory(ctx_), 0); }

void LlamaContext::set_threads(int32_t n_threads, int32_t n_threads_batch) {
    const int32_t n = n_threads > 0 ? n_threads : default_threads();
    llama_set_n_threads(ctx_, n, n_threads_batch > 0 ? n_threads_batch : n);
    if (tap_) tap_->set_threads(n);
}

// ---- sampling ------------------------------------------------------------------------------------------------

void validate(const SamplingParams & p) {
    auto bad = [](const std::string & what) { fail(ErrorKind::invalid_argument, what); };
    if (!(p.temperature == p.temperature)) bad("temperature is NaN; use 0 for greedy or a value like 0.8");
    if (p.top_k < 0) bad("top_k must be >= 0 (got " + std::to_string(p.top_k) + "); use 0 to disable it");
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) bad("top_p must be in (0, 1] (got " + std::to_string(p.top_p) + "); use 1 to disable it");
    if (p.min_p < 0.0f || p.min_p > 1.0f || p.min_p != p.min_p) bad("min_p must be in [0, 1]; use 0 to disable it");
    if (p.repeat_penalty <= 0.0f || p.repeat_penalty != p.repeat_penalty) {
        bad("repeat_penalty must be > 0; use 1 to disable it");
    }
    if (p.repeat_last_n < -1) bad("repeat_last_n must be >= -1 (-1 = whole context, 0 = off)");
    if (!std::isfinite(p.frequency_penalty) || !std::isfinite(p.presence_penalty)) {
        bad("frequency_penalty and presence_penalty must be finite numbers; use 0 to disable them");
    }
    if (!(p.dry_multiplier >= 0.0f) || !std::isfinite(p.dry_multiplier)) {
        bad("dry_multiplier must be a finite number >= 0; use 0 to disable DRY (0.8 is a common setting)");
    }
    if (!(p.dry_base >= 1.0f) || !std::isfinite(p.dry_base)) bad("dry_base must be a finite number >= 1 (e.g. 1.75)");
    if (p.dry_allowed_length < 1) bad("dry_allowed_length must be >= 1 (e.g. 2)");
    if (p.dry_penalty_last_n < -1) bad("dry_penalty_last_n must be >= -1 (-1 = whole context, 0 = off)");
}

Sampler::Sampler(const LlamaModel & model, const SamplingParams & p) {
    validate(p);
    chain_ = llama_sampler_chain_init(llama_sampler_chain_default_params());
    // Order as in llama.cpp's common sampler: penalties, then truncation, then temperature, then the draw.
    if (p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
        const int32_t last_n = p.repeat_last_n < 0 ? model.info().n_ctx_train : p.repeat_last_n;
        llama_sampler_chain_add(chain_, llama_sampler_init_penalties(model.info().n_vocab, last_n, p.repeat_penalty,
                                                                     p.frequency_penalty, p.presence_penalty));
    }
    if (p.dry_multiplier > 0.0f) {
        // The sequence breakers of llama.cpp's common defaults: a repeat does not continue across them.
        static const char * breakers[] = {"\n", ":", "\"", "*"};
        const int32_t last_n = p.dry_penalty_last_n < 0 ? model.info().n_ctx_train : p.dry_penalty_last_n;
        llama_sampler_chain_add(chain_, llama_sampler_init_dry(llama_model_get_vocab(model.raw()), p.dry_multiplier,
                                                               p.dry_base, p.dry_allowed_length, last_n, breakers,
                                                               std::size(breakers)));
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain_, llama_sampler_init_greedy());
        return;
    }
    if (p.top_k > 0) llama_sampler_chain_add(chain_, llama_sampler_init_top_k(p.top_k));
    if (p.top_p < 1.0f) llama_sampler_chain_add(chain_, llama_sampler_init_top_p(p.top_p, 1));
    if (p.min_p > 0.0f) llama_sampler_chain_add(chain_, llama_sampler_init_min_p(p.min_p, 1));
    llama_sampler_chain_add(chain_, llama_sampler_init_temp(p.temperature));
    llama_sampler_chain_add(chain_, llama_sampler_init_dist(p.seed));
}

Sampler::~Sampler() {
    if (chain_) llama_sampler_free(chain_);
}

Token Sampler::sample(LlamaContext & ctx, int32_t output_index) {
    ctx.logits(output_index);  // validates that logits exist for this index
    const std::lock_guard<std::mutex> lock(mutex_);
    // llama_sampler_sample accepts the sampled token into the chain itself.
    return llama_sampler_sample(chain_, ctx.raw(), output_index);
}

void Sampler::accept(Token token) {
    const std::lock_guard<std::mutex> lock(mutex_);
    llama_sampler_accept(chain_, token);
}

void Sampler::reset() {
    const std::lock_guard<std::mutex> lock(mutex_);
    llama_sampler_reset(chain_);
}

}  // namespace pm
