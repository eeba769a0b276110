#include "namm_tap.h"

#include "../errors.h"

#include <algorithm>
#include <cmath>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace pm::namm {

FeatureTap::FeatureTap(const FeatureTapParams & params)
    : params_(params), tables_(StftTables::make(params.ema_coefficient)), compute_(params.n_threads) {
    if (params_.n_layer < 1 || params_.n_head_kv < 1 || params_.n_head % params_.n_head_kv != 0 ||
        params_.n_cells < 1) {
        fail(ErrorKind::invalid_argument, "NAMM feature tap: bad layer/head/cell counts");
    }
    ema_keep_.assign(size_t(params_.n_cells), 1.0f);
}

FeatureTap::~FeatureTap() {
    if (state_buffer_) ggml_backend_buffer_free(state_buffer_);
    if (state_ctx_) ggml_free(state_ctx_);
}

void FeatureTap::allocate_state(const ggml_tensor * probs) {
    compute_.bind(probs, "the attention of a layer");
    const int64_t L = params_.n_layer, C = params_.n_cells, H = params_.n_head_kv;
    state_ctx_ = ggml_init(ggml_init_params{size_t(2 * L + 1) * ggml_tensor_overhead(), nullptr, /*no_alloc=*/true});
    if (!state_ctx_) fail(ErrorKind::runtime, "could not create the NAMM state context");
    for (int64_t l = 0; l < L; ++l) {
        frames_.push_back(ggml_new_tensor_3d(state_ctx_, GGML_TYPE_F32, C, kFft, H));
        ema_.push_back(ggml_new_tensor_3d(state_ctx_, GGML_TYPE_F32, C, kBins, H));
    }
    dft_ = ggml_new_tensor_2d(state_ctx_, GGML_TYPE_F32, 2 * kBins, kFft);
    state_buffer_ = ggml_backend_alloc_ctx_tensors(state_ctx_, compute_.backend());
    if (!state_buffer_) {
        const int64_t mib = ((kFft + kBins) * C * H * L * int64_t(sizeof(float))) >> 20;
        fail(ErrorKind::runtime, "could not allocate " + std::to_string(mib) + " MiB of NAMM state on " +
                                     compute_.name() + " (a smaller cache needs less)");
    }
    clear_device_state();
    if (!pending_cells_.empty()) transfer_cells(pending_cells_, nullptr, pending_values_.data());
    pending_cells_.clear();
    pending_values_.clear();
}

void FeatureTap::reset() {
    std::fill(ema_keep_.begin(), ema_keep_.end(), 1.0f);
    batch_begin_ = -1;
    batch_folds_ = false;
    pending_cells_.clear();
    pending_values_.clear();
    if (state_buffer_) clear_device_state();
}

void FeatureTap::clear_device_state() {
    ggml_backend_buffer_clear(state_buffer_, 0);
    // |(1 - a)·DFT(x)| = (1 - a)·|DFT(x)|: the EMA's weight goes into the matrix.
    std::vector<float> dft(size_t(2 * kBins * kFft));
    const float weight = 1.0f - tables_.a;
    for (int32_t t = 0; t < kFft; ++t) {  // [32][34]: row t holds sample t's weight in every bin
        for (int32_t f = 0; f < kBins; ++f) {
            dft[size_t(t * 2 * kBins + f)] = weight * tables_.cos_w[f][t];
            dft[size_t(t * 2 * kBins + kBins + f)] = weight * tables_.sin_w[f][t];
        }
    }
    ggml_backend_tensor_set(dft_, dft.data(), 0, dft.size() * sizeof(float));
}

void FeatureTap::observe(const TapBatch & b, std::vector<float> * captured_rows) {
    const ggml_tensor * P = b.probs;
    if (P->type != GGML_TYPE_F32 || !ggml_is_contiguous(P)) {
        fail(ErrorKind::runtime, "NAMM tap: the attention tensor is not contiguous f32");
    }
    const int64_t n_kv = P->ne[0], n = b.n_tokens, C = params_.n_cells, H = params_.n_head_kv;
    const int64_t group = params_.n_head / H;
    if (P->ne[2] != params_.n_head || n_kv > C || P->ne[1] < n || n < 1 || b.layer < 0 ||
        b.layer >= params_.n_layer) {
        fail(ErrorKind::runtime, "NAMM tap: attention of layer " + std::to_string(b.layer) + " has shape [" +
                                     std::to_string(n_kv) + ", " + std::to_string(P->ne[1]) + ", " +
                                     std::to_string(P->ne[2]) + "], which does not fit the model");
    }
    if (!state_buffer_) allocate_state(P);
    compute_.bind(P, "the attention of a layer");

    const int64_t filled = b.stream_begin % kHop;  // slots of the current frame that earlier batches filled
    const int64_t n_folds = (filled + n) / kHop;
    if (b.stream_begin != batch_begin_) {  // the batch's first layer: E of its new cells is stale until a fold
        if (batch_folds_) std::fill(ema_keep_.begin(), ema_keep_.end(), 1.0f);  // the previous batch folded them
        for (int32_t t = 0; t < n; ++t) ema_keep_[size_t(b.token_cells[t])] = 0.0f;
        batch_begin_ = b.stream_begin;
        batch_folds_ = n_folds > 0;
    }

    if (n_folds == 0 && b.host_probs != nullptr && captured_rows == nullptr &&
        ggml_backend_buffer_is_host(state_buffer_)) {
        copy_rows_on_host(b, n_kv, filled);
        return;
    }

    // The cells that receive this batch's tokens, as runs of consecutive cells (llama.cpp fills free cells in
    // order, so a batch is usually one run): their frames start empty.
    std::vector<int32_t> new_cells(b.token_cells, b.token_cells + n);
    std::sort(new_cells.begin(), new_cells.end());
    std::vector<std::pair<int64_t, int64_t>> runs;  // [first, end)
    for (int32_t c : new_cells) {
        if (!runs.empty() && runs.back().second == c) ++runs.back().second;
        else runs.emplace_back(c, c + 1);
    }
    int64_t longest_run = 0;
    for (const auto & r : runs) longest_run = std::max(longest_run, r.second - r.first);

    Graph g(size_t(32 + 2 * group + 3 * runs.size() + 20 * (n_folds + 1)));  // ~16 tensors per fold, views included
    ggml_context * ctx = g.ctx();
    ggml_tensor * probs = g.external(P);  // [n_kv, rows, n_head]
    // GQA: query heads g·group .. g·group + group - 1 read KV head g; the policy sees their mean (spec §1.1).
    ggml_tensor * A = nullptr;
    for (int64_t j = 0; j < group; ++j) {
        ggml_tensor * member = ggml_view_3d(ctx, probs, n_kv, n, H, probs->nb[1], probs->nb[2] * group,
                                            size_t(j) * probs->nb[2]);                          // [n_kv, n, H]
        A = A ? ggml_add(ctx, A, member) : member;
    }
    A = group == 1 ? ggml_cont(ctx, A) : ggml_scale(ctx, A, 1.0f / float(group));                // [n_kv, n, H]
    if (captured_rows) g.output(A);

    ggml_tensor * frames = frames_[size_t(b.layer)];                                               // [C, 32, H]
    // Samples [first, first + count) of the cells in use, [n_kv, count, H]: one contiguous row per sample.
    auto samples = [&](int64_t count, int64_t first) {
        return ggml_view_3d(ctx, frames, n_kv, count, H, frames->nb[1], frames->nb[2], size_t(first) * frames->nb[1]);
    };
    // E of the cells in use, [n_kv, 17, H].
    auto ema_of_cells = [&](ggml_tensor * e) {
        return ggml_view_3d(ctx, e, n_kv, kBins, H, e->nb[1], e->nb[2], 0);
    };
    // Nodes run in the order they are added, so each write lands after everything added before it has read.
    auto write = [&](ggml_tensor * src, ggml_tensor * dst) { g.output(ggml_cpy(ctx, src, dst)); };
    ggml_tensor * zeros = g.input(longest_run, kFft, H);
    for (const auto & [first, end] : runs) {
        write(ggml_view_3d(ctx, zeros, end - first, kFft, H, zeros->nb[1], zeros->nb[2], 0),
              ggml_view_3d(ctx, frames, end - first, kFft, H, frames->nb[1], frames->nb[2], size_t(first) * sizeof(float)));
    }
    ggml_tensor * ema_decay = nullptr, * ema_decay_all = nullptr, * dft = nullptr;
    for (int64_t r0 = 0; r0 < n;) {
        const int64_t slot = (filled + r0) % kHop, count = std::min(kHop - slot, n - r0);
        write(ggml_view_3d(ctx, A, n_kv, count, H, A->nb[1], A->nb[2], size_t(r0) * A->nb[1]),   // [n_kv, count, H]
              samples(count, kHop + slot));
        r0 += count;
        if (slot + count < kHop) break;  // the frame is not complete yet
        // A frame completed: E <- a·E + (1 - a)·|DFT(hann ⊙ frame)| (spec §2.2-2.3), then slide the frame by 16.
        // S[c, f] = Σ_t frame[c, t]·DFT[t, f] for all cells at once: an outer-product sum over the 32 samples,
        // which reads the frames in their cells-fastest layout (measured 2x faster than transposing for a GEMM).
        if (!dft) dft = ggml_repeat(ctx, dft_, ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 2 * kBins, kFft, H));
        ggml_tensor * spectra = ggml_sqr(ctx, ggml_out_prod(ctx, samples(kFft, 0), dft));        // [n_kv, 34, H]
        ggml_tensor * re2 = ggml_view_3d(ctx, spectra, n_kv, kBins, H, spectra->nb[1], spectra->nb[2], 0);
        ggml_tensor * im2 = ggml_view_3d(ctx, spectra, n_kv, kBins, H, spectra->nb[1], spectra->nb[2],
                                         kBins * spectra->nb[1]);
        ggml_tensor * magnitude = ggml_sqrt(ctx, ggml_add(ctx, re2, im2));                         // [n_kv, 17, H]
        // a·E + (1 - a)·S, with the DFT matrix pre-scaled by 1 - a and `decay` = a, or 0 for the E of evicted
        // occupants (first fold of the batch; later ones decay every cell).
        ggml_tensor *& decay = ema_decay ? ema_decay_all : ema_decay;
        if (!decay) decay = g.input(n_kv, 1, 1);
        write(ggml_add(ctx, ggml_mul(ctx, ema_of_cells(ema_[size_t(b.layer)]), decay), magnitude),
              ema_of_cells(ema_[size_t(b.layer)]));
        write(samples(kHop, kHop), samples(kHop, 0));
    }
    compute_.allocate(g);
    ggml_backend_tensor_memset(zeros, 0, 0, ggml_nbytes(zeros));
    if (ema_decay) {
        std::vector<float> decay(size_t(n_kv), tables_.a);
        if (ema_decay_all) ggml_backend_tensor_set(ema_decay_all, decay.data(), 0, decay.size() * sizeof(float));
        for (int64_t c = 0; c < n_kv; ++c) decay[size_t(c)] *= ema_keep_[size_t(c)];
        ggml_backend_tensor_set(ema_decay, decay.data(), 0, decay.size() * sizeof(float));
    }
    // A batch that completes no frame only moves rows: one thread is faster than waking the others.
    compute_.set_active_threads(n_folds == 0 && n <= kHop ? 1 : 0);
    compute_.compute(g);
    if (captured_rows) {
        captured_rows->resize(size_t(H * n * n_kv));
        ggml_backend_tensor_get(A, captured_rows->data(), 0, captured_rows->size() * sizeof(float));
    }
}

void FeatureTap::copy_rows_on_host(const TapBatch & b, int64_t n_kv, int64_t filled) {
    // The graph's computation, element for element: zero the new cells' frames, then write each row's GQA mean
    // (the group's heads summed in order, times 1 / group) into sample 16 + slot.
    const int64_t C = params_.n_cells, H = params_.n_head_kv, group = params_.n_head / H, n = b.n_tokens;
    float * frames = static_cast<float *>(frames_[size_t(b.layer)]->data);  // [H][32][C]
    for (int64_t t = 0; t < n; ++t) {
        const int64_t c = b.token_cells[t];
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t s = 0; s < kFft; ++s) frames[(h * kFft + s) * C + c] = 0.0f;
        }
    }
    const float inv_group = 1.0f / float(group);
    for (int64_t r = 0; r < n; ++r) {
        for (int64_t h = 0; h < H; ++h) {
            float * dst = frames + (h * kFft + kHop + filled + r) * C;
            const float * first = b.host_probs + size_t(h * group) * b.head_stride + size_t(r * n_kv);
            std::copy_n(first, n_kv, dst);
            for (int64_t j = 1; j < group; ++j) {
                const float * member = b.host_probs + size_t(h * group + j) * b.head_stride + size_t(r * n_kv);
                for (int64_t c = 0; c < n_kv; ++c) dst[c] += member[c];
            }
            if (group > 1) {
                for (int64_t c = 0; c < n_kv; ++c) dst[c] *= inv_group;
            }
        }
    }
}

std::vector<float> FeatureTap::ema(int32_t layer, const std::vector<int32_t> & cells) {
    const int64_t C = params_.n_cells, H = params_.n_head_kv, n = int64_t(cells.size());
    std::vector<float> out(size_t(H * n * kBins), 0.0f);  // [H][n][17]
    if (!state_buffer_ || n == 0) return out;  // nothing observed yet: every EMA is zero
    ema_host_.resize(size_t(C * kBins * H));   // [H][17][C]
    ggml_backend_tensor_get(ema_[size_t(layer)], ema_host_.data(), 0, ema_host_.size() * sizeof(float));
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t f = 0; f < kBins; ++f) {
            const float * src = ema_host_.data() + size_t((h * kBins + f) * C);
            for (int64_t i = 0; i < n; ++i) out[size_t((h * n + i) * kBins + f)] = src[cells[size_t(i)]];
        }
    }
    return out;
}

std::vector<float> FeatureTap::save_cells(const std::vector<int32_t> & cells) const {
    const int64_t L = params_.n_layer, C = params_.n_cells, H = params_.n_head_kv, n = int64_t(cells.size());
    std::vector<float> out(size_t(L * n * H * kSavedPerHead), 0.0f);
    for (int32_t c : cells) {
        if (c < 0 || c >= C) fail(ErrorKind::invalid_argument, "NAMM state: no cell " + std::to_string(c));
    }
    if (!state_buffer_) {  // nothing observed since the reset: zeros, or what load_cells() left pending
        for (size_t j = 0; j < pending_cells_.size(); ++j) {
            const auto it = std::find(cells.begin(), cells.end(), pending_cells_[j]);
            if (it == cells.end()) continue;
            const int64_t i = it - cells.begin();
            for (int64_t l = 0; l < L; ++l) {
                std::copy_n(pending_values_.data() + size_t(((l * int64_t(pending_cells_.size()) + int64_t(j)) * H) *
                                                             kSavedPerHead),
                            H * kSavedPerHead, out.data() + size_t(((l * n + i) * H) * kSavedPerHead));
            }
        }
        return out;
    }
    transfer_cells(cells, out.data(), nullptr);
    return out;
}

void FeatureTap::load_cells(const std::vector<int32_t> & cells, const std::vector<float> & values) {
    const int64_t L = params_.n_layer, H = params_.n_head_kv, n = int64_t(cells.size());
    if (int64_t(values.size()) != L * n * H * kSavedPerHead) {
        fail(ErrorKind::invalid_argument, "the saved NAMM features hold " + std::to_string(values.size()) +
                                              " values, not " + std::to_string(L * n * H * kSavedPerHead) +
                                              " (damaged session file)");
    }
    for (size_t i = 0; i < values.size(); ++i) {
        if (!std::isfinite(values[i])) fail(ErrorKind::invalid_argument, "the saved NAMM features are not finite");
    }
    for (int32_t c : cells) {
        if (c < 0 || c >= params_.n_cells) fail(ErrorKind::invalid_argument, "NAMM state: no cell " + std::to_string(c));
    }
    if (!state_buffer_) {
        pending_cells_ = cells;
        pending_values_ = values;
        return;
    }
    transfer_cells(cells, nullptr, values.data());
}

void FeatureTap::transfer_cells(const std::vector<int32_t> & cells, float * to_saved, const float * from_saved) const {
    const int64_t L = params_.n_layer, C = params_.n_cells, H = params_.n_head_kv, n = int64_t(cells.size());
    std::vector<float> frames(size_t(C * kFft * H)), ema(size_t(C * kBins * H));  // [H][32][C], [H][17][C]
    for (int64_t l = 0; l < L; ++l) {
        ggml_backend_tensor_get(frames_[size_t(l)], frames.data(), 0, frames.size() * sizeof(float));
        ggml_backend_tensor_get(ema_[size_t(l)], ema.data(), 0, ema.size() * sizeof(float));
        for (int64_t i = 0; i < n; ++i) {
            const int64_t c = cells[size_t(i)];
            const bool stale = !batch_folds_ && ema_keep_[size_t(c)] == 0.0f;
            for (int64_t h = 0; h < H; ++h) {
                const size_t at = size_t(((l * n + i) * H + h) * kSavedPerHead);
                for (int64_t t = 0; t < kFft; ++t) {
                    float & sample = frames[size_t((h * kFft + t) * C + c)];
                    if (to_saved) to_saved[at + size_t(t)] = sample;
                    else sample = from_saved[at + size_t(t)];
                }
                for (int64_t f = 0; f < kBins; ++f) {
                    float & bin = ema[size_t((h * kBins + f) * C + c)];
                    if (to_saved) to_saved[at + size_t(kFft + f)] = stale ? 0.0f : bin;
                    else bin = from_saved[at + size_t(kFft + f)];
                }
            }
        }
        if (from_saved) {
            ggml_backend_tensor_set(frames_[size_t(l)], frames.data(), 0, frames.size() * sizeof(float));
            ggml_backend_tensor_set(ema_[size_t(l)], ema.data(), 0, ema.size() * sizeof(float));
        }
    }
}

}  // namespace pm::namm
