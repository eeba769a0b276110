"""The PyTorch NAMM reference against the spec's formulas (namm-spec.md §2-§4), computed independently here."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pymemory.namm import NammParams, NammReference  # noqa: E402
from pymemory.namm.reference import ema_streaming_update  # noqa: E402
from pymemory.namm.testing import random_causal_attention, random_params  # noqa: E402


@pytest.fixture(scope="module")
def reference() -> NammReference:
    return NammReference(NammParams(*random_params(7)))


def test_streaming_form_equals_the_window_formula(reference):
    """32 streaming frame updates == the invocation's window STFT + EMA with the new-token frame mask (§2.3)."""
    rng = np.random.default_rng(0)
    state = reference.new_state(3)
    for invocation in range(3):
        n_old = state.n_tokens
        attn = random_causal_attention(rng, 3, n_old)
        new_pos = np.arange(invocation * 512, (invocation + 1) * 512)
        _, ema_window, hist_window, _ = reference.features(state, attn, new_pos)
        n = n_old + 512
        ema = np.zeros((3, n, 17), np.float32)
        hist = np.zeros((3, n, 16), np.float32)
        ema[:, :n_old], hist[:, :n_old] = state.ema, state.history
        for frame in range(32):
            rows = attn[:, frame * 16:(frame + 1) * 16, :].transpose(0, 2, 1)  # [H, n, 16]
            ema, hist = ema_streaming_update(ema, hist, rows)
        np.testing.assert_allclose(ema, ema_window, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(hist, hist_window)
        reference.step(state, attn, new_pos)


def test_recency_and_normalisation_formulas(reference):
    positions = np.array([[0, 5, 100, 30000, 30001]])
    rec = reference.recency(positions).numpy()
    age = (30001 - positions[0]).astype(np.float64)
    omega = 50000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(rec[0, :, :4], np.sin(age[:, None] * omega), atol=1e-6)
    np.testing.assert_allclose(rec[0, :, 4:], np.cos(age[:, None] * omega), atol=1e-6)
    assert rec[0, -1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # the newest token has age 0
    ema = np.full((1, 5, 17), 0.5, np.float32)
    X = reference.features_from_ema(positions, ema).numpy()
    _, mean, var = random_params(7)
    expected = (0.5 - mean.astype(np.float64)) / np.maximum(np.sqrt(var.astype(np.float64)), 1e-7)
    np.testing.assert_allclose(X[0, :, 8:], np.broadcast_to(expected, (5, 17)), rtol=1e-5)
    zero_var = NammReference(NammParams(random_params(7)[0], mean, np.zeros(17, np.float32) + 1e-20))
    assert np.isfinite(zero_var.features_from_ema(positions, ema).numpy()).all()  # eps guards sqrt(var) ~ 0


def test_bam_matches_an_explicit_per_token_loop(reference):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2, 9, 25)).astype(np.float32)
    scores = reference.scores_from_features(X)
    W_qkv, b_qkv = reference.W_qkv.numpy().astype(np.float64), reference.b_qkv.numpy()
    W_o, b_o = reference.W_o.numpy().astype(np.float64), reference.b_o.numpy()
    w_out, b_out = reference.w_out.numpy().astype(np.float64), reference.b_out.numpy()
    for h in range(2):
        qkv = X[h].astype(np.float64) @ W_qkv + b_qkv
        q, k, v = qkv[:, :32], qkv[:, 32:64], qkv[:, 64:]
        for i in range(9):
            logits = k[i:] @ q[i] / np.sqrt(32)  # token i sees itself and newer tokens only
            p = np.exp(logits - logits.max())
            o = (p / p.sum()) @ v[i:]
            y = o @ W_o + b_o
            hid = X[h, i] * (1 + y[25:]) + y[:25]
            assert abs(hid @ w_out + b_out[0] - scores[h, i]) < 1e-4


def test_selection_rules(reference):
    scores = np.array([[-1.0, 2.0, -3.0, 0.0, -5.0],   # 3 negatives before the newest
                       [-1.0, -2.0, 4.0, 1.0, -9.0]],  # 2 negatives: this head decides K = 5 - 2
                      np.float32)
    keep = reference.select(scores)
    assert keep.shape == (2, 3)
    assert keep[0].tolist() == [1, 3, 4]  # top-3 of head 0 incl. the forced newest, chronological
    assert keep[1].tolist() == [2, 3, 4]  # the newest is kept although its score is -9
    ties = reference.select(np.array([[1.0, -1.0, -1.0, -1.0, 0.5]], np.float32))
    assert ties[0].tolist() == [0, 4]  # zero is not negative: K = 5 - 3 = 2
    ties = reference.select(np.array([[1.0, 1.0, -1.0, 2.0]], np.float32))
    assert ties[0].tolist() == [0, 1, 3]


def test_state_carries_across_invocations(reference):
    rng = np.random.default_rng(2)
    state = reference.new_state(2)
    attn = random_causal_attention(rng, 2, 0)
    keep, scores = reference.step(state, attn, np.arange(512))
    assert scores.shape == (2, 512) and keep.shape[0] == 2
    assert state.n_tokens == keep.shape[1] and np.all(state.positions[:, -1] == 511)
    ema_before = state.ema.copy()
    zero_attention = np.zeros((2, 512, state.n_tokens + 512), np.float32)
    for t in range(512):
        zero_attention[:, t, state.n_tokens + t] = 1.0  # each new token attends only to itself
    _, ema_after, _, _ = reference.features(state, zero_attention, np.arange(512, 1024))
    # Old tokens receive nothing, except the first frame still holds their last 16 values: E decays by a^32 plus
    # that frame's contribution; with their history zeroed, exactly by a^32.
    state.history[:] = 0
    _, ema_decayed, _, _ = reference.features(state, zero_attention, np.arange(512, 1024))
    np.testing.assert_allclose(ema_decayed[:, :state.n_tokens], ema_before * 0.99 ** 512, rtol=1e-5)
    assert not np.allclose(ema_after[:, :state.n_tokens], ema_decayed[:, :state.n_tokens])


@pytest.mark.parametrize(
    "make_attn, new_pos, message",
    [
        (lambda s: np.zeros((2, 500, s + 500), np.float32), np.arange(512, 1012), "multiple of 16"),
        (lambda s: np.zeros((2, 512, s + 400), np.float32), np.arange(512, 1024), "columns"),
        (lambda s: np.zeros((3, 512, s + 512), np.float32), np.arange(512, 1024), "n_kv_heads"),
        (lambda s: np.zeros((2, 512, s + 512), np.float32), np.arange(100, 612), "increase"),
        (lambda s: np.full((2, 512, s + 512), np.nan, np.float32), np.arange(512, 1024), "NaN"),
    ],
)
def test_bad_inputs_are_clear_errors(reference, make_attn, new_pos, message):
    rng = np.random.default_rng(3)
    state = reference.new_state(2)
    reference.step(state, random_causal_attention(rng, 2, 0), np.arange(512))
    with pytest.raises(ValueError, match=message):
        reference.step(state, make_attn(state.n_tokens), new_pos)
