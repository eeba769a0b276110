#include "namm_state.h"

#include "../errors.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>

namespace pm::namm {
namespace {

void check_values(const float * values, size_t count, const char * what) {
    for (size_t i = 0; i < count; ++i) {
        if (!std::isfinite(values[i])) fail(ErrorKind::invalid_argument, std::string(what) + " contains NaN or infinity");
        if (values[i] < 0.0f) {
            fail(ErrorKind::invalid_argument, std::string(what) + " contains negative values (attention "
                                                                  "probabilities and their spectra are >= 0)");
        }
    }
}

int64_t newest_position(const LayerState & state) {
    int64_t newest = std::numeric_limits<int64_t>::min();
    for (int32_t h = 0; h < state.n_heads && state.n_tokens > 0; ++h) {
        newest = std::max<int64_t>(newest, state.positions[size_t(h) * state.n_tokens + size_t(state.n_tokens - 1)]);
    }
    return newest;
}

std::string position_text(int64_t position) {
    return position == std::numeric_limits<int64_t>::min() ? std::string("none") : std::to_string(position);
}

// history[h][k][r] <- rows[h][n_rows - 16 + r][k]: the last 16 attention values each token received.
void keep_last_rows(LayerState & state, const float * rows, int32_t n_rows) {
    const size_t n = size_t(state.n_tokens);
    for (int32_t h = 0; h < state.n_heads; ++h) {
        for (int32_t r = 0; r < kHop; ++r) {
            const float * row = rows + (size_t(h) * size_t(n_rows) + size_t(n_rows - kHop + r)) * n;
            float * dst = state.history.data() + size_t(h) * n * kHop + size_t(r);
            for (size_t k = 0; k < n; ++k) dst[k * kHop] = row[k];
        }
    }
}

}  // namespace

LayerState::LayerState(int32_t heads) {
    if (heads < 1) fail(ErrorKind::invalid_argument, "a NAMM state needs n_kv_heads >= 1 (got " + std::to_string(heads) + ")");
    n_heads = heads;
}

LayerState::LayerState(int32_t heads, int32_t tokens, std::vector<int32_t> pos, std::vector<float> ema_values,
                       std::vector<float> history_values)
    : LayerState(heads) {
    if (tokens < 0 || pos.size() != size_t(heads) * size_t(tokens) || ema_values.size() != pos.size() * kBins ||
        history_values.size() != pos.size() * kHop) {
        fail(ErrorKind::invalid_argument, "a NAMM state needs positions [heads, tokens], ema [heads, tokens, 17] and "
                                          "history [heads, tokens, 16] of matching sizes");
    }
    for (int32_t h = 0; h < heads; ++h) {
        for (int32_t i = 1; i < tokens; ++i) {
            if (pos[size_t(h) * tokens + size_t(i)] <= pos[size_t(h) * tokens + size_t(i - 1)]) {
                fail(ErrorKind::invalid_argument, "state positions must increase strictly within each head "
                                                  "(tokens are kept in chronological order)");
            }
        }
    }
    check_values(ema_values.data(), ema_values.size(), "the state's EMA");
    check_values(history_values.data(), history_values.size(), "the state's history");
    n_tokens = tokens;
    positions = std::move(pos);
    ema = std::move(ema_values);
    history = std::move(history_values);
}

void LayerState::append(const int32_t * new_positions, int32_t count) {
    if (count < 0) fail(ErrorKind::invalid_argument, "cannot append a negative number of tokens");
    int64_t previous = newest_position(*this);
    for (int32_t i = 0; i < count; ++i) {
        if (new_positions[i] <= previous) {
            fail(ErrorKind::invalid_argument, "new positions must increase strictly and follow the newest retained "
                                              "position (position " + std::to_string(new_positions[i]) + " after " +
                                              position_text(previous) + ")");
        }
        previous = new_positions[i];
    }
    const size_t n_old = size_t(n_tokens), n = n_old + size_t(count);
    std::vector<int32_t> pos(size_t(n_heads) * n);
    std::vector<float> e(size_t(n_heads) * n * kBins, 0.0f), hist(size_t(n_heads) * n * kHop, 0.0f);
    for (int32_t h = 0; h < n_heads; ++h) {
        std::copy_n(positions.data() + size_t(h) * n_old, n_old, pos.data() + size_t(h) * n);
        std::copy_n(new_positions, count, pos.data() + size_t(h) * n + n_old);
        std::copy_n(ema.data() + size_t(h) * n_old * kBins, n_old * kBins, e.data() + size_t(h) * n * kBins);
        std::copy_n(history.data() + size_t(h) * n_old * kHop, n_old * kHop, hist.data() + size_t(h) * n * kHop);
    }
    n_tokens = int32_t(n);
    positions = std::move(pos);
    ema = std::move(e);
    history = std::move(hist);
}

void LayerState::gather(const std::vector<int64_t> & keep, int32_t k) {
    if (k < 0 || keep.size() != size_t(n_heads) * size_t(k)) {
        fail(ErrorKind::invalid_argument, "keep must hold K token indices for each of the " + std::to_string(n_heads) +
                                              " heads");
    }
    for (int32_t h = 0; h < n_heads; ++h) {
        for (int32_t j = 0; j < k; ++j) {
            const int64_t i = keep[size_t(h) * k + size_t(j)];
            const int64_t before = j > 0 ? keep[size_t(h) * k + size_t(j - 1)] : -1;
            if (i < 0 || i >= n_tokens || i <= before) {
                fail(ErrorKind::invalid_argument, "keep indices must increase strictly within each head and lie in "
                                                  "[0, " + std::to_string(n_tokens) + ")");
            }
        }
    }
    std::vector<int32_t> pos(size_t(n_heads) * k);
    std::vector<float> e(size_t(n_heads) * k * kBins), hist(size_t(n_heads) * k * kHop);
    for (int32_t h = 0; h < n_heads; ++h) {
        for (int32_t j = 0; j < k; ++j) {
            const size_t src = size_t(h) * n_tokens + size_t(keep[size_t(h) * k + size_t(j)]), dst = size_t(h) * k + j;
            pos[dst] = positions[src];
            std::copy_n(ema.data() + src * kBins, kBins, e.data() + dst * kBins);
            std::copy_n(history.data() + src * kHop, kHop, hist.data() + dst * kHop);
        }
    }
    n_tokens = k;
    positions = std::move(pos);
    ema = std::move(e);
    history = std::move(hist);
}

void fold_frame(const NammModel & model, LayerState & state, const float * rows16, ScorerTimings * timings) {
    check_values(rows16, size_t(state.n_heads) * kHop * size_t(state.n_tokens), "attention");
    model.fold_frames(state.ema.data(), state.history.data(), state.n_heads, state.n_tokens, rows16, kHop,
                      state.n_tokens, timings);
    keep_last_rows(state, rows16, kHop);
}

void fold_window(const NammModel & model, LayerState & state, const float * attn, int32_t n_rows, int32_t n_new,
                 ScorerTimings * timings) {
    if (n_new < 0 || n_new > state.n_tokens) fail(ErrorKind::invalid_argument, "n_new exceeds the state's tokens");
    model.fold_frames(state.ema.data(), state.history.data(), state.n_heads, state.n_tokens, attn, n_rows,
                      state.n_tokens - n_new, timings);
    keep_last_rows(state, attn, n_rows);
}

void check_invocation(const LayerState & state, const float * attn, int32_t n_rows, const int64_t * new_pos) {
    if (n_rows <= 0 || n_rows % kHop != 0) {
        fail(ErrorKind::invalid_argument, "an invocation needs a positive multiple of 16 attention rows (got " +
                                              std::to_string(n_rows) + ")");
    }
    const size_t H = size_t(state.n_heads), n_old = size_t(state.n_tokens), n = n_old + size_t(n_rows);
    check_values(attn, H * size_t(n_rows) * n, "attn");
    for (size_t h = 0; h < H; ++h) {
        for (size_t t = 0; t < size_t(n_rows); ++t) {
            const float * row = attn + (h * size_t(n_rows) + t) * n;
            for (size_t later = n_old + t + 1; later < n; ++later) {
                if (row[later] != 0.0f) {
                    fail(ErrorKind::invalid_argument, "attn is not causal: new query " + std::to_string(t) +
                                                          " has weight on new key " + std::to_string(later - n_old) +
                                                          ", which did not exist yet");
                }
            }
        }
    }
    int64_t previous = newest_position(state);
    for (int32_t i = 0; i < n_rows; ++i) {
        if (new_pos[i] <= previous || new_pos[i] < 0 || new_pos[i] > std::numeric_limits<int32_t>::max()) {
            fail(ErrorKind::invalid_argument, "new_pos must increase strictly, start after the newest retained "
                                              "position and lie in [0, 2^31) (position " + std::to_string(new_pos[i]) +
                                              " after " + position_text(previous) + ")");
        }
        previous = new_pos[i];
    }
}

LayerState folded_invocation(const NammModel & model, const LayerState & state, const float * attn, int32_t n_rows,
                             const int64_t * new_pos, ScorerTimings * timings) {
    check_invocation(state, attn, n_rows, new_pos);
    const std::vector<int32_t> positions(new_pos, new_pos + n_rows);
    LayerState next = state;
    next.append(positions.data(), n_rows);
    fold_window(model, next, attn, n_rows, n_rows, timings);
    return next;
}

StepResult step(const NammModel & model, LayerState & state, const float * attn, int32_t n_rows,
                const int64_t * new_pos, ScorerTimings * timings) {
    LayerState next = folded_invocation(model, state, attn, n_rows, new_pos, timings);
    StepResult out;
    out.scored = model.score_layer(next, timings);
    const auto t0 = std::chrono::steady_clock::now();
    out.keep = keep_indices(out.scored, next.n_heads);
    next.gather(out.keep, out.scored.n_keep);
    state = std::move(next);
    if (timings) {
        timings->selection_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
    return out;
}

}  // namespace pm::namm
