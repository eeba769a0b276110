#include "key_distinctiveness.h"

#include "errors.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace pm {

std::vector<double> key_distinctiveness(const std::vector<float> & keys, int32_t n_pairs, int32_t n_tokens,
                                        int32_t head_dim, int32_t first, int32_t last) {
    if (n_pairs < 1 || n_tokens < 0 || head_dim < 1 ||
        keys.size() != size_t(n_pairs) * size_t(n_tokens) * size_t(head_dim)) {
        fail(ErrorKind::invalid_argument, "keys must hold n_pairs x n_tokens x head_dim values (got " +
                                              std::to_string(keys.size()) + " for " + std::to_string(n_pairs) + " x " +
                                              std::to_string(n_tokens) + " x " + std::to_string(head_dim) + ")");
    }
    first = std::clamp(first, 0, n_tokens);
    last = std::clamp(last, first, n_tokens);
    std::vector<double> out(size_t(n_tokens), 0.0);
    if (last == first) return out;
    std::vector<double> anchor(static_cast<size_t>(head_dim));
    std::vector<double> inverse_norm(static_cast<size_t>(n_tokens));
    for (int32_t p = 0; p < n_pairs; ++p) {
        const float * pair = keys.data() + size_t(p) * size_t(n_tokens) * size_t(head_dim);
        std::fill(anchor.begin(), anchor.end(), 0.0);
        for (int32_t i = first; i < last; ++i) {
            const float * k = pair + size_t(i) * size_t(head_dim);
            double sq = 0.0;
            for (int32_t d = 0; d < head_dim; ++d) sq += double(k[d]) * k[d];
            inverse_norm[size_t(i)] = sq > 0.0 ? 1.0 / std::sqrt(sq) : 0.0;
            for (int32_t d = 0; d < head_dim; ++d) anchor[size_t(d)] += k[d] * inverse_norm[size_t(i)];
        }
        double anchor_sq = 0.0;
        for (double a : anchor) anchor_sq += a * a;
        const double anchor_scale = anchor_sq > 0.0 ? 1.0 / std::sqrt(anchor_sq) : 0.0;
        for (int32_t i = first; i < last; ++i) {
            const float * k = pair + size_t(i) * size_t(head_dim);
            double dot = 0.0;
            for (int32_t d = 0; d < head_dim; ++d) dot += double(k[d]) * anchor[size_t(d)];
            out[size_t(i)] -= dot * inverse_norm[size_t(i)] * anchor_scale / n_pairs;
        }
    }
    return out;
}

void add_standardised(std::vector<double> & scores, const std::vector<double> & extra, double weight, int32_t first,
                      int32_t last) {
    if (extra.size() != scores.size()) {
        fail(ErrorKind::invalid_argument, "extra must have one value per score (got " + std::to_string(extra.size()) +
                                              " for " + std::to_string(scores.size()) + ")");
    }
    first = std::clamp(first, 0, int32_t(scores.size()));
    last = std::clamp(last, first, int32_t(scores.size()));
    if (last == first || weight == 0.0) return;
    double sum = 0.0, sum_sq = 0.0;
    for (int32_t i = first; i < last; ++i) {
        sum += extra[size_t(i)];
        sum_sq += extra[size_t(i)] * extra[size_t(i)];
    }
    const double n = double(last - first), mean = sum / n;
    const double variance = std::max(sum_sq / n - mean * mean, 0.0);
    if (variance <= 1e-24) return;
    const double scale = weight / std::sqrt(variance);
    for (int32_t i = first; i < last; ++i) scores[size_t(i)] += (extra[size_t(i)] - mean) * scale;
}

}  // namespace pm
