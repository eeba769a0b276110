"""Attention-scored policies (h2o, tova, namm) on a sliding-window model: Gemma-3-270M, whose llama.cpp context has
two KV caches (iSWA). The global layers (5, 11, 17) read a base cache that holds every token; the sliding-window
layers read an SWA cache that reuses the cells of tokens older than its 512-position window, so its cells diverge
from the base cache's. The adapter mirrors both and checks every decoded batch against the attention of the first
layer of each kind (a divergence raises); the policies score the global layers only, and an eviction removes the
tokens from both caches. docs/namm.md, "Sliding-window models"."""
from __future__ import annotations

import random

import pytest

from pymemory import InvalidArgumentError, UnsupportedModelError
from pymemory._loader import _core
from pymemory.namm.packaged import resolve_namm

GLOBAL_LAYERS = [5, 11, 17]  # gemma3: every 6th layer attends globally (llama.cpp's built-in pattern)


@pytest.fixture(scope="module")
def gemma_model(gemma_path):
    _core.set_log_verbosity(0)
    return _core.Model.load(gemma_path)


@pytest.fixture(scope="module")
def gemma_tokens(gemma_model, english_text):
    return gemma_model.tokenize(english_text, True, False)  # Gemma needs its BOS


def _stream(engine, tokens, rng=None):
    """Feeds the tokens in batches of irregular sizes (every branch of the cell allocators), checking the bound."""
    capacity = engine.stats()["capacity"]
    start = 0
    while start < len(tokens):
        n = rng.choice([1, 1, 3, 16, 40, 64]) if rng else 64
        engine.feed(tokens[start:start + n])
        start += n
        assert engine.stats()["cells_used"] <= capacity
    return engine.stats()


@pytest.mark.model
def test_gemma_reports_its_sliding_window_layers(gemma_model):
    info = gemma_model.info
    assert info["n_swa"] == 512
    assert [layer for layer, sliding in enumerate(info["swa_layers"]) if not sliding] == GLOBAL_LAYERS


@pytest.mark.model
@pytest.mark.parametrize("window, n_tokens, reindex, device_reductions", [
    (252, 1200, False, False),   # cache (256) smaller than the SWA window: tokens leave the window while cached
    (252, 800, False, True),     # the same through ggml reductions (the GPU path): totals-based checks
    (700, 1700, False, False),   # cache larger than the window: the SWA cache reuses cells and purges
    (600, 1300, True, False),    # re-indexed positions: seq_add on both caches
])
def test_h2o_cell_mirrors_hold_on_gemma(gemma_model, gemma_tokens, window, n_tokens, reindex, device_reductions):
    """Several cache turnovers past the 512-position window. With one mirror for both caches the check stops
    decoding (measured: at token ~1,600 with 1,024 cells); with two, every batch passes, and every eviction is the
    policy's own decision (no forced evictions)."""
    tokens = gemma_tokens[:n_tokens]
    engine = _core.Engine(gemma_model, policy="h2o", n_sink=4, window=window, reindex=reindex, n_threads=1,
                          device_reductions=device_reductions)
    s = _stream(engine, tokens, random.Random(window + n_tokens))
    assert s["tokens_seen"] == n_tokens and s["tokens_evicted"] == n_tokens - s["cells_used"]
    assert s["evictions"] > 0 and s["cells_used"] > window // 2
    stats = engine.policy_stats()
    assert stats["forced_evictions"] == 0
    assert stats["scored_layers"] == GLOBAL_LAYERS
    positions = engine.cached_positions()
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert engine.cached_tokens()[:4] == tokens[:4]                           # sinks
    assert engine.cached_tokens()[-window // 2:] == tokens[-window // 2:]     # h2o's recent half
    if reindex:
        assert positions == list(range(len(positions)))
    else:
        assert positions[-1] == n_tokens - 1


@pytest.mark.model
def test_tova_runs_on_gemma(gemma_model, gemma_tokens):
    engine = _core.Engine(gemma_model, policy="tova", n_sink=4, window=252, n_threads=1)
    s = _stream(engine, gemma_tokens[:1000])
    assert s["evictions"] > 0 and engine.policy_stats()["forced_evictions"] == 0
    assert len(engine.token_scores()) == s["cells_used"]


@pytest.mark.model
def test_namm_on_gemma_scores_the_global_layers(gemma_model, gemma_tokens):
    """The packaged NAMM (trained on SmolLM2; it runs every 32 tokens) on Gemma at 4+252 cells, budget mode:
    every invocation reads the three global layers (one KV head each: 3 votes per token) and does all the
    evicting; the cache stays bounded through five turnovers and the tokens leaving the SWA window."""
    n = 1300
    engine = _core.Engine(gemma_model, policy="namm", n_sink=4, window=252, n_threads=1,
                          namm_path=str(resolve_namm("smollm2")), namm_mode="budget")
    s = _stream(engine, gemma_tokens[:n])
    stats = engine.policy_stats()
    assert stats["scored_layers"] == GLOBAL_LAYERS
    invocations = stats["invocations"]
    delay = invocations[0]["tokens_seen"]
    assert len(invocations) == n // delay
    # The scorer runs once the cache is above its budget (224 = 256 - delay); below it nothing could be evicted.
    assert all(len(r["layer_kept"]) == (len(GLOBAL_LAYERS) if r["scored"] else 0) for r in invocations)
    assert [r["scored"] for r in invocations] == [r["cells_before"] > 256 - delay for r in invocations]
    assert not invocations[0]["scored"] and invocations[-1]["scored"]
    assert all(r["cells_after"] <= 256 - delay for r in invocations)     # budget: room for the next `delay`
    from helpers.namm_records import still_deferred

    # What the last invocation gave up and the tokens since have not yet needed is still cached (deferred evictions)
    decided = sum(r["cells_before"] - r["cells_after"] for r in invocations)
    assert decided - still_deferred(s, invocations) == s["tokens_evicted"]
    assert stats["forced_evictions"] == 0
    assert s["tokens_evicted"] == n - s["cells_used"] and s["cells_used"] <= 256
    assert engine.cached_tokens()[:4] == gemma_tokens[:4]


@pytest.mark.model
def test_a_keyed_namm_on_gemma_reads_the_global_layers_normalised_keys(gemma_model, gemma_path, gemma_tokens):
    """smollm2-keys on Gemma: the keys a key weight reads are RoPE's input, on Gemma-3 the global layers' keys after
    their RMS norm (Kcur_normed), which llama.cpp's allocator lets RoPE overwrite in place; the tap copies them
    before RoPE runs. With nothing evicted (a 1,024-cell cache), the engine's distinctiveness at its last invocation
    matches numpy's on those keys from one full decode, not on the rotated ones (what it read before the copy);
    with evictions, every invocation keeps what budget_zmax plus half a standard deviation of it keeps."""
    import sys
    from pathlib import Path

    import numpy as np
    from helpers.namm_records import assert_budget_choices, probe_distinctiveness

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from value_capture import ValueCapture

    tokens = gemma_tokens[:700]
    namm = str(resolve_namm("smollm2-keys"))
    engine = _core.Engine(gemma_model, policy="namm", n_sink=4, window=1020, n_threads=1, namm_path=namm)
    assert engine.policy_stats()["scored_layers"] == GLOBAL_LAYERS
    engine.capture_namm_layers(GLOBAL_LAYERS)
    engine.feed(tokens)
    assert engine.stats()["tokens_evicted"] == 0
    last = max(engine.namm_captures(), key=lambda c: c["tokens_seen"])
    n = len(last["positions"])
    assert n > 600 and list(last["positions"]) == list(range(n))
    with ValueCapture(gemma_path, 2) as capture:
        normed = capture.projections(tokens[:n], "Kcur_normed-")[0][GLOBAL_LAYERS]  # [3 pairs, n, 256]
        rotated = capture.projections(tokens[:n], "Kcur-")[-1][GLOBAL_LAYERS]       # after RoPE
    engine_says = np.asarray(last["key_distinctiveness"])[4:n - 1]
    off = {name: np.abs(probe_distinctiveness(keys[:, 4:n - 1]) - engine_says)
           for name, keys in (("normalised", normed), ("rotated", rotated))}
    # The engine decodes in 16-token batches, the capture in one: llama.cpp's kernels differ by ~0.2 % here.
    assert off["normalised"].mean() < 0.005 and off["normalised"].max() < 0.02, off["normalised"]
    assert off["rotated"].mean() > 0.008  # what reading the keys after RoPE gives: this test tells them apart

    delay = _core.NammModel.load(namm).hparams["deploy_delay"]
    engine = _core.Engine(gemma_model, policy="namm", n_sink=4, window=252, n_threads=1, namm_path=namm,
                          namm_defer_evictions=False)
    engine.capture_namm_layers(GLOBAL_LAYERS)
    engine.feed(tokens)
    assert_budget_choices(engine, GLOBAL_LAYERS, "budget_zmax", 256 - delay, key_weight=0.5)


@pytest.mark.model
def test_h2o_on_gemma_keeps_other_tokens_than_sink(gemma_model, gemma_tokens):
    """h2o must keep old tokens that received attention, not the sink policy's contiguous recent window: at the
    same 256 cells, some of h2o's kept tokens come from before sink's window, and its evicted set differs."""
    tokens = gemma_tokens[:1200]
    kept = {}
    for policy in ("sink", "h2o"):
        engine = _core.Engine(gemma_model, policy=policy, n_sink=4, window=252, n_threads=1)
        _stream(engine, tokens)
        n = len(engine.cached_tokens())
        if policy == "sink":  # re-indexed positions: the sinks plus the last n - 4 stream tokens
            kept[policy] = set(range(4)) | set(range(len(tokens) - (n - 4), len(tokens)))
        else:                 # absolute positions: position = stream index
            kept[policy] = set(engine.cached_positions())
    sink_window_start = min(kept["sink"] - set(range(4)))
    old_kept = [p for p in kept["h2o"] if 4 <= p < sink_window_start]
    assert len(old_kept) >= 20, f"h2o kept only {len(old_kept)} tokens from before sink's window"
    assert len(kept["h2o"] ^ kept["sink"]) >= 40


@pytest.mark.model
@pytest.mark.parametrize("policy, window, n_tokens", [
    ("h2o", 700, 1300),   # cache larger than the SWA window: the SWA cache has reused cells and purged
    ("namm", 252, 700),   # smaller: tokens leave the window while cached
])
def test_attention_policy_sessions_on_gemma(gemma_model, gemma_tokens, policy, window, n_tokens):
    """A session of an attention-scored policy on an iSWA model saves both caches' cell layouts: the restored
    engine's mirrors pass the check on every later batch (a wrong SWA mirror stops decoding with an error), and
    it streams on as the saved one does."""
    extra = {"namm_path": resolve_namm("smollm2")} if policy == "namm" else {}

    def make():
        return _core.Engine(gemma_model, policy=policy, n_sink=4, window=window, n_threads=1, **extra)

    a = make()
    _stream(a, gemma_tokens[:n_tokens])
    state = a.save_state()
    b = make()
    b.load_state(state)
    assert b.save_state() == state
    more = gemma_tokens[n_tokens:n_tokens + 300]
    _stream(a, more)
    _stream(b, more)  # several batches and evictions after the restore, each checked against both mirrors
    # The restored cells sit elsewhere (and the SWA cache comes back without the cells its window has left), so the
    # attention sums run in another order: near-ties may go the other way, but the choices stay the saved engine's.
    kept_a, kept_b = set(a.cached_positions()), set(b.cached_positions())
    assert len(kept_a & kept_b) >= 0.95 * len(kept_a)
    sa, sb = a.stats(), b.stats()
    assert (sb["cells_used"], sb["tokens_seen"], sb["tokens_evicted"]) == (sa["cells_used"], sa["tokens_seen"],
                                                                          sa["tokens_evicted"])
    assert b.policy_stats()["forced_evictions"] == a.policy_stats()["forced_evictions"] == 0
    # A sink engine's session has no SWA cell layout: refused, not misread.
    sink = _core.Engine(gemma_model, policy="sink", n_sink=4, window=window, n_threads=1)
    sink.feed(gemma_tokens[:50])
    with pytest.raises(InvalidArgumentError):
        make().load_state(sink.save_state())


@pytest.mark.model
def test_what_stays_refused_on_sliding_window_models(gemma_model, gemma_path, tmp_path):
    from pathlib import Path

    from helpers.gguf_surgery import patch_swa_pattern, with_swa_pattern

    # A Gemma whose every layer slides (the GGUF's pattern): no layer sees past the window, nothing to score by.
    all_sliding = with_swa_pattern(Path(gemma_path), tmp_path / "gemma-all-sliding.gguf", [True, True])
    model = _core.Model.load(str(all_sliding))
    assert model.info["swa_layers"] == [1, 1]
    with pytest.raises(UnsupportedModelError, match="only sliding-window attention layers"):
        _core.Engine(model, policy="h2o", n_sink=4, window=252, n_threads=1)
    _core.Engine(model, policy="sink", n_sink=4, window=252, n_threads=1).feed([2, 651, 1234])  # sink still runs
    # With one global layer of two, the same cut model runs h2o (the pattern comes from the GGUF key).
    mixed = patch_swa_pattern(all_sliding, tmp_path / "gemma-mixed.gguf", [True, False])
    model = _core.Model.load(str(mixed))
    engine = _core.Engine(model, policy="h2o", n_sink=4, window=60, n_threads=1)
    engine.feed(list(range(1000, 1700)))
    assert engine.policy_stats()["scored_layers"] == [1] and engine.stats()["cells_used"] <= 64
