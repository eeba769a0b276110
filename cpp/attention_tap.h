// The attention tap: each layer's post-softmax attention, observed while llama.cpp decodes.
//
// llama.cpp's scheduler asks an eval callback, node by node, whether to show it a computed tensor. The tap answers
// yes only for the attention probabilities (the node llama.cpp names "kq_soft_max-<layer>", flash attention off;
// the name lives in attention_tap.cpp and is upstream-fragile), and for each one:
//   1. builds an AttentionView (shape, strides, where the matrix lives, which cell each batch token went to);
//   2. on the first layer of each kind (layer 0; on iSWA models also the first layer of the other kind: sliding
//      window or global), lets the adapter check that cache's cell mirror against the pattern (kv_cell_mirror.h);
//   3. reduces the matrix per cell where it lives (host loop, or a ggml graph on its device: ggml_compute.h) when
//      the policy reads per-cell totals;
//   4. hands the view to the policy's callback.
// Errors cannot cross ggml's scheduler: the tap cancels the compute and keeps the message for the adapter.
//
// This unit uses ggml only. llama_adapter.cpp installs eval_callback() in the context it creates and feeds the tap
// each batch's cells (begin_batch); nothing here calls llama.cpp.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

struct ggml_tensor;

namespace pm {

class DeviceCompute;

using Pos = int32_t;

// Which rows of a layer's attention the tap adds up per cell (AttentionView::cell_totals), over all query heads:
// none, every row of the batch (H2O's accumulated attention), or only the last row, the newest token's query
// (TOVA's rule).
enum class AttentionTotals { none, all_rows, last_row };

// One layer's attention probabilities as llama.cpp computed them (flash attention off), valid only during the
// callback. Layout (ggml order): probs[h * head_stride + t * n_kv + c] for query head h, batch token t, cell c.
// Columns are KV *cells* 0..n_kv-1 of the layer's cache, not tokens; masked and empty cells hold exactly 0. On an
// iSWA model (Gemma 2/3) sliding-window layers read a cache of their own (`sliding`), whose cells differ from the
// global layers'; cell_pos and token_cell are those of the layer's cache. Query head h
// reads KV head h / (n_head / n_head_kv) (ggml's broadcasting order, the same as HF's repeat_kv).
// The matrix stays where llama.cpp computed it: `probs` is set only when that is host memory (CPU backend); on a
// GPU a policy reduces `tensor` there with its own ggml graph (cpp/ggml_compute.h).
struct AttentionView {
    int32_t layer = 0;
    bool sliding = false;               // a sliding-window layer of an iSWA model (its own cache, cells and mask)
    int32_t n_kv = 0;
    int32_t n_tokens = 0;
    int32_t n_head = 0;
    size_t head_stride = 0;             // floats between heads (n_kv * rows of the tensor, which may be padded)
    const ggml_tensor * tensor = nullptr;  // llama.cpp's kq_soft_max-<layer>: [n_kv, rows >= n_tokens, n_head]
    const float * probs = nullptr;      // the same in host memory, or nullptr when it lives on a device
    const float * cell_totals = nullptr;  // [n_kv] attention each cell received (all heads; rows: totals_rows); not
                                          // computed for sliding layers unless the mirror check needs them
    AttentionTotals totals_rows = AttentionTotals::none;  // which rows cell_totals sums (none: not computed)
    const Pos * cell_pos = nullptr;     // [n_kv] position held by each cell, -1 if empty
    const Pos * token_pos = nullptr;    // [n_tokens] positions of the batch's tokens (the rows)
    const int32_t * token_cell = nullptr;  // [n_tokens] cell each batch token was placed in
};

// Called from inside llama_decode, on the decoding thread, once per layer and ubatch.
using AttentionCallback = std::function<void(const AttentionView &)>;

// One layer's keys for the batch's tokens *before RoPE* (what llama.cpp's RoPE node for the keys, "Kcur-<layer>",
// reads: after any bias and key norm), copied to host memory, valid only during the callback:
// keys[(t * n_head_kv + g) * head_dim + d] for batch token t, KV head g. Position-free, so they stay valid when
// the cache's positions are shifted.
struct KeyView {
    int32_t layer = 0;
    bool sliding = false;
    int32_t n_tokens = 0;
    int32_t n_head_kv = 0;
    int32_t head_dim = 0;
    const float * keys = nullptr;
    const int32_t * token_cell = nullptr;  // [n_tokens] cell each batch token was placed in (the layer's cache)
};
using KeyCallback = std::function<void(const KeyView &)>;
// Checks the view of the first layer of each kind (sliding / global) before the callback sees it: "" if fine, else
// the error that cancels the decode. It gets the host matrix (probs) when there is one, else cell_totals over all
// rows.
using AttentionCheck = std::function<std::string(const AttentionView &)>;

// The host reduction behind AttentionView::cell_totals: out[c] = sum over heads (and the chosen rows) of
// view.probs. Pure (no llama.cpp): the tap runs it on host attention, tests run it on synthetic matrices.
// n_threads > 1 splits large matrices' cells over OpenMP threads (where the build has OpenMP).
void sum_attention_by_cell(const AttentionView & view, AttentionTotals rows, std::vector<float> & out,
                           int32_t n_threads = 1);

class AttentionTap {
public:
    // n_threads: threads of the CPU backend that reduces attention when device reductions are on.
    AttentionTap(AttentionCallback on_attention, AttentionCheck check_layer0, int32_t n_threads);
    ~AttentionTap();
    AttentionTap(const AttentionTap &) = delete;
    AttentionTap & operator=(const AttentionTap &) = delete;

    // Also hand over each observed layer's keys before RoPE (one more split of llama.cpp's graph per layer, at its
    // RoPE node for the keys); empty = none.
    void set_key_callback(KeyCallback on_keys) { on_keys_ = std::move(on_keys); }

    // A ggml_backend_sched_eval_callback; install it with user_data = this tap.
    static bool eval_callback(ggml_tensor * tensor, bool ask, void * user_data);

    // Which layers slide (iSWA models: 1 per sliding-window layer); empty = none. Views of those layers get the SWA
    // cache's cells (begin_batch) and no cell totals.
    void set_layer_kinds(std::vector<uint8_t> sliding) { sliding_ = std::move(sliding); }
    // Before each decode: the position of every cell (read during the decode, so it must stay valid until then),
    // and the positions and cells of the batch's n_tokens tokens (copied); for iSWA models also the SWA cache's
    // cell positions and the batch's cells there. Clears error().
    void begin_batch(const Pos * cell_pos, const Pos * token_pos, const int32_t * token_cell, int32_t n_tokens,
                     const Pos * swa_cell_pos = nullptr, const int32_t * swa_token_cell = nullptr);
    // Why the tap cancelled the last decode, or "".
    const std::string & error() const { return error_; }

    // The layers whose attention the scheduler hands over (1 per observed layer); empty = all. Each observed layer
    // splits llama.cpp's graph compute at its attention node, so a policy that scores few layers asks for few.
    void set_observed_layers(std::vector<uint8_t> observed) { observed_ = std::move(observed); }
    bool observes(int32_t layer) const {
        return observed_.empty() || (layer >= 0 && size_t(layer) < observed_.size() && observed_[size_t(layer)]);
    }

    // Per-cell totals to compute for every layer (AttentionView::cell_totals), where the attention lives.
    void set_totals(AttentionTotals rows) { totals_ = rows; }
    // Treats attention (and keys) as device-resident even when they are in host memory (probs stays null, totals
    // come from a ggml graph, the layer-0 check reads them, keys are copied by ggml_backend_tensor_get): what a GPU
    // run does, for tests.
    void set_device_reductions(bool enabled) { device_reductions_ = enabled; }
    void set_threads(int32_t n_threads);
    // Seconds spent reading observed layers' attention (views, checks, per-cell totals and on_attention) since
    // the last call: the policy's observe time.
    double take_observe_seconds() {
        const double s = observe_seconds_;
        observe_seconds_ = 0.0;
        return s;
    }

private:
    // The computed tensor named `name`, a layer's attention: view, check, totals, callback. False cancels.
    bool observe(ggml_tensor * tensor, const char * name, int32_t layer);
    // The RoPE node of a layer's keys: its input (or the copy taken before RoPE overwrote it), to on_keys_. False
    // cancels.
    bool observe_keys(ggml_tensor * rope, const char * name, int32_t layer);
    // `keys` ([head_dim, n_head_kv, rows >= n_tokens], f32) to host memory as [token][KV head][head_dim]. False
    // cancels (error_ says why).
    bool copy_keys(const ggml_tensor * keys, const char * name, std::vector<float> & out);
    // Whether the node `name` of `layer` is to be copied before RoPE runs: every key stage until the layer's first
    // RoPE node says which one it reads (rope_inputs_), then only that one.
    bool copies_before_rope(int32_t layer, const char * name) const;
    // AttentionView::cell_totals over `rows`: a host loop, or a ggml graph on the tensor's device.
    void compute_cell_totals(AttentionView & view, AttentionTotals rows);

    AttentionCallback on_attention_;
    KeyCallback on_keys_;
    std::vector<float> keys_;                // the batch's keys of one layer, [token][KV head][head_dim]
    std::vector<float> pre_rope_keys_;       // the latest key stage copied before RoPE, same layout
    const ggml_tensor * pre_rope_source_ = nullptr;  // the node it was copied from, in this graph
    // Per layer: the name of the node its RoPE reads when that node must be copied first, kNoCopy when RoPE's input
    // survives it, "" before the layer's first RoPE node
    std::vector<std::string> rope_inputs_;
    static constexpr const char * kNoCopy = "(read at RoPE)";
    AttentionCheck check_layer0_;
    AttentionTotals totals_ = AttentionTotals::none;
    bool device_reductions_ = false;
    std::unique_ptr<DeviceCompute> device_;  // reductions of device-resident attention
    int32_t n_threads_ = 1;                  // host reductions' threads (the context's decode threads)
    std::vector<float> cell_totals_;
    double observe_seconds_ = 0.0;
    std::vector<uint8_t> sliding_;           // per layer: 1 = sliding-window layer
    std::vector<uint8_t> observed_;          // per layer: 1 = observed; empty = all
    const Pos * cell_pos_ = nullptr;         // the batch being decoded: base cache
    std::vector<Pos> token_pos_;
    std::vector<int32_t> token_cell_;
    const Pos * swa_cell_pos_ = nullptr;     // ... and SWA cache (iSWA models)
    std::vector<int32_t> swa_token_cell_;
    bool checked_[2] = {false, false};       // this batch's first layer of each kind (global, sliding) was checked
    const ggml_tensor * mask_[2] = {nullptr, nullptr};  // the KQ mask each kind's layers used in this batch
    int32_t mask_layer_[2] = {-1, -1};
    std::string error_;                      // set inside the callback; the adapter's decode() throws it
};

}  // namespace pm
