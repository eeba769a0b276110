// Which KV cell holds which position: a mirror of llama.cpp's private cell allocator.
//
// llama.cpp does not say where it puts a token in its KV cache, but the attention the tap observes has one column
// per *cell*, so attention-scored policies need the cell of every cached token. This class replays the allocator of
// the pinned llama.cpp (src/llama-kv-cache.cpp, llama_kv_cache, single stream):
//   place()  = find_slot + apply_ubatch   (a decoded batch, or a restored session's cells)
//   remove() = seq_rm                      shift() = seq_add           clear() = clear
// An iSWA model (Gemma 2/3) has two such caches (llama-kv-cache-iswa.cpp): a base cache for the global layers and
// an SWA cache for the sliding-window layers; every memory operation goes to both. With n_swa > 0 this class is the
// SWA cache: find_slot may reuse a cell whose token the window has left (pos <= max pos + 1 - n_swa), and
// apply_ubatch then purges every older position too, so its cells diverge from the base cache's.
// It is upstream-fragile by nature, so it checks itself: check() compares a batch's layer-0 attention with what the
// mirror predicts, and the adapter stops decoding on any mismatch instead of letting a policy evict wrong tokens.
//
// Pure C++ (no llama.cpp or ggml calls); only llama_adapter.cpp drives it, one call per llama.cpp memory operation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pm {

using Pos = int32_t;
struct AttentionView;  // attention_tap.h

class KvCellMirror {
public:
    // A cache of n_cells empty cells (llama_n_ctx after padding); n_swa > 0: the SWA cache of an iSWA model, whose
    // layers see a token at position p from position q only while q - p < n_swa (llama.cpp's standard SWA).
    void reset(uint32_t n_cells, int32_t n_swa = 0);
    int32_t n_swa() const { return n_swa_; }

    // Position held by each cell, -1 if empty.
    const std::vector<Pos> & positions() const { return pos_; }
    uint32_t size() const { return uint32_t(pos_.size()); }

    // Places n tokens (positions[i] of one ubatch) as find_slot + apply_ubatch do; returns the cell of each, or an
    // empty vector (and changes nothing) if there is no room.
    std::vector<int32_t> place(const Pos * positions, int32_t n);
    void remove(Pos p0, Pos p1);             // seq_rm: empties cells holding [p0, p1); negative bounds are open
    void shift(Pos p0, Pos p1, Pos delta);   // seq_add: positions in [p0, p1) += delta; cells that go negative empty
    void clear();
    // What a saved session holds of this cache, in cell order: every held position, except (SWA cache) those the
    // next position no longer sees, which llama.cpp leaves out of a restore (measured on Gemma-3, tests/test_iswa.py).
    std::vector<Pos> saved_positions() const;

    // Checks one batch's attention of a layer of this cache (the view's cell_pos, token_pos and token_cell come from
    // this mirror and the batch) against the mirror: a token attends to the cell it was placed in and to no empty
    // cell, no cell holding a later position and, in an SWA cache, no cell whose position left its window. Exact
    // (every row) when the matrix is in host memory (view.probs), otherwise from view.cell_totals summed over all
    // rows. Returns "" or the error to stop decoding with (what diverged).
    std::string check(const AttentionView & layer0) const;

private:
    uint32_t used_max_p1() const;  // one past the last non-empty cell
    bool visible(Pos cell, Pos query) const;  // the KQ mask: a cell holding `cell` is seen from position `query`
    std::string check_rows(const AttentionView & v) const;
    std::string check_totals(const AttentionView & v) const;

    std::vector<Pos> pos_;
    uint32_t head_ = 0;  // where find_slot starts looking
    uint32_t used_ = 0;  // non-empty cells
    int32_t n_swa_ = 0;  // 0: no sliding window
};

}  // namespace pm
