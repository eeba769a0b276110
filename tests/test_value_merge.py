"""Value merging (cpp/value_merge.h, cpp/engine_merge.cpp): the engine's merge against the probes' reference
(tools/kv_merge.py), and merging in a running NAMM engine."""
from __future__ import annotations

import numpy as np
import pytest
from test_kv_merge import _state_bytes
from tool_modules import load_tool

SHIPPED_KEYS = "pymemory/data/namm/smollm2-keys.gguf"


def _random_state(rng, n_cells=14, n_layer=2, n_head=3, head_dim=4):
    positions = rng.permutation(40)[:n_cells]  # cells in any order, positions with holes
    keys = [rng.normal(size=(n_cells, n_head * head_dim)) + rng.normal(size=n_head * head_dim) for _ in range(n_layer)]
    values = [rng.normal(size=(n_head * head_dim, n_cells)) for _ in range(n_layer)]
    return positions, _state_bytes(positions, keys, values)


@pytest.mark.parametrize("seed,threshold", [(0, 0.2), (1, 0.5), (2, -1.0), (3, 0.0)])
def test_the_engine_merges_as_the_reference_does(seed, threshold):
    from pymemory._loader import _core

    kv_merge = load_tool("kv_merge")
    rng = np.random.default_rng(seed)
    n_sink, n_head, n_layer = 3, 3, 2
    positions, buffer = _random_state(rng, n_layer=n_layer, n_head=n_head)
    gone = set(int(p) for p in rng.choice(positions[positions >= n_sink], 5, replace=False))
    # Weights from earlier merges: the reference keys them by position, the engine by cell
    weights = {(layer, h): np.ones(64, np.float32) for layer in range(n_layer) for h in range(n_head)}
    for w in weights.values():
        w[:40] = rng.integers(1, 4, 40)
    reference = kv_merge.ValueMerger(4, n_sink, threshold)
    reference.weight = {k: v.copy() for k, v in weights.items()}
    ref_state = kv_merge.CacheState.parse(buffer.copy())
    reference._merge(ref_state, gone)

    roles = [1 if p in gone else 2 if p < n_sink else 0 for p in positions]
    per_cell = [weights[(layer, h)][p] for p in positions for layer in range(n_layer) for h in range(n_head)]
    out, out_weights, offered, merged = _core.merge_kv_state(buffer.tobytes(), roles, per_cell, n_head, threshold)
    engine_state = kv_merge.CacheState.parse(np.frombuffer(out, np.uint8).copy())
    for layer in range(n_layer):
        np.testing.assert_allclose(engine_state.values[layer].astype(np.float32),
                                   ref_state.values[layer].astype(np.float32), atol=2e-3)
        np.testing.assert_array_equal(engine_state.keys[layer], ref_state.keys[layer])
    assert (offered, merged) == (reference.offered, reference.merged) and offered == len(gone) * n_layer * n_head
    if threshold == -1.0:
        assert merged == offered
    changed = [(layer, h, int(p)) for c, p in enumerate(positions) for layer in range(n_layer) for h in range(n_head)
               if out_weights[(c * n_layer + layer) * n_head + h] != per_cell[(c * n_layer + layer) * n_head + h]]
    assert len(changed) > 0 and all(reference.weight[(layer, h)][p] ==
                                    out_weights[(list(positions).index(p) * n_layer + layer) * n_head + h]
                                    for layer, h, p in changed)


def test_merge_refuses_what_it_cannot_read():
    from pymemory._loader import _core
    from pymemory.errors import InvalidArgumentError, UnsupportedModelError

    rng = np.random.default_rng(0)
    positions, buffer = _random_state(rng)
    with pytest.raises(UnsupportedModelError, match="layout"):
        _core.merge_kv_state(buffer.tobytes()[:-1], [0] * len(positions), [1.0] * len(positions) * 6, 3, 0.5)
    with pytest.raises(InvalidArgumentError, match="roles"):
        _core.merge_kv_state(buffer.tobytes(), [5] * len(positions), [1.0] * len(positions) * 6, 3, 0.5)


def _engine(model, threshold=None, **kw):
    from pymemory._loader import _core

    return _core.Engine(model, policy="namm", n_sink=4, window=124, namm_path=SHIPPED_KEYS, n_threads=2,
                        namm_merge_threshold=threshold, **kw)


def test_merging_keeps_the_budget_and_changes_what_the_model_reads(smollm2_model, english_text):
    tokens = smollm2_model.tokenize(english_text[:4000], add_special=True)[:448]
    plain, merged = _engine(smollm2_model), _engine(smollm2_model, 0.6)
    nll_plain = plain.score(tokens, 1)
    nll_merged = merged.score(tokens, 1)
    s, p = merged.stats(), plain.stats()
    pairs = 30 * 3
    assert p["values_offered"] == p["values_merged"] == 0
    assert s["values_offered"] > 0 and s["values_offered"] % pairs == 0 and 0 < s["values_merged"] < s["values_offered"]
    assert s["peak_cells"] == p["peak_cells"] == 128 and s["cells_used"] == 128
    # Until the first invocation that gives tokens up, the two read the same cache
    first = 128 - 4
    np.testing.assert_array_equal(nll_plain[1:first], nll_merged[1:first])
    assert abs(float(np.mean(nll_plain[160:])) - float(np.mean(nll_merged[160:]))) > 1e-4
    # Cells moved with every merge: the policy's diagnostics and deferred choices followed them
    assert len(merged.policy_stats()["invocations"]) == len(plain.policy_stats()["invocations"])
    assert merged.policy_stats()["forced_evictions"] == 0
    assert merged.cached_tokens() == [tokens[i] for i in merged.cached_positions()]


def test_a_merging_engine_saves_and_restores(smollm2_model, english_text):
    tokens = smollm2_model.tokenize(english_text[:4000], add_special=True)[:320]
    engine = _engine(smollm2_model, 0.6)
    engine.feed(tokens[:300])
    assert engine.stats()["values_merged"] > 0
    restored = _engine(smollm2_model, 0.6)
    restored.load_state(engine.save_state())
    assert restored.cached_positions() == engine.cached_positions()
    for t in tokens[300:]:
        restored.feed([t])
        engine.feed([t])
    # Not bit for bit: the running means restart at the restore, and a restored cache holds its cells in another
    # order (llama.cpp's arithmetic depends on it, docs/results.md §7), so near ties may fall the other way.
    same = set(restored.cached_positions()) & set(engine.cached_positions())
    assert len(restored.cached_positions()) == len(engine.cached_positions()) == 128 and len(same) >= 120
    assert restored.stats()["values_merged"] > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy="sink", namm_merge_threshold=0.5), "policy 'sink'"),
    (dict(policy="namm", namm_path=SHIPPED_KEYS, namm_merge_threshold=1.5), "between -1 and 1"),
    (dict(policy="namm", namm_path=SHIPPED_KEYS, namm_merge_threshold=float("nan")), None),
    (dict(policy="namm", namm_path=SHIPPED_KEYS, namm_merge_threshold=0.5, type_k="q8_0"), "type_k and type_v"),
])
def test_merge_settings_are_checked(smollm2_model, kwargs, match):
    from pymemory._loader import _core
    from pymemory.errors import InvalidArgumentError

    if match is None:  # NaN is "off", as leaving it unset
        engine = _core.Engine(smollm2_model, n_sink=4, window=124, **kwargs)
        engine.feed(list(range(10, 200)))
        assert engine.stats()["values_offered"] == 0
        return
    with pytest.raises(InvalidArgumentError, match=match):
        _core.Engine(smollm2_model, n_sink=4, window=124, **kwargs)


def test_a_namm_file_that_records_a_threshold_merges_by_default(smollm2_model, english_text, tmp_path):
    from pymemory._loader import _core
    from pymemory.namm.checkpoint import load_gguf_as_written
    from pymemory.namm.convert import write_gguf

    path = write_gguf(load_gguf_as_written(SHIPPED_KEYS), tmp_path / "merging.gguf", "f32",
                      deploy_merge_threshold=0.6)["output"]
    assert _core.NammModel.load(str(path)).hparams["deploy_merge_threshold"] == pytest.approx(0.6)
    assert _core.NammModel.load(SHIPPED_KEYS).hparams["deploy_merge_threshold"] is None
    tokens = smollm2_model.tokenize(english_text[:4000], add_special=True)[:300]
    by_file = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=124, namm_path=str(path), n_threads=2)
    by_hand = _engine(smollm2_model, 0.6)
    np.testing.assert_array_equal(by_file.score(tokens, 1), by_hand.score(tokens, 1))
    assert by_file.stats()["values_merged"] == by_hand.stats()["values_merged"] > 0
    # An explicit setting overrides the file's: -1 merges every value given up
    everything = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=124, namm_path=str(path), n_threads=2,
                              namm_merge_threshold=-1.0)
    everything.feed(tokens)
    s = everything.stats()
    assert s["values_merged"] == s["values_offered"] > by_file.stats()["values_merged"]
    # A model whose KV state cannot be merged runs the file without merging (its own setting would be refused)
    q8 = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=124, namm_path=str(path), n_threads=2,
                      type_k="q8_0")
    q8.feed(tokens)
    assert q8.stats()["values_offered"] == 0


def test_streaming_llm_checks_the_threshold(smollm2_path):
    from pymemory import StreamingLLM
    from pymemory.errors import InvalidArgumentError

    for bad in (1.5, True, "0.5"):
        with pytest.raises(InvalidArgumentError, match="namm_merge_threshold"):
            StreamingLLM(smollm2_path, policy="namm", namm_path="smollm2-keys", namm_merge_threshold=bad)
    llm = StreamingLLM(smollm2_path, policy="namm", namm_path="smollm2-keys", window=124, namm_merge_threshold=0.6)
    text = "".join(llm.generate("It is a truth universally acknowledged, that " * 30, max_tokens=40))
    assert text and llm.stats.values_offered > 0 and llm.stats.values_merged > 0
    llm.close()
