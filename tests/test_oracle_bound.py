"""tools/namm_oracle_bound.py: the hindsight oracle's attention matrix and its llama.cpp eviction harness; the probe's rules and
signals (tools/namm_aggregation_probe.py, tools/eviction_signals.py)."""
from __future__ import annotations

import numpy as np
import pytest
from tool_modules import load_tool


def _tool():
    return load_tool("namm_oracle_bound")


def test_attention_received_puts_each_window_row_at_its_query_and_pair():
    tool = _tool()
    rng = np.random.default_rng(0)
    first = rng.random((2, 2, 3), dtype=np.float32)  # [H, R, n]: queries 1, 2 over tokens 0..2
    second = rng.random((2, 1, 4), dtype=np.float32)  # query 3 over tokens 0..3
    layer0 = [{"positions": np.arange(3), "attention": first}, {"positions": np.arange(4), "attention": second}]
    layer1 = [{"positions": np.arange(3), "attention": 2 * first}, {"positions": np.arange(4), "attention": second}]
    received = tool.attention_received([layer0, layer1], 5)
    assert received.shape == (4, 5, 5)  # (layer, KV head) pairs, layer-major
    expected = np.zeros((4, 5, 5), np.float32)
    for pair, (scale, head) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1)]):
        expected[pair, 1:3, :3] = scale * first[head]
        expected[pair, 3, :4] = second[head, 0]
    np.testing.assert_allclose(received, expected, rtol=1e-6)


def test_mean_log_share_averages_clipped_log_shares_over_pairs():
    tool = _tool()
    received = np.array([[2.0, 0.0, 1000.0], [2.0, 4.0, 1000.0]])  # [pairs, tokens]: 2 queries over 4 cached tokens
    # shares = received / 2 rows * 4 tokens: [4, 0 -> 0.01, 2000 -> 50] and [4, 8, 50]
    np.testing.assert_allclose(tool.mean_log_share(received, 2, 4),
                               [np.log(4), (np.log(0.01) + np.log(8)) / 2, np.log(50)])


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
    # Evicting the newest instead (the scores reversed) is a different cache: the harness follows the scores.
    newest_first, _ = tool.run_sample(harness, tokens, 96, 64, 32, 4, lambda now, candidates: -candidates)
    # The harness evicted (a 64-cell cache reads worse than the full one) as the engine's sink does: closer to it than
    # the other rule. Not closer than 0.08: the two hold the same tokens in other physical cell orders, and on some
    # CPUs llama.cpp's attention depends on that order (0.050 nats here on an AVX-512 EPYC; tools/kv_layout_check.py).
    assert peak == 64 and oldest_first > full + 0.05 and abs(oldest_first - engine_sink) < 0.08, (
        oldest_first, engine_sink, full)
    assert abs(newest_first - engine_sink) > abs(oldest_first - engine_sink) + 0.02, (newest_first, oldest_first)


def test_summarise_scores_each_policy_on_the_samples_it_ran():
    tool = _tool()
    full = {"t": 3.0, "a": 1.0}
    rows = {"full": {"full cache (engine)": {"nll": full, "peak_cells": 512}},
            "128": {"sink": {"nll": {"t": 3.2, "a": 3.0}, "peak_cells": 128},
                    "question oracle": {"nll": {"a": 2.0}, "peak_cells": 128}}}
    tables = tool.summarise(rows, ["t"], ["a"])
    assert tables["128"]["sink"]["text_gap"] == pytest.approx(0.2)
    oracle = tables["128"]["question oracle"]
    assert "text_nll" not in oracle and oracle["answer_closed"] == pytest.approx(0.5)


def test_summarise_gives_the_text_share_closed_a_bootstrap_interval():
    tool = _tool()
    ids = [f"s{i}:text:x" for i in range(4)]
    full = dict(zip(ids, (3.0, 3.1, 2.9, 3.2)))
    sink = {k: v + 0.2 for k, v in full.items()}
    halfway = {k: v + gap for (k, v), gap in zip(full.items(), (0.05, 0.15, 0.1, 0.1))}
    rows = {"full": {"full cache": {"nll": full, "peak_cells": 512}},
            "128": {"sink": {"nll": sink, "peak_cells": 128}, "as full": {"nll": dict(full), "peak_cells": 128},
                    "halfway": {"nll": halfway, "peak_cells": 128}}}
    tables = tool.summarise(rows, ids, [], "full cache")["128"]
    assert "text_closed_interval" not in tables["sink"]
    assert tables["as full"]["text_closed_interval"] == pytest.approx([1.0, 1.0])
    low, high = tables["halfway"]["text_closed_interval"]
    assert tables["halfway"]["text_closed"] == pytest.approx(0.5)
    assert low < 0.5 < high and high - low < 0.5  # per-sample shares 0.25..0.75: the interval spans ½, not 0..1


def test_summarise_resamples_overlapping_texts_together():
    tool = _tool()
    # Sixteen samples, two stretches of a novel: the eight samples of each start 10 tokens apart and overlap.
    ids = [f"s{i}:text:novel@{(i // 8) * 10_000 + (i % 8) * 10}" for i in range(16)]
    full = {k: 3.0 for k in ids}
    sink = {k: 3.2 for k in ids}
    closed = {k: 3.0 + (0.02 if i < 8 else 0.18) for i, k in enumerate(ids)}  # one stretch near full, one near sink
    rows = {"full": {"full cache": {"nll": full, "peak_cells": 512}},
            "128": {"sink": {"nll": sink, "peak_cells": 128}, "rule": {"nll": closed, "peak_cells": 128}}}
    apart = tool.summarise(rows, ids, [], "full cache")["128"]["rule"]["text_closed_interval"]
    together = tool.summarise(rows, ids, [], "full cache", span=512)["128"]["rule"]["text_closed_interval"]
    # Two clusters are two pieces of evidence, not sixteen: the interval widens to what two stretches can say.
    assert together[1] - together[0] > 1.5 * (apart[1] - apart[0])


def test_shipped_test_set_takes_a_length_and_refuses_the_runs_own_seed(smollm2_path):
    from pymemory.namm.packaged import resolve_namm

    tool = _tool()
    namm = resolve_namm("smollm2-rate")
    _, config, _, _, samples, seed = tool.shipped_test_set(namm, 2, 0, sample_tokens=1024, test_seed=5)
    assert (config.sample_tokens, config.scored_tokens, seed) == (1024, 512, 5)
    assert [s.n_tokens for s in samples] == [1024, 1024] and all(len(s.target) == 512 for s in samples)
    with pytest.raises(ValueError, match="run's seed"):
        tool.shipped_test_set(namm, 2, 0, test_seed=config.seed)


def _probe():
    return load_tool("namm_aggregation_probe")


def _signals():
    return load_tool("eviction_signals")


def test_standardised_top_ranks_by_each_pairs_own_scale():
    probe = _probe()
    values = np.exp(np.array([[0.0, 1.0, 2.0], [2.0, 2.0, 0.0]]))  # [pairs, candidates]
    z0 = np.array([-1.0, 0.0, 1.0]) * np.sqrt(1.5)
    z1 = np.array([1.0, 1.0, -2.0]) / np.sqrt(2.0)
    np.testing.assert_allclose(probe.standardised_top(values, 1), np.maximum(z0, z1), atol=1e-6)
    np.testing.assert_allclose(probe.standardised_top(values, -1), (z0 + z1) / 2, atol=1e-6)
    np.testing.assert_allclose(probe.standardised_top(values * np.array([[10.0], [0.1]]), 1),
                               np.maximum(z0, z1), atol=1e-6)  # a pair's overall scale does not matter


def test_newest_kept_protects_the_recent_window_only():
    probe = _probe()
    rule = probe.newest_kept(lambda now, cand: -cand.astype(float), 32)
    scores = rule(100, np.array([10, 60, 68, 99]))
    assert list(scores[:2]) == [-10.0, -60.0] and np.isinf(scores[2:]).all()


def test_probe_rules_parse_names_that_hold_commas():
    probe = load_tool("namm_aggregation_probe")
    h2o = "sum over pairs (h2o's score, no recent window)"
    assert "," in h2o and h2o in probe.RULES
    assert probe.parse_rules(f"top-1 of pairs (max),{h2o},mean rate over pairs") == [
        "top-1 of pairs (max)", h2o, "mean rate over pairs"]
    with pytest.raises(ValueError, match="no such rule"):
        probe.parse_rules("top-1 of pairs (max),no such rule")


def test_duplicate_of_better_counts_only_a_better_ranked_twin():
    signals = _signals()
    keys = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]]])  # [pairs, cand, head_dim]: 0 and 2 are twins
    values = np.array([[[0.0, 2.0], [1.0, 0.0], [0.0, 3.0]]])
    ranked = np.array([2.0, 1.0, 0.5])  # 0 ranks above its twin 2
    dup = signals.duplicate_of_better(keys, values, ranked)
    assert dup[2] > 0.99 and dup[0] == -1.0  # the top-ranked token has nothing better to duplicate it
    assert dup[1] < 0.6  # unlike the better one (key and value orthogonal to 0's)
    swapped = signals.duplicate_of_better(keys, values, np.array([0.5, 1.0, 2.0]))
    assert swapped[0] > 0.99 and swapped[2] == -1.0  # the twin that ranks lower is the duplicate


def test_key_distinctiveness_keeps_the_key_unlike_the_rest():
    signals = _signals()
    keys = np.array([[[1.0, 0.0], [2.0, 0.1], [1.0, -0.1], [0.0, 1.0]]])
    scores = signals.key_distinctiveness(keys)[0]
    assert int(np.argmax(scores)) == 3 and scores.shape == (4,)
    np.testing.assert_allclose(signals.key_distinctiveness(keys * 5.0), signals.key_distinctiveness(keys), atol=1e-6)


def test_token_surprisal_is_the_engines_full_cache_nll(smollm2_path, smollm2_model):
    from pymemory._loader import _core
    from pymemory.evaluation.bench import filler_tokens

    tokens = filler_tokens(smollm2_model, 600)  # more than one of the probe's 512-token batches
    surprisal = _signals().token_surprisal(load_tool("namm_oracle_bound").LlamaHarness(smollm2_path, 640, 2), tokens)
    engine = _core.Engine(smollm2_model, policy="none", n_sink=0, window=640, n_threads=2)
    reference = np.asarray(engine.score(tokens, 64))  # NaN first: nothing predicts the first token
    assert surprisal.shape == (600,) and np.isnan(reference[0])
    # The two contexts round differently (0.06 nats per token on average, a few up to 0.5, at any batching), so the
    # check is on agreement overall: an off-by-one token would decorrelate them and shift the mean.
    difference = surprisal[1:] - reference[1:]
    assert abs(difference.mean()) < 0.01 and np.abs(difference).mean() < 0.1, difference
    assert np.corrcoef(surprisal[1:], reference[1:])[0, 1] > 0.99
    assert surprisal[0] == np.median(surprisal[1:])


def test_separator_mask_marks_punctuation_and_line_breaks_only(smollm2_path):
    harness = load_tool("namm_oracle_bound").LlamaHarness(smollm2_path, 64, 2)
    tokens = harness.llm.tokenize(b'a man; in possession!\n\nOf a fortune... "Yes." said Mr. Darcy', add_bos=False)
    pieces = [harness.llm.detokenize([t]).decode() for t in tokens]
    marked = [p for p, s in zip(pieces, _signals().separator_mask(harness, tokens)) if s]
    assert ";" in marked and "!" in marked and "..." in marked and '."' in marked and "." in marked
    assert any("\n" in p for p in marked)
    assert not set(marked) & {" man", " possession", " Yes", " Mr", ' "', " a"}, marked


def test_copies_among_counts_each_candidates_token_among_the_candidates_only():
    tokens = np.array([5, 7, 5, 9, 5, 7])
    copies = _signals().copies_among(tokens, np.array([1, 2, 3, 4, 5]))  # position 0's 5 is no candidate
    assert list(copies) == [2, 2, 1, 2, 2]


def test_every_probe_step_of_run_results_names_rules_the_probe_has():
    import re
    from pathlib import Path

    steps = (Path(__file__).resolve().parent.parent / "tools" / "run_results.sh").read_text()
    # a rule name may hold an apostrophe ("each pair's"), so each quoting is matched on its own
    lists = re.findall(r"namm_aggregation_probe\.py[^\n]*(?:\n[^\n]*){0,3}?--rules (?:\"([^\"]*)\"|'([^']*)')", steps)
    assert len(lists) >= 10  # the probe's steps, each naming its rules
    for names in (double or single for double, single in lists):
        assert _probe().parse_rules(names)  # ValueError names a rule the probe no longer has
    assert _probe().keyed_variant("surprisal", -0.25).endswith("RoPE - 0.25 x surprisal z")
