// NAMM token features, part 1: the attention spectrogram folded into an EMA (namm-spec.md §2.1–2.3).
//
// Streaming form (§2.3): every 16 stream tokens (one STFT hop), for each cached token,
//     E <- a * E + (1 - a) * |rfft(hann32 * [H16 || x16])|,   H16 <- x16,   a = 0.99^16
// where x16 are the 16 attention values the token received from the last 16 queries and H16 the 16 before them.
// The spec shows this equals the original's per-invocation window formula (32 frames over [H16 || 512 rows] with
// the new-token frame mask): for a token that did not exist yet its attention is exactly 0, so its frames add 0.
// StftTables are the Hann-windowed DFT matrices that the ggml graphs multiply by (NammModel::fold_frames for the
// one-invocation API, FeatureTap for the engine).
#pragma once

#include <cstdint>

namespace pm::namm {

constexpr int32_t kFft = 32;      // n_fft
constexpr int32_t kHop = 16;      // hop_length = n_fft - (values carried between invocations)
constexpr int32_t kBins = 17;     // n_fft / 2 + 1 (DC and Nyquist included)
constexpr int32_t kRecency = 8;   // sin || cos of 4 frequencies
constexpr int32_t kFeatures = kRecency + kBins;  // 25: [recency || spectrum]
constexpr int32_t kFeaturesPadded = 32;          // q8_0/q4_0 blocks are 32 wide along the input dimension

// Hann-windowed DFT tables and the per-frame EMA factor.
struct StftTables {
    float cos_w[kBins][kFft];  // hann[n] * cos(2*pi*f*n/32)
    float sin_w[kBins][kFft];  // hann[n] * sin(2*pi*f*n/32)
    float a = 0.0f;            // ema_coefficient ^ hop
    static StftTables make(double ema_coefficient = 0.99);
};

}  // namespace pm::namm
