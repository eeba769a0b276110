// Bindings of the NAMM scorer (cpp/namm/) and the pure shared-cell decision of the NAMM policy.
// Arrays cross as numpy, laid out as in the C++ core: attention [head][rows][tokens] float32, positions int64,
// EMA [head][token][17], history [head][token][16], scores [head][token]. Graph computations release the GIL.
#include "bindings.h"
#include "numpy_util.h"

#include "errors.h"
#include "key_distinctiveness.h"
#include "namm/namm_model.h"
#include "namm/namm_state.h"
#include "namm_policy.h"

#include <cmath>
#include <limits>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace pm::py_bindings {
namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::string shape_text(const py::array & a) {
    std::string s = "[";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
    return s + "]";
}

py::dict hparams_dict(const namm::NammHparams & hp) {
    py::dict d;
    d["format_version"] = hp.format_version;
    d["delay"] = hp.delay;
    d["ema_coefficient"] = hp.ema_coefficient;
    d["ema_bias_correction"] = hp.ema_bias_correction;
    d["recency_max_freq"] = hp.recency_max_freq;
    d["recency_start"] = hp.recency_start;
    d["threshold"] = hp.threshold;
    d["norm_eps"] = hp.norm_eps;
    d["weight_type"] = hp.weight_type;
    d["source"] = hp.source;
    d["deploy_mode"] = hp.deploy_mode;    // "" when the file records none
    d["deploy_quorum"] = hp.deploy_quorum;
    d["deploy_delay"] = hp.deploy_delay;  // 0 when the file records none
    d["deploy_neighbours"] = hp.deploy_neighbours;  // 0 when the file records none
    d["deploy_key_weight"] = hp.deploy_key_weight;  // 0 when the file records none
    d["deploy_merge_threshold"] = std::isnan(hp.deploy_merge_threshold) ? py::object(py::none())
                                                                        : py::object(py::float_(hp.deploy_merge_threshold));
    return d;
}

py::dict timings_dict(const namm::ScorerTimings & t) {
    py::dict d;
    d["features_ms"] = t.features_ms;
    d["bam_ms"] = t.bam_ms;
    d["selection_ms"] = t.selection_ms;
    return d;
}

py::array_t<int64_t> positions_numpy(const namm::LayerState & s) {
    const std::vector<int64_t> wide(s.positions.begin(), s.positions.end());
    return as_numpy(wide, {s.n_heads, s.n_tokens});
}

// int64 positions -> int32, each checked to lie in [0, 2^31).
std::vector<int32_t> checked_positions(const Int64Array & positions) {
    std::vector<int32_t> pos(size_t(positions.size()));
    for (size_t i = 0; i < pos.size(); ++i) {
        const int64_t p = positions.data()[i];
        if (p < 0 || p > std::numeric_limits<int32_t>::max()) {
            fail(ErrorKind::invalid_argument, "positions must lie in [0, 2^31) (got " + std::to_string(p) + ")");
        }
        pos[i] = int32_t(p);
    }
    return pos;
}

namm::LayerState state_from_arrays(const Int64Array & positions, const FloatArray & ema, const FloatArray & history) {
    if (positions.ndim() != 2 || ema.ndim() != 3 || history.ndim() != 3 || ema.shape(2) != namm::kBins ||
        history.shape(2) != namm::kHop || ema.shape(0) != positions.shape(0) || ema.shape(1) != positions.shape(1) ||
        history.shape(0) != positions.shape(0) || history.shape(1) != positions.shape(1)) {
        fail(ErrorKind::invalid_argument, "expected positions [heads, tokens], ema [heads, tokens, 17] and history "
                                          "[heads, tokens, 16]; got " + shape_text(positions) + ", " + shape_text(ema) +
                                          ", " + shape_text(history));
    }
    return namm::LayerState(int32_t(positions.shape(0)), int32_t(positions.shape(1)), checked_positions(positions),
                            std::vector<float>(ema.data(), ema.data() + ema.size()),
                            std::vector<float>(history.data(), history.data() + history.size()));
}

// attn [n_kv_heads, delay, n_old + delay] and new_pos [delay] for one invocation on `state` (the reference's API).
void check_invocation_shapes(const namm::NammModel & model, const namm::LayerState & state, const FloatArray & attn,
                             const Int64Array & new_pos) {
    const int32_t rows = model.hparams().delay;
    const std::string expected = "[n_kv_heads=" + std::to_string(state.n_heads) + ", " + std::to_string(rows) +
                                 ", n_old + " + std::to_string(rows) + " = " + std::to_string(state.n_tokens + rows) + "]";
    if (attn.ndim() != 3 || attn.shape(0) != state.n_heads) {
        fail(ErrorKind::invalid_argument, "attn must be " + expected + ", got " + shape_text(attn));
    }
    if (attn.shape(1) != rows) {
        fail(ErrorKind::invalid_argument, "attn has " + std::to_string(attn.shape(1)) + " rows; an invocation receives "
                                          "the " + std::to_string(rows) + " queries since the previous one (delay " +
                                          std::to_string(rows) + ")");
    }
    if (attn.shape(2) != state.n_tokens + rows) {
        fail(ErrorKind::invalid_argument, "attn has " + std::to_string(attn.shape(2)) + " columns; this state retains " +
                                              std::to_string(state.n_tokens) + " tokens per head, so it needs " + expected);
    }
    if (new_pos.ndim() != 1 || new_pos.shape(0) != rows) {
        fail(ErrorKind::invalid_argument, "new_pos must hold the " + std::to_string(rows) +
                                              " new absolute positions, got shape " + shape_text(new_pos));
    }
}

}  // namespace

void register_namm(py::module_ & m) {
    py::class_<namm::LayerState>(m, "NammLayerState",
                                 "One layer's NAMM state: per KV head, the retained tokens (chronological) with their "
                                 "positions, spectrogram EMA and last 16 attention values.")
        .def(py::init<int32_t>(), py::arg("n_kv_heads"))
        .def(py::init(&state_from_arrays), py::arg("positions"), py::arg("ema"), py::arg("history"),
             "From arrays: positions [H, n] int, ema [H, n, 17] and history [H, n, 16] float32.")
        .def_readonly("n_heads", &namm::LayerState::n_heads)
        .def_readonly("n_tokens", &namm::LayerState::n_tokens)
        .def_property_readonly("positions", &positions_numpy, "int64 [H, n] absolute positions (a copy)")
        .def_property_readonly("ema", [](const namm::LayerState & s) {
            return as_numpy(s.ema, {s.n_heads, s.n_tokens, namm::kBins});
        }, "float32 [H, n, 17] un-normalised spectrogram EMA (a copy)")
        .def_property_readonly("history", [](const namm::LayerState & s) {
            return as_numpy(s.history, {s.n_heads, s.n_tokens, namm::kHop});
        }, "float32 [H, n, 16] last 16 attention values per token (a copy)")
        .def("append", [](namm::LayerState & s, const Int64Array & positions) {
            if (positions.ndim() != 1) fail(ErrorKind::invalid_argument, "positions must be 1-D, got " + shape_text(positions));
            const std::vector<int32_t> pos = checked_positions(positions);
            s.append(pos.data(), int32_t(pos.size()));
        }, py::arg("positions"), "Adds new tokens to every head (E = 0, history = 0), after the newest one.")
        .def("gather", [](namm::LayerState & s, const Int64Array & keep) {
            if (keep.ndim() != 2 || keep.shape(0) != s.n_heads) {
                fail(ErrorKind::invalid_argument, "keep must be [n_kv_heads=" + std::to_string(s.n_heads) + ", K], got " +
                                                      shape_text(keep));
            }
            s.gather(std::vector<int64_t>(keep.data(), keep.data() + keep.size()), int32_t(keep.shape(1)));
        }, py::arg("keep"), "Keeps only keep[h] (increasing token indices) in each head.");

    py::class_<namm::NammModel, std::shared_ptr<namm::NammModel>>(m, "NammModel",
                                                                 "A NAMM GGUF loaded on a ggml backend.")
        .def_static("load", py::overload_cast<const std::string &, const std::string &, int32_t>(&namm::NammModel::load),
                    py::arg("path"), py::arg("device") = "cpu", py::arg("n_threads") = 0,
                    py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("hparams", [](const namm::NammModel & self) { return hparams_dict(self.hparams()); })
        .def_property_readonly("device", &namm::NammModel::device_name)
        .def("set_threads", &namm::NammModel::set_threads, py::arg("n_threads"))
        .def(
            "set_bam_attention",
            [](namm::NammModel & self, const std::string & kind) {
                using K = namm::NammModel::BamAttention;
                if (kind != "automatic" && kind != "flash" && kind != "matmul") {
                    fail(ErrorKind::invalid_argument, "bam attention must be 'automatic', 'flash' or 'matmul' (got '" + kind + "')");
                }
                self.set_bam_attention(kind == "flash" ? K::flash : kind == "matmul" ? K::matmul : K::automatic);
            },
            py::arg("kind"))
        .def_property_readonly("bam_uses_flash_attention", &namm::NammModel::bam_uses_flash_attention)
        .def(
            "step",
            [](const namm::NammModel & self, namm::LayerState & state, const FloatArray & attn, const Int64Array & new_pos) {
                check_invocation_shapes(self, state, attn, new_pos);
                namm::StepResult result;
                namm::ScorerTimings timings;
                {
                    py::gil_scoped_release release;
                    result = namm::step(self, state, attn.data(), int32_t(attn.shape(1)), new_pos.data(), &timings);
                }
                const py::ssize_t n = attn.shape(2);
                return py::make_tuple(as_numpy(result.keep, {state.n_heads, state.n_tokens}),
                                      as_numpy(result.scored.scores, {state.n_heads, n}), timings_dict(timings));
            },
            py::arg("state"), py::arg("attn"), py::arg("new_pos"),
            "One invocation: (keep [H, K] int64 chronological token indices, scores [H, n], timings in ms).")
        .def(
            "folded",
            [](const namm::NammModel & self, const namm::LayerState & state, const FloatArray & attn,
               const Int64Array & new_pos) {
                check_invocation_shapes(self, state, attn, new_pos);
                py::gil_scoped_release release;
                return namm::folded_invocation(self, state, attn.data(), int32_t(attn.shape(1)), new_pos.data());
            },
            py::arg("state"), py::arg("attn"), py::arg("new_pos"),
            "The state after appending the invocation's tokens and folding its window (`state` is not changed).")
        .def(
            "fold_frame",
            [](const namm::NammModel & self, namm::LayerState & state, const FloatArray & rows16) {
                if (rows16.ndim() != 3 || rows16.shape(0) != state.n_heads || rows16.shape(1) != namm::kHop ||
                    rows16.shape(2) != state.n_tokens) {
                    fail(ErrorKind::invalid_argument, "rows16 must be [n_kv_heads=" + std::to_string(state.n_heads) +
                                                          ", 16, n_tokens=" + std::to_string(state.n_tokens) + "], got " +
                                                          shape_text(rows16));
                }
                py::gil_scoped_release release;
                namm::fold_frame(self, state, rows16.data());
            },
            py::arg("state"), py::arg("rows16"), "One STFT frame folded into the state (streaming form).")
        .def(
            "features",
            [](const namm::NammModel & self, const namm::LayerState & state) {
                std::vector<float> x;
                {
                    py::gil_scoped_release release;
                    x = self.features(state);
                }
                return as_numpy(x, {state.n_heads, state.n_tokens, namm::kFeatures});
            },
            py::arg("state"), "The 25 features [H, n, 25] (recency ‖ normalised spectrum) of the state's tokens.")
        .def(
            "scores",
            [](const namm::NammModel & self, const namm::LayerState & state) {
                std::vector<float> s;
                namm::ScorerTimings timings;
                {
                    py::gil_scoped_release release;
                    s = self.scores(state, &timings);
                }
                return py::make_tuple(as_numpy(s, {state.n_heads, state.n_tokens}), timings_dict(timings));
            },
            py::arg("state"), "Scores [H, n] of the state's tokens (features and BAM, no selection), timings.")
        .def(
            "scores_from_features",
            [](const namm::NammModel & self, const FloatArray & x) {
                if (x.ndim() != 3 || x.shape(2) != namm::kFeatures) {
                    fail(ErrorKind::invalid_argument, "X must be [H, n, 25], got " + shape_text(x));
                }
                for (py::ssize_t i = 0; i < x.size(); ++i) {
                    if (!std::isfinite(x.data()[i])) fail(ErrorKind::invalid_argument, "X contains NaN or infinity");
                }
                const int32_t H = int32_t(x.shape(0)), n = int32_t(x.shape(1));
                std::vector<float> s;
                {
                    py::gil_scoped_release release;
                    s = self.scores_from_features(x.data(), H, n);
                }
                return as_numpy(s, {H, n});
            },
            py::arg("x"), "BAM alone: scores [H, n] of features X [H, n, 25].");

    m.def(
        "namm_select",
        [](const FloatArray & scores, float threshold) {
            if (scores.ndim() != 2) fail(ErrorKind::invalid_argument, "scores must be [heads, tokens], got " + shape_text(scores));
            std::vector<float> s(scores.data(), scores.data() + scores.size());
            const int32_t H = int32_t(scores.shape(0));
            const namm::LayerScores out = namm::select_tokens(std::move(s), H, int32_t(scores.shape(1)), threshold);
            return as_numpy(namm::keep_indices(out, H), {H, out.n_keep});
        },
        py::arg("scores"), py::arg("threshold") = 0.0f,
        "The selection rule (spec §4.1): keep [H, K] int64, chronological token indices per head.");

    m.def(
        "decide_shared_evictions",
        [](const std::string & mode, float quorum, int32_t max_cells, int32_t n_sink,
           const std::vector<int32_t> & drop_votes, const std::vector<double> & scores, int32_t n_pairs,
           const std::vector<double> & reserve_scores, int32_t reserve, int32_t neighbours) {
            SharedCellDecision rule;
            rule.mode = mode;
            rule.quorum = quorum;
            rule.max_cells = max_cells;
            rule.n_sink = n_sink;
            rule.reserve = reserve;
            rule.neighbours = neighbours;
            return decide_shared_evictions(rule, drop_votes, scores, n_pairs, reserve_scores);
        },
        py::arg("mode"), py::arg("quorum"), py::arg("max_cells"), py::arg("n_sink"), py::arg("drop_votes"),
        py::arg("scores"), py::arg("n_pairs"), py::arg("reserve_scores") = std::vector<double>{},
        py::arg("reserve") = 0, py::arg("neighbours") = 0);
    m.def(
        "key_distinctiveness",
        [](const std::vector<float> & keys, int32_t n_pairs, int32_t n_tokens, int32_t head_dim, int32_t first,
           int32_t last) { return key_distinctiveness(keys, n_pairs, n_tokens, head_dim, first, last); },
        py::arg("keys"), py::arg("n_pairs"), py::arg("n_tokens"), py::arg("head_dim"), py::arg("first"),
        py::arg("last"));
    m.def(
        "add_standardised",
        [](std::vector<double> scores, const std::vector<double> & extra, double weight, int32_t first,
           int32_t last) {
            add_standardised(scores, extra, weight, first, last);
            return scores;
        },
        py::arg("scores"), py::arg("extra"), py::arg("weight"), py::arg("first"), py::arg("last"));
}

}  // namespace pm::py_bindings
