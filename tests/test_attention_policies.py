"""Attention-scored policies (h2o; namm in test_namm_policy.py): the tap, the cell mirror, bounded caches."""
from __future__ import annotations

import random

import pytest

from conftest import STREAM_TOKENS
from pymemory import InvalidArgumentError, StreamingLLM, UnsupportedModelError
from pymemory._loader import _core


def test_lowest_scoring_orders_by_score_then_age_and_clamps():
    scores = [5.0, 1.0, 3.0, 1.0, 0.5, 9.0]
    assert _core.lowest_scoring(scores, 1, 5, 2) == [1, 4]  # 0.5, then the older of the two 1.0s
    assert _core.lowest_scoring(scores, 1, 5, 3) == [1, 3, 4]
    assert _core.lowest_scoring(scores, 0, 6, 0) == []
    assert _core.lowest_scoring(scores, 4, 6, 10) == [4, 5]  # no more than the range holds


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
def test_device_reductions_keep_what_host_reductions_keep(smollm2_model, english_text):
    """The GPU code path (ggml graphs over the attention tensor, no host matrix) run on the CPU backend evicts the
    same tokens as the host loops."""
    tokens = smollm2_model.tokenize(english_text, True, False)[:900]
    kept = {}
    for device in (False, True):
        engine = _core.Engine(smollm2_model, policy="h2o", n_sink=4, window=124, h2o_recent=40,
                              device_reductions=device)
        for start in range(0, len(tokens), 37):
            engine.feed(tokens[start:start + 37])
        kept[device] = engine.cached_positions()
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
def test_attention_policies_refuse_what_they_cannot_do(smollm2_path, gemma_path):
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        StreamingLLM(gemma_path, policy="h2o", window=252)
    with pytest.raises(InvalidArgumentError, match="h2o_recent"):
        StreamingLLM(smollm2_path, policy="h2o", window=100, h2o_recent=100)
    with pytest.raises(InvalidArgumentError, match="needs namm_path"):
        StreamingLLM(smollm2_path, policy="namm")
    with pytest.raises(InvalidArgumentError, match="quorum"):
        StreamingLLM(smollm2_path, policy="h2o", quorum=1.5)
