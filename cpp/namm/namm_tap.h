// NAMM token features computed while the model decodes (namm-spec.md §2.1-2.3, §8.1), on the device where
// llama.cpp computed the attention.
//
// Per layer, in one backend buffer (C = KV cells, H = KV heads):
//     frames [C, 32, H]   per (cell, head) the STFT frame being assembled: samples 0-15 are the previous frame's
//                         last 16 attention values, 16-31 the current frame's as its queries arrive; cells
//                         fastest, so that a query's row is one contiguous write
//     ema    [C, 17, H]   the un-normalised spectrogram EMA E (spec §2.3), cells fastest, as the DFT's output
// Only the n_kv cells llama.cpp attends over (the used ones and a few empty) are computed.
// Each batch's post-softmax attention (llama.cpp's kq_soft_max, [n_kv, rows, n_head]) is averaged over each GQA
// group (spec §1.1) and folded in with the streaming form of §2.3 by one ggml graph per layer:
//     every 16 stream tokens:  E <- a·E + (1 - a)·|rfft(hann ⊙ frame)|,  frame[0:16] <- frame[16:32],  a = 0.99^16
// so no attention matrix ever leaves the device; invocations read only E.
//
// Cells are not tokens: a cell that receives a new token forgets its previous occupant. Its frame is zeroed before
// the token's first attention row is written, and its E is masked to zero at the next fold; that is the original's
// E = 0, history = 0 for new tokens (attention from queries older than the token is exactly zero, by causality).
#pragma once

#include "../ggml_compute.h"
#include "spectrogram.h"

#include <cstdint>
#include <memory>
#include <vector>

struct ggml_backend_buffer;
struct ggml_context;

namespace pm::namm {

struct FeatureTapParams {
    int32_t n_layer = 0;
    int32_t n_head = 0;      // query heads
    int32_t n_head_kv = 0;   // KV heads (H)
    int32_t n_cells = 0;     // KV cells of the context
    int32_t n_threads = 0;   // CPU backend threads (<= 0: all)
    double ema_coefficient = 0.99;
};

// One layer's attention for one batch, as the engine's tap delivers it.
struct TapBatch {
    int32_t layer = 0;
    const ggml_tensor * probs = nullptr;   // [n_kv, >= n_tokens, n_head] f32, contiguous (llama.cpp's tensor)
    int32_t n_tokens = 0;                  // real rows (the tensor may be padded)
    int64_t stream_begin = 0;              // stream index of the first row
    const int32_t * token_cells = nullptr; // [n_tokens] cell of each new token
    // The same attention when it is in host memory (nullptr otherwise): a batch that completes no STFT frame (15 of
    // 16 decode steps) then only copies rows, done by a host loop instead of a graph.
    const float * host_probs = nullptr;
    size_t head_stride = 0;                // floats between heads in host_probs
};

class FeatureTap {
public:
    explicit FeatureTap(const FeatureTapParams & params);
    ~FeatureTap();
    FeatureTap(const FeatureTap &) = delete;
    FeatureTap & operator=(const FeatureTap &) = delete;

    void reset();  // new sequence: all state zero
    // Folds one layer's rows into its state. With `captured_rows`, also returns the GQA-averaged rows of this batch,
    // [H][n_tokens][n_kv] (for fidelity tests).
    void observe(const TapBatch & batch, std::vector<float> * captured_rows = nullptr);
    // EMA [H][n][17] of the given cells, in the given order. Exact right after a fold, i.e. whenever the stream
    // length is a multiple of 16 (NAMM invocations always are).
    std::vector<float> ema(int32_t layer, const std::vector<int32_t> & cells);

    // Sessions (NammPolicy::save_state): per layer, the frame (32 samples) and E (17 bins) of each given cell for every
    // KV head, [layer][i][H][32 + 17] in the order of `cells`. The E of a token whose batch has not folded yet still
    // belongs to its cell's previous occupant and is saved as 0, the token's own E. Exact between batches.
    std::vector<float> save_cells(const std::vector<int32_t> & cells) const;
    // The reverse, into a tap just reset: cell cells[i] gets token i's values (applied at the first observe when
    // the state lives on a device not bound yet). Throws invalid_argument when the sizes do not fit.
    void load_cells(const std::vector<int32_t> & cells, const std::vector<float> & values);
    static constexpr int32_t kSavedPerHead = kFft + kBins;

    std::string device() const { return compute_.name(); }
    void set_threads(int32_t n_threads) { compute_.set_threads(n_threads); }

private:
    void allocate_state(const ggml_tensor * probs);
    void clear_device_state();
    // observe() for a batch that completes no frame, on host memory: new cells' frames zeroed, rows copied in.
    void copy_rows_on_host(const TapBatch & b, int64_t n_kv, int64_t filled);
    // Moves the given cells' frames and E between the state and the saved layout of save_cells(): into `to_saved`
    // (E of tokens whose batch has not folded as 0), or from `from_saved` into the state.
    void transfer_cells(const std::vector<int32_t> & cells, float * to_saved, const float * from_saved) const;

    FeatureTapParams params_;
    StftTables tables_;
    DeviceCompute compute_;
    ggml_context * state_ctx_ = nullptr;
    ggml_backend_buffer * state_buffer_ = nullptr;
    std::vector<ggml_tensor *> frames_, ema_;  // per layer, see above
    ggml_tensor * dft_ = nullptr;              // [34, 32] (1 - a)·Hann-windowed DFT: bins 0-16 cos, 17-33 sin

    int64_t batch_begin_ = -1;                 // stream index of the batch being observed
    bool batch_folds_ = false;                 // whether it completes a frame
    std::vector<float> ema_keep_;              // [C] 0 for cells whose E belongs to an evicted occupant, else 1
    std::vector<float> ema_host_;              // staging for ema()
    std::vector<int32_t> pending_cells_;       // load_cells() before the state was allocated
    std::vector<float> pending_values_;
};

}  // namespace pm::namm
