#include "namm_state.h"

#include "../errors.h"

#include <algorithm>
#include <cmath>

namespace pm::namm {

LayerInput fold_window(const NammModel & model, LayerState & st, const float * attn, int32_t n_rows,
                       const int32_t * new_pos) {
    if (st.n_heads <= 0) fail(ErrorKind::invalid_argument, "the NAMM state has no heads");
    if (n_rows <= 0 || n_rows % kHop != 0) {
        fail(ErrorKind::invalid_argument, "an invocation needs a positive multiple of 16 attention rows (got " +
                                              std::to_string(n_rows) + ")");
    }
    const int32_t H = st.n_heads, n_old = st.n_tokens, n = n_old + n_rows;
    for (int32_t i = 0; i < n_rows; ++i) {
        const int32_t previous = i > 0 ? new_pos[i - 1] : (n_old > 0 ? st.positions[size_t(n_old - 1)] : -1);
        if (new_pos[i] <= previous) {
            fail(ErrorKind::invalid_argument, "new positions must increase and follow the retained ones (position " +
                                                  std::to_string(new_pos[i]) + " after " + std::to_string(previous) + ")");
        }
    }
    for (size_t k = 0; k < size_t(H) * n_rows * size_t(n); ++k) {
        if (!std::isfinite(attn[k])) fail(ErrorKind::invalid_argument, "attention contains NaN or infinity");
    }
    // Append the new tokens: E = 0, history = 0 (spec §2.1, §2.3).
    LayerInput in;
    in.n_heads = H;
    in.n_tokens = n;
    in.positions.resize(size_t(H) * n);
    in.ema.assign(size_t(H) * n * kBins, 0.0f);
    std::vector<float> history(size_t(H) * n * kHop, 0.0f);
    for (int32_t h = 0; h < H; ++h) {
        for (int32_t i = 0; i < n_old; ++i) {
            const size_t src = size_t(h) * n_old + size_t(i), dst = size_t(h) * n + size_t(i);
            in.positions[dst] = st.positions[src];
            std::copy_n(st.ema.data() + src * kBins, kBins, in.ema.data() + dst * kBins);
            std::copy_n(st.history.data() + src * kHop, kHop, history.data() + dst * kHop);
        }
        for (int32_t i = 0; i < n_rows; ++i) in.positions[size_t(h) * n + size_t(n_old + i)] = new_pos[i];
    }
    // Fold the frames: rows 16j .. 16j+15 of every column.
    const StftTables & tables = model.stft();
    float rows[kHop];
    for (int32_t h = 0; h < H; ++h) {
        const float * head_attn = attn + size_t(h) * n_rows * size_t(n);
        for (int32_t frame = 0; frame < n_rows / kHop; ++frame) {
            for (int32_t i = 0; i < n; ++i) {
                for (int32_t r = 0; r < kHop; ++r) rows[r] = head_attn[size_t(frame * kHop + r) * n + size_t(i)];
                const size_t k = size_t(h) * n + size_t(i);
                fold_frame(tables, in.ema.data() + k * kBins, history.data() + k * kHop, rows);
            }
        }
    }
    st.n_tokens = n;
    st.positions = in.positions;
    st.ema = in.ema;
    st.history = std::move(history);
    return in;
}

StepResult step(const NammModel & model, LayerState & st, const float * attn, int32_t n_rows, const int32_t * new_pos) {
    LayerInput in = fold_window(model, st, attn, n_rows, new_pos);
    StepResult out;
    out.scored = model.score_layer(in);
    const int32_t H = st.n_heads, n = st.n_tokens, K = out.scored.n_keep;
    // Gather each head's retained tokens (chronological).
    LayerState kept(H);
    kept.n_tokens = K;
    kept.positions.resize(size_t(H) * K);
    kept.ema.resize(size_t(H) * K * kBins);
    kept.history.resize(size_t(H) * K * kHop);
    out.keep.resize(size_t(H) * K);
    for (int32_t h = 0; h < H; ++h) {
        int32_t j = 0;
        for (int32_t i = 0; i < n; ++i) {
            if (!out.scored.keep[size_t(h) * n + size_t(i)]) continue;
            const size_t src = size_t(h) * n + size_t(i), dst = size_t(h) * K + size_t(j);
            out.keep[dst] = i;
            kept.positions[dst] = st.positions[src];
            std::copy_n(st.ema.data() + src * kBins, kBins, kept.ema.data() + dst * kBins);
            std::copy_n(st.history.data() + src * kHop, kHop, kept.history.data() + dst * kHop);
            ++j;
        }
    }
    st = std::move(kept);
    return out;
}

}  // namespace pm::namm
