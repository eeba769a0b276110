"""The PyTorch NAMM reference against the spec's formulas (namm-spec.md §2-§4), each recomputed independently here."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pymemory.namm import NammHparams, NammReference  # noqa: E402
from pymemory.namm import gguf_format as fmt  # noqa: E402
from pymemory.namm.checkpoint import validate_vector  # noqa: E402
from pymemory.namm.reference import ema_streaming_update  # noqa: E402
from pymemory.namm.testing import random_causal_attention, random_params, run_invocations  # noqa: E402

A = 0.99 ** 16  # EMA coefficient per frame (spec §2.3)


def make_reference(seed: int = 7, **hparams) -> NammReference:
    return NammReference.from_vector(validate_vector(*random_params(seed), f"random seed {seed}"),
                                     NammHparams(**hparams))


@pytest.fixture(scope="module")
def reference() -> NammReference:
    return make_reference()


def test_parameter_layout_is_the_spec_table():
    offsets = {name: (start, end) for name, (start, end, _) in fmt.PARAM_LAYOUT.items()}
    assert offsets == {"W_qkv": (0, 2400), "b_qkv": (2400, 2496), "W_o": (2496, 4096), "b_o": (4096, 4146),
                       "w_out": (4146, 4171), "b_out": (4171, 4172)}
    assert fmt.param_count() == 4172 and fmt.param_count(16, False) == 2026  # spec §5.5
    assert (fmt.RELEASED.n_bins, fmt.RELEASED.n_features, fmt.RELEASED.frames) == (17, 25, 32)


def test_step_shapes_and_state_over_invocations(reference):
    state = reference.new_state(3)
    assert state.positions.shape == (3, 0) and state.ema.shape == (3, 0, 17) and state.history.shape == (3, 0, 16)
    for inv in run_invocations(reference, state, 4, np.random.default_rng(0), first_position=100, gap=7):
        n, K = inv.attn.shape[2], inv.keep.shape[1]
        assert inv.scores.shape == (3, n) and inv.scores.dtype == np.float32
        assert inv.keep.dtype == np.int64 and 1 <= K <= n
        assert np.all(np.diff(inv.keep, axis=1) > 0)  # chronological, no duplicates
        assert state.positions.shape == (3, K) and state.ema.shape == (3, K, 17) and state.history.shape == (3, K, 16)
        assert np.all(state.positions[:, -1] == inv.new_pos[-1])  # the newest token survives in every head
        assert np.all(np.diff(state.positions, axis=1) > 0)
    assert state.positions.dtype == np.int64 and state.ema.dtype == state.history.dtype == np.float32


def test_streaming_form_equals_the_window_formula(reference):
    """32 streaming frame updates per invocation == the window STFT + EMA with the new-token frame mask (§2.3), the
    contract between this reference and the engine's streaming features."""
    rng = np.random.default_rng(0)
    state = reference.new_state(3)
    for invocation in range(3):
        n_old = state.n_tokens
        attn = random_causal_attention(rng, 3, n_old)  # [3, 512, n_old + 512]
        new_pos = np.arange(invocation * 512, (invocation + 1) * 512)
        window = reference.features(state, attn, new_pos)
        ema = np.zeros((3, n_old + 512, 17))  # new tokens start at zero
        hist = np.zeros((3, n_old + 512, 16))
        ema[:, :n_old], hist[:, :n_old] = state.ema, state.history
        for frame in range(32):
            rows = attn[:, frame * 16:(frame + 1) * 16, :].transpose(0, 2, 1)  # [H, n, 16]
            ema, hist = ema_streaming_update(ema, hist, rows)
        assert np.max(np.abs(ema - window.ema)) <= 1e-6 * max(1.0, np.abs(ema).max())
        np.testing.assert_array_equal(hist, window.history)
        reference.step(state, attn, new_pos)


def test_window_formula_matches_the_dft_definition(reference):
    """§2.2-2.3 evaluated literally for a few old and new tokens: S[j, f] = |Σ_n w[n]·x̃[16j + n]·e^(−2πi f n/32)|,
    E = a^32·E_old + Σ_j m[j]·(1 − a)·a^(31−j)·S[j]."""
    rng = np.random.default_rng(1)
    state = reference.new_state(2)
    reference.step(state, random_causal_attention(rng, 2, 0), np.arange(512))
    n_old = state.n_tokens
    attn = random_causal_attention(rng, 2, n_old)
    ema = reference.features(state, attn, np.arange(512, 1024)).ema
    n = np.arange(32)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * n / 32)
    dft = np.exp(-2j * np.pi * np.arange(17)[:, None] * n[None, :] / 32)  # [17, 32]
    for k in (0, n_old - 1, n_old, n_old + 37, n_old + 511):
        t = k - n_old  # window index of a new token
        prev = state.history[1, k] if t < 0 else np.zeros(16)
        series = np.concatenate([prev, attn[1, :, k]]).astype(np.float64)  # [528]
        expected = state.ema[1, k].astype(np.float64) * A ** 32 if t < 0 else np.zeros(17)
        for j in range(32):
            if t >= 0 and t // 16 > j:
                continue  # the frame ended before this token existed
            spectrum = np.abs(dft @ (w * series[16 * j:16 * j + 32]))
            expected += (1 - A) * A ** (31 - j) * spectrum
        np.testing.assert_allclose(ema[1, k], expected, rtol=1e-5, atol=1e-9)


def test_recency_and_normalisation_formulas(reference):
    positions = np.array([[0, 5, 100, 30000, 30001]])
    rec = reference.recency(positions).numpy()
    age = (30001 - positions[0]).astype(np.float64)
    omega = 50000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(omega, [1, 0.066874, 0.0044721, 0.00029907], rtol=1e-4)  # spec §2.5
    np.testing.assert_allclose(rec[0, :, :4], np.sin(age[:, None] * omega), atol=1e-6)
    np.testing.assert_allclose(rec[0, :, 4:], np.cos(age[:, None] * omega), atol=1e-6)
    assert rec[0, -1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # the newest token has age 0
    shifted = make_reference(recency_start=3).recency(positions).numpy()
    np.testing.assert_allclose(shifted[0, :, :4], np.sin((age[:, None] + 3) * omega), atol=1e-6)

    ema = np.random.default_rng(2).uniform(0, 0.05, (1, 5, 17)).astype(np.float32)
    X = reference.features_from_ema(positions, ema).numpy()
    _, mean, var = random_params(7)
    expected = (ema - mean.astype(np.float64)) / np.maximum(np.sqrt(var.astype(np.float64)), 1e-7)
    np.testing.assert_allclose(X[..., 8:], expected, rtol=1e-5)
    np.testing.assert_array_equal(X[..., :8], rec)  # [recency ‖ spectrum]
    tiny_var = NammReference.from_vector(validate_vector(random_params(7)[0], mean, np.full(17, 1e-20), "tiny"))
    np.testing.assert_allclose(tiny_var.normalise(ema).numpy(), (ema - mean) / 1e-7, rtol=1e-5)  # eps floor


def test_bam_matches_an_explicit_per_token_loop(reference):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2, 9, 25)).astype(np.float32)
    scores = reference.scores_from_features(X)
    p = {name: getattr(reference.params, name).numpy().astype(np.float64)
         for name in ("W_qkv", "b_qkv", "W_o", "b_o", "w_out", "b_out")}
    for h in range(2):
        qkv = X[h].astype(np.float64) @ p["W_qkv"] + p["b_qkv"]
        q, k, v = qkv[:, :32], qkv[:, 32:64], qkv[:, 64:]
        for i in range(9):
            logits = k[i:] @ q[i] / np.sqrt(32)  # token i sees itself and newer tokens only
            weights = np.exp(logits - logits.max())
            y = (weights / weights.sum()) @ v[i:] @ p["W_o"] + p["b_o"]
            hidden = X[h, i] * (1 + y[25:]) + y[:25]
            assert abs(hidden @ p["w_out"] + p["b_out"] - scores[h, i]) < 1e-4


def test_selection_rules(reference):
    scores = np.array([[-1.0, 2.0, -3.0, 0.0, -5.0],   # 3 negatives before the newest
                       [-1.0, -2.0, 4.0, 1.0, -9.0]],  # 2 negatives: this head decides K = 5 - 2
                      np.float32)
    keep = reference.select(scores)
    assert keep[0].tolist() == [1, 3, 4]  # its best 3, including one negative (-1 loses to the forced newest)
    assert keep[1].tolist() == [2, 3, 4]  # the newest is kept although its score is -9
    assert reference.select(np.array([[1.0, -1.0, -1.0, -1.0, 0.5]]))[0].tolist() == [0, 4]  # K = 5 - 3
    assert reference.select(np.array([[0.0, 0.0, -1.0, 2.0]]))[0].tolist() == [0, 1, 3]  # 0 is not negative
    assert reference.select(np.array([[-1.0, -2.0, -3.0]]))[0].tolist() == [2]  # K >= 1: the newest
    # Ties: head 0 sets K = 5 - 1 = 4; head 1 has four tokens at -1 for three places: the newer ones win.
    keep = reference.select(np.array([[3.0, 3.0, 3.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0, -9.0]]))
    assert keep.tolist() == [[0, 1, 2, 4], [1, 2, 3, 4]]


def test_state_carries_across_invocations(reference):
    rng = np.random.default_rng(2)
    state = reference.new_state(2)
    attn = random_causal_attention(rng, 2, 0)
    keep, _ = reference.step(state, attn, np.arange(512))
    np.testing.assert_array_equal(state.positions, keep)  # positions 0..511 = column indices
    np.testing.assert_array_equal(state.history, np.take_along_axis(attn[:, -16:, :].transpose(0, 2, 1),
                                                                    keep[..., None], 1))
    ema_before = state.ema.copy()
    self_only = np.zeros((2, 512, state.n_tokens + 512), np.float32)
    self_only[:, np.arange(512), state.n_tokens + np.arange(512)] = 1.0  # old tokens receive nothing new
    with_history = reference.features(state, self_only, np.arange(512, 1024)).ema[:, :state.n_tokens]
    state.history[:] = 0  # without the carried 16 values, the old EMA only decays, by a^32 = 0.99^512
    decayed = reference.features(state, self_only, np.arange(512, 1024)).ema[:, :state.n_tokens]
    np.testing.assert_allclose(decayed, ema_before * 0.99 ** 512, rtol=1e-5)
    assert np.all(with_history >= decayed) and not np.allclose(with_history, decayed)  # the history counts


@pytest.mark.parametrize(
    "make_attn, new_pos, error, message",
    [
        (lambda n: np.zeros((2, 496, n + 496), np.float32), np.arange(512, 1008), ValueError, "496 rows"),
        (lambda n: np.zeros((2, 512, n + 400), np.float32), np.arange(512, 1024), ValueError, "columns"),
        (lambda n: np.zeros((3, 512, n + 512), np.float32), np.arange(512, 1024), ValueError, "n_kv_heads=2"),
        (lambda n: np.eye(n + 512, dtype=np.float32)[n:][None].repeat(2, 0), np.arange(100, 612), ValueError,
         "increase"),
        (lambda n: np.full((2, 512, n + 512), np.nan, np.float32), np.arange(512, 1024), ValueError, "NaN"),
        (lambda n: np.full((2, 512, n + 512), -0.5, np.float32), np.arange(512, 1024), ValueError, "negative"),
        (lambda n: np.ones((2, 512, n + 512), np.float32), np.arange(512, 1024), ValueError, "not causal"),
        (lambda n: np.zeros((2, 512, n + 512)), np.arange(512, 1024), TypeError, "float32"),
        (lambda n: torch.zeros(2, 512, n + 512, dtype=torch.float64), np.arange(512, 1024), TypeError, "float32"),
        (lambda n: np.zeros((2, 512, n + 512), np.float32), np.arange(512, 1024) * 1.0, ValueError, "integer"),
    ],
)
def test_bad_inputs_are_clear_errors(reference, make_attn, new_pos, error, message):
    state = reference.new_state(2)
    reference.step(state, random_causal_attention(np.random.default_rng(3), 2, 0), np.arange(512))
    before = state.positions.copy()
    with pytest.raises(error, match=message):
        reference.step(state, make_attn(state.n_tokens), new_pos)
    np.testing.assert_array_equal(state.positions, before)  # a refused invocation leaves the state alone


def test_torch_input_and_unsupported_configurations(reference):
    state = reference.new_state(1)
    attn = torch.from_numpy(random_causal_attention(np.random.default_rng(4), 1, 0))
    keep, scores = reference.step(state, attn, list(range(512)))
    assert isinstance(keep, np.ndarray) and isinstance(scores, np.ndarray)
    with pytest.raises(ValueError, match="hidden_dim=16.*only the released"):
        make_reference(hidden_dim=16)
    with pytest.raises(ValueError, match="multiple of 16"):
        make_reference(delay=500)
    with pytest.raises(ValueError, match="n_kv_heads"):
        reference.new_state(0)
