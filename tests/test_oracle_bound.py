"""tools/namm_oracle_bound.py: the hindsight oracle's attention matrix and its llama.cpp eviction harness."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("namm_oracle_bound", ROOT / "tools" / "namm_oracle_bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_received_puts_each_window_row_at_its_query_and_sums_layers_and_heads():
    tool = _tool()
    rng = np.random.default_rng(0)
    first = rng.random((2, 2, 3), dtype=np.float32)  # [H, R, n]: queries 1, 2 over tokens 0..2
    second = rng.random((2, 1, 4), dtype=np.float32)  # query 3 over tokens 0..3
    layer = [{"positions": np.arange(3), "attention": first}, {"positions": np.arange(4), "attention": second}]
    received = tool.attention_received([layer, layer], 5)  # two layers with the same captures
    expected = np.zeros((5, 5))
    expected[1:3, :3] = 2 * first.sum(axis=0)
    expected[3, :4] = 2 * second.sum(axis=0)[0]
    np.testing.assert_allclose(received, expected, rtol=1e-6)


def test_harness_matches_the_engine_and_holds_its_budget(smollm2_path, smollm2_model):
    from pymemory._loader import _core
    from pymemory.evaluation.bench import filler_tokens

    tool = _tool()
    tokens = filler_tokens(smollm2_model, 224)
    harness = tool.LlamaHarness(smollm2_path, 256, 2)
    full, full_peak = tool.run_sample(harness, tokens, 96, 10 ** 9, 32, 4, None)
    engine = _core.Engine(smollm2_model, policy="none", n_sink=0, window=256, n_threads=2)
    engine.feed(tokens[:96])
    reference = float(np.mean(engine.score(tokens[96:], 32)))
    assert full_peak == 224 and abs(full - reference) < 0.02, (full, reference)

    oldest_first, peak = tool.run_sample(harness, tokens, 96, 64, 32, 4, lambda now, candidates: candidates)
    sink = _core.Engine(smollm2_model, policy="sink", n_sink=4, window=60, n_threads=2, reindex=False)
    sink.feed(tokens[:96])
    engine_sink = float(np.mean(sink.score(tokens[96:], 32)))
    # The harness evicted (a 64-cell cache reads worse than the full one) as the engine's sink does.
    assert peak == 64 and oldest_first > full + 0.05 and abs(oldest_first - engine_sink) < 0.05, (
        oldest_first, engine_sink, full)
    # Evicting the newest instead (the scores reversed) is a different cache: the harness follows the scores.
    newest_first, _ = tool.run_sample(harness, tokens, 96, 64, 32, 4, lambda now, candidates: -candidates)
    assert abs(newest_first - oldest_first) > 0.05
