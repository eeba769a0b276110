// The attention tap: recognises llama.cpp's attention nodes in the scheduler's eval callback, builds views, reduces
// them per cell. ggml only; see attention_tap.h.
#include "attention_tap.h"

#include "ggml_compute.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <utility>

#include "ggml-backend.h"
#include "ggml.h"

namespace pm {
namespace {

// Upstream name of the post-softmax attention node (llama-graph.cpp, build_attn_mha: cb(kq, "kq_soft_max", il)).
// llama.cpp names graph nodes "<name>-<layer>". If it changes, nothing is observed and the engine fails loudly
// (engine.cpp counts the tapped layers).
constexpr const char * kAttentionTensorPrefix = "kq_soft_max-";
// Upstream name of a layer's keys (the model builders' cb(Kcur, "Kcur", il)): llama.cpp names the projection, its
// 3-D reshape and the RoPE'd keys alike; the RoPE node is the one whose input is the keys before RoPE.
constexpr const char * kKeyTensorPrefix = "Kcur-";

// The layer of a node named "Kcur<anything>-<layer>" (a stage of a layer's keys: Gemma-3's RMS-normalised keys are
// "Kcur_normed-<layer>"), or -1.
int32_t key_stage_layer(const char * name) {
    if (std::strncmp(name, "Kcur", 4) != 0) return -1;
    const char * dash = std::strrchr(name, '-');
    if (dash == nullptr || dash[1] == '\0') return -1;
    for (const char * c = dash + 1; *c; ++c) {
        if (*c < '0' || *c > '9') return -1;
    }
    return std::atoi(dash + 1);
}

// A node whose result RoPE may read and then overwrite: computed (not a view, which owns no memory of its own, and
// not the projection, which RoPE never reads before a reshape).
bool may_feed_rope(const ggml_tensor * t) {
    switch (t->op) {
        case GGML_OP_ROPE: case GGML_OP_MUL_MAT: case GGML_OP_NONE:
        case GGML_OP_RESHAPE: case GGML_OP_VIEW: case GGML_OP_PERMUTE: case GGML_OP_TRANSPOSE:
            return false;
        default:
            return true;
    }
}

// Whether `t` is laid out as a batch's keys: f32 [head_dim, n_head_kv, rows >= n_tokens], rows of head_dim floats.
bool holds_batch_keys(const ggml_tensor * t, int32_t n_tokens) {
    return t != nullptr && t->type == GGML_TYPE_F32 && t->nb[0] == sizeof(float) && t->ne[3] == 1 &&
           t->ne[2] >= n_tokens;
}

// The layer number after `prefix` in `name`, or -1 when name is not prefix + digits.
int32_t layer_after(const char * name, const char * prefix) {
    const size_t n = std::strlen(prefix);
    if (std::strncmp(name, prefix, n) != 0 || name[n] == '\0') return -1;
    for (const char * c = name + n; *c; ++c) {
        if (*c < '0' || *c > '9') return -1;
    }
    return std::atoi(name + n);
}

// totals[c] += the sum of rows[r][c] over n_rows rows, for c in [0, n): eight rows at a time, so each total is loaded
// and stored once per eight rows instead of once per row (the matrix itself is read once; it does not fit in any
// cache at 4K cells). Built for AVX2 and for the baseline, chosen at load time: the wheel is built on the user's
// machine but not with -march=native. The order of additions within a cell does not depend on n, so every
// split over threads gives the same sums.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void add_rows(const float * rows, size_t row_stride, int32_t n_rows, int32_t n, float * totals) {
    int32_t r = 0;
    for (; r + 8 <= n_rows; r += 8) {
        const float * p0 = rows + size_t(r) * row_stride;
        const float * p1 = p0 + row_stride;
        const float * p2 = p1 + row_stride;
        const float * p3 = p2 + row_stride;
        const float * p4 = p3 + row_stride;
        const float * p5 = p4 + row_stride;
        const float * p6 = p5 + row_stride;
        const float * p7 = p6 + row_stride;
        for (int32_t c = 0; c < n; ++c) {
            totals[c] += ((p0[c] + p1[c]) + (p2[c] + p3[c])) + ((p4[c] + p5[c]) + (p6[c] + p7[c]));
        }
    }
    for (; r < n_rows; ++r) {
        const float * p = rows + size_t(r) * row_stride;
        for (int32_t c = 0; c < n; ++c) totals[c] += p[c];
    }
}

}  // namespace

void sum_attention_by_cell(const AttentionView & v, AttentionTotals rows, std::vector<float> & out, int32_t n_threads) {
    out.assign(size_t(v.n_kv), 0.0f);
    if (rows == AttentionTotals::none || v.n_tokens < 1) return;
    const int32_t t0 = rows == AttentionTotals::last_row ? v.n_tokens - 1 : 0;
    // Each thread adds a range of cells over every head and row: a prompt batch's matrix (heads x 512 rows x
    // n_kv) is read once, at the bandwidth of all the cores llama.cpp itself computes with.
    const size_t work = size_t(v.n_head) * size_t(v.n_tokens - t0) * size_t(v.n_kv);
    const int32_t threads = work >= (size_t(1) << 20) ? std::max<int32_t>(1, n_threads) : 1;
    const int32_t chunk = ((v.n_kv + threads - 1) / threads + 15) / 16 * 16;
    float * totals = out.data();
#if defined(_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
#endif
    for (int32_t part = 0; part < threads; ++part) {
        const int32_t c0 = part * chunk;
        const int32_t c1 = std::min(v.n_kv, c0 + chunk);
        if (c1 <= c0) continue;
        for (int32_t h = 0; h < v.n_head; ++h) {
            const float * first_row = v.probs + size_t(h) * v.head_stride + size_t(t0) * size_t(v.n_kv) + c0;
            add_rows(first_row, size_t(v.n_kv), v.n_tokens - t0, c1 - c0, totals + c0);
        }
    }
}

AttentionTap::AttentionTap(AttentionCallback on_attention, AttentionCheck check_layer0, int32_t n_threads)
    : on_attention_(std::move(on_attention)),
      check_layer0_(std::move(check_layer0)),
      device_(std::make_unique<DeviceCompute>(n_threads)),
      n_threads_(n_threads > 0 ? n_threads : 1) {}

AttentionTap::~AttentionTap() = default;

void AttentionTap::begin_batch(const Pos * cell_pos, const Pos * token_pos, const int32_t * token_cell,
                               int32_t n_tokens, const Pos * swa_cell_pos, const int32_t * swa_token_cell) {
    cell_pos_ = cell_pos;
    token_pos_.assign(token_pos, token_pos + n_tokens);
    token_cell_.assign(token_cell, token_cell + n_tokens);
    swa_cell_pos_ = swa_cell_pos;
    if (swa_token_cell) {
        swa_token_cell_.assign(swa_token_cell, swa_token_cell + n_tokens);
    } else {
        swa_token_cell_.clear();
    }
    checked_[0] = checked_[1] = false;
    mask_[0] = mask_[1] = nullptr;
    mask_layer_[0] = mask_layer_[1] = -1;
    pre_rope_source_ = nullptr;
    error_.clear();
}

void AttentionTap::set_threads(int32_t n_threads) {
    device_->set_threads(n_threads);
    n_threads_ = n_threads > 0 ? n_threads : 1;
}

bool AttentionTap::eval_callback(ggml_tensor * tensor, bool ask, void * user_data) {
    auto * self = static_cast<AttentionTap *>(user_data);
    const char * name = ggml_get_name(tensor);
    // A layer's keys before RoPE (the RoPE node's input), when asked for, or its attention; nothing else.
    const int32_t key_layer =
        self->on_keys_ && tensor->op == GGML_OP_ROPE ? layer_after(name, kKeyTensorPrefix) : -1;
    if (key_layer < 0 && self->on_keys_ && may_feed_rope(tensor)) {
        // A stage of the keys that RoPE may overwrite in place: copied before RoPE runs, where the layer needs it.
        const int32_t stage_layer = key_stage_layer(name);
        if (stage_layer >= 0 && self->observes(stage_layer) && self->copies_before_rope(stage_layer, name) &&
            holds_batch_keys(tensor, int32_t(self->token_pos_.size()))) {
            if (ask) return true;
            const auto t0 = std::chrono::steady_clock::now();
            const bool ok = self->copy_keys(tensor, name, self->pre_rope_keys_);
            self->pre_rope_source_ = ok ? tensor : nullptr;
            self->observe_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            return ok;
        }
    }
    const int32_t layer = key_layer >= 0 ? key_layer : layer_after(name, kAttentionTensorPrefix);
    if (layer < 0) return !ask;  // observe nothing else
    if (ask) return self->observes(layer);  // observe this node once it is computed, if it is a layer we read
    const auto t0 = std::chrono::steady_clock::now();
    const bool ok = key_layer >= 0 ? self->observe_keys(tensor, name, layer) : self->observe(tensor, name, layer);
    self->observe_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return ok;
}

bool AttentionTap::observe(ggml_tensor * tensor, const char * name, int32_t layer) {
    // Errors cannot propagate through ggml's scheduler: remember them and cancel the compute.
    try {
        if (tensor->type != GGML_TYPE_F32 || !ggml_is_contiguous(tensor) || tensor->ne[3] != 1) {
            error_ = std::string("attention tensor ") + name + " has an unexpected layout (type " +
                     ggml_type_name(tensor->type) + ")";
            return false;
        }
        AttentionView view;
        view.layer = layer;
        view.n_kv = int32_t(tensor->ne[0]);
        view.n_tokens = int32_t(token_pos_.size());  // rows past the batch (padding) are not ours
        view.n_head = int32_t(tensor->ne[2]);
        view.head_stride = size_t(tensor->ne[0]) * size_t(tensor->ne[1]);
        if (tensor->ne[1] < view.n_tokens) {
            error_ = "attention tensor has fewer rows than the batch has tokens";
            return false;
        }
        view.tensor = tensor;
        const bool on_host = !device_reductions_ && tensor->buffer && ggml_backend_buffer_is_host(tensor->buffer);
        view.probs = on_host ? static_cast<const float *>(tensor->data) : nullptr;
        view.sliding = layer >= 0 && size_t(layer) < sliding_.size() && sliding_[size_t(layer)] != 0;
        const int kind = view.sliding ? 1 : 0;
        if (view.sliding && (swa_cell_pos_ == nullptr || swa_token_cell_.size() != token_pos_.size())) {
            error_ = std::string("internal: attention of sliding-window layer ") + name + " but no SWA cell mirror";
            return false;
        }
        view.cell_pos = view.sliding ? swa_cell_pos_ : cell_pos_;
        view.token_pos = token_pos_.data();
        view.token_cell = view.sliding ? swa_token_cell_.data() : token_cell_.data();
        if (!sliding_.empty()) {
            // Layers of different kinds read different caches through different KQ masks (src[1] of the softmax):
            // a shared mask means the layer kinds we were given are not llama.cpp's.
            const ggml_tensor * mask = tensor->src[1];
            const ggml_tensor * other = mask_[1 - kind];
            if (mask != nullptr && mask == other) {
                error_ = "layers " + std::to_string(mask_layer_[1 - kind]) + " and " + std::to_string(layer) +
                         " share llama.cpp's attention mask but pymemory takes one for a sliding-window layer and "
                         "the other for a global one: this model's sliding-window layer pattern is not the one "
                         "pymemory assumed";
                return false;
            }
            if (mask_[kind] == nullptr) {
                mask_[kind] = mask;
                mask_layer_[kind] = layer;
            }
        }
        if (!checked_[kind]) {
            // The first layer of each kind checks its cache's mirror; without the host matrix the check reads the
            // totals over all rows.
            checked_[kind] = true;
            if (!on_host) compute_cell_totals(view, AttentionTotals::all_rows);
            const std::string problem = check_layer0_ ? check_layer0_(view) : std::string();
            if (!problem.empty()) {
                error_ = problem + (sliding_.empty() ? std::string()
                                                     : std::string(" [layer ") + std::to_string(layer) +
                                                           (view.sliding ? ", sliding-window cache]" : ", base cache]"));
                return false;
            }
        }
        // Sliding layers are not scored (their attention says nothing about tokens outside the window).
        if (!view.sliding && totals_ != AttentionTotals::none && totals_ != view.totals_rows) {
            compute_cell_totals(view, totals_);
        }
        on_attention_(view);
    } catch (const std::exception & e) {
        error_ = e.what();
        return false;
    }
    return true;
}

bool AttentionTap::copies_before_rope(int32_t layer, const char * name) const {
    if (size_t(layer) >= rope_inputs_.size() || rope_inputs_[size_t(layer)].empty()) return true;  // not yet known
    return rope_inputs_[size_t(layer)] == name;
}

bool AttentionTap::copy_keys(const ggml_tensor * keys, const char * name, std::vector<float> & out) {
    try {
        const int32_t n_tokens = int32_t(token_pos_.size());
        if (!holds_batch_keys(keys, n_tokens)) {
            error_ = std::string("the keys RoPE reads at ") + name + " have an unexpected layout (type " +
                     (keys ? ggml_type_name(keys->type) : "none") + ")";
            return false;
        }
        const int32_t head_dim = int32_t(keys->ne[0]);
        const int32_t n_head_kv = int32_t(keys->ne[1]);
        const size_t row = size_t(head_dim) * sizeof(float);
        out.resize(size_t(n_tokens) * size_t(n_head_kv) * size_t(head_dim));
        char * dst = reinterpret_cast<char *>(out.data());
        if (!device_reductions_ && keys->buffer && ggml_backend_buffer_is_host(keys->buffer)) {
            const char * base = static_cast<const char *>(keys->data);
            for (int32_t t = 0; t < n_tokens; ++t) {
                for (int32_t g = 0; g < n_head_kv; ++g) {
                    std::memcpy(dst + (size_t(t) * size_t(n_head_kv) + size_t(g)) * row,
                                base + size_t(t) * keys->nb[2] + size_t(g) * keys->nb[1], row);
                }
            }
        } else if (ggml_is_contiguous(keys)) {
            ggml_backend_tensor_get(keys, dst, 0, out.size() * sizeof(float));
        } else {
            error_ = std::string("the keys RoPE reads at ") + name + " live on a device and are not contiguous";
            return false;
        }
    } catch (const std::exception & e) {
        error_ = e.what();
        return false;
    }
    return true;
}

bool AttentionTap::observe_keys(ggml_tensor * rope, const char * name, int32_t layer) {
    try {
        const ggml_tensor * keys = rope->src[0];  // [head_dim, n_head_kv, rows >= n_tokens]
        if (keys == nullptr) {
            error_ = std::string("the RoPE node ") + name + " has no input";
            return false;
        }
        // llama.cpp's allocator computes RoPE in place when its input is a plain tensor no other node reads
        // (Gemma-3's normalised keys): by now that memory holds the rotated keys, so the copy taken before RoPE
        // ran is the one to use. Remember which node that is, so that later batches copy only it.
        const bool in_place = keys->data == rope->data;
        const bool copied = pre_rope_source_ == keys;
        if (size_t(layer) >= rope_inputs_.size()) rope_inputs_.resize(size_t(layer) + 1);
        rope_inputs_[size_t(layer)] = copied ? ggml_get_name(keys) : kNoCopy;
        if (copied) {
            keys_.swap(pre_rope_keys_);
        } else if (in_place) {
            error_ = std::string("llama.cpp computed ") + name + " in place over its input '" + ggml_get_name(keys) +
                     "', so the keys before RoPE were overwritten before they could be read; pymemory cannot read "
                     "this model's keys: run it without a key weight (namm_key_weight=0)";
            return false;
        } else if (!copy_keys(keys, name, keys_)) {
            return false;
        }
        pre_rope_source_ = nullptr;
        KeyView view;
        view.layer = layer;
        view.sliding = layer >= 0 && size_t(layer) < sliding_.size() && sliding_[size_t(layer)] != 0;
        view.n_tokens = int32_t(token_pos_.size());
        view.head_dim = int32_t(keys->ne[0]);
        view.n_head_kv = int32_t(keys->ne[1]);
        view.token_cell = view.sliding ? swa_token_cell_.data() : token_cell_.data();
        view.keys = keys_.data();
        on_keys_(view);
    } catch (const std::exception & e) {
        error_ = e.what();
        return false;
    }
    return true;
}

void AttentionTap::compute_cell_totals(AttentionView & v, AttentionTotals rows) {
    if (v.probs) {
        sum_attention_by_cell(v, rows, cell_totals_, n_threads_);
    } else {
        cell_totals_.assign(size_t(v.n_kv), 0.0f);
        // The rows to add: all of the batch's, or only the last (the newest token's query).
        const int32_t t0 = rows == AttentionTotals::last_row ? v.n_tokens - 1 : 0;
        const int32_t n_rows = v.n_tokens - t0;
        device_->bind(v.tensor, "the attention of a layer");
        Graph g(16);
        ggml_context * ctx = g.ctx();
        ggml_tensor * probs = g.external(v.tensor);                                           // [n_kv, rows, n_head]
        ggml_tensor * real = ggml_view_3d(ctx, probs, v.n_kv, n_rows, v.n_head, probs->nb[1], probs->nb[2],
                                          size_t(t0) * probs->nb[1]);                          // [n_kv, n_rows, n_head]
        // Rows and heads first, so one sum_rows adds everything a cell received.
        ggml_tensor * by_cell = ggml_cont(ctx, ggml_permute(ctx, real, 2, 0, 1, 3));          // [n_rows, n_head, n_kv]
        ggml_tensor * totals = ggml_sum_rows(ctx, ggml_reshape_2d(ctx, by_cell, int64_t(n_rows) * v.n_head,
                                                                 v.n_kv));                    // [1, n_kv]
        g.output(totals);
        device_->allocate(g);
        device_->compute(g);
        ggml_backend_tensor_get(totals, cell_totals_.data(), 0, cell_totals_.size() * sizeof(float));
    }
    v.cell_totals = cell_totals_.data();
    v.totals_rows = rows;
}

}  // namespace pm
