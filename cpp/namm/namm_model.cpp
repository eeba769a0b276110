#include "namm_model.h"

#include "../gguf_checks.h"

#include "../errors.h"
#include "../ggml_compute.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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

// Bytes of backend memory one graph may use for its intermediate tensors; calls split their tokens (features) or
// queries (BAM) into chunks that fit, so memory stays O(n · chunk) whatever n is.
constexpr int64_t kGraphBudgetBytes = int64_t(128) << 20;
constexpr int64_t kBamQueryBlock = 128;
constexpr int64_t kBamFlashQueryBlock = 256;
constexpr int64_t kFlashMaskBytesPerEntry = 6;  // a block's mask: f32 then its f16 copy

[[noreturn]] void bad_file(const std::string & path, const std::string & what) {
    fail(ErrorKind::bad_model_file, "'" + path + "' is not a valid NAMM GGUF: " + what +
                                        " (write one with `pymemory convert-namm`; format: docs/namm-gguf.md)");
}

// The shortest decimal that round-trips an f32, as the Python readers take it (docs/namm-gguf.md), so 0.99f is
// used as 0.99 and not 0.9900000095.
double shortest_decimal(float value) {
    char text[32];
    for (int digits = 6; digits < 10; ++digits) {
        std::snprintf(text, sizeof(text), "%.*g", digits, double(value));
        const double parsed = std::strtod(text, nullptr);
        if (float(parsed) == value) return parsed;
    }
    return double(value);
}

// Metadata readers that name the key when it is missing or has the wrong type.
struct Meta {
    gguf_context * ctx;
    const std::string & path;

    int64_t find(const char * key, gguf_type type) const {
        const int64_t id = gguf_find_key(ctx, key);
        if (id < 0) bad_file(path, std::string("missing key '") + key + "'");
        if (gguf_get_kv_type(ctx, id) != type) {
            bad_file(path, std::string("key '") + key + "' has type " + gguf_type_name(gguf_get_kv_type(ctx, id)) +
                               ", expected " + gguf_type_name(type));
        }
        return id;
    }
    uint32_t u32(const char * key) const { return gguf_get_val_u32(ctx, find(key, GGUF_TYPE_UINT32)); }
    float f32(const char * key) const { return gguf_get_val_f32(ctx, find(key, GGUF_TYPE_FLOAT32)); }
    std::string str(const char * key) const { return gguf_get_val_str(ctx, find(key, GGUF_TYPE_STRING)); }
    bool boolean(const char * key) const { return gguf_get_val_bool(ctx, find(key, GGUF_TYPE_BOOL)); }

    void expect_u32(const char * key, uint32_t value) const {
        const uint32_t got = u32(key);
        if (got != value) {
            bad_file(path, std::string(key) + " is " + std::to_string(got) + "; only the released NAMM BAM network (" +
                               key + " = " + std::to_string(value) + ") is supported");
        }
    }
    void expect_str(const char * key, const char * value) const {
        const std::string got = str(key);
        if (got != value) {
            bad_file(path, std::string(key) + " is '" + got + "'; only the released NAMM BAM network (" + key +
                               " = '" + value + "') is supported");
        }
    }
};

struct TensorSpec {
    const char * name;
    int64_t ne0, ne1;
    bool may_be_quantized;
};

// GGUF tensor names and shapes in ggml order (ne0 = inputs); docs/namm-gguf.md, "Tensors".
constexpr TensorSpec kTensors[] = {
    {"namm.attn_qkv.weight", kFeaturesPadded, 3 * kHidden, true},
    {"namm.attn_qkv.bias", 3 * kHidden, 1, false},
    {"namm.attn_out.weight", kHidden, 2 * kFeatures, true},
    {"namm.attn_out.bias", 2 * kFeatures, 1, false},
    {"namm.out.weight", kFeatures, 1, false},
    {"namm.out.bias", 1, 1, false},
    {"namm.feat_mean", kBins, 1, false},
    {"namm.feat_var", kBins, 1, false},
};
constexpr int32_t kParamCount = 25 * 96 + 96 + 32 * 50 + 50 + 25 + 1;  // 4172, spec §3

std::vector<float> dequantized(const ggml_tensor * t) {
    std::vector<float> out(size_t(ggml_nelements(t)));
    if (t->type == GGML_TYPE_F32) {
        std::memcpy(out.data(), t->data, out.size() * sizeof(float));
    } else {
        ggml_get_type_traits(t->type)->to_float(t->data, out.data(), int64_t(out.size()));
    }
    return out;
}

// What is wrong with the eight tensors' values (kTensors order), or "" when nothing is: padding columns of W_qkv
// must be zero and the variances >= 0, not all zero. Shared by the file reader and set_parameters().
std::string value_problem(const std::vector<std::vector<float>> & values) {
    const std::vector<float> & qkv = values[0];  // [96][32]
    for (int64_t row = 0; row < 3 * kHidden; ++row) {
        for (int64_t col = kFeatures; col < kFeaturesPadded; ++col) {
            if (qkv[size_t(row * kFeaturesPadded + col)] != 0.0f) {
                return "namm.attn_qkv.weight has non-zero padding in input columns 25-31";
            }
        }
    }
    const std::vector<float> & var = values[7];
    if (std::any_of(var.begin(), var.end(), [](float v) { return v < 0.0f; }) ||
        std::all_of(var.begin(), var.end(), [](float v) { return v == 0.0f; })) {
        return "namm.feat_var must be >= 0 and not all zero";
    }
    return "";
}

// 1 / max(sqrt(var), eps): the graph multiplies by it instead of dividing.
std::vector<float> inverse_std(const std::vector<float> & var, float eps) {
    std::vector<float> inv_std(kBins);
    for (int32_t f = 0; f < kBins; ++f) inv_std[size_t(f)] = 1.0f / std::max(std::sqrt(var[size_t(f)]), eps);
    return inv_std;
}

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

void check_tokens(const LayerInput & in) {
    if (in.n_heads <= 0 || in.n_tokens <= 0) {
        fail(ErrorKind::invalid_argument, "NAMM scoring needs at least one head and one token");
    }
    if (in.positions.size() != size_t(in.n_heads) * size_t(in.n_tokens) ||
        in.ema.size() != size_t(in.n_heads) * size_t(in.n_tokens) * kBins) {
        fail(ErrorKind::invalid_argument, "NAMM layer input has inconsistent sizes (positions [heads, tokens], "
                                          "ema [heads, tokens, 17])");
    }
}

}  // namespace

// ---- loading -------------------------------------------------------------------------------------------------

std::shared_ptr<NammModel> NammModel::load(const std::string & path, const std::string & device, int32_t n_threads) {
    std::shared_ptr<NammModel> model(new NammModel());
    model->backend_ = init_backend(device);
    model->owns_backend_ = true;
    model->set_threads(n_threads);
    model->load_file(path);
    return model;
}

std::shared_ptr<NammModel> NammModel::load(const std::string & path, ggml_backend * backend) {
    if (!backend) fail(ErrorKind::invalid_argument, "NammModel::load needs a ggml backend (got none)");
    std::shared_ptr<NammModel> model(new NammModel());
    model->backend_ = backend;
    model->load_file(path);
    return model;
}

void NammModel::load_file(const std::string & path) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) fail(ErrorKind::file_not_found, "NAMM file not found: '" + path + "'");
    if (!std::filesystem::is_regular_file(path, ec)) bad_file(path, "not a regular file");
    {
        char magic[4] = {0, 0, 0, 0};
        FILE * f = std::fopen(path.c_str(), "rb");
        if (!f) bad_file(path, "it cannot be opened for reading");
        const size_t got = std::fread(magic, 1, 4, f);
        std::fclose(f);
        if (got != 4 || std::memcmp(magic, "GGUF", 4) != 0) bad_file(path, "no GGUF magic (not a GGUF file)");
    }
    {
        // Loading allocates what the header says the tensors hold, and ggml aborts when that allocation fails: a
        // corrupted shape must be refused from the header alone first (tensor data has to lie inside the file).
        gguf_context * header = gguf_init_from_file(path.c_str(), gguf_init_params{/*no_alloc=*/true, nullptr});
        if (!header) bad_file(path, "the GGUF header cannot be read (truncated or corrupted)");
        const size_t data_end = tensor_data_end(header);
        gguf_free(header);
        const auto file_size = std::filesystem::file_size(path, ec);
        if (ec || data_end > file_size) {
            bad_file(path, "its tensors claim more data than the file holds: truncated or corrupted (a damaged size or shape)");
        }
    }
    ggml_context * data_ctx = nullptr;
    gguf_context * gctx = gguf_init_from_file(path.c_str(), gguf_init_params{/*no_alloc=*/false, &data_ctx});
    if (!gctx) bad_file(path, "the GGUF header or tensor data cannot be read (truncated or corrupted)");
    std::unique_ptr<gguf_context, decltype(&gguf_free)> gguf_owner(gctx, gguf_free);
    std::unique_ptr<ggml_context, decltype(&ggml_free)> data_owner(data_ctx, ggml_free);

    // Metadata (reading rules 2-5).
    const Meta meta{gctx, path};
    const std::string arch = meta.str("general.architecture");
    if (arch != "namm") bad_file(path, "general.architecture is '" + arch + "', expected 'namm'");
    NammHparams & hp = hparams_;
    hp.format_version = meta.u32("namm.format_version");
    if (hp.format_version != kFormatVersion) {
        bad_file(path, "format version " + std::to_string(hp.format_version) + " is not supported (this build reads "
                       "version " + std::to_string(kFormatVersion) + "; re-convert with the matching pymemory)");
    }
    meta.expect_u32("namm.n_fft", kFft);
    meta.expect_u32("namm.hop", kHop);
    meta.expect_str("namm.window", "hann_periodic");
    meta.expect_u32("namm.recency.dim", kRecency);
    meta.expect_str("namm.feature_order", "recency,spectrum");
    meta.expect_u32("namm.hidden_dim", kHidden);
    meta.expect_u32("namm.n_heads", 1);
    meta.expect_str("namm.mask", "backward");
    meta.expect_str("namm.gate", "identity");
    if (!meta.boolean("namm.attention_bias")) {
        bad_file(path, "namm.attention_bias is false; only the released NAMM BAM network (with bias) is supported");
    }
    meta.expect_u32("namm.n_features", kFeatures);
    meta.expect_u32("namm.n_bins", kBins);
    meta.expect_u32("namm.param_count", kParamCount);
    const uint32_t delay = meta.u32("namm.delay");
    hp.ema_coefficient = meta.f32("namm.ema_coefficient");
    hp.recency_max_freq = meta.f32("namm.recency.max_freq");
    hp.recency_start = int32_t(meta.u32("namm.recency.start"));
    hp.threshold = meta.f32("namm.threshold");
    hp.norm_eps = meta.f32("namm.norm_eps");
    hp.weight_type = meta.str("namm.weight_type");
    hp.source = meta.str("namm.source");
    if (gguf_find_key(gctx, "namm.ema_bias_correction") >= 0) {
        hp.ema_bias_correction = meta.boolean("namm.ema_bias_correction");
    }
    if (gguf_find_key(gctx, "namm.deploy.mode") >= 0) {
        hp.deploy_mode = meta.str("namm.deploy.mode");
        if (!is_deploy_mode(hp.deploy_mode)) {
            bad_file(path, "namm.deploy.mode is '" + hp.deploy_mode + "', expected " + kDeployModes);
        }
    }
    if (gguf_find_key(gctx, "namm.deploy.quorum") >= 0) {
        hp.deploy_quorum = meta.f32("namm.deploy.quorum");
        if (!(hp.deploy_quorum > 0.0f && hp.deploy_quorum <= 1.0f)) bad_file(path, "namm.deploy.quorum must be in (0, 1]");
    }
    if (gguf_find_key(gctx, "namm.deploy.delay") >= 0) {
        const uint32_t deploy_delay = meta.u32("namm.deploy.delay");
        if (deploy_delay == 0 || deploy_delay % kHop != 0 || deploy_delay > (1u << 20)) {
            bad_file(path, "namm.deploy.delay must be a positive multiple of 16 (got " + std::to_string(deploy_delay) +
                               ")");
        }
        hp.deploy_delay = int32_t(deploy_delay);
    }
    if (gguf_find_key(gctx, "namm.deploy.neighbours") >= 0) {
        const uint32_t neighbours = meta.u32("namm.deploy.neighbours");
        if (neighbours > uint32_t(kMaxNeighbours)) {
            bad_file(path, "namm.deploy.neighbours must be at most " + std::to_string(kMaxNeighbours) + " (got " +
                               std::to_string(neighbours) + ")");
        }
        hp.deploy_neighbours = int32_t(neighbours);
    }
    if (gguf_find_key(gctx, "namm.deploy.key_weight") >= 0) {
        hp.deploy_key_weight = meta.f32("namm.deploy.key_weight");
        if (!(hp.deploy_key_weight >= 0.0f && hp.deploy_key_weight <= kMaxKeyWeight)) {
            bad_file(path, "namm.deploy.key_weight must be between 0 and " + std::to_string(kMaxKeyWeight) +
                               " (got " + std::to_string(hp.deploy_key_weight) + ")");
        }
    }
    if (gguf_find_key(gctx, "namm.deploy.merge_threshold") >= 0) {
        hp.deploy_merge_threshold = meta.f32("namm.deploy.merge_threshold");
        if (!(hp.deploy_merge_threshold >= -1.0f && hp.deploy_merge_threshold <= 1.0f)) {
            bad_file(path, "namm.deploy.merge_threshold must be a cosine between -1 and 1 (got " +
                               std::to_string(hp.deploy_merge_threshold) + ")");
        }
    }
    if (gguf_find_key(gctx, "namm.source.iteration") >= 0) meta.find("namm.source.iteration", GGUF_TYPE_INT32);
    if (delay == 0 || delay % kHop != 0 || delay > (1u << 20)) {
        bad_file(path, "namm.delay must be a positive multiple of 16 (got " + std::to_string(delay) + ")");
    }
    hp.delay = int32_t(delay);
    if (!(hp.ema_coefficient > 0.0f && hp.ema_coefficient < 1.0f)) bad_file(path, "namm.ema_coefficient must lie in (0, 1)");
    if (!(hp.recency_max_freq > 0.0f) || !std::isfinite(hp.recency_max_freq)) {
        bad_file(path, "namm.recency.max_freq must be > 0");
    }
    if (!(hp.norm_eps > 0.0f) || !std::isfinite(hp.norm_eps)) bad_file(path, "namm.norm_eps must be > 0");
    if (!std::isfinite(hp.threshold)) bad_file(path, "namm.threshold must be finite");
    const std::string type_names[] = {"f32", "f16", "q8_0", "q4_0"};
    if (std::find(std::begin(type_names), std::end(type_names), hp.weight_type) == std::end(type_names)) {
        bad_file(path, "namm.weight_type is '" + hp.weight_type + "'; expected f32, f16, q8_0 or q4_0");
    }

    // Tensors (rules 6-8): exactly the eight, with their shapes and types, finite, padding zero, sane variances.
    const int64_t n_expected = int64_t(std::size(kTensors));
    for (int64_t i = 0; i < gguf_get_n_tensors(gctx); ++i) {
        const char * name = gguf_get_tensor_name(gctx, i);
        const bool known = std::any_of(std::begin(kTensors), std::end(kTensors),
                                       [&](const TensorSpec & s) { return std::strcmp(s.name, name) == 0; });
        if (!known) bad_file(path, std::string("unexpected tensor '") + name + "'");
    }
    std::vector<std::vector<float>> values;  // dequantised, in kTensors order
    for (const TensorSpec & spec : kTensors) {
        const ggml_tensor * t = ggml_get_tensor(data_ctx, spec.name);
        if (!t) bad_file(path, std::string("missing tensor '") + spec.name + "'");
        if (t->ne[0] != spec.ne0 || t->ne[1] != spec.ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
            bad_file(path, std::string("tensor '") + spec.name + "' has shape [" + std::to_string(t->ne[0]) + ", " +
                               std::to_string(t->ne[1]) + "], expected [" + std::to_string(spec.ne0) + ", " +
                               std::to_string(spec.ne1) + "] (ggml order, ne0 = inputs)");
        }
        const std::string type = ggml_type_name(t->type);
        if (spec.may_be_quantized ? type != hp.weight_type : t->type != GGML_TYPE_F32) {
            bad_file(path, std::string("tensor '") + spec.name + "' has type " + type + ", expected " +
                               (spec.may_be_quantized ? hp.weight_type + " (namm.weight_type)" : std::string("f32")));
        }
        values.push_back(dequantized(t));
        for (float v : values.back()) {
            if (!std::isfinite(v)) bad_file(path, std::string("tensor '") + spec.name + "' contains NaN or infinity");
        }
    }
    if (gguf_get_n_tensors(gctx) != n_expected) bad_file(path, "a tensor appears more than once");
    const std::string problem = value_problem(values);
    if (!problem.empty()) bad_file(path, problem);
    const std::vector<float> inv_std = inverse_std(values[7], hp.norm_eps);

    // Backend tensors: the file's (feat_var replaced by inv_std) plus the DFT matrix.
    const size_t n_backend = std::size(kTensors) + 1;
    weights_ctx_ = ggml_init(ggml_init_params{n_backend * ggml_tensor_overhead(), nullptr, /*no_alloc=*/true});
    if (!weights_ctx_) fail(ErrorKind::runtime, "could not create the NAMM weights context");
    std::vector<ggml_tensor *> tensors;
    for (const TensorSpec & spec : kTensors) {
        ggml_tensor * t = ggml_dup_tensor(weights_ctx_, ggml_get_tensor(data_ctx, spec.name));
        ggml_set_name(t, spec.name);
        tensors.push_back(t);
    }
    dft_ = ggml_new_tensor_2d(weights_ctx_, GGML_TYPE_F32, kFft, 2 * kBins);
    allocator_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    use_flash_ = backend_has_flash_attention();
    weights_buffer_ = ggml_backend_alloc_ctx_tensors(weights_ctx_, backend_);
    if (!weights_buffer_) fail(ErrorKind::runtime, "could not allocate the NAMM weights on the backend");
    for (size_t i = 0; i < tensors.size(); ++i) {
        const ggml_tensor * src = ggml_get_tensor(data_ctx, kTensors[i].name);
        const bool is_var = std::strcmp(kTensors[i].name, "namm.feat_var") == 0;
        const void * data = is_var ? static_cast<const void *>(inv_std.data()) : src->data;
        ggml_backend_tensor_set(tensors[i], data, 0, ggml_nbytes(src));
    }
    const StftTables tables = StftTables::make(shortest_decimal(hp.ema_coefficient));
    ggml_backend_tensor_set(dft_, tables.cos_w, 0, sizeof(tables.cos_w));
    ggml_backend_tensor_set(dft_, tables.sin_w, sizeof(tables.cos_w), sizeof(tables.sin_w));
    w_qkv_ = tensors[0];
    b_qkv_ = tensors[1];
    w_o_ = tensors[2];
    b_o_ = tensors[3];
    w_out_ = tensors[4];
    b_out_ = tensors[5];
    mean_ = tensors[6];
    inv_std_ = tensors[7];
}

void NammModel::set_parameters(const std::vector<std::pair<std::string, std::vector<float>>> & tensors) {
    if (hparams_.weight_type != "f32") {
        fail(ErrorKind::invalid_argument, "set_parameters needs a NAMM whose weights are f32 (this one is " +
                                              hparams_.weight_type + "); load an f32 GGUF as the template");
    }
    std::vector<std::vector<float>> values(std::size(kTensors));
    std::vector<bool> given(std::size(kTensors), false);
    for (const auto & [name, data] : tensors) {
        size_t i = 0;
        while (i < std::size(kTensors) && name != kTensors[i].name) ++i;
        if (i == std::size(kTensors)) fail(ErrorKind::invalid_argument, "unknown NAMM tensor '" + name + "'");
        if (given[i]) fail(ErrorKind::invalid_argument, "NAMM tensor '" + name + "' given twice");
        const size_t expected = size_t(kTensors[i].ne0 * kTensors[i].ne1);
        if (data.size() != expected) {
            fail(ErrorKind::invalid_argument, "NAMM tensor '" + name + "' has " + std::to_string(data.size()) +
                                                  " values, expected " + std::to_string(expected));
        }
        if (!std::all_of(data.begin(), data.end(), [](float v) { return std::isfinite(v); })) {
            fail(ErrorKind::invalid_argument, "NAMM tensor '" + name + "' contains NaN or infinity");
        }
        values[i] = data;
        given[i] = true;
    }
    for (size_t i = 0; i < std::size(kTensors); ++i) {
        if (!given[i]) fail(ErrorKind::invalid_argument, std::string("NAMM tensor '") + kTensors[i].name + "' missing");
    }
    const std::string problem = value_problem(values);
    if (!problem.empty()) fail(ErrorKind::invalid_argument, problem);
    values[7] = inverse_std(values[7], hparams_.norm_eps);
    ggml_tensor * targets[] = {w_qkv_, b_qkv_, w_o_, b_o_, w_out_, b_out_, mean_, inv_std_};
    const std::lock_guard<std::mutex> lock(compute_mutex_);
    for (size_t i = 0; i < std::size(kTensors); ++i) {
        ggml_backend_tensor_set(targets[i], values[i].data(), 0, values[i].size() * sizeof(float));
    }
}

NammModel::~NammModel() {
    if (allocator_) ggml_gallocr_free(allocator_);
    if (weights_buffer_) ggml_backend_buffer_free(weights_buffer_);
    if (weights_ctx_) ggml_free(weights_ctx_);
    if (backend_ && owns_backend_) ggml_backend_free(backend_);
}

std::string NammModel::device_name() const {
    return backend_ ? ggml_backend_name(backend_) : "";
}

void NammModel::set_threads(int32_t n_threads) {
    const std::lock_guard<std::mutex> lock(compute_mutex_);
    set_backend_threads(backend_, n_threads);
}

const char * const kDeployModes = "'quorum', 'budget', 'budget_max', 'budget_zmax' or 'budget_mix'";

bool is_deploy_mode(const std::string & mode) {
    return mode == "quorum" || mode == "budget" || mode == "budget_max" || mode == "budget_zmax" || mode == "budget_mix";
}

double NammModel::ema_coefficient() const { return shortest_decimal(hparams_.ema_coefficient); }

// ---- step 1: features ----------------------------------------------------------------------------------------

void NammModel::fold_frames(float * ema, const float * history, int32_t n_heads, int32_t n_tokens, const float * rows,
                            int32_t n_rows, int32_t first_new, ScorerTimings * timings) const {
    if (n_heads <= 0 || n_tokens < 0) fail(ErrorKind::invalid_argument, "fold_frames needs heads and tokens");
    if (n_rows <= 0 || n_rows % kHop != 0) {
        fail(ErrorKind::invalid_argument, "attention comes in frames of 16 rows (got " + std::to_string(n_rows) + ")");
    }
    if (first_new < 0 || first_new > n_tokens) fail(ErrorKind::invalid_argument, "first_new out of range");
    if (n_tokens == 0) return;
    const auto t0 = Clock::now();
    const int64_t H = n_heads, n = n_tokens, R = n_rows, T = n_rows / kHop;
    // EMA weights of frame j (spec §2.3), computed in double like the original's sum.
    const double a = std::pow(shortest_decimal(hparams_.ema_coefficient), kHop);
    std::vector<double> frame_weight(static_cast<size_t>(T));
    for (int64_t j = 0; j < T; ++j) frame_weight[size_t(j)] = (1.0 - a) * std::pow(a, double(T - 1 - j));
    const float decay = float(std::pow(a, double(T)));

    // Floats per token and head that a chunk graph holds at most (series twice, frames, spectra).
    const int64_t floats_per_token = 2 * (kHop + R) + kFft * T + 7 * kBins * T;
    const int64_t chunk = std::min(n, std::max<int64_t>(16, kGraphBudgetBytes / int64_t(sizeof(float)) /
                                                                    (floats_per_token * H)));
    std::vector<float> history_rows(static_cast<size_t>(kHop * chunk));  // one head's history, [16][token]
    std::vector<float> weights(static_cast<size_t>(T * chunk * H));      // [head][token][frame]

    const std::lock_guard<std::mutex> lock(compute_mutex_);
    for (int64_t k0 = 0; k0 < n; k0 += chunk) {
        const int64_t c = std::min(chunk, n - k0), M = T * c * H;
        Graph g(64);
        ggml_context * ctx = g.ctx();
        // Each token's series [history ‖ rows] (spec §2.1), uploaded token-fastest as the caller lays rows out.
        ggml_tensor * series_in = g.input(c, kHop + R, H);                                          // [c, 16+R, H]
        ggml_tensor * ema_old = g.input(kBins, c, H);                                               // [17, c, H]
        ggml_tensor * w = g.input(M);                                                               // [T·c·H]
        ggml_tensor * series = ggml_cont(ctx, ggml_transpose(ctx, series_in));                      // [16+R, c, H]
        // Frame j = samples 16j .. 16j+31 = hop blocks j and j + 1 (ggml views may not overlap: two views).
        auto blocks_from = [&](int64_t first) {                                                     // [16, T, c, H]
            return ggml_view_4d(ctx, series, kHop, T, c, H, kHop * sizeof(float), series->nb[1], series->nb[2],
                                size_t(first * kHop) * sizeof(float));
        };
        ggml_tensor * frames = ggml_concat(ctx, blocks_from(0), blocks_from(1), 0);                // [32, T, c, H]
        // One-sided DFT of the Hann-windowed frames (spec §2.2). The frames are the matmul's rows, so the
        // spectra come out with (frame, token, head) fastest: long rows for the element-wise ops below.
        ggml_tensor * spectra = ggml_mul_mat(ctx, ggml_reshape_2d(ctx, frames, kFft, M), dft_);   // [M, 34]
        ggml_tensor * re = ggml_view_2d(ctx, spectra, M, kBins, spectra->nb[1], 0);               // [M, 17]
        ggml_tensor * im = ggml_view_2d(ctx, spectra, M, kBins, spectra->nb[1], kBins * spectra->nb[1]);
        ggml_tensor * magnitude = ggml_sqrt(ctx, ggml_add(ctx, ggml_sqr(ctx, re), ggml_sqr(ctx, im)));  // [M, 17]
        // E <- a^T E + Σ_j w[j, k] S_j (spec §2.3): weight, then sum the T frames of each (token, head, bin).
        ggml_tensor * weighted = ggml_reshape_2d(ctx, ggml_mul(ctx, magnitude, w), T, c * H * kBins);
        ggml_tensor * folded = ggml_reshape_3d(ctx, ggml_sum_rows(ctx, weighted), c, H, kBins);  // [c, H, 17]
        folded = ggml_cont(ctx, ggml_permute(ctx, folded, 1, 2, 0, 3));                           // [17, c, H]
        ggml_tensor * ema_new = ggml_add(ctx, ggml_scale(ctx, ema_old, decay), folded);            // [17, c, H]
        g.output(ema_new);
        g.allocate(allocator_);

        // Inputs: token slice [k0, k0 + c) of the caller's arrays.
        const size_t row_bytes = size_t(c) * sizeof(float);
        for (int64_t h = 0; h < H; ++h) {
            const float * head_history = history + (h * n + k0) * kHop;
            for (int64_t i = 0; i < c; ++i) {
                for (int64_t r = 0; r < kHop; ++r) history_rows[size_t(r * c + i)] = head_history[i * kHop + r];
            }
            const size_t head_offset = size_t(h * (kHop + R)) * row_bytes;
            ggml_backend_tensor_set(series_in, history_rows.data(), head_offset, size_t(kHop) * row_bytes);
            ggml_backend_tensor_set_2d(series_in, rows + h * R * n + k0, head_offset + size_t(kHop) * row_bytes,
                                       row_bytes, size_t(R), row_bytes, size_t(n) * sizeof(float));
        }
        ggml_backend_tensor_set_2d(ema_old, ema + k0 * kBins, 0, size_t(c * kBins) * sizeof(float), size_t(H),
                                   size_t(c * kBins) * sizeof(float), size_t(n * kBins) * sizeof(float));
        for (int64_t i = 0; i < c; ++i) {
            const int64_t k = k0 + i;
            // A new token with window index t counts from frame t / 16 on (spec §2.3, mask m).
            const int64_t first_frame = k < first_new ? 0 : (k - first_new) / kHop;
            for (int64_t j = 0; j < T; ++j) weights[size_t(i * T + j)] = j >= first_frame ? float(frame_weight[size_t(j)]) : 0.0f;
        }
        for (int64_t h = 1; h < H; ++h) std::copy_n(weights.begin(), c * T, weights.begin() + h * c * T);
        ggml_backend_tensor_set(w, weights.data(), 0, size_t(M) * sizeof(float));
        g.compute(backend_);
        ggml_backend_tensor_get_2d(ema_new, ema + k0 * kBins, 0, size_t(c * kBins) * sizeof(float), size_t(H),
                                   size_t(c * kBins) * sizeof(float), size_t(n * kBins) * sizeof(float));
    }
    if (timings) timings->features_ms += ms_since(t0);
}

// ---- step 2: scores ------------------------------------------------------------------------------------------

// Recency embedding (spec §2.5) evaluated in double like the original's table: [head][token][8], tokens in
// reversed order when `reversed` (BAM's order).
std::vector<float> NammModel::recency(const LayerInput & in, bool reversed) const {
    const int32_t n = in.n_tokens;
    std::vector<float> out(size_t(in.n_heads) * size_t(n) * kRecency);
    constexpr int32_t half = kRecency / 2;
    double omega[half];
    for (int32_t i = 0; i < half; ++i) omega[i] = std::pow(double(hparams_.recency_max_freq), -double(i) / half);
    for (int32_t h = 0; h < in.n_heads; ++h) {
        const int32_t * pos = in.positions.data() + size_t(h) * size_t(n);
        for (int32_t i = 0; i < n; ++i) {
            const double age = double(pos[n - 1]) - double(pos[i]) + hparams_.recency_start;
            const int32_t row = reversed ? n - 1 - i : i;
            float * dst = out.data() + (size_t(h) * size_t(n) + size_t(row)) * kRecency;
            for (int32_t k = 0; k < half; ++k) {
                dst[k] = float(std::sin(age * omega[k]));
                dst[half + k] = float(std::cos(age * omega[k]));
            }
        }
    }
    return out;
}

// With bias correction a token seen by q queries (q = newest position - its position + 1) has its EMA divided by
// 1 - c^max(q, 16): the total weight its attention carries in the average after q queries (at least one 16-query
// frame, which every token has been folded into by an invocation). Without it the EMA of a token starts at zero and
// takes ~1 / (1 - c) queries to warm up, so a score that reads it ranks new tokens low; with it the DC bin is a
// recency-weighted attention rate over the token's lifetime. Ages come from positions, as the recency embedding's.
std::vector<float> NammModel::spectrum_input(const LayerInput & in, bool reversed) const {
    const int32_t n = in.n_tokens;
    std::vector<float> out(size_t(in.n_heads) * size_t(n) * kBins);
    const double c = ema_coefficient();
    for (int32_t h = 0; h < in.n_heads; ++h) {
        const int32_t * pos = in.positions.data() + size_t(h) * size_t(n);
        for (int32_t i = 0; i < n; ++i) {
            const float * src = in.ema.data() + (size_t(h) * size_t(n) + size_t(i)) * kBins;
            float * dst = out.data() + (size_t(h) * size_t(n) + size_t(reversed ? n - 1 - i : i)) * kBins;
            const double queries = std::max(double(pos[n - 1]) - double(pos[i]) + 1.0, double(kHop));
            const double weight = hparams_.ema_bias_correction ? 1.0 - std::pow(c, queries) : 1.0;  // x / 1 is exact
            for (int32_t f = 0; f < kBins; ++f) dst[f] = float(double(src[f]) / weight);
        }
    }
    return out;
}

// X = [recency ‖ (E - μ) / max(√σ², eps)] (spec §2.4, §2.6): ema [17, n, H], recency [8, n, H] -> [25, n, H].
ggml_tensor * NammModel::build_features(ggml_context * ctx, ggml_tensor * ema, ggml_tensor * rec) const {
    ggml_tensor * spectrum = ggml_mul(ctx, ggml_sub(ctx, ema, mean_), inv_std_);  // [17, n, H]
    return ggml_concat(ctx, rec, spectrum, 0);                                   // [25, n, H]
}

// BAM (spec §3) for every head of a layer, as one graph, from tokens (features built in the graph) or from given
// features x [head][token][25]. Token order is reversed so that the backward mask ("token i attends to j >= i")
// becomes the causal mask of ggml_diag_mask_inf; queries go in blocks so memory stays O(n · block), not O(n^2).
std::vector<float> NammModel::run_bam(const LayerInput * tokens, const float * x_host, int32_t n_heads,
                                      int32_t n_tokens) const {
    const int64_t H = n_heads, n = n_tokens;
    // Host inputs in reversed token order.
    std::vector<float> ema_rev, rec_rev, x_rev;
    if (tokens) {
        ema_rev = spectrum_input(*tokens, true);
        rec_rev = recency(*tokens, true);
    } else {
        x_rev.resize(size_t(H * n) * kFeatures);
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t i = 0; i < n; ++i) {
                std::copy_n(x_host + size_t(h * n + i) * kFeatures, kFeatures,
                            x_rev.data() + size_t(h * n + (n - 1 - i)) * kFeatures);
            }
        }
    }
    // Queries go in blocks: block b sees only the keys up to its own (the reversed-causal triangle), so memory stays
    // O(n · block). The matmul form keeps each block's [keys, block, H] scores in memory between its two matmuls;
    // ggml's flash attention never materialises them (tiles of 64 x 64 in cache, fully masked tiles skipped).
    const bool flash = use_flash_;
    const int64_t budget_block = kGraphBudgetBytes / (flash ? kFlashMaskBytesPerEntry : int64_t(sizeof(float)) * H) / n;
    const int64_t block = std::min<int64_t>(
        {n, flash ? kBamFlashQueryBlock : kBamQueryBlock, std::max<int64_t>(32, budget_block)});
    const int64_t n_blocks = (n + block - 1) / block;

    Graph g(size_t(64 + 32 * n_blocks));
    ggml_context * ctx = g.ctx();
    ggml_tensor * ema = nullptr, * rec = nullptr, * x = nullptr;
    if (tokens) {
        ema = g.input(kBins, n, H);                                                      // [17, n, H]
        rec = g.input(kRecency, n, H);                                                   // [8, n, H]
        x = build_features(ctx, ema, rec);                                               // [25, n, H]
    } else {
        x = g.input(kFeatures, n, H);                                                    // [25, n, H]
    }
    ggml_tensor * zero = flash ? g.input(1, 1) : nullptr;                                // [1, 1] mask seed
    // Q, K, V: one linear layer on the features zero-padded to 32 (the weight's padding columns are zero).
    ggml_tensor * xp = ggml_pad(ctx, x, kFeaturesPadded - kFeatures, 0, 0, 0);           // [32, n, H]
    ggml_tensor * qkv = ggml_add(ctx, ggml_mul_mat(ctx, w_qkv_, xp), b_qkv_);            // [96, n, H]
    auto part = [&](int32_t index) {                                                     // [32, n, H] view
        return ggml_view_3d(ctx, qkv, kHidden, n, H, qkv->nb[1], qkv->nb[2], size_t(index * kHidden) * sizeof(float));
    };
    ggml_tensor * q = flash ? part(0) : ggml_cont(ctx, part(0));                         // [32, n, H]
    ggml_tensor * k = flash ? part(1) : ggml_cont(ctx, part(1));                         // [32, n, H]
    ggml_tensor * v = flash ? part(2) : ggml_cont(ctx, ggml_transpose(ctx, part(2)));    // [32, n, H] / [n, 32, H]
    const float scale = 1.0f / std::sqrt(float(kHidden));
    std::vector<std::pair<int64_t, ggml_tensor *>> block_scores;
    for (int64_t b0 = 0; b0 < n; b0 += block) {
        const int64_t nb = std::min(block, n - b0);
        const int64_t n_keys = b0 + nb;  // reversed order: query b0 + i sees keys 0 .. b0 + i
        ggml_tensor * kb = ggml_view_3d(ctx, k, kHidden, n_keys, H, k->nb[1], k->nb[2], 0);          // [32, keys, H]
        ggml_tensor * qb = ggml_view_3d(ctx, q, kHidden, nb, H, q->nb[1], q->nb[2], size_t(b0) * q->nb[1]);
        ggml_tensor * o = nullptr;                                                                    // [32, nb, H]
        if (flash) {
            ggml_tensor * vb = ggml_view_3d(ctx, v, kHidden, n_keys, H, v->nb[1], v->nb[2], 0);       // [32, keys, H]
            ggml_tensor * mask = ggml_diag_mask_inf_inplace(ctx, ggml_repeat_4d(ctx, zero, n_keys, nb, 1, 1), int(b0));
            mask = ggml_cast(ctx, mask, GGML_TYPE_F16);                                               // [keys, nb]
            ggml_tensor * fa = ggml_flash_attn_ext(ctx, qb, kb, vb, mask, scale, 0.0f, 0.0f);        // [32, H, nb]
            o = ggml_cont(ctx, ggml_permute(ctx, fa, 0, 2, 1, 3));
        } else {
            ggml_tensor * s = ggml_mul_mat(ctx, kb, ggml_cont(ctx, qb));                              // [keys, nb, H]
            s = ggml_diag_mask_inf_inplace(ctx, s, int(b0));
            s = ggml_soft_max_ext_inplace(ctx, s, nullptr, scale, 0.0f);
            ggml_tensor * vb = ggml_view_3d(ctx, v, n_keys, kHidden, H, v->nb[1], v->nb[2], 0);       // [keys, 32, H]
            o = ggml_mul_mat(ctx, vb, s);
        }
        // Output projection, gate and residual (spec §3.3-3.4): hidden = x ⊙ (1 + g) + r, then the final linear.
        ggml_tensor * y = ggml_add(ctx, ggml_mul_mat(ctx, w_o_, o), b_o_);                           // [50, nb, H]
        ggml_tensor * res = ggml_view_3d(ctx, y, kFeatures, nb, H, y->nb[1], y->nb[2], 0);            // [25, nb, H]
        ggml_tensor * gate = ggml_view_3d(ctx, y, kFeatures, nb, H, y->nb[1], y->nb[2], kFeatures * sizeof(float));
        ggml_tensor * xb = ggml_view_3d(ctx, x, kFeatures, nb, H, x->nb[1], x->nb[2], size_t(b0) * x->nb[1]);
        ggml_tensor * hidden = ggml_add(ctx, ggml_add(ctx, ggml_mul(ctx, xb, gate), xb), res);       // [25, nb, H]
        ggml_tensor * score = ggml_add(ctx, ggml_mul_mat(ctx, w_out_, hidden), b_out_);              // [1, nb, H]
        g.output(score);
        block_scores.emplace_back(b0, score);
    }
    g.allocate(allocator_);
    if (zero) {
        const float zero_value = 0.0f;
        ggml_backend_tensor_set(zero, &zero_value, 0, sizeof(float));
    }
    if (tokens) {
        ggml_backend_tensor_set(ema, ema_rev.data(), 0, ema_rev.size() * sizeof(float));
        ggml_backend_tensor_set(rec, rec_rev.data(), 0, rec_rev.size() * sizeof(float));
    } else {
        ggml_backend_tensor_set(x, x_rev.data(), 0, x_rev.size() * sizeof(float));
    }
    g.compute(backend_);
    std::vector<float> scores(size_t(H * n)), block_values;
    for (const auto & [b0, score] : block_scores) {
        const int64_t nb = score->ne[1];
        block_values.resize(size_t(nb * H));
        ggml_backend_tensor_get(score, block_values.data(), 0, block_values.size() * sizeof(float));  // [H][nb]
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t i = 0; i < nb; ++i) scores[size_t(h * n + (n - 1 - (b0 + i)))] = block_values[size_t(h * nb + i)];
        }
    }
    return scores;
}

bool NammModel::backend_has_flash_attention() const {
    // Asks the backend about the op BAM would build: f32 Q, K and V of width 32, an f16 mask.
    ggml_init_params params{4 * ggml_tensor_overhead() + 1024, nullptr, true};
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kHidden, 64, 2);
    ggml_tensor * k = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kHidden, 64, 2);
    ggml_tensor * v = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kHidden, 64, 2);
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 64, 64);
    ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0f, 0.0f, 0.0f);
    const bool supported = ggml_backend_supports_op(backend_, fa);
    ggml_free(ctx);
    return supported;
}

void NammModel::set_bam_attention(BamAttention kind) {
    const std::lock_guard<std::mutex> lock(compute_mutex_);
    const bool available = backend_has_flash_attention();
    if (kind == BamAttention::flash && !available) {
        fail(ErrorKind::unsupported, "the NAMM scorer's backend (" + std::string(ggml_backend_name(backend_)) +
                                         ") has no flash attention on f32 tensors; use 'matmul' or 'automatic'");
    }
    use_flash_ = kind == BamAttention::flash || (kind == BamAttention::automatic && available);
}

bool NammModel::bam_uses_flash_attention() const {
    const std::lock_guard<std::mutex> lock(compute_mutex_);
    return use_flash_;
}

std::vector<float> NammModel::scores(const LayerInput & tokens, ScorerTimings * timings) const {
    check_tokens(tokens);
    const auto t0 = Clock::now();
    const std::lock_guard<std::mutex> lock(compute_mutex_);
    std::vector<float> out = run_bam(&tokens, nullptr, tokens.n_heads, tokens.n_tokens);
    if (timings) timings->bam_ms += ms_since(t0);
    return out;
}

std::vector<float> NammModel::scores_from_features(const float * x, int32_t n_heads, int32_t n_tokens) const {
    if (n_heads <= 0 || n_tokens <= 0) fail(ErrorKind::invalid_argument, "BAM needs at least one head and one token");
    const std::lock_guard<std::mutex> lock(compute_mutex_);
    return run_bam(nullptr, x, n_heads, n_tokens);
}

std::vector<float> NammModel::features(const LayerInput & tokens) const {
    check_tokens(tokens);
    const int64_t H = tokens.n_heads, n = tokens.n_tokens;
    const std::vector<float> rec_host = recency(tokens, false);
    const std::vector<float> ema_host = spectrum_input(tokens, false);
    const std::lock_guard<std::mutex> lock(compute_mutex_);
    Graph g(16);
    ggml_tensor * ema = g.input(kBins, n, H);                // [17, n, H]
    ggml_tensor * rec = g.input(kRecency, n, H);             // [8, n, H]
    ggml_tensor * x = build_features(g.ctx(), ema, rec);     // [25, n, H]
    g.output(x);
    g.allocate(allocator_);
    ggml_backend_tensor_set(ema, ema_host.data(), 0, ema_host.size() * sizeof(float));
    ggml_backend_tensor_set(rec, rec_host.data(), 0, rec_host.size() * sizeof(float));
    g.compute(backend_);
    std::vector<float> out(size_t(H * n * kFeatures));
    ggml_backend_tensor_get(x, out.data(), 0, out.size() * sizeof(float));
    return out;
}

LayerScores NammModel::score_layer(const LayerInput & tokens, ScorerTimings * timings) const {
    std::vector<float> s = scores(tokens, timings);
    const auto t0 = Clock::now();
    LayerScores out = select_tokens(std::move(s), tokens.n_heads, tokens.n_tokens, hparams_.threshold);
    if (timings) timings->selection_ms += ms_since(t0);
    return out;
}

// ---- step 3: selection (host) --------------------------------------------------------------------------------

LayerScores select_tokens(std::vector<float> scores, int32_t n_heads, int32_t n_tokens, float threshold) {
    if (n_heads <= 0 || n_tokens <= 0 || scores.size() != size_t(n_heads) * size_t(n_tokens)) {
        fail(ErrorKind::invalid_argument, "selection needs scores [heads, tokens] with at least one of each");
    }
    for (float s : scores) {
        if (std::isnan(s)) fail(ErrorKind::invalid_argument, "NAMM scores contain NaN");
    }
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
        // Descending score with the newest token first (forced +inf); among equal scores the newer token first.
        const auto ranks_before = [&](int32_t a, int32_t b) {
            const bool a_last = size_t(a) + 1 == n, b_last = size_t(b) + 1 == n;
            if (a_last != b_last) return a_last;
            if (s[a] != s[b]) return s[a] > s[b];
            return a > b;
        };
        std::nth_element(order.begin(), order.begin() + (out.n_keep - 1), order.end(), ranks_before);
        for (int32_t r = 0; r < out.n_keep; ++r) out.keep[size_t(h) * n + size_t(order[size_t(r)])] = 1;
    }
    out.scores = std::move(scores);
    return out;
}

std::vector<int64_t> keep_indices(const LayerScores & selection, int32_t n_heads) {
    const size_t n = selection.keep.size() / size_t(n_heads);
    std::vector<int64_t> out;
    out.reserve(size_t(n_heads) * size_t(selection.n_keep));
    for (int32_t h = 0; h < n_heads; ++h) {
        for (size_t i = 0; i < n; ++i) {
            if (selection.keep[size_t(h) * n + i]) out.push_back(int64_t(i));
        }
    }
    return out;
}

}  // namespace pm::namm
