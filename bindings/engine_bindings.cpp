// Bindings of the llama.cpp adapter types, the memory policies and the streaming engine.
// Long-running calls (load, feed, score, sample) release the GIL.
#include "bindings.h"
#include "namm/namm_model.h"
#include "numpy_util.h"

#include "engine.h"
#include "errors.h"
#include "kv_policy.h"
#include "kv_state_view.h"
#include "value_merge.h"
#include "llama_adapter.h"

#include <limits>
#include <optional>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace pm::py_bindings {
namespace {

FlashAttention parse_flash_attention(const std::string & name) {
    if (name == "auto") return FlashAttention::automatic;
    if (name == "on") return FlashAttention::enabled;
    if (name == "off") return FlashAttention::disabled;
    fail(ErrorKind::invalid_argument, "flash_attention must be 'auto', 'on' or 'off' (got '" + name + "')");
}

py::dict plan_to_dict(const EvictionPlan & plan) {
    py::list remove, shift;
    for (const auto & r : plan.remove) remove.append(py::make_tuple(r.p0, r.p1));
    for (const auto & s : plan.shift) shift.append(py::make_tuple(s.p0, s.p1, s.delta));
    py::dict d;
    d["remove"] = remove;
    d["shift"] = shift;
    d["recompute"] = plan.recompute;
    d["n_evicted"] = plan.n_evicted;
    d["next_pos"] = plan.next_pos;
    return d;
}

EvictionPlan plan_from_dict(const py::dict & d) {
    EvictionPlan plan;
    for (auto item : d["remove"].cast<py::list>()) {
        auto t = item.cast<std::pair<Pos, Pos>>();
        plan.remove.push_back({t.first, t.second});
    }
    for (auto item : d["shift"].cast<py::list>()) {
        auto t = item.cast<std::tuple<Pos, Pos, Pos>>();
        plan.shift.push_back({std::get<0>(t), std::get<1>(t), std::get<2>(t)});
    }
    plan.recompute = d.contains("recompute") && d["recompute"].cast<bool>();
    return plan;
}

py::dict stats_to_dict(const EngineStats & s) {
    py::dict d;
    d["cells_used"] = s.cells_used;
    d["capacity"] = s.capacity;
    d["n_ctx_physical"] = s.n_ctx_physical;
    d["n_pinned"] = s.n_pinned;
    d["peak_cells"] = s.peak_cells;
    d["tokens_seen"] = s.tokens_seen;
    d["evictions"] = s.evictions;
    d["tokens_evicted"] = s.tokens_evicted;
    d["tokens_recomputed"] = s.tokens_recomputed;
    d["values_offered"] = s.values_offered;
    d["values_merged"] = s.values_merged;
    d["max_pos"] = s.max_pos;
    d["next_pos"] = s.next_pos;
    return d;
}

py::dict info_to_dict(const ModelInfo & i) {
    py::dict d;
    d["path"] = i.path;
    d["architecture"] = i.architecture;
    d["name"] = i.name;
    d["description"] = i.description;
    d["n_vocab"] = i.n_vocab;
    d["n_layer"] = i.n_layer;
    d["n_head"] = i.n_head;
    d["n_head_kv"] = i.n_head_kv;
    d["n_embd"] = i.n_embd;
    d["n_ctx_train"] = i.n_ctx_train;
    d["n_swa"] = i.n_swa;
    d["swa_layers"] = std::vector<int>(i.swa_layers.begin(), i.swa_layers.end());  // 1 = sliding-window layer
    d["is_recurrent"] = i.is_recurrent;
    d["is_hybrid"] = i.is_hybrid;
    d["uses_mrope"] = i.uses_mrope;
    d["add_bos"] = i.add_bos;
    d["bos"] = i.bos;
    d["eos"] = i.eos;
    d["chat_template"] = i.chat_template;
    return d;
}

py::dict policy_stats_to_dict(const AttentionPolicy * policy) {
    py::dict d;
    py::list records;
    if (policy) {
        for (const auto & r : policy->invocations()) {
            py::dict rec;
            rec["tokens_seen"] = r.tokens_seen;
            rec["cells_before"] = r.cells_before;
            rec["cells_after"] = r.cells_after;
            rec["scored"] = r.scored;
            rec["layer_kept"] = r.layer_kept;
            rec["union_size"] = r.union_size;
            rec["intersection_size"] = r.intersection_size;
            rec["jaccard_union"] = r.jaccard_union;
            rec["jaccard_intersection"] = r.jaccard_intersection;
            records.append(rec);
        }
        d["policy"] = policy->name();
        d["scored_layers"] = policy->scored_layers();  // model layers read (an iSWA model's global layers only)
        d["forced_evictions"] = policy->forced_evictions();
        d["observe_seconds"] = policy->observe_seconds;
        d["decide_seconds"] = policy->decide_seconds;
    }
    d["invocations"] = records;
    return d;
}

py::list captures_to_list(const AttentionPolicy * policy) {
    py::list out;
    if (!policy) return out;
    for (const auto & c : policy->captures()) {
        py::dict d;
        d["layer"] = c.layer;
        d["tokens_seen"] = c.tokens_seen;
        d["positions"] = as_numpy(c.positions, {c.n_tokens});
        d["attention"] = as_numpy(c.attention, {c.n_heads, c.n_rows, c.n_tokens});
        d["ema"] = as_numpy(c.ema, {c.n_heads, c.n_tokens, 17});
        d["scores"] = as_numpy(c.scores, {c.n_heads, c.n_tokens});
        d["keep"] = as_numpy(c.keep, {c.n_heads, c.n_tokens});
        d["kept"] = as_numpy(c.kept, {c.n_tokens});
        if (!c.key_distinctiveness.empty()) d["key_distinctiveness"] = as_numpy(c.key_distinctiveness, {c.n_tokens});
        out.append(d);
    }
    return out;
}

// Thread safety: every call on an Engine holds Engine::call_mutex, so two Python threads on one Engine take turns
// (one stream cannot decode twice at once). Rule: never wait for that mutex while holding the GIL — the thread that
// holds it may be decoding without the GIL and must be able to take the GIL back when done. `locked` runs GIL-free
// work under the mutex; `lock_engine` takes the mutex (GIL released while waiting) for calls that build Python
// objects under it.
template <class F>
auto locked(const Engine & engine, F && work) {
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(engine.call_mutex());
    return work();
}

std::unique_lock<std::mutex> lock_engine(const Engine & engine) {
    py::gil_scoped_release release;
    return std::unique_lock<std::mutex>(engine.call_mutex());
}

py::array_t<float> to_numpy(std::vector<float> && values) {
    auto * heap = new std::vector<float>(std::move(values));
    py::capsule owner(heap, [](void * p) { delete static_cast<std::vector<float> *>(p); });
    return py::array_t<float>({py::ssize_t(heap->size())}, {py::ssize_t(sizeof(float))}, heap->data(), owner);
}

}  // namespace

void register_engine(py::module_ & m) {
    m.def("set_log_verbosity", &set_log_verbosity, py::arg("level"),
          "llama.cpp log level on stderr: 0 silent (errors are in exceptions), 1 warnings and errors (default), 2 info, 3 debug.");
    m.def("backend_summary", &backend_summary, "The ggml devices llama.cpp can use, e.g. 'CPU (AMD EPYC ...)'.");

    // ---- model ----
    py::class_<LlamaModel, std::shared_ptr<LlamaModel>>(m, "Model", "A loaded GGUF model (weights + vocabulary).")
        .def_static(
            "load",
            [](const std::string & path, int32_t n_gpu_layers, bool use_mmap, bool use_extra_bufts) {
                ModelParams p;
                p.path = path;
                p.n_gpu_layers = n_gpu_layers;
                p.use_mmap = use_mmap;
                p.use_extra_bufts = use_extra_bufts;
                py::gil_scoped_release release;
                return LlamaModel::load(p);
            },
            py::arg("path"), py::arg("n_gpu_layers") = 0, py::arg("use_mmap") = true, py::arg("use_extra_bufts") = true)
        .def_property_readonly("info", [](const LlamaModel & self) { return info_to_dict(self.info()); })
        .def("tokenize", &LlamaModel::tokenize, py::arg("text"), py::arg("add_special") = true,
             py::arg("parse_special") = false, py::call_guard<py::gil_scoped_release>())
        .def(
            "token_bytes",
            [](const LlamaModel & self, Token token, bool render_special) {
                return py::bytes(self.token_bytes(token, render_special));
            },
            py::arg("token"), py::arg("render_special") = false)
        .def(
            "detokenize",
            [](const LlamaModel & self, const std::vector<Token> & tokens, bool render_special) {
                return py::bytes(self.detokenize(tokens, render_special));
            },
            py::arg("tokens"), py::arg("render_special") = false)
        .def("is_end_of_generation", &LlamaModel::is_end_of_generation, py::arg("token"))
        .def(
            "apply_chat_template",
            [](const LlamaModel & self, const std::vector<std::pair<std::string, std::string>> & messages,
               bool add_assistant, const std::string & template_override) {
                std::vector<ChatMessage> chat;
                for (const auto & [role, content] : messages) chat.push_back({role, content});
                return py::bytes(self.apply_chat_template(chat, add_assistant, template_override));
            },
            py::arg("messages"), py::arg("add_assistant") = true, py::arg("template") = "");

    // ---- sampling ----
    py::class_<SamplingParams>(m, "SamplingParams")
        .def(py::init([](float temperature, int32_t top_k, float top_p, float min_p, float repeat_penalty,
                         int32_t repeat_last_n, float frequency_penalty, float presence_penalty, float dry_multiplier,
                         float dry_base, int32_t dry_allowed_length, int32_t dry_penalty_last_n, uint32_t seed) {
                 SamplingParams p;
                 p.temperature = temperature;
                 p.top_k = top_k;
                 p.top_p = top_p;
                 p.min_p = min_p;
                 p.repeat_penalty = repeat_penalty;
                 p.repeat_last_n = repeat_last_n;
                 p.frequency_penalty = frequency_penalty;
                 p.presence_penalty = presence_penalty;
                 p.dry_multiplier = dry_multiplier;
                 p.dry_base = dry_base;
                 p.dry_allowed_length = dry_allowed_length;
                 p.dry_penalty_last_n = dry_penalty_last_n;
                 p.seed = seed;
                 validate(p);
                 return p;
             }),
             py::arg("temperature") = 0.8f, py::arg("top_k") = 40, py::arg("top_p") = 0.95f, py::arg("min_p") = 0.05f,
             py::arg("repeat_penalty") = 1.0f, py::arg("repeat_last_n") = 64, py::arg("frequency_penalty") = 0.0f,
             py::arg("presence_penalty") = 0.0f, py::arg("dry_multiplier") = 0.0f, py::arg("dry_base") = 1.75f,
             py::arg("dry_allowed_length") = 2, py::arg("dry_penalty_last_n") = -1, py::arg("seed") = 0u)
        .def_readonly("temperature", &SamplingParams::temperature)
        .def_readonly("top_k", &SamplingParams::top_k)
        .def_readonly("top_p", &SamplingParams::top_p)
        .def_readonly("min_p", &SamplingParams::min_p)
        .def_readonly("repeat_penalty", &SamplingParams::repeat_penalty)
        .def_readonly("repeat_last_n", &SamplingParams::repeat_last_n)
        .def_readonly("frequency_penalty", &SamplingParams::frequency_penalty)
        .def_readonly("presence_penalty", &SamplingParams::presence_penalty)
        .def_readonly("dry_multiplier", &SamplingParams::dry_multiplier)
        .def_readonly("dry_base", &SamplingParams::dry_base)
        .def_readonly("dry_allowed_length", &SamplingParams::dry_allowed_length)
        .def_readonly("dry_penalty_last_n", &SamplingParams::dry_penalty_last_n)
        .def_readonly("seed", &SamplingParams::seed);

    py::class_<Sampler>(m, "Sampler", "llama.cpp sampler chain (penalties, DRY, top-k, top-p, min-p, temperature).")
        .def(py::init<const LlamaModel &, const SamplingParams &>(), py::arg("model"), py::arg("params"),
             py::keep_alive<1, 2>())
        .def("accept", &Sampler::accept, py::arg("token"), py::call_guard<py::gil_scoped_release>())
        .def("reset", &Sampler::reset, py::call_guard<py::gil_scoped_release>());

    // ---- policies (pure planning, testable without a model) ----
    m.def(
        "plan_eviction",
        [](const std::string & policy, int32_t n_sink, int32_t window, int32_t evict_chunk,
           const std::vector<Pos> & positions, int32_t n_pinned, int32_t n_incoming) {
            PolicyParams p;
            p.kind = parse_policy_kind(policy);
            p.n_sink = n_sink;
            p.window = window;
            p.evict_chunk = evict_chunk;
            validate(p);
            return plan_to_dict(plan_eviction(p, CacheState{positions, n_pinned}, n_incoming));
        },
        py::arg("policy"), py::arg("n_sink"), py::arg("window"), py::arg("evict_chunk"), py::arg("positions"),
        py::arg("n_pinned"), py::arg("n_incoming"),
        "The plan a policy makes for `n_incoming` new tokens given the cached positions: "
        "{'remove': [(p0, p1)], 'shift': [(p0, p1, delta)], 'recompute': bool, 'n_evicted': int}.");
    m.def(
        "merge_kv_state",
        [](py::bytes state, const std::vector<int32_t> & roles, std::vector<float> weights, int32_t n_head_kv,
           float threshold) {
            std::string data = state;
            const KvStateView view = parse_kv_state(reinterpret_cast<const uint8_t *>(data.data()), data.size());
            std::vector<MergeRole> role;
            for (int32_t r : roles) {
                if (r < 0 || r > 2) fail(ErrorKind::invalid_argument, "roles are 0 (kept), 1 (gone) or 2 (fixed)");
                role.push_back(MergeRole(r));
            }
            const MergeStats stats = merge_values(reinterpret_cast<uint8_t *>(data.data()), view, role, weights,
                                                  n_head_kv, threshold);
            return py::make_tuple(py::bytes(data), weights, stats.offered, stats.merged);
        },
        py::arg("state"), py::arg("roles"), py::arg("weights"), py::arg("n_head_kv"), py::arg("threshold"),
        "value_merge.h on a llama.cpp sequence state's bytes (tests): (state, weights, offered, merged).");
    m.def(
        "plan_removal",
        [](const std::vector<Pos> & positions, const std::vector<int32_t> & indices, bool reindex) {
            return plan_to_dict(plan_removal(CacheState{positions, 0}, indices, reindex));
        },
        py::arg("positions"), py::arg("indices"), py::arg("reindex"));
    m.def(
        "plan_compaction",
        [](const std::vector<Pos> & positions) { return plan_to_dict(plan_compaction(CacheState{positions, 0})); },
        py::arg("positions"), "The shifts that close every gap between cached positions (nothing removed).");
    m.def("default_evict_chunk", &default_evict_chunk, py::arg("window"),
          "Tokens evicted at once by default: window / 16, at least 16, at most the window.");
    m.def("lowest_scoring", &lowest_scoring, py::arg("scores"), py::arg("first"), py::arg("end"), py::arg("count"),
          "Indices of the `count` lowest scores in [first, end), older first on ties, sorted.");

    m.def(
        "sum_attention_by_cell",
        [](const py::array_t<float, py::array::c_style | py::array::forcecast> & attention, bool last_row,
           int32_t n_threads) {
            if (attention.ndim() != 3) fail(ErrorKind::invalid_argument, "attention must be [heads, rows, cells]");
            if (n_threads < 1) fail(ErrorKind::invalid_argument, "n_threads must be >= 1");
            AttentionView v;
            v.n_head = int32_t(attention.shape(0));
            v.n_tokens = int32_t(attention.shape(1));
            v.n_kv = int32_t(attention.shape(2));
            v.head_stride = size_t(v.n_tokens) * size_t(v.n_kv);
            v.probs = attention.data();
            std::vector<float> totals;
            {
                py::gil_scoped_release unlocked;
                sum_attention_by_cell(v, last_row ? AttentionTotals::last_row : AttentionTotals::all_rows, totals,
                                      n_threads);
            }
            return to_numpy(std::move(totals));
        },
        py::arg("attention"), py::arg("last_row") = false, py::arg("n_threads") = 1,
        "The tap's host reduction: attention [heads, rows, cells] summed per cell over heads and rows (or the last).");

    // H2O / TOVA selection on synthetic attention (no model): the tests feed attention matrices of their own and check
    // which tokens go. observe() reduces the matrix exactly as the tap's host loop does (sum_attention_by_cell).
    py::class_<CellScorePolicy>(m, "CellScorePolicy",
                                "h2o or tova on synthetic attention: observe() layer matrices, make_room() answers.")
        .def(py::init([](const std::string & policy, int32_t n_sink, int32_t recent, int32_t evict_chunk,
                         uint32_t n_cells) -> std::unique_ptr<CellScorePolicy> {
                 const CellScoreParams p{n_sink, recent, evict_chunk};
                 const PolicyKind kind = parse_policy_kind(policy);
                 if (kind == PolicyKind::h2o) return std::make_unique<H2oPolicy>(p, n_cells);
                 if (kind == PolicyKind::tova) return std::make_unique<TovaPolicy>(p, n_cells);
                 fail(ErrorKind::invalid_argument, "CellScorePolicy is 'h2o' or 'tova' (got '" + policy + "')");
             }),
             py::arg("policy"), py::arg("n_sink"), py::arg("recent"), py::arg("evict_chunk"), py::arg("n_cells"))
        .def("begin_batch", [](CellScorePolicy & self) { self.begin_batch(0, 0); })
        .def(
            "observe",
            [](CellScorePolicy & self, int32_t layer,
               const py::array_t<float, py::array::c_style | py::array::forcecast> & attention,
               const std::vector<int32_t> & token_cells) {
                if (attention.ndim() != 3) fail(ErrorKind::invalid_argument, "attention must be [heads, rows, cells]");
                AttentionView v;
                v.layer = layer;
                v.n_head = int32_t(attention.shape(0));
                v.n_tokens = int32_t(attention.shape(1));
                v.n_kv = int32_t(attention.shape(2));
                v.head_stride = size_t(v.n_tokens) * size_t(v.n_kv);
                v.probs = attention.data();
                if (int32_t(token_cells.size()) != v.n_tokens) {
                    fail(ErrorKind::invalid_argument, "token_cells needs one cell per attention row");
                }
                for (int32_t c : token_cells) {
                    if (c < 0 || c >= v.n_kv) fail(ErrorKind::invalid_argument, "token cell outside the attention");
                }
                v.token_cell = token_cells.data();
                std::vector<float> totals;
                const AttentionTotals rows =
                    self.cell_totals_last_row() ? AttentionTotals::last_row : AttentionTotals::all_rows;
                sum_attention_by_cell(v, rows, totals);
                v.cell_totals = totals.data();
                v.totals_rows = rows;
                self.observe(v);
            },
            py::arg("layer"), py::arg("attention"), py::arg("token_cells"),
            "One layer's attention [heads, rows (the batch's tokens), cells]; layer 0 starts a new ubatch.")
        .def(
            "make_room",
            [](CellScorePolicy & self, const std::vector<int32_t> & cells, int32_t capacity, int32_t n_incoming,
               int32_t n_pinned) {
                for (int32_t c : cells) {
                    if (c < 0 || size_t(c) >= self.cell_scores().size()) {
                        fail(ErrorKind::invalid_argument, "cell outside the policy's cells");
                    }
                }
                CacheState state;
                for (size_t i = 0; i < cells.size(); ++i) state.positions.push_back(Pos(i));
                state.n_pinned = n_pinned;
                return self.make_room(CacheView{state, cells, capacity}, n_incoming);
            },
            py::arg("cells"), py::arg("capacity"), py::arg("n_incoming"), py::arg("n_pinned") = 0,
            "Chronological indices (into `cells`, the cell of each cached token, oldest first) to evict.")
        .def_property_readonly("scores", &CellScorePolicy::cell_scores)
        .def_property_readonly("forced_evictions", &CellScorePolicy::forced_evictions);

    m.def(
        "apply_plan",
        [](const std::vector<Pos> & positions, const py::dict & plan) {
            return apply_plan(CacheState{positions, 0}, plan_from_dict(plan)).positions;
        },
        py::arg("positions"), py::arg("plan"), "Positions left in the cache once `plan` is applied.");

    // ---- engine ----
    py::class_<Engine>(m, "Engine", "One token stream through a bounded KV cache under a memory policy.")
        .def(py::init([](std::shared_ptr<LlamaModel> model, const std::string & policy, int32_t n_sink, int32_t window,
                         std::optional<int32_t> evict_chunk, std::optional<bool> reindex, int32_t n_threads,
                         int32_t n_threads_batch,
                         int32_t prefill_chunk, const std::string & flash_attention, const std::string & type_k,
                         const std::string & type_v, int32_t h2o_recent, const std::string & namm_path,
                         const std::string & namm_mode, float quorum, int32_t max_cells, int32_t namm_delay,
                         int32_t namm_layers, bool device_reductions, std::optional<int32_t> compact_at,
                         bool namm_defer_evictions, int32_t namm_neighbours, float namm_key_weight,
                         std::optional<float> namm_merge_threshold) {
                 EngineParams p;
                 p.policy.kind = parse_policy_kind(policy);
                 p.policy.n_sink = n_sink;
                 p.policy.window = window;
                 p.policy.evict_chunk = evict_chunk.value_or(default_evict_chunk(window));
                 // Sink-style policies re-index (the paper's rule); attention-scored ones keep absolute positions
                 // as the originals do unless asked, and by default close the cache's gaps once the next position
                 // would pass the model's training context (past it the model's output collapses).
                 p.policy.reindex = reindex.value_or(!is_attention_scored(p.policy.kind));
                 const bool auto_compact = !reindex.has_value() && is_attention_scored(p.policy.kind) && model;
                 p.policy.compact_at = compact_at.value_or(auto_compact ? model->info().n_ctx_train : 0);
                 p.n_threads = n_threads;
                 p.n_threads_batch = n_threads_batch;
                 p.prefill_chunk = prefill_chunk;
                 p.flash_attention = parse_flash_attention(flash_attention);
                 p.type_k = type_k;
                 p.type_v = type_v;
                 p.attention.h2o_recent = h2o_recent;
                 p.attention.namm_path = namm_path;
                 p.attention.namm_mode = namm_mode;
                 p.attention.quorum = quorum;
                 p.attention.max_cells = max_cells;
                 p.attention.namm_delay = namm_delay;
                 p.attention.namm_layers = namm_layers;
                 p.attention.namm_defer_evictions = namm_defer_evictions;
                 p.attention.namm_neighbours = namm_neighbours;
                 p.attention.namm_key_weight = namm_key_weight;
                 p.attention.namm_merge_threshold =
                     namm_merge_threshold.value_or(std::numeric_limits<float>::quiet_NaN());
                 p.attention.device_reductions = device_reductions;
                 p.model.path = model ? model->info().path : "";
                 py::gil_scoped_release release;
                 return std::make_unique<Engine>(std::move(model), p);
             }),
             py::arg("model"), py::arg("policy") = "sink", py::arg("n_sink") = 4, py::arg("window") = 1020,
             py::arg("evict_chunk") = py::none(), py::arg("reindex") = py::none(), py::arg("n_threads") = 0,
             py::arg("n_threads_batch") = 0, py::arg("prefill_chunk") = 0, py::arg("flash_attention") = "auto",
             py::arg("type_k") = "f16", py::arg("type_v") = "f16", py::arg("h2o_recent") = -1,
             py::arg("namm_path") = "", py::arg("namm_mode") = "", py::arg("quorum") = 0.0f,
             py::arg("max_cells") = 0, py::arg("namm_delay") = 0, py::arg("namm_layers") = 0,
             py::arg("device_reductions") = false, py::arg("compact_at") = py::none(),
             py::arg("namm_defer_evictions") = true, py::arg("namm_neighbours") = -1,
             py::arg("namm_key_weight") = -1.0f, py::arg("namm_merge_threshold") = py::none())
        .def_property_readonly("model", &Engine::shared_model)
        .def(
            "feed", [](Engine & self, const std::vector<Token> & tokens) { locked(self, [&] { self.feed(tokens); }); },
            py::arg("tokens"))
        .def(
            "score",
            [](Engine & self, const std::vector<Token> & tokens, int32_t chunk) {
                return to_numpy(locked(self, [&] { return self.score(tokens, chunk); }));
            },
            py::arg("tokens"), py::arg("chunk") = 1)
        .def(
            "sample", [](Engine & self, Sampler & sampler) { return locked(self, [&] { return self.sample(sampler); }); },
            py::arg("sampler"))
        .def("last_logits", [](const Engine & self) { return to_numpy(locked(self, [&] { return self.last_logits(); })); })
        .def(
            "pin_prefix", [](Engine & self, int32_t n) { locked(self, [&] { self.pin_prefix(n); }); }, py::arg("n_tokens"))
        .def("reset", [](Engine & self) { locked(self, [&] { self.reset(); }); })
        .def(
            "save_state",
            [](const Engine & self) { return py::bytes(locked(self, [&] { return self.save_state(); })); },
            "The stream's whole state (KV cells, cache mirror, pinned prefix, counters) as bytes; sink-style "
            "policies, h2o and tova (namm raises UnsupportedModelError).")
        .def(
            "load_state",
            [](Engine & self, const py::bytes & data) {
                std::string bytes = data;
                locked(self, [&] { self.load_state(bytes); });
            },
            py::arg("data"),
            "Restores save_state() bytes of an engine with the same model and memory settings; raises "
            "InvalidArgumentError (and resets) for damaged or mismatched bytes. Feed tokens before sampling.")
        .def(
            "rewind", [](Engine & self, int32_t n) { locked(self, [&] { self.rewind(n); }); }, py::arg("n_tokens"),
            "Takes back the last n cached tokens of the stream (sink-style policies); feed before sampling again.")
        .def(
            "set_threads",
            [](Engine & self, int32_t n_threads, int32_t n_threads_batch) {
                locked(self, [&] { self.set_threads(n_threads, n_threads_batch); });
            },
            py::arg("n_threads"), py::arg("n_threads_batch") = 0)
        .def("cached_tokens", [](const Engine & self) { return locked(self, [&] { return self.cached_tokens(); }); })
        .def("cached_positions", [](const Engine & self) { return locked(self, [&] { return self.cached_positions(); }); })
        .def("stats", [](const Engine & self) { return stats_to_dict(locked(self, [&] { return self.stats(); })); })
        .def(
            "capture_namm_layers",
            [](Engine & self, const std::vector<int32_t> & layers) {
                const auto lock = lock_engine(self);
                if (!self.attention_policy()) fail(ErrorKind::invalid_argument, "capture needs policy 'namm'");
                self.attention_policy()->capture_layers(layers);
            },
            py::arg("layers"), "Record, for these layers, what every later NAMM invocation saw and decided.")
        .def(
            "set_namm_parameters",
            [](Engine & self, const py::dict & tensors) {
                std::vector<std::pair<std::string, std::vector<float>>> values;
                for (const auto & item : tensors) {
                    const auto array = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(item.second);
                    if (!array) fail(ErrorKind::invalid_argument, "NAMM tensor values must be float arrays");
                    values.emplace_back(py::str(item.first), std::vector<float>(array.data(), array.data() + array.size()));
                }
                locked(self, [&] {
                    namm::NammModel * scorer = self.attention_policy() ? self.attention_policy()->namm_scorer() : nullptr;
                    if (!scorer) fail(ErrorKind::invalid_argument, "set_namm_parameters needs an engine with policy 'namm'");
                    scorer->set_parameters(values);
                });
            },
            py::arg("tensors"),
            "Replaces the NAMM's parameters in memory (a trainer's candidate): the eight NAMM GGUF tensors by name, "
            "ggml layout (pymemory.namm.convert.ggml_tensors). The engine's NAMM file must be f32. Call reset() "
            "before streaming a new sample.")
        .def("namm_captures",
             [](const Engine & self) {
                 const auto lock = lock_engine(self);
                 return captures_to_list(self.attention_policy());
             })
        .def(
            "clear_namm_captures",
            [](Engine & self) {
                const auto lock = lock_engine(self);
                if (self.attention_policy()) self.attention_policy()->clear_captures();
            },
            "Drops the captures read so far (each holds a layer's attention rows for one invocation).")
        .def("token_scores",
             [](Engine & self) { return locked(self, [&] { return self.token_scores(); }); },
             "h2o / tova: the score each cached token is ranked by (chronological, as cached_positions()); h2o's "
             "accumulated attention, tova's attention from the newest query, summed over layers and query heads. "
             "Empty for the other policies.")
        .def("policy_stats",
             [](const Engine & self) {
                 const auto lock = lock_engine(self);
                 return policy_stats_to_dict(self.attention_policy());
             },
             "Attention-scored policies: one record per invocation (cells before/after, whether the NAMM scorer "
             "ran: budget mode skips it when nothing could be evicted, per-layer kept counts, union/intersection "
             "of the per-head keep sets) and forced evictions; empty for the others.")
        .def_property_readonly("prefill_chunk",
                               [](const Engine & self) { return locked(self, [&] { return self.resolved_prefill_chunk(); }); })
        .def_property_readonly("policy", [](const Engine & self) { return policy_kind_name(self.params().policy.kind); })
        .def_property_readonly("capacity", [](const Engine & self) { return capacity(self.params().policy); });
}

}  // namespace pm::py_bindings
