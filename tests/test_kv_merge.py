"""tools/kv_merge.py: llama.cpp's sequence state as arrays, and merging evicted values into kept ones."""
from __future__ import annotations

import numpy as np
import pytest
from tool_modules import load_tool


def _tool():
    return load_tool("kv_merge")


def _state_bytes(positions, keys, values) -> np.ndarray:
    """A state buffer in llama.cpp's layout: keys per layer [cells, width], values per layer [width, cells]."""
    parts = [np.array([7], np.uint64).tobytes(), np.array([1, len(positions)], np.uint32).tobytes()]
    parts += [np.array([p, 1, 0], np.int32).tobytes() for p in positions]
    parts.append(np.array([1, len(keys)], np.uint32).tobytes())
    for k in keys:
        parts += [np.array([1], np.int32).tobytes(), np.array([k.shape[1] * 2], np.uint64).tobytes(),
                  k.astype(np.float16).tobytes()]
    for v in values:
        parts += [np.array([1], np.int32).tobytes(), np.array([2, v.shape[0]], np.uint32).tobytes(),
                  v.astype(np.float16).tobytes()]
    return np.frombuffer(b"".join(parts), np.uint8).copy()


def test_parse_gives_writable_views_of_positions_keys_and_values():
    tool = _tool()
    rng = np.random.default_rng(0)
    keys = [rng.normal(size=(3, 4)), rng.normal(size=(3, 4))]
    values = [rng.normal(size=(4, 3)), rng.normal(size=(4, 3))]
    buffer = _state_bytes([0, 5, 9], keys, values)
    state = tool.CacheState.parse(buffer)
    assert state.positions.tolist() == [0, 5, 9]
    np.testing.assert_allclose(state.keys[1], keys[1].astype(np.float16))
    np.testing.assert_allclose(state.values[0], values[0].astype(np.float16))
    state.values[1][2, 1] = 42.0  # writes through to the buffer llama.cpp will read back
    assert tool.CacheState.parse(buffer).values[1][2, 1] == 42.0


@pytest.mark.parametrize("damage", ["trailing byte", "short", "two streams", "quantized keys"])
def test_parse_refuses_a_layout_it_does_not_know(damage):
    tool = _tool()
    buffer = _state_bytes([0, 1], [np.zeros((2, 4))], [np.zeros((4, 2))])
    if damage == "trailing byte":
        buffer = np.concatenate([buffer, np.zeros(1, np.uint8)])
    elif damage == "short":
        buffer = buffer[:-2]
    elif damage == "two streams":
        buffer[8:12] = np.frombuffer(np.array([2], np.uint32).tobytes(), np.uint8)
    else:
        at = 8 + 8 + 2 * 12 + 8  # after the header, the cells and (V transposed, layers)
        buffer[at:at + 4] = np.frombuffer(np.array([8], np.int32).tobytes(), np.uint8)  # q8_0
    with pytest.raises(ValueError):
        tool.CacheState.parse(buffer)


def test_an_evicted_value_joins_the_running_mean_of_the_kept_token_with_the_closest_key():
    tool = _tool()
    head_dim = 2
    # One layer, one KV head; tokens at positions 0 (a sink), 1, 2, 3, 4. Keys: 1 and 3 point one way, 2 and 4 the
    # other (after the mean is taken away); the cosine of 3 to 1 is 1, of 4 to 2 is 1.
    keys = np.array([[0, 0], [1, 0], [0, 1], [1, 0], [0, 1]], float)
    values = np.array([[9, 9], [1, 1], [2, 2], [3, 3], [4, 4]], float)  # [cells, D]
    state = tool.CacheState.parse(_state_bytes([0, 1, 2, 3, 4], [keys], [values.T]))
    merger = tool.ValueMerger(head_dim, n_sink=1, threshold=0.9)
    merger._merge(state, {3})
    np.testing.assert_allclose(state.values[0].T, [[9, 9], [2, 2], [2, 2], [3, 3], [4, 4]])  # 1 <- mean(1, 3)
    # A second token merged into the same one counts with weight 1 against the two it already holds.
    keys2 = np.array([[0, 0], [1, 0], [0, 1], [0, 1], [1, 0]], float)  # position 5's key like position 1's
    state2 = tool.CacheState.parse(_state_bytes([0, 1, 2, 4, 5], [keys2], [np.array(
        [[9, 9], [2, 2], [2, 2], [4, 4], [8, 8]], float).T]))
    merger._merge(state2, {5})
    np.testing.assert_allclose(state2.values[0].T[1], [4, 4])  # (2 * 2 + 8) / 3
    assert merger.merged == 2 and merger.offered == 2


def test_a_value_below_the_threshold_or_into_a_sink_is_not_merged():
    tool = _tool()
    keys = np.array([[-1, -1], [0, 1], [1, 0.2], [-1, -1]], float)
    values = np.array([[5, 5], [1, 1], [2, 2], [3, 3]], float)
    state = tool.CacheState.parse(_state_bytes([0, 1, 2, 3], [keys], [values.T]))
    # position 3's key points away from every kept non-sink key; the sink (position 0), whose key is the same as
    # position 3's, is never a target
    tool.ValueMerger(2, n_sink=1, threshold=0.5)._merge(state, {3})
    np.testing.assert_allclose(state.values[0].T, values)
