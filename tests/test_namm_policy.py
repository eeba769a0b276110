"""NAMM as a memory policy of the engine: shared-cell decisions, fidelity to the reference on real decoding, and
long runs at bounded memory."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
from helpers.measurements import record
from helpers.namm_records import assert_budget_choices, probe_distinctiveness, still_deferred

from conftest import STREAM_TOKENS
from pymemory import InvalidArgumentError, StreamingLLM
from pymemory._loader import _core

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")


def test_quorum_and_budget_decisions():
    drop = [9, 9, 9, 4, 9, 0, 9, 9]  # 9 pairs
    scores = [0.0, 0.0, 0.0, 1.0, -2.0, 3.0, -1.0, 0.0]
    decide = _core.decide_shared_evictions
    assert decide("quorum", 1.0, 0, 2, drop, scores, 9) == [2, 4, 6]  # never sinks (0, 1) nor the newest (7)
    assert decide("quorum", 0.4, 0, 2, drop, scores, 9) == [2, 3, 4, 6]  # 4/9 >= 0.4
    assert decide("quorum", 1.0, 0, 0, [0] * 8, scores, 9) == []
    # Budget: most drop votes first, then lowest mean score, then older.
    assert decide("budget", 1.0, 6, 2, drop, scores, 9) == [4, 6]
    assert decide("budget", 1.0, 4, 2, drop, scores, 9) == [2, 3, 4, 6]  # then the 4-vote token
    assert decide("budget", 1.0, 100, 2, drop, scores, 9) == []
    # budget_max: the scores are each token's highest over the pairs and votes do not count, so a token that
    # one head wants (8 of 9 pairs drop token 3, its best score is 5.0) outlives tokens fewer pairs drop.
    drop = [9, 9, 2, 8, 1, 3, 9, 9]
    best = [0.0, 0.0, 1.0, 5.0, -1.0, 0.5, 2.0, 0.0]
    assert decide("budget", 1.0, 5, 2, drop, best, 9) == [3, 5, 6]  # 9 votes, 8, then 3
    assert decide("budget_max", 1.0, 5, 2, drop, best, 9) == [2, 4, 5]  # best -1.0, 0.5, then 1.0
    # budget_mix: budget's ranking (votes, then mean) after the reserve's tokens, the highest reserve scores, stay.
    mean = [0.0, 0.0, 0.3, 0.1, 0.2, 0.4, 0.5, 0.0]
    assert decide("budget_mix", 1.0, 5, 2, drop, mean, 9, best, 0) == [3, 5, 6]  # no reserve: budget's choice
    assert decide("budget_mix", 1.0, 5, 2, drop, mean, 9, best, 1) == [2, 5, 6]  # token 3 (best 5.0) stays
    assert decide("budget_mix", 1.0, 5, 2, drop, mean, 9, best, 2) == [2, 4, 5]  # and token 6 (best 2.0)


def test_neighbours_rank_each_candidate_with_the_best_score_next_to_it():
    """neighbours=k: a candidate ranks by the highest score among itself and its k nearest candidates on each side
    (sinks and the newest token are no candidates, so they lend nothing); votes and the reserve are not pooled."""
    decide = _core.decide_shared_evictions
    scores = [9.0, 9.0, 1.0, 5.0, -1.0, 0.5, 2.0, -3.0, 0.2, 9.0]  # sinks 0, 1; newest 9
    drop = [0] * 10
    assert decide("budget_zmax", 1.0, 7, 2, drop, scores, 9) == [4, 7, 8]  # its own score: -1, -3, 0.2
    # pooled: 5, 5, 5, 2, 2, 2, 0.2 -> 8 first, then the older of the tokens next to the 2.0
    assert decide("budget_zmax", 1.0, 7, 2, drop, scores, 9, [], 0, 1) == [5, 6, 8]
    assert decide("budget_max", 1.0, 7, 2, drop, scores, 9, [], 0, 1) == [5, 6, 8]
    # two on each side: 5, 5, 5, 5, 2, 2, 2
    assert decide("budget_zmax", 1.0, 7, 2, drop, scores, 9, [], 0, 2) == [6, 7, 8]
    assert decide("budget", 1.0, 7, 2, [1, 1, 0, 0, 0, 0, 3, 0, 0, 0], scores, 9, [], 0, 1) == [5, 6, 8]  # votes first


def test_key_distinctiveness_is_minus_each_keys_cosine_to_the_candidates_mean_direction():
    """KeyDiff on shared cells: per pair, -cos(key, normalised mean of the candidates' unit keys), averaged over
    the pairs; 0 outside the candidates [first, last); the scale of a key does not matter."""
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(4, 12, 8)).astype(np.float32)  # [pairs, tokens, head_dim]
    keys[:, 5] *= 30.0
    got = np.array(_core.key_distinctiveness(keys.ravel().tolist(), 4, 12, 8, 2, 11))
    unit = keys[:, 2:11] / np.linalg.norm(keys[:, 2:11], axis=2, keepdims=True)
    anchor = unit.mean(axis=1, keepdims=True)
    anchor /= np.linalg.norm(anchor, axis=2, keepdims=True)
    expected = np.zeros(12)
    expected[2:11] = -(unit * anchor).sum(axis=2).mean(axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    keys[:, 3] = keys[:, 4]  # twins are equally (in)distinct
    got = np.array(_core.key_distinctiveness(keys.ravel().tolist(), 4, 12, 8, 2, 11))
    assert got[3] == pytest.approx(got[4]) and got[0] == got[11] == 0.0
    with pytest.raises(InvalidArgumentError, match="keys must hold n_pairs x n_tokens x head_dim values"):
        _core.key_distinctiveness([0.0] * 10, 4, 12, 8, 2, 11)


def test_add_standardised_adds_weighted_z_scores_over_the_candidates_only():
    scores = [5.0, 1.0, 2.0, 3.0, 7.0]
    extra = [100.0, 1.0, 2.0, 3.0, -100.0]
    z = np.array([1.0, 2.0, 3.0])
    z = (z - z.mean()) / z.std()
    np.testing.assert_allclose(_core.add_standardised(scores, extra, 0.5, 1, 4), [5.0, *(np.array([1.0, 2.0, 3.0]) + 0.5 * z), 7.0])
    assert _core.add_standardised(scores, [4.0] * 5, 2.0, 1, 4) == scores  # no spread: nothing to add
    with pytest.raises(InvalidArgumentError, match="one value per score"):
        _core.add_standardised(scores, [1.0], 1.0, 0, 5)


@pytest.mark.model
@pytest.mark.parametrize("mode", ["budget_max", "budget_zmax", "budget_mix"])
def test_budget_max_evicts_the_tokens_no_pair_scores_high(smollm2_model, english_text, namm_gguf, tmp_path, mode):
    """budget_max through the engine, taken from the NAMM file's deploy settings (no namm_mode given): at every
    invocation the evicted tokens are exactly those whose highest score over the scored (layer, KV head) pairs is
    lowest (sinks and the newest token stay), down to max_cells. budget_zmax: the same with each pair's scores
    standardised over the cached tokens (minus the pair's mean, over its standard deviation) first. budget_mix: the
    192 / 8 tokens with the highest standardised score stay, the rest go as budget mode ranks (most drop votes,
    then lowest mean score)."""
    from pymemory.namm import load_checkpoint
    from pymemory.namm.convert import write_gguf

    path = write_gguf(load_checkpoint(namm_gguf[1], trust_pickle=True), tmp_path / "max.gguf", "f32", delay=64,
                      deploy={"mode": mode, "quorum": 1.0})["output"]
    tokens = smollm2_model.tokenize(english_text, True, False)[:700]
    engine = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path), namm_layers=3)
    engine.capture_namm_layers([5, 15, 25])  # the 3 layers spread over 30
    engine.feed(tokens)
    assert_budget_choices(engine, [5, 15, 25], mode, 256 - 64)


@pytest.mark.model
def test_a_namm_deployed_with_neighbours_ranks_each_token_with_the_best_score_next_to_it(
        smollm2_model, smollm2_path, english_text, namm_gguf, tmp_path):
    """A NAMM GGUF that records namm.deploy.neighbours ranks by the pooled standardised maximum by default;
    namm_neighbours overrides it (0: each token's own score), and quorum mode, which ranks nothing, refuses it."""
    from pymemory.namm import load_checkpoint
    from pymemory.namm.checkpoint import gguf_settings
    from pymemory.namm.convert import write_gguf

    path = write_gguf(load_checkpoint(namm_gguf[1], trust_pickle=True), tmp_path / "pooled.gguf", "f32", delay=64,
                      deploy={"mode": "budget_zmax", "quorum": 1.0}, deploy_neighbours=2)["output"]
    assert gguf_settings(path)["deploy_neighbours"] == 2
    assert _core.NammModel.load(str(path)).hparams["deploy_neighbours"] == 2
    tokens = smollm2_model.tokenize(english_text, True, False)[:700]
    for override, neighbours in ((-1, 2), (0, 0), (1, 1)):
        engine = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path),
                              namm_layers=2, namm_neighbours=override, namm_defer_evictions=False)
        engine.capture_namm_layers([7, 22])  # the 2 layers spread over 30
        engine.feed(tokens)
        assert_budget_choices(engine, [7, 22], "budget_zmax", 256 - 64, neighbours)
    with pytest.raises(InvalidArgumentError, match="namm_neighbours pools the scores a budget mode ranks by"):
        _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path), namm_mode="quorum",
                     namm_neighbours=1)
    with pytest.raises(InvalidArgumentError, match="namm_neighbours must be between 0 and 64"):
        StreamingLLM(smollm2_path, policy="namm", namm_path=str(path), namm_neighbours=65)


@pytest.mark.model
def test_a_key_weight_ranks_by_the_standardised_maximum_plus_the_keys_distinctiveness(
        smollm2_model, smollm2_path, english_text, namm_gguf, tmp_path):
    """A NAMM GGUF that records namm.deploy.key_weight adds that many standard deviations of each candidate's key
    distinctiveness (KeyDiff on the keys before RoPE, averaged over the scored pairs) to budget_zmax's score. The
    engine's distinctiveness at the first invocation, before anything was evicted, equals numpy's on the keys llama.cpp
    computes for the same tokens with a full cache; every invocation keeps what the weighted ranking keeps;
    namm_key_weight overrides the file (0: attention alone); quorum mode refuses it; a session keeps the keys."""
    import sys
    from pathlib import Path

    from pymemory.namm import load_checkpoint
    from pymemory.namm.checkpoint import gguf_settings, run_settings
    from pymemory.namm.convert import write_gguf

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from value_capture import ValueCapture

    path = write_gguf(load_checkpoint(namm_gguf[1], trust_pickle=True), tmp_path / "keys.gguf", "f32", delay=64,
                      deploy={"mode": "budget_zmax", "quorum": 1.0}, deploy_key_weight=0.5)["output"]
    assert gguf_settings(path)["deploy_key_weight"] == 0.5 and run_settings(path)["key_weight"] == 0.5
    assert _core.NammModel.load(str(path)).hparams["deploy_key_weight"] == 0.5
    tokens = smollm2_model.tokenize(english_text, True, False)[:700]
    layers = [7, 22]  # the 2 layers spread over 30
    with ValueCapture(smollm2_path, 2) as capture:
        before_rope = capture.projections(tokens, "Kcur-")[0]  # [30 layers x 3 heads, token, 64]
    pairs = np.concatenate([np.arange(3 * layer, 3 * layer + 3) for layer in layers])
    for override, weight in ((-1, 0.5), (0.0, 0.0), (2.0, 2.0)):
        engine = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path),
                              namm_layers=2, namm_key_weight=override, namm_defer_evictions=False)
        engine.capture_namm_layers(layers)
        engine.feed(tokens)
        captures = engine.namm_captures()
        if weight == 0.0:
            assert all("key_distinctiveness" not in c for c in captures)
        else:
            first = min(captures, key=lambda c: c["tokens_seen"])
            positions = first["positions"]  # nothing evicted yet: the first positions of the text
            keys = before_rope[pairs][:, positions]
            n = len(positions)
            expected = np.zeros(n)
            expected[4:n - 1] = probe_distinctiveness(keys[:, 4:n - 1])
            np.testing.assert_allclose(first["key_distinctiveness"], expected, atol=2e-3)
        assert_budget_choices(engine, layers, "budget_zmax", 256 - 64, key_weight=weight)
    with pytest.raises(InvalidArgumentError, match="namm_key_weight adds to the scores a budget mode ranks by"):
        _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path), namm_mode="quorum",
                     namm_key_weight=1.0)
    with pytest.raises(InvalidArgumentError, match="namm_key_weight must be a number between 0 and 100"):
        StreamingLLM(smollm2_path, policy="namm", namm_path=str(path), namm_key_weight=-1.0)
    # A saved session carries the keys: the restored engine makes the saved one's choices.
    def keyed():
        return _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path), namm_layers=2)
    saved_from = keyed()
    saved_from.feed(tokens[:300])
    restored = keyed()
    restored.load_state(saved_from.save_state())
    for e in (saved_from, restored):
        e.feed(tokens[300:700])
    assert restored.cached_positions() == saved_from.cached_positions()
    plain = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path), namm_layers=2,
                         namm_key_weight=0.0)
    plain.feed(tokens[:300])
    with pytest.raises(InvalidArgumentError, match="holds no keys, which namm_key_weight > 0 reads"):
        keyed().load_state(plain.save_state())


@pytest.mark.model
def test_the_engine_runs_a_namm_at_its_deployed_interval(smollm2_model, english_text, namm_gguf, tmp_path):
    """A NAMM GGUF that records a deployed interval (namm.deploy.delay) is invoked at it by default, not at the
    interval it was trained at; an explicit namm_delay still wins."""
    from pymemory.namm import load_checkpoint
    from pymemory.namm.convert import write_gguf

    path = write_gguf(load_checkpoint(namm_gguf[1], trust_pickle=True), tmp_path / "deployed.gguf", "f32", delay=64,
                      deploy={"mode": "budget_zmax", "quorum": 1.0}, deploy_delay=32)["output"]
    tokens = smollm2_model.tokenize(english_text, True, False)[:400]

    def invocations(**kwargs) -> list[int]:
        engine = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path),
                              namm_layers=1, **kwargs)
        engine.capture_namm_layers([15])
        engine.feed(tokens)
        assert engine.stats()["peak_cells"] <= 256
        return sorted({c["tokens_seen"] for c in engine.namm_captures()})

    assert invocations() == list(range(32, 401, 32))
    assert invocations(namm_delay=64) == list(range(64, 401, 64))


@pytest.mark.model
def test_deferred_evictions_hold_the_peak_and_give_up_what_the_invocation_chose(smollm2_model, english_text,
                                                                                namm_gguf, tmp_path):
    """Budget modes by default evict what an invocation gives up only as new tokens need the room. Fed in batches
    of the interval nothing changes (each batch needs exactly that room): scores and cache equal the immediate
    eviction's. Fed one token at a time the cache stays full, each new token pushes out one of the tokens the
    invocation gave up and nothing else, and a saved session restores the tokens still to go."""
    from pymemory.namm import load_checkpoint
    from pymemory.namm.convert import write_gguf

    path = write_gguf(load_checkpoint(namm_gguf[1], trust_pickle=True), tmp_path / "z.gguf", "f32", delay=32,
                      deploy={"mode": "budget_zmax", "quorum": 1.0})["output"]
    tokens = smollm2_model.tokenize(english_text, True, False)[:400]

    def engine(defer: bool):
        # 256 cells: batches of 32 (the prefill chunk, window / 4, is larger), so they end at every invocation
        return _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=str(path), namm_layers=2,
                            n_threads=2, namm_defer_evictions=defer)

    deferred, immediate = engine(True), engine(False)
    np.testing.assert_array_equal(deferred.score(tokens[:384], 32)[1:], immediate.score(tokens[:384], 32)[1:])
    # The invocation at 384 has given up 32 tokens the deferred cache still holds
    assert set(immediate.cached_positions()) <= set(deferred.cached_positions())
    assert len(deferred.cached_positions()) == len(immediate.cached_positions()) + 32 == 256
    for e in (deferred, immediate):
        e.reset()
        e.feed(tokens[:320])  # in batches that end at invocations: the same state, bar the tokens still to go
    assert len(immediate.cached_positions()) == 224 and len(deferred.cached_positions()) == 256
    given_up = set(deferred.cached_positions()) - set(immediate.cached_positions())
    assert len(given_up) == 32 and max(given_up) < 320
    for k in range(1, 32):
        for e in (deferred, immediate):
            e.feed([tokens[319 + k]])
        kept, now = set(immediate.cached_positions()), set(deferred.cached_positions())
        assert len(now) == 256 and kept <= now and len(now - kept) == 32 - k and now - kept <= given_up
        if k == 10:
            saved = deferred.save_state()
    assert deferred.policy_stats()["forced_evictions"] == 0
    restored = engine(True)
    restored.load_state(saved)
    for t in tokens[330:351]:  # what `deferred` was fed after it was saved
        restored.feed([t])
    assert restored.cached_positions() == deferred.cached_positions()


@pytest.mark.model
def test_an_unknown_namm_mode_is_refused_when_the_engine_is_built(smollm2_model, namm_gguf):
    # Not at the first invocation, 512 tokens into a stream: the raw core checks it up front too.
    with pytest.raises(InvalidArgumentError, match="namm_mode must be 'quorum', 'budget', 'budget_max', 'budget_zmax' or 'budget_mix' .got 'lru'"):
        _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=namm_gguf[0], namm_mode="lru",
                     namm_delay=64)


@pytest.fixture(scope="module")
def namm_gguf(tmp_path_factory):
    from pymemory.namm import load_checkpoint
    from pymemory.namm.convert import write_gguf
    from pymemory.namm.testing import write_random_checkpoint

    d = tmp_path_factory.mktemp("namm_policy")
    write_random_checkpoint(d / "ckpt.pt", seed=2)
    return str(write_gguf(load_checkpoint(d / "ckpt.pt", trust_pickle=True), d / "namm.gguf", "f32")["output"]), \
        d / "ckpt.pt"


@pytest.mark.model
@pytest.mark.parametrize("ema_coefficient,corrected", [(None, False), (0.998, False), (0.998, True)])
def test_engine_features_and_scores_equal_the_reference_on_captured_attention(smollm2_model, english_text, namm_gguf,
                                                                             tmp_path, ema_coefficient, corrected):
    """Decode real text with policy namm; for three layers, capture the GQA-averaged attention each invocation
    received, feed it to the PyTorch reference (with the reference's state set to the tokens the engine kept), and
    compare the engine's spectrogram EMAs and BAM scores with the reference's. Again with a NAMM file whose moving
    average is longer than the released one (per-token coefficient 0.998 instead of 0.99), and with that average
    bias-corrected (the scores must then differ from the uncorrected reference's)."""
    from dataclasses import replace

    from pymemory.namm import NammReference, load_checkpoint, load_gguf
    from pymemory.namm.convert import write_gguf
    from pymemory.namm.reference import ReferenceState

    path, ckpt = namm_gguf
    uncorrected = None
    if ema_coefficient is None:
        reference = NammReference.from_checkpoint(ckpt, trust_pickle=True)
    else:
        path = write_gguf(load_checkpoint(ckpt, trust_pickle=True), tmp_path / "long_ema.gguf",
                          ema_coefficient=ema_coefficient, ema_bias_correction=corrected)["output"]
        vector, hparams = load_gguf(path)
        assert hparams.ema_coefficient == pytest.approx(ema_coefficient)
        assert hparams.ema_bias_correction is corrected
        assert _core.NammModel.load(path).hparams["ema_bias_correction"] is corrected
        reference = NammReference.from_gguf(path)
        if corrected:
            uncorrected = NammReference.from_vector(vector, replace(hparams, ema_bias_correction=False))
    correction_effects = []
    tokens = smollm2_model.tokenize(english_text, True, False)[:1700]
    # The original evicts at each invocation (the reference's state keeps only what it kept)
    engine = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=1020, namm_path=path, namm_mode="budget",
                          max_cells=500, namm_defer_evictions=False)
    engine.capture_namm_layers([0, 15, 29])
    engine.feed(tokens)
    captures = engine.namm_captures()
    assert len(captures) == 9 and engine.policy_stats()["forced_evictions"] == 0
    states: dict[int, ReferenceState] = {}
    score_errors, ema_errors = [], []
    for c in captures:
        attn, positions = c["attention"], c["positions"]
        state = states.get(c["layer"]) or reference.new_state(attn.shape[0])
        # The captured rows are real attention: each GQA-averaged row sums to 1 over the tokens that existed.
        rows_stream = c["tokens_seen"] - 512 + np.arange(512)
        visible = positions[None, :] <= positions[-512:][:, None]
        np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-4)
        assert np.all(attn[:, ~visible] == 0)
        assert rows_stream[-1] == positions[-1]  # absolute positions: stream index = position
        X, ema, history, ref_positions = reference.features(state, attn, positions[state.n_tokens:])
        np.testing.assert_array_equal(ref_positions[0], positions)
        np.testing.assert_allclose(c["ema"], ema, rtol=1e-4, atol=1e-7)
        score_error = float(np.max(np.abs(reference.scores_from_features(X) - c["scores"])))
        ema_error = float(np.max(np.abs(c["ema"] - ema) / (np.abs(ema) + 1e-7)))
        print(f"layer {c['layer']} at {c['tokens_seen']} tokens: max |score difference| {score_error:.1e}, "
              f"max relative EMA difference {ema_error:.1e}")
        assert score_error <= 1e-4
        if uncorrected is not None:
            correction_effects.append(float(np.max(np.abs(uncorrected.scores_from_features(
                uncorrected.features_from_ema(ref_positions, ema)) - c["scores"]))))
        score_errors.append(score_error)
        ema_errors.append(ema_error)
        kept = np.nonzero(c["kept"])[0]
        states[c["layer"]] = ReferenceState(ref_positions[:, kept], ema[:, kept], history[:, kept])
    if uncorrected is not None:
        assert min(correction_effects) > 1e-3, correction_effects  # the correction changes what the engine scores
    if ema_coefficient is not None:
        return
    record("namm_engine_vs_reference_score_diff_range", [min(score_errors), max(score_errors)],
           "NAMM in the engine on 1,700 tokens of Austen (SmolLM2, layers 0/15/29, 3 invocations): min and max over "
           "the 9 (layer, invocation) pairs of max |score difference| to the PyTorch reference fed the same attention")
    record("namm_engine_vs_reference_ema_rel_diff_max", max(ema_errors),
           "the same: largest relative EMA difference (on EMAs near zero)")


@pytest.mark.model
@pytest.mark.parametrize("mode", ["quorum", "budget", "budget_max", "budget_zmax"])
def test_long_generation_with_namm_stays_bounded(smollm2_model, namm_gguf, mode):
    path, _ = namm_gguf
    engine = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=1020, namm_path=path, namm_mode=mode,
                          quorum=0.5)
    sampler = _core.Sampler(smollm2_model, _core.SamplingParams(temperature=0.8, seed=4))
    engine.feed(smollm2_model.tokenize("The history of the world, chapter one.", True, False))
    n = max(STREAM_TOKENS, 1600)
    for i in range(n):
        token = engine.sample(sampler)
        engine.feed([token])
        if i % 128 == 0:
            assert engine.stats()["cells_used"] <= 1024
    stats = engine.policy_stats()
    records = stats["invocations"]
    assert len(records) == engine.stats()["tokens_seen"] // 512
    assert all(r["cells_after"] <= r["cells_before"] <= 1024 for r in records)
    scored = [r for r in records if r["scored"]]
    assert all(len(r["layer_kept"]) == 30 and 0 < min(r["layer_kept"]) for r in scored)
    # Budget mode skips the scorer while nothing could be evicted (at most max_cells = 512 cached); quorum never.
    assert [r["scored"] for r in records] == [mode == "quorum" or r["cells_before"] > 512 for r in records]
    assert len(scored) >= 2
    assert engine.stats()["peak_cells"] <= 1024
    # The policy's own decisions, not the forced-eviction fallback (which alone keeps cells <= capacity):
    by_policy = sum(r["cells_before"] - r["cells_after"] for r in records)
    # Budget modes defer what an invocation gives up until new tokens need the room: what the last one gave up and
    # the tokens since have not yet used is still cached, and the cache is at its peak.
    still_pending = 0
    if mode != "quorum":
        still_pending = still_deferred(engine.stats(), records)
        assert engine.stats()["cells_used"] == 1024
    assert engine.stats()["tokens_evicted"] == by_policy + stats["forced_evictions"] - still_pending  # all accounted
    if mode != "quorum":
        # Holds exactly max_cells (capacity - delay = 512) after each invocation, so the next 512 tokens always fit:
        # a well-sized budget never needs the fallback.
        assert all(r["cells_after"] == min(r["cells_before"], 512) for r in records)
        assert stats["forced_evictions"] == 0
    else:
        # Quorum 0.5 keeps everything every (layer, head) keeps and drops what they all drop (bar sinks and the
        # newest token), and it does evict on its own.
        assert all(r["intersection_size"] <= r["cells_after"] <= r["union_size"] + 4 + 1 for r in records)
        assert by_policy > 0
    print(mode, engine.stats()["tokens_seen"], "tokens,", len(records), "invocations, cells before/after: first",
          [(r["cells_before"], r["cells_after"]) for r in records][:4], "max before",
          max(r["cells_before"] for r in records), "mean after",
          round(sum(r["cells_after"] for r in records) / len(records), 1), "peak", engine.stats()["peak_cells"],
          "forced", stats["forced_evictions"])


@pytest.mark.model
def test_namm_layers_scores_an_even_subset_with_unchanged_per_layer_features(smollm2_model, english_text, namm_gguf):
    """namm_layers=3 scores layers 5, 15 and 25 of 30 and votes with those alone; a scored layer's features and
    scores are its own, so up to the first invocation they equal those of the engine that scores all layers."""
    path, _ = namm_gguf
    tokens = smollm2_model.tokenize(english_text, True, False)[:300]
    engines = {k: _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=path,
                               namm_mode="budget", namm_delay=64, namm_layers=k) for k in (0, 3)}
    for engine in engines.values():
        engine.capture_namm_layers([15])
        engine.feed(tokens)
    subset, full = engines[3].policy_stats(), engines[0].policy_stats()
    assert len(subset["invocations"]) == len(full["invocations"]) == 300 // 64
    assert all(len(r["layer_kept"]) == 3 for r in subset["invocations"])
    assert all(len(r["layer_kept"]) == 30 for r in full["invocations"])
    first = [e.namm_captures()[0] for e in (engines[3], engines[0])]
    assert first[0]["layer"] == first[1]["layer"] == 15
    np.testing.assert_allclose(first[0]["ema"], first[1]["ema"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(first[0]["scores"], first[1]["scores"], atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="not scored"):
        engines[3].capture_namm_layers([0])
    for bad in (-1, 31):
        with pytest.raises(InvalidArgumentError, match="namm_layers"):
            _core.Engine(smollm2_model, policy="namm", n_sink=4, window=252, namm_path=path, namm_delay=64,
                         namm_layers=bad)


@pytest.mark.model
def test_streaming_llm_and_cli_run_namm(smollm2_path, namm_gguf, capsys, monkeypatch):
    path, _ = namm_gguf
    with StreamingLLM(smollm2_path, policy="namm", namm_path=path, window=252, namm_delay=64,
                      namm_mode="budget") as llm:
        text = "".join(llm.generate("Tell me a story.", max_tokens=700, ignore_eos=True, temperature=0.7))
        assert text
        ps = llm.policy_stats
        assert ps["policy"] == "namm" and len(ps["invocations"]) >= 1
        assert "overall/mean_cells_after" in ps["mem_stats"] and "layer_id_29/mean_kept" in ps["mem_stats"]
    import io

    from pymemory.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n/stats\n"))
    assert main(["chat", "--model", smollm2_path, "--policy", "namm", "--namm", path, "--window", "1020",
                 "--max-tokens", "20", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "[cache" in err
    # --namm-layers / --namm-delay reach the engine
    from pymemory.commands import add_model_arguments, open_model

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(["--model", smollm2_path, "--policy", "namm", "--namm", path, "--window", "252",
                              "--namm-layers", "3", "--namm-delay", "64"])
    with open_model(args) as llm:
        "".join(llm.generate("Tell me a story.", max_tokens=70, ignore_eos=True))
        assert llm.policy_stats["scored_layers"] == [5, 15, 25] and len(llm.policy_stats["invocations"]) >= 1


@pytest.mark.model
def test_forced_eviction_with_reindex_uses_the_scores_of_the_right_tokens(smollm2_model, namm_gguf):
    """Between invocations a full cache evicts by the last invocation's mean scores (make_room). With reindex=True
    positions are compacted after every eviction, so those scores must follow the tokens, not the positions they
    had (the bug: a map keyed by position gave each token the score of whichever token had its position before).
    Distinct token ids identify the tokens; the expected cache is simulated from the captured scores."""
    path, _ = namm_gguf
    n_sink, window, delay = 4, 44, 32
    capacity = n_sink + window
    tokens = [int(t) for t in np.random.default_rng(0).permutation(np.arange(1000, 30000))[:2 * delay - 1]]
    engine = _core.Engine(smollm2_model, policy="namm", n_sink=n_sink, window=window, namm_path=path,
                          namm_delay=delay, reindex=True, namm_mode="quorum", quorum=1.0, n_threads=1)
    engine.capture_namm_layers(list(range(smollm2_model.info["n_layer"])))
    engine.feed(tokens[:delay])  # ends with the first invocation
    captures = engine.namm_captures()
    assert len(captures) == smollm2_model.info["n_layer"] and {c["tokens_seen"] for c in captures} == {delay}
    # Mean over every (layer, KV head) pair, as the policy computes it, in chronological order at the invocation.
    mean_scores = np.mean([c["scores"].astype(np.float64) for c in captures], axis=(0, 1))
    invoked = [tokens[p] for p in captures[0]["positions"]]  # no eviction before: position = stream index
    kept = captures[0]["kept"].astype(bool)
    cache = [(t, s) for t, s, k in zip(invoked, mean_scores, kept) if k]
    assert engine.cached_tokens() == [t for t, _ in cache]
    score_at_position = dict(zip(captures[0]["positions"].tolist(), mean_scores))

    forced = disagreements = 0
    for token in tokens[delay:]:  # up to the token before the next invocation: only forced evictions
        if len(cache) + 1 > capacity:
            candidates = range(n_sink, len(cache) - 1)  # never the sinks nor the newest token
            right = min(candidates, key=lambda i: (cache[i][1], i))
            positions = engine.cached_positions()
            wrong = min(candidates, key=lambda i: (score_at_position.get(positions[i], 0.0), i))
            disagreements += right != wrong
            del cache[right]
            forced += 1
        cache.append((token, 0.0))  # decoded since the invocation: no score yet
        engine.feed([token])
        assert engine.cached_tokens() == [t for t, _ in cache], f"after {forced} forced evictions"
        assert engine.cached_positions() == list(range(len(cache)))  # re-indexed
    stats = engine.policy_stats()
    print(f"kept {int(kept.sum())} of {delay} at the invocation, then {forced} forced evictions; keyed by position "
          f"{disagreements} of them would have evicted another token")
    assert forced == int(kept.sum()) + len(tokens) - delay - capacity
    assert stats["forced_evictions"] == forced > 5 and len(stats["invocations"]) == 1
    assert disagreements > 0  # the scenario tells the two lookups apart: keyed by position it would fail
