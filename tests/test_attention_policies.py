"""Attention-scored policies (h2o, tova; namm in test_namm_policy.py): the tap, the cell mirror, bounded caches."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

import pytest

from conftest import STREAM_TOKENS
from pymemory import InvalidArgumentError, StreamingLLM
from pymemory._loader import _core


def test_lowest_scoring_orders_by_score_then_age_and_clamps():
    scores = [5.0, 1.0, 3.0, 1.0, 0.5, 9.0]
    assert _core.lowest_scoring(scores, 1, 5, 2) == [1, 4]  # 0.5, then the older of the two 1.0s
    assert _core.lowest_scoring(scores, 1, 5, 3) == [1, 3, 4]
    assert _core.lowest_scoring(scores, 0, 6, 0) == []
    assert _core.lowest_scoring(scores, 4, 6, 10) == [4, 5]  # no more than the range holds


@pytest.mark.parametrize("shape", [(3, 1, 37), (9, 512, 1031), (2, 600, 2048)])
def test_host_reduction_sums_every_cell_with_any_thread_count(shape):
    """The tap's host loop (a prompt batch's matrix split over threads by cells) adds exactly what numpy adds,
    over all rows or the last one, with one thread or several, including matrices too small to split and cell
    counts that do not divide evenly."""
    attention = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    for last_row in (False, True):
        rows = attention[:, -1:] if last_row else attention
        expected = rows.sum(axis=(0, 1), dtype=np.float64)
        one = _core.sum_attention_by_cell(attention, last_row, 1)
        np.testing.assert_allclose(one, expected, rtol=1e-5)
        for threads in (2, 3):
            np.testing.assert_array_equal(_core.sum_attention_by_cell(attention, last_row, threads), one)
    with pytest.raises(InvalidArgumentError, match="heads, rows, cells"):
        _core.sum_attention_by_cell(attention[0])


@pytest.mark.model
@pytest.mark.parametrize("device_reductions", [False, True])
def test_cell_mirror_tracks_llama_cpp_through_irregular_batches_and_evictions(smollm2_model, english_text,
                                                                              device_reductions):
    """Every decoded batch checks the adapter's mirror of llama.cpp's cell allocation against the layer-0
    attention pattern (a token must attend to the cell the mirror placed it in, and to no cell holding a later
    or no position). Scattered h2o evictions, holes refilled by later tokens, and batches of random sizes
    exercise every branch of the allocation; any divergence raises instead of passing. With device_reductions the
    check and h2o's per-cell sums come from ggml graphs, as on a GPU, instead of host loops over the matrix."""
    tokens = smollm2_model.tokenize(english_text, True, False)[:1500]
    rng = random.Random(5)
    for reindex in (False, True):
        engine = _core.Engine(smollm2_model, policy="h2o", n_sink=4, window=92, evict_chunk=5, h2o_recent=20,
                              reindex=reindex, device_reductions=device_reductions)
        start = 0
        while start < len(tokens):
            n = rng.choice([1, 1, 2, 3, 7, 16, 40])
            engine.feed(tokens[start:start + n])
            start += n
            s = engine.stats()
            assert s["cells_used"] <= 96
        positions = engine.cached_positions()
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        assert engine.cached_tokens()[:4] == tokens[:4]
        assert engine.cached_tokens()[-20:] == tokens[-20:]  # the recent window is always kept
        if reindex:
            assert positions == list(range(len(positions)))
        else:
            assert positions[-1] == len(tokens) - 1  # absolute positions, gaps where tokens left
            assert len(positions) < positions[-1]


@pytest.mark.model
def test_absolute_positions_are_compacted_before_they_pass_compact_at(smollm2_model, english_text):
    """With reindex=False an attention-scored policy keeps absolute positions, which grow with the stream; past the
    model's training context its output collapses (docs/results.md §4). compact_at closes every gap before a token
    would get that position: positions stay below it, nothing is evicted for it, and the cell mirror (checked by
    every decode) still matches llama.cpp after the shifts."""
    tokens = smollm2_model.tokenize(english_text, True, False)[:1500]
    rng = random.Random(7)
    engine = _core.Engine(smollm2_model, policy="h2o", n_sink=4, window=92, evict_chunk=5, h2o_recent=20,
                          reindex=False, compact_at=300)
    start, max_pos = 0, 0
    while start < len(tokens):
        n = rng.choice([1, 2, 7, 16, 40])
        engine.feed(tokens[start:start + n])
        start += n
        max_pos = max(max_pos, engine.stats()["max_pos"])
    positions = engine.cached_positions()
    assert max_pos < 300 and positions == sorted(positions) and len(set(positions)) == len(positions)
    assert engine.cached_tokens()[:4] == tokens[:4] and engine.cached_tokens()[-20:] == tokens[-20:]
    s = engine.stats()
    assert s["tokens_evicted"] == len(tokens) - s["cells_used"]  # compactions evict nothing
    # Without compact_at the same stream keeps absolute positions.
    absolute = _core.Engine(smollm2_model, policy="h2o", n_sink=4, window=92, h2o_recent=20, reindex=False)
    absolute.feed(tokens)
    assert absolute.stats()["max_pos"] == len(tokens) - 1
    with pytest.raises(InvalidArgumentError, match="compact_at must be >= 0"):
        _core.Engine(smollm2_model, policy="h2o", n_sink=4, window=92, compact_at=-1)


@pytest.mark.model
def test_attention_scored_policies_compact_at_the_training_context_by_default(tmp_path, smollm2_path, english_text):
    """The default (reindex unset) keeps absolute positions inside the model's training context and compacts before
    passing it. SmolLM2 with its training context patched from 8,192 to 1,024 positions: the same weights, a
    limit a short test reaches."""
    from helpers.gguf_surgery import with_training_context
    from pymemory.namm.packaged import resolve_namm

    model = _core.Model.load(os.fspath(with_training_context(Path(smollm2_path), tmp_path / "short.gguf", 1024)))
    assert model.info["n_ctx_train"] == 1024
    tokens = model.tokenize(english_text, True, False)[:1300]
    for policy, extra in (("h2o", {}), ("tova", {}), ("namm", {"namm_path": resolve_namm("smollm2")})):
        engine = _core.Engine(model, policy=policy, n_sink=4, window=124, **extra)
        engine.feed(tokens[:1000])
        assert engine.stats()["max_pos"] == 999  # absolute so far
        engine.feed(tokens[1000:])
        s = engine.stats()
        assert s["max_pos"] < 1024 and s["tokens_seen"] == 1300 and s["cells_used"] <= 128, (policy, s)
        assert engine.cached_tokens()[-32:] == tokens[-32:]


@pytest.mark.model
@pytest.mark.parametrize("policy", ["h2o", "namm", "namm with keys"])
def test_device_reductions_keep_what_host_reductions_keep(smollm2_model, english_text, policy):
    """The GPU code path (ggml graphs over the attention tensor, no host matrix; keys copied by
    ggml_backend_tensor_get) run on the CPU backend evicts the same tokens as the host loops (h2o's cell sums; NAMM's
    row copies between STFT frames; the keys' strided copy). Batches of 37 tokens and then single tokens reach both
    kinds of NAMM batch: ones that complete a frame and ones that do not."""
    from pymemory.namm.packaged import resolve_namm

    extra = {"h2o": {"h2o_recent": 40}, "namm": {"namm_path": resolve_namm("smollm2")},
             "namm with keys": {"namm_path": resolve_namm("smollm2-rate"), "namm_key_weight": 0.5}}[policy]
    policy = policy.split()[0]
    tokens = smollm2_model.tokenize(english_text, True, False)[:500]
    kept = {}
    for device in (False, True):
        engine = _core.Engine(smollm2_model, policy=policy, n_sink=4, window=124, device_reductions=device, **extra)
        for start in range(0, 400, 37):
            engine.feed(tokens[start:min(start + 37, 400)])
        for token in tokens[400:]:  # single tokens: row copies, a frame fold every 16th, an invocation every 32nd
            engine.feed([token])
        kept[device] = engine.cached_positions()
        assert engine.policy_stats()["forced_evictions"] == 0
    assert kept[True] == kept[False] and kept[True][-1] == len(tokens) - 1 and len(kept[True]) <= 128


@pytest.mark.model
def test_h2o_long_generation_stays_within_budget(smollm2_model):
    engine = _core.Engine(smollm2_model, policy="h2o", n_sink=4, window=252, reindex=True)
    sampler = _core.Sampler(smollm2_model, _core.SamplingParams(temperature=0.8, seed=2))
    engine.feed(smollm2_model.tokenize("Once upon a time", True, False))
    n = max(STREAM_TOKENS, 600)
    for i in range(n):
        token = engine.sample(sampler)
        engine.feed([token])
        if i % 100 == 0:
            assert engine.stats()["cells_used"] <= 256
    s = engine.stats()
    assert s["peak_cells"] <= 256 and s["evictions"] > 0 and s["max_pos"] < 256
    assert engine.policy_stats()["policy"] == "h2o"
    print("h2o", {k: s[k] for k in ("tokens_seen", "peak_cells", "max_pos", "evictions")})


@pytest.mark.model
def test_h2o_keeps_older_heavy_hitters_that_sink_drops(smollm2_model, english_text):
    tokens = smollm2_model.tokenize(english_text, True, False)[:1200]
    h2o = _core.Engine(smollm2_model, policy="h2o", n_sink=4, window=124, h2o_recent=62)
    sink = _core.Engine(smollm2_model, policy="sink", n_sink=4, window=124)
    h2o.feed(tokens)
    sink.feed(tokens)
    cutoff = len(tokens) - 124  # everything before this is outside the sink window
    old_kept = [p for p in h2o.cached_positions()[4:] if p < cutoff]
    assert len(old_kept) >= 20  # part of the heavy-hitter half comes from far back (31 measured)
    recent = sink.cached_tokens()[4:]  # sink re-indexes positions: compare token ids with the stream's tail
    assert len(recent) <= 124 and recent == tokens[len(tokens) - len(recent):]


@pytest.mark.model
def test_attention_policies_refuse_what_they_cannot_do(smollm2_path):
    # (sliding-window models are supported since issue 13: tests/test_iswa.py)
    with pytest.raises(InvalidArgumentError, match="h2o_recent"):
        StreamingLLM(smollm2_path, policy="h2o", window=100, h2o_recent=100)
    with pytest.raises(InvalidArgumentError, match="needs namm_path"):
        StreamingLLM(smollm2_path, policy="namm")
    with pytest.raises(InvalidArgumentError, match="quorum"):
        StreamingLLM(smollm2_path, policy="h2o", quorum=1.5)


# ---- TOVA next to H2O: the same eviction rule, different scores ---------------------------------------------------

def _causal_batch():
    """One layer, two heads (identical), four tokens in cells 0-3: rows 1-2 look at token 1, the last row (the
    newest token) at tokens 0 and 3 and hardly at all at token 1."""
    rows = np.array([[1.0, 0.0, 0.0, 0.0],
                     [0.5, 0.5, 0.0, 0.0],
                     [0.3, 0.6, 0.1, 0.0],
                     [0.4, 0.02, 0.08, 0.5]], dtype=np.float32)
    return np.stack([rows, rows])  # [heads, rows, cells]


def test_tova_evicts_what_the_newest_query_ignores_where_h2o_evicts_the_least_accumulated():
    attention = _causal_batch()
    chosen = {}
    for name in ("h2o", "tova"):
        policy = _core.CellScorePolicy(name, n_sink=1, recent=0, evict_chunk=1, n_cells=8)
        policy.begin_batch()
        for layer in range(2):  # the same matrix on two layers: scores are summed over layers and heads
            policy.observe(layer, attention, [0, 1, 2, 3])
        chosen[name] = policy.make_room([0, 1, 2, 3], capacity=4, n_incoming=1)
        if name == "h2o":  # every row: token 2 received least (0.15 per head and layer)
            assert np.allclose(policy.scores[:4], 4 * attention[0].sum(axis=0))
        else:  # the last row only: token 1 (0.02)
            assert np.allclose(policy.scores[:4], 4 * attention[0, -1])
    assert chosen == {"h2o": [2], "tova": [1]}


def test_tova_replaces_its_scores_at_every_ubatch_while_h2o_accumulates():
    """A later ubatch (layer 0 arrives again, with or without begin_batch: llama.cpp may split a batch) replaces
    every TOVA score by the new last row's; H2O adds the new rows and restarts only the cells the new tokens took
    (cell 2 here, whose token was evicted)."""
    first = _causal_batch()
    # Token 2 was evicted; the next batch's two tokens go to cells 2 (a reused cell) and 4.
    second = np.zeros((2, 2, 5), dtype=np.float32)
    second[:, 0] = [0.1, 0.3, 0.4, 0.2, 0.0]
    second[:, 1] = [0.1, 0.02, 0.3, 0.2, 0.38]
    h2o = _core.CellScorePolicy("h2o", n_sink=1, recent=0, evict_chunk=1, n_cells=8)
    tova = _core.CellScorePolicy("tova", n_sink=1, recent=0, evict_chunk=1, n_cells=8)
    for policy in (h2o, tova):
        policy.observe(0, first, [0, 1, 2, 3])
        policy.observe(0, second, [2, 4])  # no begin_batch: layer 0 starts the ubatch
    assert np.allclose(tova.scores[:5], 2 * second[0, -1]) and not np.any(tova.scores[5:])
    before = 2 * first[0].sum(axis=0)
    expected = np.array([before[0], before[1], 0.0, before[3], 0.0]) + 2 * second[0].sum(axis=0)
    assert np.allclose(h2o.scores[:5], expected)
    # Cache (oldest first): tokens in cells 0, 1, 3, 2, 4; full at 5, one more incoming. The sink (cell 0) stays.
    cells = [0, 1, 3, 2, 4]
    assert tova.make_room(cells, capacity=5, n_incoming=1) == [1]  # cell 1: 0.02 from the newest query
    assert h2o.make_room(cells, capacity=5, n_incoming=1) == [4]   # cell 4: 0.38 in all (cell 2 restarted: 0.7)


def test_tova_keeps_pinned_and_recent_tokens_and_counts_forced_evictions():
    attention = np.full((1, 1, 6), 1 / 6, dtype=np.float32)
    attention[0, 0, 4] = 0.0  # the newest query ignores token 4, which the recent window protects
    tova = _core.CellScorePolicy("tova", n_sink=0, recent=2, evict_chunk=2, n_cells=6)
    tova.observe(0, attention, [5])
    assert tova.make_room(list(range(6)), capacity=6, n_incoming=1, n_pinned=2) == [2, 3]
    assert tova.forced_evictions == 0
    assert tova.make_room(list(range(6)), capacity=6, n_incoming=3, n_pinned=2) == [2, 3, 4]  # recent must go too
    assert tova.forced_evictions == 1
    with pytest.raises(InvalidArgumentError, match="'h2o' or 'tova'"):
        _core.CellScorePolicy("sink", n_sink=0, recent=0, evict_chunk=1, n_cells=4)


@pytest.mark.model
@pytest.mark.parametrize("device_reductions", [False, True])
def test_tova_scores_are_the_newest_tokens_attention(smollm2_model, english_text, device_reductions):
    """On SmolLM2 (no eviction yet): TOVA's score of a cell is what the last token of the last batch paid it, so each
    layer and head adds one softmax row (total n_layer * n_head), whatever the batch size; after a one-token batch it
    equals exactly what H2O's accumulated scores grew by. Host loop and ggml graph (device_reductions) alike."""
    info = smollm2_model.info
    tokens = smollm2_model.tokenize(english_text, True, False)[:48]
    engines = {name: _core.Engine(smollm2_model, policy=name, n_sink=4, window=124, n_threads=1,
                                  device_reductions=device_reductions) for name in ("h2o", "tova")}
    one_row = info["n_layer"] * info["n_head"]
    for engine in engines.values():
        engine.feed(tokens[:40])
    h2o_before = np.array(engines["h2o"].token_scores())
    assert h2o_before.sum() == pytest.approx(40 * one_row, rel=1e-3)  # every row of the 40-token batch
    assert np.sum(engines["tova"].token_scores()) == pytest.approx(one_row, rel=1e-3)
    for engine in engines.values():
        engine.feed(tokens[40:47])  # 7 tokens: still one row for TOVA
    assert np.sum(engines["tova"].token_scores()) == pytest.approx(one_row, rel=1e-3)
    h2o_before = np.array(engines["h2o"].token_scores())
    for engine in engines.values():
        engine.feed(tokens[47:48])
    grown = np.array(engines["h2o"].token_scores()) - np.append(h2o_before, 0.0)
    tova = np.array(engines["tova"].token_scores())
    assert len(tova) == 48 and np.allclose(tova, grown, rtol=1e-4, atol=1e-5)
    assert np.all(tova > 0)  # every cached token is visible to the newest query
    assert engines["tova"].policy_stats()["policy"] == "tova"


@pytest.mark.model
def test_tova_long_stream_stays_bounded_with_its_own_evictions(smollm2_model, english_text):
    """1,000 tokens in irregular batches, then 80 generated: the cache never exceeds its 128 cells, every eviction is
    TOVA's own choice (0 forced), the sinks stay, and TOVA keeps tokens from far back (not a rolling window)."""
    tokens = smollm2_model.tokenize(english_text, True, False)[:1000]
    engine = _core.Engine(smollm2_model, policy="tova", n_sink=4, window=124, n_threads=1)
    rng = random.Random(7)
    start = 0
    while start < len(tokens):
        n = rng.choice([1, 3, 16, 31, 64])
        engine.feed(tokens[start:start + n])
        start += n
        assert engine.stats()["cells_used"] <= 128
    sampler = _core.Sampler(smollm2_model, _core.SamplingParams(temperature=0.8, seed=3))
    for _ in range(80):
        engine.feed([engine.sample(sampler)])
        assert engine.stats()["cells_used"] <= 128
    s = engine.stats()
    assert s["peak_cells"] <= 128 and s["evictions"] > 20 and s["tokens_seen"] == 1080
    assert engine.policy_stats()["forced_evictions"] == 0
    assert engine.cached_tokens()[:4] == tokens[:4]
    old = [p for p in engine.cached_positions()[4:] if p < s["tokens_seen"] - 300]
    assert len(old) >= 5, old
    assert len(engine.token_scores()) == s["cells_used"]


@pytest.mark.model
def test_tova_refuses_what_h2o_refuses(smollm2_path):
    with pytest.raises(InvalidArgumentError, match="h2o_recent"):
        StreamingLLM(smollm2_path, policy="tova", window=100, h2o_recent=100)
    with pytest.raises(InvalidArgumentError, match="flash"):
        StreamingLLM(smollm2_path, policy="tova", window=100, flash_attention="on")
