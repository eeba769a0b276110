"""Memory policies as pure plans on synthetic cache states (no model needed)."""
from __future__ import annotations

import random

import pytest

from pymemory._loader import _core
from pymemory.errors import CacheFullError, InvalidArgumentError


def plan(policy, positions, n_incoming, *, n_sink=4, window=12, evict_chunk=1, n_pinned=None):
    if n_pinned is None:
        n_pinned = n_sink if policy in ("sink", "context_shift") else 0
    return _core.plan_eviction(policy, n_sink, window, evict_chunk, list(positions), n_pinned, n_incoming)


def test_nothing_happens_while_tokens_fit():
    p = plan("sink", range(10), 6)  # 10 + 6 == capacity 16
    assert p == {"remove": [], "shift": [], "recompute": False, "n_evicted": 0, "next_pos": -1}


def test_sink_evicts_oldest_non_sink_and_reindexes():
    p = plan("sink", range(16), 1)
    assert p["remove"] == [(4, 5)]
    assert p["shift"] == [(5, 16, -1)]
    after = _core.apply_plan(list(range(16)), p)
    assert after == list(range(15))  # contiguous again, one free cell


def test_sink_evict_chunk_evicts_several_at_once():
    p = plan("sink", range(16), 1, evict_chunk=5)
    assert p["remove"] == [(4, 9)] and p["n_evicted"] == 5
    assert _core.apply_plan(list(range(16)), p) == list(range(11))


def test_sink_evicts_at_least_what_is_needed():
    p = plan("sink", range(16), 7, evict_chunk=2)
    assert p["n_evicted"] == 7


def test_window_has_no_sinks():
    p = plan("window", range(16), 1, n_sink=0, window=16)
    assert p["remove"] == [(0, 1)] and p["shift"] == [(1, 16, -1)]


def test_context_shift_discards_half_of_the_non_kept():
    p = plan("context_shift", range(16), 1)
    assert p["n_evicted"] == 6  # (16 - 4) / 2
    assert p["remove"] == [(4, 10)] and p["shift"] == [(10, 16, -6)]


def test_recompute_marks_rebuild_and_evicts_only_what_is_needed():
    p = plan("recompute", range(16), 1, n_sink=0, window=16, evict_chunk=8)
    assert p["recompute"] and p["n_evicted"] == 1


def test_none_refuses_overflow():
    with pytest.raises(CacheFullError, match="policy 'none' never evicts"):
        plan("none", range(16), 1)


def test_pinned_prefix_is_never_evicted():
    p = plan("sink", range(16), 1, n_pinned=9)
    assert p["remove"] == [(9, 10)]


def test_invalid_parameters_are_clear_errors():
    with pytest.raises(InvalidArgumentError, match="window must be at least 1"):
        plan("sink", [], 1, window=0)
    with pytest.raises(InvalidArgumentError, match="n_sink must be >= 0"):
        plan("sink", [], 1, n_sink=-1)
    with pytest.raises(InvalidArgumentError, match="unknown policy 'lru'"):
        plan("lru", [], 1)
    with pytest.raises(InvalidArgumentError, match="evict_chunk"):
        plan("sink", [], 1, evict_chunk=0)
    with pytest.raises(InvalidArgumentError, match="cannot fit next to"):
        plan("sink", range(16), 13)


def test_removal_of_scattered_tokens_without_reindex_keeps_absolute_positions():
    positions = [0, 1, 2, 5, 6, 7, 9, 12]
    p = _core.plan_removal(positions, [1, 3, 4, 7], False)
    assert p["remove"] == [(1, 2), (5, 7), (12, 13)] and p["shift"] == [] and p["next_pos"] == -1
    assert _core.apply_plan(positions, p) == [0, 2, 7, 9]


def test_removal_with_reindex_compacts_gaps_after_first_removed():
    positions = [0, 1, 2, 5, 6, 7, 9, 12]
    p = _core.plan_removal(positions, [1, 4], True)
    assert _core.apply_plan(positions, p) == [0, 1, 2, 3, 4, 5] and p["next_pos"] == 6
    assert _core.plan_removal([0, 1, 2], [0, 1, 2], True)["next_pos"] == 0  # emptied: restart at 0


def test_compaction_closes_every_gap_and_keeps_the_order():
    positions = [0, 1, 2, 5, 6, 9, 12]
    p = _core.plan_compaction(positions)
    assert p["remove"] == [] and p["n_evicted"] == 0
    assert p["shift"] == [(5, 7, -2), (9, 10, -4), (12, 13, -6)] and p["next_pos"] == 7
    assert _core.apply_plan(positions, p) == list(range(7))
    assert _core.apply_plan([3, 4, 8], _core.plan_compaction([3, 4, 8])) == [0, 1, 2]  # a gap before the first
    nothing = _core.plan_compaction([0, 1, 2])
    assert nothing["shift"] == [] and nothing["next_pos"] == -1  # no gap: positions stay absolute


def test_removal_rejects_bad_indices():
    with pytest.raises(InvalidArgumentError):
        _core.plan_removal([0, 1, 2], [2, 1], True)
    with pytest.raises(InvalidArgumentError):
        _core.plan_removal([0, 1, 2], [3], True)


@pytest.mark.parametrize("policy", ["sink", "window", "context_shift", "recompute"])
def test_streaming_invariants_on_random_feeds(policy):
    """Simulate a long stream: the cache never exceeds capacity, positions stay contiguous below capacity,
    sinks stay, and the kept tokens are exactly the sinks plus the most recent ones."""
    rng = random.Random(1234)
    n_sink = 4 if policy in ("sink", "context_shift") else 0
    window, chunk = 28, 3
    capacity = n_sink + window
    cache: list[int] = []  # positions
    tokens: list[int] = []  # stream index held at each position
    stream = 0
    for _ in range(400):
        n_in = rng.randint(1, 8)
        p = _core.plan_eviction(policy, n_sink, window, chunk, cache, n_sink, n_in)
        new_cache = _core.apply_plan(cache, p)
        removed = {i for i, pos in enumerate(cache) for r in p["remove"] if r[0] <= pos < r[1]}
        tokens = [t for i, t in enumerate(tokens) if i not in removed]
        cache = new_cache
        assert len(cache) + n_in <= capacity
        start = cache[-1] + 1 if cache else 0
        cache += list(range(start, start + n_in))
        tokens += list(range(stream, stream + n_in))
        stream += n_in
        assert cache == list(range(len(cache)))  # re-indexed: contiguous from 0
        assert max(cache) < capacity
        if stream > capacity and n_sink:
            assert tokens[:n_sink] == list(range(n_sink))  # sinks never leave
        recent = tokens[n_sink:] if stream > capacity else tokens
        assert recent == list(range(stream - len(recent), stream))  # the rest is the most recent run


def test_default_evict_chunk_grows_with_the_window():
    # 1/16 of the window (the K-shift re-rotates every cached key, so fewer, larger evictions on larger caches),
    # at least 16 tokens, never more than the window.
    assert [_core.default_evict_chunk(w) for w in (8, 16, 252, 1020, 2044, 8188)] == [8, 16, 16, 63, 127, 511]
