"""tools/value_capture.py: value vectors captured from llama.cpp, and the output displacement of evicting a token."""
from __future__ import annotations

import numpy as np
import pytest
from tool_modules import load_tool


def _tool():
    return load_tool("value_capture")


def test_output_displacement_is_how_far_evicting_a_key_moves_each_output():
    tool = _tool()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5))
    logits[:, 0, 2:] = -np.inf  # query 0 sees keys 0..1 only (causal rows)
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [pairs, query, key]
    values = rng.normal(size=(2, 5, 4))
    displacement = tool.output_displacement(attention, values)
    for p in range(2):
        for q in range(3):
            output = attention[p, q] @ values[p]
            for k in range(5):
                if attention[p, q, k] == 0:
                    assert displacement[p, q, k] == 0
                    continue
                kept = np.delete(np.arange(5), k)
                renormalised = attention[p, q, kept] / attention[p, q, kept].sum()
                moved = np.linalg.norm(renormalised @ values[p, kept] - output)  # evicting k, exactly
                assert np.isclose(displacement[p, q, k] / (1 - attention[p, q, k]), moved, rtol=1e-6)


def test_values_are_per_token_layer_major_and_causal(smollm2_path):
    tool = _tool()
    tokens = [1, 504, 2340, 28, 504, 1431, 2340, 5, 904, 504, 77, 1431]
    with tool.ValueCapture(smollm2_path, 2) as capture:
        values = capture.values(tokens)
        prefix = capture.values(tokens[:7])
    assert values.shape == (30 * 3, len(tokens), 64)  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    assert np.isfinite(values).all()
    # layer 0's values depend on the token alone (no position enters V): equal ids give equal vectors
    layer0 = values[:3]
    for a in range(len(tokens)):
        for b in range(len(tokens)):
            same = np.allclose(layer0[:, a], layer0[:, b], atol=1e-5)
            assert same == (tokens[a] == tokens[b]), (a, b)
    # later layers see only earlier tokens: a prefix's values are the prefix of the whole's
    np.testing.assert_allclose(prefix, values[:, :7], atol=2e-3, rtol=2e-3)
    assert not np.allclose(values[3:, 7], values[3:, 8], atol=1e-3)


def test_rotate_is_llamas_rope_between_the_projections_before_and_after_it(smollm2_path):
    tool = _tool()
    tokens = [1, 504, 2340, 28, 504, 1431, 2340, 5, 904, 504, 77, 1431]
    positions = np.arange(len(tokens))
    with tool.ValueCapture(smollm2_path, 2) as capture:
        queries = capture.projections(tokens, "Qcur-")
        keys = capture.projections(tokens, "Kcur-")
        base, rope_type = tool.rope_settings(capture)
    assert (base, rope_type) == (100000.0, 0)  # SmolLM2: llama's adjacent-pair RoPE, base 1e5
    assert [q.shape for q in queries] == [(30 * 9, len(tokens), 64)] * 2  # before RoPE, then after
    assert [k.shape for k in keys] == [(30 * 3, len(tokens), 64)] * 2
    for before, after in (queries, keys):
        np.testing.assert_allclose(tool.rotate(before, positions, base, rope_type), after, atol=2e-4)
        assert not np.allclose(tool.rotate(before, positions, base, 2), after, atol=1e-2)  # NeoX halves differ
        np.testing.assert_allclose(before[:, 0], after[:, 0], atol=1e-5)  # position 0 alone is not rotated
        assert not np.allclose(before[:, 1:], after[:, 1:], atol=1e-2)
    with pytest.raises(ValueError, match="rope type"):
        tool.rotate(queries[0], positions, base, 1)
