// Bindings of the NAMM scorer (cpp/namm/) and the pure shared-cell decision of the NAMM policy.
// Arrays cross as numpy: attention [head][rows][columns] float32, positions int32, scores float32.
#include "bindings.h"

#include "errors.h"
#include "namm/namm_model.h"
#include "namm/namm_state.h"
#include "namm_policy.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace pm::py_bindings {
namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> as_numpy(const std::vector<T> & values, std::vector<py::ssize_t> shape) {
    py::array_t<T> out(shape);
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
}

namm::LayerInput layer_input(const IntArray & positions, const FloatArray & ema) {
    if (positions.ndim() != 2 || ema.ndim() != 3 || ema.shape(2) != namm::kBins || ema.shape(0) != positions.shape(0) ||
        ema.shape(1) != positions.shape(1)) {
        fail(ErrorKind::invalid_argument, "expected positions [heads, tokens] and ema [heads, tokens, 17]");
    }
    namm::LayerInput in;
    in.n_heads = int32_t(positions.shape(0));
    in.n_tokens = int32_t(positions.shape(1));
    in.positions.assign(positions.data(), positions.data() + positions.size());
    in.ema.assign(ema.data(), ema.data() + ema.size());
    return in;
}

py::dict hparams_dict(const namm::NammHparams & hp) {
    py::dict d;
    d["format_version"] = hp.format_version;
    d["delay"] = hp.delay;
    d["ema_coefficient"] = hp.ema_coefficient;
    d["recency_dim"] = hp.recency_dim;
    d["recency_max_freq"] = hp.recency_max_freq;
    d["recency_start"] = hp.recency_start;
    d["hidden"] = hp.hidden;
    d["threshold"] = hp.threshold;
    d["norm_eps"] = hp.norm_eps;
    d["weight_type"] = hp.weight_type;
    d["source"] = hp.source;
    return d;
}

}  // namespace

void register_namm(py::module_ & m) {
    py::class_<namm::LayerState>(m, "NammLayerState",
                                 "One layer's NAMM state: per KV head, the retained tokens' positions, EMA, history.")
        .def(py::init<int32_t>(), py::arg("n_heads"))
        .def_readonly("n_heads", &namm::LayerState::n_heads)
        .def_readonly("n_tokens", &namm::LayerState::n_tokens)
        .def_property_readonly("positions", [](const namm::LayerState & s) {
            return as_numpy(s.positions, {s.n_heads, s.n_tokens});
        })
        .def_property_readonly("ema", [](const namm::LayerState & s) {
            return as_numpy(s.ema, {s.n_heads, s.n_tokens, namm::kBins});
        })
        .def_property_readonly("history", [](const namm::LayerState & s) {
            return as_numpy(s.history, {s.n_heads, s.n_tokens, namm::kHop});
        });

    py::class_<namm::NammModel, std::shared_ptr<namm::NammModel>>(m, "NammModel",
                                                                 "A NAMM GGUF loaded on a ggml backend.")
        .def_static("load", &namm::NammModel::load, py::arg("path"), py::arg("device") = "cpu",
                    py::arg("n_threads") = 0, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("hparams", [](const namm::NammModel & self) { return hparams_dict(self.hparams()); })
        .def_property_readonly("device", &namm::NammModel::device_name)
        .def("set_threads", &namm::NammModel::set_threads, py::arg("n_threads"))
        .def(
            "step",
            [](const namm::NammModel & self, namm::LayerState & state, const FloatArray & attn, const IntArray & new_pos) {
                if (attn.ndim() != 3 || attn.shape(0) != state.n_heads) {
                    fail(ErrorKind::invalid_argument, "attn must be float32 [n_kv_heads=" +
                                                          std::to_string(state.n_heads) + ", rows, columns]");
                }
                const int32_t n_rows = int32_t(attn.shape(1));
                if (attn.shape(2) != state.n_tokens + n_rows) {
                    fail(ErrorKind::invalid_argument,
                         "attn has " + std::to_string(attn.shape(2)) + " columns; the state holds " +
                             std::to_string(state.n_tokens) + " tokens, so it needs n_old + rows = " +
                             std::to_string(state.n_tokens + n_rows));
                }
                if (new_pos.ndim() != 1 || new_pos.shape(0) != n_rows) {
                    fail(ErrorKind::invalid_argument, "new_pos must hold one position per attention row");
                }
                namm::StepResult result;
                {
                    py::gil_scoped_release release;
                    result = namm::step(self, state, attn.data(), n_rows, new_pos.data());
                }
                const py::ssize_t n = py::ssize_t(result.scored.scores.size()) / state.n_heads;
                return py::make_tuple(as_numpy(result.keep, {state.n_heads, state.n_tokens}),
                                      as_numpy(result.scored.scores, {state.n_heads, n}));
            },
            py::arg("state"), py::arg("attn"), py::arg("new_pos"),
            "One invocation: returns (keep [heads, K] int64 chronological column indices, scores [heads, n]).")
        .def(
            "score_layer",
            [](const namm::NammModel & self, const IntArray & positions, const FloatArray & ema) {
                namm::LayerInput in = layer_input(positions, ema);
                namm::LayerScores out;
                namm::ScorerTimings timings;
                {
                    py::gil_scoped_release release;
                    out = self.score_layer(in, &timings);
                }
                std::vector<uint8_t> keep(out.keep.begin(), out.keep.end());
                py::dict t;
                t["features_ms"] = timings.features_ms;
                t["bam_ms"] = timings.bam_ms;
                t["selection_ms"] = timings.selection_ms;
                return py::make_tuple(as_numpy(out.scores, {in.n_heads, in.n_tokens}),
                                      as_numpy(keep, {in.n_heads, in.n_tokens}), out.n_keep, t);
            },
            py::arg("positions"), py::arg("ema"),
            "Scores [heads, n], keep mask [heads, n] (uint8), K and timings for chronological tokens.")
        .def(
            "features",
            [](const namm::NammModel & self, const IntArray & positions, const FloatArray & ema) {
                namm::LayerInput in = layer_input(positions, ema);
                return as_numpy(self.features(in), {in.n_heads, in.n_tokens, namm::kFeatures});
            },
            py::arg("positions"), py::arg("ema"), "The 25 features [heads, n, 25]: recency || normalised spectrum.");

    m.def(
        "namm_select",
        [](const FloatArray & scores, float threshold) {
            if (scores.ndim() != 2) fail(ErrorKind::invalid_argument, "scores must be [heads, tokens]");
            std::vector<float> s(scores.data(), scores.data() + scores.size());
            namm::LayerScores out = namm::select_tokens(std::move(s), int32_t(scores.shape(0)),
                                                        int32_t(scores.shape(1)), threshold);
            std::vector<uint8_t> keep(out.keep.begin(), out.keep.end());
            return py::make_tuple(as_numpy(keep, {scores.shape(0), scores.shape(1)}), out.n_keep);
        },
        py::arg("scores"), py::arg("threshold") = 0.0f, "The selection rule alone: (keep mask, K).");

    m.def(
        "decide_shared_evictions",
        [](const std::string & mode, float quorum, int32_t max_cells, int32_t n_sink,
           const std::vector<int32_t> & drop_votes, const std::vector<double> & mean_scores, int32_t n_pairs) {
            SharedCellDecision rule;
            rule.mode = mode;
            rule.quorum = quorum;
            rule.max_cells = max_cells;
            rule.n_sink = n_sink;
            return decide_shared_evictions(rule, drop_votes, mean_scores, n_pairs);
        },
        py::arg("mode"), py::arg("quorum"), py::arg("max_cells"), py::arg("n_sink"), py::arg("drop_votes"),
        py::arg("mean_scores"), py::arg("n_pairs"));
}

}  // namespace pm::py_bindings
