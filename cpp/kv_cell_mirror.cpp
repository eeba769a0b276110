// The cell mirror: llama-kv-cache.cpp's slot allocation for one stream (a base or an SWA cache), replayed. See
// kv_cell_mirror.h.
#include "kv_cell_mirror.h"

#include "attention_tap.h"

#include <algorithm>
#include <limits>

namespace pm {

void KvCellMirror::reset(uint32_t n_cells, int32_t n_swa) {
    pos_.assign(n_cells, -1);
    head_ = 0;
    used_ = 0;
    n_swa_ = std::max(n_swa, 0);
}

bool KvCellMirror::visible(Pos cell, Pos query) const {
    return cell >= 0 && cell <= query && (n_swa_ == 0 || query - cell < n_swa_);
}

std::vector<Pos> KvCellMirror::saved_positions() const {
    Pos pos_max = -1;
    for (Pos p : pos_) pos_max = std::max(pos_max, p);
    std::vector<Pos> out;
    for (Pos p : pos_) {
        if (p >= 0 && (n_swa_ == 0 || (pos_max + 1) - p < n_swa_)) out.push_back(p);
    }
    return out;
}

std::vector<int32_t> KvCellMirror::place(const Pos * positions, int32_t n) {
    const uint32_t size = uint32_t(pos_.size());
    const uint32_t n_tokens = uint32_t(n);
    std::vector<int32_t> idxs;
    if (n_tokens > size) return idxs;
    uint32_t head_cur = head_;
    // find_slot: with many free cells before the head, start from the beginning to fill the cache.
    if (head_cur > used_ + 2 * n_tokens) head_cur = 0;
    // An SWA cache may also take a cell whose token the next position no longer sees (masked relative to the
    // sequence's largest position + 1).
    Pos pos_max = -1;
    if (n_swa_ > 0) {
        for (Pos p : pos_) pos_max = std::max(pos_max, p);
    }
    const auto usable = [&](uint32_t idx) {
        const Pos p = pos_[idx];
        return p < 0 || (n_swa_ > 0 && (pos_max + 1) - p >= n_swa_);
    };
    uint32_t n_tested = 0;
    while (true) {
        if (head_cur + 1 > size) {
            n_tested += size - head_cur;
            head_cur = 0;
            continue;
        }
        const uint32_t idx = head_cur++;
        ++n_tested;
        if (usable(idx)) idxs.push_back(int32_t(idx));
        if (idxs.size() == n_tokens) break;
        if (n_tested >= size) return {};
    }
    // apply_ubatch: overwrite, remembering the largest position overwritten (SWA cache only)
    Pos pos_max_rm = -1;
    for (uint32_t i = 0; i < n_tokens; ++i) {
        Pos & cell = pos_[size_t(idxs[i])];
        if (cell >= 0) {
            pos_max_rm = std::max(pos_max_rm, cell);
        } else {
            ++used_;
        }
        cell = positions[i];
    }
    // ... and purge every position up to it, so the sequence's cached positions stay one contiguous range.
    if (pos_max_rm >= 0) {
        Pos pos_min = std::numeric_limits<Pos>::max();
        for (Pos p : pos_) {
            if (p >= 0) pos_min = std::min(pos_min, p);
        }
        if (pos_min <= pos_max_rm) remove(pos_min, pos_max_rm + 1);
    }
    head_ = uint32_t(idxs.back()) + 1;
    return idxs;
}

void KvCellMirror::remove(Pos p0, Pos p1) {
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = std::numeric_limits<Pos>::max();
    const uint32_t size = uint32_t(pos_.size());
    uint32_t new_head = size;
    for (uint32_t i = 0; i < size; ++i) {
        if (pos_[i] < 0 || pos_[i] < p0 || pos_[i] >= p1) continue;
        pos_[i] = -1;
        --used_;
        if (new_head == size) new_head = i;
    }
    if (new_head != size && new_head < head_) head_ = new_head;
}

void KvCellMirror::shift(Pos p0, Pos p1, Pos delta) {
    if (delta == 0) return;
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = std::numeric_limits<Pos>::max();
    if (p0 == p1) return;
    const uint32_t size = uint32_t(pos_.size());
    uint32_t new_head = size;
    for (uint32_t i = 0; i < size; ++i) {
        if (pos_[i] < 0 || pos_[i] < p0 || pos_[i] >= p1) continue;
        pos_[i] += delta;
        if (pos_[i] < 0) {
            pos_[i] = -1;
            --used_;
            if (new_head == size) new_head = i;
        }
    }
    head_ = new_head != size ? new_head : 0;
}

void KvCellMirror::clear() {
    std::fill(pos_.begin(), pos_.end(), -1);
    head_ = 0;
    used_ = 0;
}

uint32_t KvCellMirror::used_max_p1() const {
    for (size_t i = pos_.size(); i > 0; --i) {
        if (pos_[i - 1] >= 0) return uint32_t(i);
    }
    return 0;
}

// ---- consistency checks against a batch's layer-0 attention ------------------------------------------------

std::string KvCellMirror::check(const AttentionView & layer0) const {
    const std::string problem = layer0.probs ? check_rows(layer0) : check_totals(layer0);
    if (problem.empty()) return problem;
    return "KV cell mirror out of sync with llama.cpp (" + problem +
           "); this llama.cpp version allocates cells differently from the one pymemory was written for";
}

std::string KvCellMirror::check_rows(const AttentionView & v) const {
    const uint32_t used_end = used_max_p1();
    if (uint32_t(v.n_kv) < used_end || size_t(v.n_kv) > pos_.size()) {
        return "attention covers " + std::to_string(v.n_kv) + " cells but the cell mirror expects at least " +
               std::to_string(used_end);
    }
    const size_t plane = v.head_stride;
    for (int32_t t = 0; t < v.n_tokens; ++t) {
        bool self_seen = false;
        for (int32_t c = 0; c < v.n_kv; ++c) {
            float total = 0.0f;
            for (int32_t h = 0; h < v.n_head; ++h) total += v.probs[size_t(h) * plane + size_t(t) * v.n_kv + c];
            const Pos p = v.cell_pos[c];
            if (!visible(p, v.token_pos[t]) && total != 0.0f) {
                return "cell " + std::to_string(c) + " receives attention from position " +
                       std::to_string(v.token_pos[t]) + " but the mirror says it holds " +
                       (p < 0 ? std::string("nothing") : "position " + std::to_string(p));
            }
            if (c == v.token_cell[t]) self_seen = total > 0.0f;
        }
        if (!self_seen) {
            return "the token at position " + std::to_string(v.token_pos[t]) + " does not attend to cell " +
                   std::to_string(v.token_cell[t]) + " where the mirror placed it";
        }
    }
    return "";
}

std::string KvCellMirror::check_totals(const AttentionView & v) const {
    // Without the rows: an empty cell must receive nothing, and every cell the batch was placed in must receive
    // something (each token attends to itself).
    const uint32_t used_end = used_max_p1();
    if (uint32_t(v.n_kv) < used_end || size_t(v.n_kv) > pos_.size()) {
        return "attention covers " + std::to_string(v.n_kv) + " cells but the cell mirror expects at least " +
               std::to_string(used_end);
    }
    // A cell no row of the batch may see: empty, after the last token, or (SWA) out of the first token's window
    // and therefore of every later one's.
    Pos first = std::numeric_limits<Pos>::max(), last = -1;
    for (int32_t t = 0; t < v.n_tokens; ++t) {
        first = std::min(first, v.token_pos[t]);
        last = std::max(last, v.token_pos[t]);
    }
    for (int32_t c = 0; c < v.n_kv; ++c) {
        const Pos p = v.cell_pos[c];
        const bool hidden = p < 0 || p > last || (n_swa_ > 0 && first - p >= n_swa_);
        if (hidden && v.cell_totals[c] != 0.0f) {
            return "cell " + std::to_string(c) + " receives attention but the mirror says it " +
                   (p < 0 ? std::string("is empty") : "holds position " + std::to_string(p) + ", hidden from the batch");
        }
    }
    for (int32_t t = 0; t < v.n_tokens; ++t) {
        if (!(v.cell_totals[v.token_cell[t]] > 0.0f)) {
            return "cell " + std::to_string(v.token_cell[t]) + ", where the mirror placed position " +
                   std::to_string(v.token_pos[t]) + ", receives no attention";
        }
    }
    return "";
}

}  // namespace pm
