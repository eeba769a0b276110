#include "namm_model.h"

#include "../errors.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <thread>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

namespace pm::namm {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

[[noreturn]] void bad_file(const std::string & path, const std::string & what) {
    fail(ErrorKind::bad_model_file, "'" + path + "' is not a valid NAMM GGUF: " + what +
                                        " (write one with `pymemory convert-namm`; format: docs/namm-gguf.md)");
}

// Metadata readers that name the key when it is missing or has the wrong type.
struct Meta {
    gguf_context * ctx;
    const std::string & path;

    int64_t find(const char * key, gguf_type type) const {
        const int64_t id = gguf_find_key(ctx, key);
        if (id < 0) bad_file(path, std::string("missing key '") + key + "'");
        if (gguf_get_kv_type(ctx, id) != type) bad_file(path, std::string("key '") + key + "' has the wrong type");
        return id;
    }
    uint32_t u32(const char * key) const { return gguf_get_val_u32(ctx, find(key, GGUF_TYPE_UINT32)); }
    float f32(const char * key) const { return gguf_get_val_f32(ctx, find(key, GGUF_TYPE_FLOAT32)); }
    std::string str(const char * key) const { return gguf_get_val_str(ctx, find(key, GGUF_TYPE_STRING)); }
    bool boolean(const char * key) const { return gguf_get_val_bool(ctx, find(key, GGUF_TYPE_BOOL)); }
};

struct TensorSpec {
    const char * name;
    int64_t ne0, ne1;
    bool may_be_quantized;
};

// GGUF tensor names and shapes (ne order: ne0 = inputs). See docs/namm-gguf.md.
constexpr TensorSpec kTensors[] = {
    {"namm.attn_qkv.weight", kFeaturesPadded, 96, true},
    {"namm.attn_qkv.bias", 96, 1, false},
    {"namm.attn_out.weight", 32, 2 * kFeatures, true},
    {"namm.attn_out.bias", 2 * kFeatures, 1, false},
    {"namm.out.weight", kFeatures, 1, false},
    {"namm.out.bias", 1, 1, false},
    {"namm.feat_mean", kBins, 1, false},
    {"namm.feat_var", kBins, 1, false},
};

ggml_backend_t init_backend(const std::string & device) {
    ggml_backend_t backend = nullptr;
    if (device == "cpu") {
        backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    } else if (device == "gpu") {
        backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
        if (!backend) {
            fail(ErrorKind::unsupported, "no GPU backend: llama-cpp-python was built for the CPU only (rebuild it "
                                         "with CMAKE_ARGS=\"-DGGML_CUDA=on\" or use device='cpu')");
        }
    } else if (device == "auto") {
        backend = ggml_backend_init_best();
    } else {
        fail(ErrorKind::invalid_argument, "device must be 'cpu', 'gpu' or 'auto' (got '" + device + "')");
    }
    if (!backend) fail(ErrorKind::runtime, "could not initialise a ggml backend for the NAMM scorer");
    return backend;
}

}  // namespace

std::shared_ptr<NammModel> NammModel::load(const std::string & path, const std::string & device, int32_t n_threads) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) fail(ErrorKind::file_not_found, "NAMM file not found: '" + path + "'");
    if (!std::filesystem::is_regular_file(path, ec)) bad_file(path, "not a regular file");
    {
        char magic[4] = {0, 0, 0, 0};
        FILE * f = std::fopen(path.c_str(), "rb");
        if (!f) bad_file(path, "cannot open it");
        const size_t got = std::fread(magic, 1, 4, f);
        std::fclose(f);
        if (got != 4 || std::memcmp(magic, "GGUF", 4) != 0) bad_file(path, "no GGUF magic");
    }
    ggml_context * meta_ctx = nullptr;
    gguf_init_params params{/*no_alloc=*/false, /*ctx=*/&meta_ctx};
    gguf_context * gctx = gguf_init_from_file(path.c_str(), params);
    if (!gctx) bad_file(path, "the GGUF header or tensor data cannot be read (truncated or corrupted)");

    std::shared_ptr<NammModel> model(new NammModel());
    try {
        Meta meta{gctx, path};
        const std::string arch = meta.str("general.architecture");
        if (arch != "namm") bad_file(path, "general.architecture is '" + arch + "', expected 'namm'");
        NammHparams & hp = model->hparams_;
        hp.format_version = meta.u32("namm.format_version");
        if (hp.format_version != kFormatVersion) {
            bad_file(path, "format version " + std::to_string(hp.format_version) + " is not supported (this build "
                           "reads version " + std::to_string(kFormatVersion) + ")");
        }
        hp.delay = int32_t(meta.u32("namm.delay"));
        hp.ema_coefficient = meta.f32("namm.ema_coefficient");
        hp.recency_dim = int32_t(meta.u32("namm.recency.dim"));
        hp.recency_max_freq = meta.f32("namm.recency.max_freq");
        hp.recency_start = int32_t(meta.u32("namm.recency.start"));
        hp.hidden = int32_t(meta.u32("namm.hidden_dim"));
        hp.threshold = meta.f32("namm.threshold");
        hp.norm_eps = meta.f32("namm.norm_eps");
        hp.source = meta.str("namm.source");
        // Everything else the scorer hard-codes must match the file, or the file describes another network.
        auto expect_u32 = [&](const char * key, uint32_t value) {
            if (meta.u32(key) != value) bad_file(path, std::string(key) + " must be " + std::to_string(value));
        };
        auto expect_str = [&](const char * key, const char * value) {
            if (meta.str(key) != value) bad_file(path, std::string(key) + " must be '" + value + "'");
        };
        expect_u32("namm.n_fft", kFft);
        expect_u32("namm.hop", kHop);
        expect_u32("namm.n_bins", kBins);
        expect_u32("namm.n_features", kFeatures);
        expect_u32("namm.n_heads", 1);
        expect_str("namm.window", "hann_periodic");
        expect_str("namm.feature_order", "recency,spectrum");
        expect_str("namm.mask", "backward");
        expect_str("namm.gate", "identity");
        if (!meta.boolean("namm.attention_bias")) bad_file(path, "namm.attention_bias must be true");
        if (hp.recency_dim != kRecency || hp.hidden != 32) bad_file(path, "recency dim 8 and hidden 32 are required");
        if (hp.delay <= 0 || hp.delay % kHop != 0) bad_file(path, "namm.delay must be a positive multiple of 16");

        // Tensors: names, shapes, types.
        model->stft_ = StftTables::make(hp.ema_coefficient);
        const size_t n_tensors = sizeof(kTensors) / sizeof(kTensors[0]);
        ggml_init_params wparams{n_tensors * ggml_tensor_overhead(), nullptr, /*no_alloc=*/true};
        model->weights_ctx_ = ggml_init(wparams);
        std::vector<std::pair<ggml_tensor *, ggml_tensor *>> copies;  // (backend tensor, file tensor)
        for (const TensorSpec & spec : kTensors) {
            ggml_tensor * src = ggml_get_tensor(meta_ctx, spec.name);
            if (!src) bad_file(path, std::string("missing tensor '") + spec.name + "'");
            if (src->ne[0] != spec.ne0 || src->ne[1] != spec.ne1 || src->ne[2] != 1 || src->ne[3] != 1) {
                bad_file(path, std::string("tensor '") + spec.name + "' has shape [" + std::to_string(src->ne[0]) +
                                   ", " + std::to_string(src->ne[1]) + "], expected [" + std::to_string(spec.ne0) +
                                   ", " + std::to_string(spec.ne1) + "] (ggml order)");
            }
            const bool ok_type = src->type == GGML_TYPE_F32 ||
                                 (spec.may_be_quantized && (src->type == GGML_TYPE_F16 || src->type == GGML_TYPE_Q8_0 ||
                                                            src->type == GGML_TYPE_Q4_0));
            if (!ok_type) {
                bad_file(path, std::string("tensor '") + spec.name + "' has type " + ggml_type_name(src->type));
            }
            if (spec.may_be_quantized) hp.weight_type = ggml_type_name(src->type);
            ggml_tensor * dst = ggml_dup_tensor(model->weights_ctx_, src);
            ggml_set_name(dst, spec.name);
            copies.emplace_back(dst, src);
        }
        model->mean_host_.assign(kBins, 0.0f);
        model->inv_std_host_.assign(kBins, 0.0f);
        const float * mean_src = static_cast<const float *>(ggml_get_tensor(meta_ctx, "namm.feat_mean")->data);
        const float * var_src = static_cast<const float *>(ggml_get_tensor(meta_ctx, "namm.feat_var")->data);
        for (int32_t f = 0; f < kBins; ++f) {
            if (!std::isfinite(mean_src[f]) || !std::isfinite(var_src[f]) || var_src[f] < 0.0f) {
                bad_file(path, "feature statistics must be finite with variances >= 0");
            }
            model->mean_host_[size_t(f)] = mean_src[f];
            model->inv_std_host_[size_t(f)] = 1.0f / std::max(std::sqrt(var_src[f]), hp.norm_eps);
        }
        // inv_std replaces the variance tensor on the backend: the graph multiplies instead of dividing.
        ggml_tensor * inv_std = nullptr;
        for (auto & [dst, src] : copies) {
            if (std::strcmp(ggml_get_name(dst), "namm.feat_var") == 0) inv_std = dst;
        }

        model->backend_ = init_backend(device);
        model->set_threads(n_threads);
        model->weights_buffer_ = ggml_backend_alloc_ctx_tensors(model->weights_ctx_, model->backend_);
        if (!model->weights_buffer_) fail(ErrorKind::runtime, "could not allocate the NAMM weights on the backend");
        for (auto & [dst, src] : copies) {
            if (dst == inv_std) {
                ggml_backend_tensor_set(dst, model->inv_std_host_.data(), 0, kBins * sizeof(float));
            } else {
                ggml_backend_tensor_set(dst, src->data, 0, ggml_nbytes(src));
            }
        }
        auto get = [&](const char * name) { return ggml_get_tensor(model->weights_ctx_, name); };
        model->w_qkv_ = get("namm.attn_qkv.weight");
        model->b_qkv_ = get("namm.attn_qkv.bias");
        model->w_o_ = get("namm.attn_out.weight");
        model->b_o_ = get("namm.attn_out.bias");
        model->w_out_ = get("namm.out.weight");
        model->b_out_ = get("namm.out.bias");
        model->mean_ = get("namm.feat_mean");
        model->inv_std_ = inv_std;
    } catch (...) {
        gguf_free(gctx);
        ggml_free(meta_ctx);
        throw;
    }
    gguf_free(gctx);
    ggml_free(meta_ctx);
    return model;
}

NammModel::~NammModel() {
    if (weights_buffer_) ggml_backend_buffer_free(weights_buffer_);
    if (weights_ctx_) ggml_free(weights_ctx_);
    if (backend_) ggml_backend_free(backend_);
}

std::string NammModel::device_name() const {
    return backend_ ? ggml_backend_name(backend_) : "";
}

void NammModel::set_threads(int32_t n_threads) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend_);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto set_n_threads = reg ? reinterpret_cast<ggml_backend_set_n_threads_t>(
                                   ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"))
                             : nullptr;
    if (set_n_threads) {
        const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
        set_n_threads(backend_, n_threads > 0 ? n_threads : int32_t(hw));
    }
}

// Recency embedding (spec §2.5), evaluated in double like the original's table: [head][token][8].
std::vector<float> NammModel::recency_rows(const LayerInput & in, bool reversed) const {
    const int32_t n = in.n_tokens;
    std::vector<float> out(size_t(in.n_heads) * size_t(n) * kRecency);
    double omega[kRecency / 2];
    for (int32_t i = 0; i < kRecency / 2; ++i) {
        omega[i] = std::pow(double(hparams_.recency_max_freq), -double(i) / (kRecency / 2));
    }
    for (int32_t h = 0; h < in.n_heads; ++h) {
        const int32_t * pos = in.positions.data() + size_t(h) * size_t(n);
        const int32_t newest = pos[n - 1];
        for (int32_t i = 0; i < n; ++i) {
            const double age = double(newest - pos[i] + hparams_.recency_start);
            const int32_t row = reversed ? n - 1 - i : i;
            float * dst = out.data() + (size_t(h) * size_t(n) + size_t(row)) * kRecency;
            for (int32_t k = 0; k < kRecency / 2; ++k) {
                dst[k] = float(std::sin(age * omega[k]));
                dst[kRecency / 2 + k] = float(std::cos(age * omega[k]));
            }
        }
    }
    return out;
}

std::vector<float> NammModel::features(const LayerInput & in) const {
    const int32_t n = in.n_tokens;
    const std::vector<float> recency = recency_rows(in, false);
    std::vector<float> out(size_t(in.n_heads) * size_t(n) * kFeatures);
    for (size_t k = 0; k < size_t(in.n_heads) * size_t(n); ++k) {
        float * dst = out.data() + k * kFeatures;
        std::copy_n(recency.data() + k * kRecency, kRecency, dst);
        for (int32_t f = 0; f < kBins; ++f) {
            dst[kRecency + f] = (in.ema[k * kBins + size_t(f)] - mean_host_[size_t(f)]) * inv_std_host_[size_t(f)];
        }
    }
    return out;
}

// BAM (spec §3) for every head of a layer, as one ggml graph. Token order is reversed inside the graph so that
// the backward mask ("token i attends to j >= i") becomes an ordinary causal mask (ggml_diag_mask_inf). Queries are
// processed in blocks so memory stays O(n * block), not O(n^2): 32K tokens fit.
std::vector<float> NammModel::run_bam(const LayerInput & in, ScorerTimings * timings) const {
    const int64_t n = in.n_tokens, H = in.n_heads;
    auto t0 = Clock::now();
    // Inputs in reversed token order.
    std::vector<float> ema_rev(size_t(H * n) * kBins);
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < n; ++i) {
            std::copy_n(in.ema.data() + size_t(h * n + i) * kBins, kBins,
                        ema_rev.data() + size_t(h * n + (n - 1 - i)) * kBins);
        }
    }
    const std::vector<float> recency_rev = recency_rows(in, true);
    if (timings) timings->features_ms += ms_since(t0);

    // Block of queries: S is [keys <= n, block, H] floats; keep it under ~64 MiB.
    const int64_t budget_floats = int64_t(64) << 20 >> 2;
    const int64_t block = std::clamp<int64_t>(budget_floats / std::max<int64_t>(1, n * H), 32, std::max<int64_t>(n, 32));
    const int64_t n_blocks = (n + block - 1) / block;
    const size_t graph_size = size_t(64 + 16 * n_blocks);
    ggml_init_params gp{ggml_tensor_overhead() * graph_size + ggml_graph_overhead_custom(graph_size, false), nullptr,
                        /*no_alloc=*/true};
    ggml_context * ctx = ggml_init(gp);
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, graph_size, false);

    ggml_tensor * ema = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kBins, n, H);         // [17, n, H]
    ggml_tensor * rec = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kRecency, n, H);      // [8, n, H]
    ggml_set_input(ema);
    ggml_set_input(rec);
    // Features (spec §2.4, §2.6): [recency || (E - mean) * inv_std], zero-padded to 32 for the quantised matmul.
    ggml_tensor * spec = ggml_mul(ctx, ggml_sub(ctx, ema, mean_), inv_std_);          // [17, n, H]
    ggml_tensor * x = ggml_concat(ctx, rec, spec, 0);                                 // [25, n, H]
    ggml_tensor * xp = ggml_pad(ctx, x, kFeaturesPadded - kFeatures, 0, 0, 0);        // [32, n, H]
    // Q, K, V: one linear layer, columns 0-31 / 32-63 / 64-95 (spec §3.1).
    ggml_tensor * qkv = ggml_add(ctx, ggml_mul_mat(ctx, w_qkv_, xp), b_qkv_);          // [96, n, H]
    const size_t row = qkv->nb[1];
    ggml_tensor * q = ggml_cont(ctx, ggml_view_3d(ctx, qkv, 32, n, H, row, qkv->nb[2], 0));
    ggml_tensor * k = ggml_cont(ctx, ggml_view_3d(ctx, qkv, 32, n, H, row, qkv->nb[2], 32 * sizeof(float)));
    ggml_tensor * v = ggml_cont(ctx, ggml_view_3d(ctx, qkv, 32, n, H, row, qkv->nb[2], 64 * sizeof(float)));
    ggml_tensor * vt = ggml_cont(ctx, ggml_transpose(ctx, v));                         // [n, 32, H]
    const float scale = 1.0f / std::sqrt(32.0f);
    ggml_tensor * attn_out = nullptr;                                                 // [32, n, H]
    for (int64_t b0 = 0; b0 < n; b0 += block) {
        const int64_t nb = std::min(block, n - b0);
        const int64_t n_keys = b0 + nb;  // reversed order: query b0+j sees keys 0 .. b0+j
        ggml_tensor * kb = ggml_view_3d(ctx, k, 32, n_keys, H, k->nb[1], k->nb[2], 0);
        ggml_tensor * qb = ggml_view_3d(ctx, q, 32, nb, H, q->nb[1], q->nb[2], size_t(b0) * q->nb[1]);
        ggml_tensor * s = ggml_mul_mat(ctx, kb, qb);                                   // [n_keys, nb, H]
        s = ggml_diag_mask_inf(ctx, ggml_scale(ctx, s, scale), int(b0));
        s = ggml_soft_max(ctx, s);
        ggml_tensor * vb = ggml_view_3d(ctx, vt, n_keys, 32, H, vt->nb[1], vt->nb[2], 0);
        ggml_tensor * ob = ggml_mul_mat(ctx, vb, s);                                   // [32, nb, H]
        attn_out = attn_out ? ggml_concat(ctx, attn_out, ob, 1) : ob;
    }
    // Output projection, gate and residual (spec §3.3-3.4): H = X * (1 + g) + r.
    ggml_tensor * y = ggml_add(ctx, ggml_mul_mat(ctx, w_o_, attn_out), b_o_);         // [50, n, H]
    ggml_tensor * res = ggml_cont(ctx, ggml_view_3d(ctx, y, kFeatures, n, H, y->nb[1], y->nb[2], 0));
    ggml_tensor * gate = ggml_cont(ctx, ggml_view_3d(ctx, y, kFeatures, n, H, y->nb[1], y->nb[2],
                                                     kFeatures * sizeof(float)));
    ggml_tensor * hid = ggml_add(ctx, ggml_add(ctx, ggml_mul(ctx, x, gate), x), res);   // [25, n, H]
    ggml_tensor * score = ggml_add(ctx, ggml_mul_mat(ctx, w_out_, hid), b_out_);       // [1, n, H]
    ggml_set_output(score);
    ggml_build_forward_expand(gf, score);

    ggml_gallocr_t alloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    if (!ggml_gallocr_alloc_graph(alloc, gf)) {
        ggml_gallocr_free(alloc);
        ggml_free(ctx);
        fail(ErrorKind::runtime, "could not allocate the NAMM scorer graph for " + std::to_string(n) + " tokens");
    }
    ggml_backend_tensor_set(ema, ema_rev.data(), 0, ema_rev.size() * sizeof(float));
    ggml_backend_tensor_set(rec, recency_rev.data(), 0, recency_rev.size() * sizeof(float));
    t0 = Clock::now();
    const ggml_status status = ggml_backend_graph_compute(backend_, gf);
    std::vector<float> scores_rev(size_t(H * n));
    if (status == GGML_STATUS_SUCCESS) {
        ggml_backend_tensor_get(score, scores_rev.data(), 0, scores_rev.size() * sizeof(float));
    }
    if (timings) timings->bam_ms += ms_since(t0);
    ggml_gallocr_free(alloc);
    ggml_free(ctx);
    if (status != GGML_STATUS_SUCCESS) fail(ErrorKind::runtime, "the NAMM scorer graph failed to compute");
    std::vector<float> scores(size_t(H * n));
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < n; ++i) scores[size_t(h * n + i)] = scores_rev[size_t(h * n + (n - 1 - i))];
    }
    return scores;
}

LayerScores NammModel::score_layer(const LayerInput & in, ScorerTimings * timings) const {
    if (in.n_heads <= 0 || in.n_tokens <= 0) fail(ErrorKind::invalid_argument, "NAMM scoring needs tokens and heads");
    if (in.positions.size() != size_t(in.n_heads) * size_t(in.n_tokens) ||
        in.ema.size() != size_t(in.n_heads) * size_t(in.n_tokens) * kBins) {
        fail(ErrorKind::invalid_argument, "NAMM layer input has inconsistent sizes");
    }
    std::vector<float> scores = run_bam(in, timings);
    const auto t0 = Clock::now();
    LayerScores out = select_tokens(std::move(scores), in.n_heads, in.n_tokens, hparams_.threshold);
    if (timings) timings->selection_ms += ms_since(t0);
    return out;
}

LayerScores select_tokens(std::vector<float> scores, int32_t n_heads, int32_t n_tokens, float threshold) {
    LayerScores out;
    const size_t n = size_t(n_tokens);
    int32_t min_negative = n_tokens;
    for (int32_t h = 0; h < n_heads; ++h) {
        int32_t negative = 0;
        for (size_t i = 0; i + 1 < n; ++i) negative += scores[size_t(h) * n + i] < threshold;  // newest: forced kept
        min_negative = std::min(min_negative, negative);
    }
    out.n_keep = n_tokens - min_negative;
    out.keep.assign(size_t(n_heads) * n, 0);
    std::vector<int32_t> order(n);
    for (int32_t h = 0; h < n_heads; ++h) {
        const float * s = scores.data() + size_t(h) * n;
        std::iota(order.begin(), order.end(), 0);
        // Descending score; the newest token first (forced +inf); among equal scores the newer token wins.
        std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
            const bool a_last = size_t(a) + 1 == n, b_last = size_t(b) + 1 == n;
            if (a_last != b_last) return a_last;
            if (s[a] != s[b]) return s[a] > s[b];
            return a > b;
        });
        for (int32_t r = 0; r < out.n_keep; ++r) out.keep[size_t(h) * n + size_t(order[size_t(r)])] = 1;
    }
    out.scores = std::move(scores);
    return out;
}

}  // namespace pm::namm
