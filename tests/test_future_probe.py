"""tools/namm_future_probe.py: causal predictors of summed future attention, the signals they read, and its errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tool_modules import TOOLS, load_tool


def _probe():
    return load_tool("namm_future_probe")


def _received(rng, pairs=2, n=12):
    """[pairs, query, key] causal softmax rows."""
    logits = rng.normal(size=(pairs, n, n))
    logits[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    return (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)


def test_signals_read_only_the_past_and_hindsight_only_the_future():
    probe = _probe()
    received = _received(np.random.default_rng(0))
    signals = probe.Signals(received)
    now, cand = 8, np.array([1, 3, 6])
    got = signals.features(now, cand)  # [pairs, cand, F]
    assert got.shape == (2, 3, len(probe.FEATURES))
    np.testing.assert_allclose(got[..., -1], np.log(now - cand)[None, :].repeat(2, 0), rtol=1e-6)
    rate = received[:, :now, cand].sum(axis=1) / (now - cand) * now
    np.testing.assert_allclose(got[..., 3], np.log(np.clip(rate, 0.01, 50.0)), rtol=1e-5)
    later = received.copy()
    later[:, now:] = 0.0  # what queries from `now` on give changes no feature...
    np.testing.assert_allclose(probe.Signals(later).features(now, cand), got, rtol=1e-6)
    # ...and is all that hindsight and the target read
    np.testing.assert_allclose(signals.future(now, cand, None), received[:, now:, cand].sum(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(signals.future(now, cand, 2), received[:, now:now + 2, cand].sum(axis=(0, 1)),
                               rtol=1e-5)
    np.testing.assert_allclose(signals.target(now, cand, 2), received[:, now:now + 2, cand].sum(axis=1) / 2 * now,
                               rtol=1e-5)
    # near the end a target is the rate over the queries left, not a sum short of the horizon
    np.testing.assert_allclose(signals.target(10, cand, 8), received[:, 10:, cand].sum(axis=1) / 2 * 10, rtol=1e-5)


def test_poisson_fit_recovers_the_mean_not_the_geometric_mean():
    probe = _probe()
    rng = np.random.default_rng(1)
    # columns far from unit spread: a fit that forgot to undo its standardisation would miss by their scale
    x = np.concatenate([rng.normal(size=(20000, 2)) * [3.0, 0.2], np.ones((20000, 1))], axis=1)
    truth = np.array([0.25, -2.5, 0.3])
    y = rng.poisson(np.exp(x @ truth)).astype(np.float64)
    np.testing.assert_allclose(probe.fit_poisson(x, y), truth, atol=0.05)
    # least squares on log(y + small) would be biased by the zeros; the Poisson fit's mean matches the data's
    assert abs(np.exp(x @ probe.fit_poisson(x, y)).mean() - y.mean()) < 0.02 * y.mean()


def test_token_features_standardise_within_the_candidates_and_the_classifier_learns_a_label():
    probe = _probe()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 40, len(probe.FEATURES))).astype(np.float32)
    shared = np.zeros(len(probe.FEATURES) * (len(probe.FEATURES) + 3) // 2 + 1)
    features = probe.token_features(x, shared)
    assert features.shape == (40, len(probe.TOKEN_FEATURES))
    z = probe.standardised(x[..., 2])
    np.testing.assert_allclose(features[:, 0], z.max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(probe.token_features(x + 5.0, shared)[:, 0], features[:, 0], rtol=1e-4)  # shift-free
    # a label that follows the z-max feature is learned: the classifier ranks by it
    y = np.exp(x[..., 2]) * 0 + np.where(z.max(axis=0) > np.quantile(z.max(axis=0), 0.7), 5.0, 0.1)[None, :]
    weights = probe.fit_token_ranker(x, y.astype(np.float32), shared, per_time=40, nows=np.array([41]), kept=12,
                                     n_sink=0)  # 12 of 40 candidates kept
    scores = probe.expanded(features) @ weights
    top = set(np.argsort(-scores)[:12])
    assert len(top & set(np.argsort(-z.max(axis=0))[:12])) >= 10


def test_future_queries_attend_causally_within_each_kv_heads_group():
    probe = _probe()
    rng = np.random.default_rng(4)
    layers, n_kv, group, n, d = 2, 2, 3, 10, 8
    fq = probe.FutureQueries.__new__(probe.FutureQueries)
    fq.queries = rng.normal(size=(layers, n_kv, group, n, d)).astype(np.float32)  # before RoPE
    fq.keys = rng.normal(size=(layers, n_kv, n, d)).astype(np.float32)  # after RoPE
    fq.base, fq.rope_type, fq.scale = 10000.0, 0, 1.0 / np.sqrt(d)
    sources, at, cached = np.array([5, 7]), np.array([5, 12]), np.array([0, 1, 3, 6, 7, 9])
    got = fq.attention(sources, at, cached)  # [pairs, cached]
    want = np.zeros((layers * n_kv, len(cached)))
    for layer in range(layers):
        for kv in range(n_kv):
            for j in range(group):
                for source, position in zip(sources, at):
                    q = probe.rotate(fq.queries[layer, kv, j, [source]], np.array([position]), 10000.0, 0)[0]
                    seen = cached <= position
                    logits = fq.keys[layer, kv, cached[seen]] @ q / np.sqrt(d)
                    row = np.zeros(len(cached))
                    row[seen] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
                    want[layer * n_kv + kv] += row / (group * len(sources))
    np.testing.assert_allclose(got, want, atol=2e-3)  # queries meet the keys in f16, as in llama.cpp
    assert (got[:, cached > 12] == 0).all() and got[:, cached > 5].sum() > 0  # query 5 at 5 cannot see 6, 7, 9


def test_summed_rank_correlation_is_one_for_a_perfect_predictor_and_minus_one_reversed():
    probe = _probe()
    y = np.random.default_rng(3).uniform(0.1, 5.0, size=(4, 30))
    assert probe.summed_rank_correlation(np.log(y), y, 10) == pytest.approx(1.0)
    total = y.sum(axis=0)
    reversed_ = np.log(np.broadcast_to((1.0 / total)[None, :], y.shape) / 4)
    assert probe.summed_rank_correlation(reversed_, y, 10) == pytest.approx(-1.0)


@pytest.mark.parametrize("flags, message", [(["--rules", "zmax,nosuch"], "nosuch"),
                                            (["--rules", ""], "none"),
                                            (["--horizon", "100"], "--horizon must be a multiple"),
                                            (["--window", "0"], "--window")])
def test_bad_arguments_are_refused_with_the_reason(flags, message, smollm2_path):  # the later checks load it
    out = subprocess.run([sys.executable, str(TOOLS / "namm_future_probe.py"), "--out", "/nonexistent/x", *flags],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-500:]
