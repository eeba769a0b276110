#include "value_merge.h"

#include "errors.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace pm {

MergeStats merge_values(uint8_t * data, const KvStateView & view, const std::vector<MergeRole> & role,
                        std::vector<float> & weights, int32_t n_head_kv, float threshold) {
    MergeStats stats;
    const int32_t n = view.n_cells();
    if (int32_t(role.size()) != n) fail(ErrorKind::runtime, "internal: merge roles do not match the KV state's cells");
    std::vector<int32_t> kept, gone, unfixed;
    for (int32_t c = 0; c < n; ++c) {
        if (role[size_t(c)] == MergeRole::kept) kept.push_back(c);
        if (role[size_t(c)] == MergeRole::gone) gone.push_back(c);
        if (role[size_t(c)] != MergeRole::fixed) unfixed.push_back(c);
    }
    if (view.layers.empty() || gone.empty() || kept.empty()) return stats;
    const int32_t n_head = n_head_kv;
    const int32_t head_dim = n_head > 0 ? view.layers[0].k_width / n_head : 0;
    if (head_dim <= 0) fail(ErrorKind::runtime, "internal: value merging got no KV heads");
    if (size_t(weights.size()) != size_t(n) * view.layers.size() * size_t(n_head)) {
        fail(ErrorKind::runtime, "internal: merge weights do not match the KV state's cells");
    }
    const size_t n_pairs = view.layers.size() * size_t(n_head);
    std::vector<float> unit(size_t(n) * size_t(head_dim));  // [cell][head_dim]: one head's centred unit keys
    std::vector<float> mean(static_cast<size_t>(head_dim));
    for (size_t l = 0; l < view.layers.size(); ++l) {
        const KvStateView::Layer & layer = view.layers[l];
        if (layer.k_width != n_head * head_dim || layer.v_width % n_head != 0) {
            fail(ErrorKind::unsupported, "value merging needs every layer to have the same KV heads (layer " +
                                             std::to_string(l) + " differs)");
        }
        const int32_t v_dim = layer.v_width / n_head;
        const auto value_index = [&](int32_t cell, int32_t h, int32_t d) -> size_t {
            const size_t component = size_t(h) * size_t(v_dim) + size_t(d);
            return view.v_transposed ? component * size_t(n) + size_t(cell)
                                     : size_t(cell) * size_t(layer.v_width) + component;
        };
        for (int32_t h = 0; h < n_head; ++h) {
            std::fill(mean.begin(), mean.end(), 0.0f);
            for (int32_t c : unfixed) {
                for (int32_t d = 0; d < head_dim; ++d) {
                    const float k = kv_get(data, layer.k_offset, layer.k_type,
                                           size_t(c) * size_t(layer.k_width) + size_t(h) * size_t(head_dim) + size_t(d));
                    unit[size_t(c) * size_t(head_dim) + size_t(d)] = k;
                    mean[size_t(d)] += k / float(unfixed.size());
                }
            }
            for (int32_t c : unfixed) {
                float * u = &unit[size_t(c) * size_t(head_dim)];
                double norm = 0.0;
                for (int32_t d = 0; d < head_dim; ++d) {
                    u[d] -= mean[size_t(d)];
                    norm += double(u[d]) * u[d];
                }
                const float inv = float(1.0 / std::max(std::sqrt(norm), 1e-6));
                for (int32_t d = 0; d < head_dim; ++d) u[d] *= inv;
            }
            for (int32_t e : gone) {
                ++stats.offered;
                const float * ue = &unit[size_t(e) * size_t(head_dim)];
                int32_t best = -1;
                float best_cos = -2.0f;
                for (int32_t t : kept) {
                    const float * ut = &unit[size_t(t) * size_t(head_dim)];
                    float dot = 0.0f;
                    for (int32_t d = 0; d < head_dim; ++d) dot += ue[d] * ut[d];
                    if (dot > best_cos) best_cos = dot, best = t;
                }
                if (best < 0 || !(best_cos >= threshold)) continue;
                float & w = weights[size_t(best) * n_pairs + l * size_t(n_head) + size_t(h)];
                for (int32_t d = 0; d < v_dim; ++d) {
                    const float vt = kv_get(data, layer.v_offset, layer.v_type, value_index(best, h, d));
                    const float ve = kv_get(data, layer.v_offset, layer.v_type, value_index(e, h, d));
                    kv_set(data, layer.v_offset, layer.v_type, value_index(best, h, d), (vt * w + ve) / (w + 1.0f));
                }
                w += 1.0f;
                ++stats.merged;
            }
        }
    }
    return stats;
}

}  // namespace pm
