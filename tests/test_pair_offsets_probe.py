"""tools/namm_pair_offsets_probe.py (offsets per pair on budget_zmax's rule, scored by the future attention its
evictions lose) and the neighbour pooling of tools/namm_aggregation_probe.py."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tool_modules import TOOLS, load_tool


def _received(rng, pairs=3, n=64):
    """[pairs, query, key] causal softmax rows."""
    logits = rng.normal(size=(pairs, n, n)) * 2.0
    logits[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    return (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)


def test_zero_offsets_rank_as_budget_zmax_and_the_lost_share_is_what_later_queries_give_the_evicted():
    probe = load_tool("namm_pair_offsets_probe")
    aggregation = load_tool("namm_aggregation_probe")
    received = _received(np.random.default_rng(0))
    replay = probe.Replay(received, delay=8)
    now, cand = 40, np.arange(2, 39)
    ema = aggregation.moving_averages(received, 0.998)
    np.testing.assert_allclose(replay.scores(now, cand, np.zeros(3)),
                               aggregation.ema_scores(ema, 0.998, now, cand, True, 1), rtol=1e-4, atol=1e-5)
    # an offset far above the others hands the ranking to that pair alone
    alone = replay.scores(now, cand, np.array([0.0, 50.0, 0.0]))
    log = np.log(np.maximum(ema[1, now, cand] / (1 - 0.998 ** np.maximum(now - cand, 1)), 1e-9))
    assert np.array_equal(np.argsort(alone), np.argsort(log))

    # The replay's own schedule, written out: cut to capacity - delay every delay tokens, sinks and newest stay.
    capacity, delay, n_sink = 24, 8, 2
    offsets = np.array([0.0, 0.7, -0.4])
    cached, lost = [], 0.0
    for now in range(delay, received.shape[1], delay):
        cached += list(range(now - delay, now))
        if len(cached) > capacity - delay:
            cand = np.array(cached[n_sink:-1])
            evict = cand[np.argsort(replay.scores(now, cand, offsets), kind="stable")[:len(cached) - capacity + delay]]
            lost += received[:, now:, evict].sum()
            cached = [p for p in cached if p not in set(evict.tolist())]
    assert lost > 0 and abs(replay.lost(offsets, capacity, delay, n_sink) - lost / received.sum()) < 1e-5


def test_the_fit_returns_its_best_candidate_as_pair_offsets():
    probe = load_tool("namm_pair_offsets_probe")
    rng = np.random.default_rng(1)
    replays = [probe.Replay(_received(rng, pairs=4), delay=8) for _ in range(2)]
    # two groups of two pairs (as "per layer" groups a layer's KV heads): one free value, pairs 2 and 3 share it
    offsets, curve = probe.fit_offsets(replays, np.array([0, 0, 1, 1]), 24, 8, 2, generations=6, sigma=1.0, seed=1)
    assert len(curve) == 6 and offsets[0] == offsets[1] == 0.0 and offsets[2] == offsets[3] != 0.0
    assert abs(np.mean([r.lost(offsets, 24, 8, 2) for r in replays]) - min(curve)) < 1e-12


def test_neighbour_max_takes_the_best_score_within_reach():
    aggregation = load_tool("namm_aggregation_probe")
    scores = np.array([0.0, 5.0, 1.0, 2.0, 0.0, 0.0, 9.0])
    rule = lambda now, cand: scores  # noqa: E731
    pooled = {args: aggregation.neighbour_max(rule, *args)(0, None).tolist()
              for args in ((1,), (1, 0), (0, 1), (1, 1, 0.5), (2,))}
    assert pooled[(1,)] == [5, 5, 5, 2, 2, 9, 9]
    assert pooled[(1, 0)] == [0, 5, 5, 2, 2, 0, 9]  # each from the one before it
    assert pooled[(0, 1)] == [5, 5, 2, 2, 0, 9, 9]  # each from the one after it
    assert pooled[(1, 1, 0.5)] == [4.5, 5, 4.5, 2, 1.5, 8.5, 9]  # neighbours count 0.5 less
    assert pooled[(2,)] == [5, 5, 5, 5, 9, 9, 9]
    values = np.random.default_rng(3).random((4, 9)) + 0.1
    np.testing.assert_allclose(aggregation.standardised_pooled_max(values, 0), aggregation.standardised_top(values, 1))


@pytest.mark.parametrize("flags, message", [(["--fit-text", "0"], "--fit-text, --text and --generations"),
                                            (["--sigma", "0"], "--sigma positive"),
                                            (["--namm", "nosuch"], "NAMM file not found: 'nosuch'"),
                                            (["--fraction", "0.05"], "--fraction gives 51 cells")])
def test_bad_arguments_are_refused_with_the_reason(flags, message, smollm2_path):  # the later checks load it
    out = subprocess.run([sys.executable, str(TOOLS / "namm_pair_offsets_probe.py"), "--out", "/nonexistent/x",
                          *flags], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-500:]
