"""Reading a NAMM engine's invocation records."""
from __future__ import annotations

import numpy as np


def still_deferred(stats: dict, invocations: list[dict]) -> int:
    """Tokens the last invocation gave up that are still cached: a budget mode evicts them only as new tokens need
    the room, so after the last invocation (cells_before -> cells_after decided) and the tokens seen since, the
    cache holds that many more than cells_after + those tokens."""
    last = invocations[-1]
    pending = stats["cells_used"] - last["cells_after"] - (stats["tokens_seen"] - last["tokens_seen"])
    assert 0 <= pending <= last["cells_before"] - last["cells_after"]
    return pending


def assert_budget_choices(engine, layers_scored: list[int], mode: str, max_cells: int, neighbours: int = 0,
                          key_weight: float = 0.0) -> None:
    """Every invocation of `engine` (its captures of every scored layer) kept exactly what `mode` keeps of the
    captured scores at max_cells (sinks 0..3 and the newest token stay; `neighbours`: each candidate ranked by the
    best score within that many candidates on each side; `key_weight`: plus that many standard deviations of the
    captured key distinctiveness), and at least 5 of them evicted."""
    by_invocation: dict[int, list[dict]] = {}
    for c in engine.namm_captures():
        by_invocation.setdefault(c["tokens_seen"], []).append(c)
    evicting = 0
    for seen, layers in by_invocation.items():
        assert sorted(c["layer"] for c in layers) == layers_scored
        raw = np.concatenate([c["scores"] for c in layers]).astype(np.float64)  # [layers x 3 heads, n]
        scores = raw
        if mode != "budget_max":
            scores = (raw - raw.mean(axis=1, keepdims=True)) / raw.std(axis=1, keepdims=True)
        best = np.max(scores, axis=0)  # [n]
        n = best.size
        expected = np.ones(n, bool)
        if n > max_cells:
            candidates = np.arange(4, n - 1)
            ranked = best[4:n - 1].copy()
            if key_weight:
                distinct = layers[0]["key_distinctiveness"][4:n - 1]
                ranked += key_weight * (distinct - distinct.mean()) / distinct.std()
            for d in range(1, neighbours + 1):  # the best score within d candidates on either side
                ranked[d:] = np.maximum(ranked[d:], best[4:n - 1 - d])
                ranked[:-d] = np.maximum(ranked[:-d], best[4 + d:n - 1])
            if mode == "budget_mix":
                reserved = candidates[np.argsort(-best[4:n - 1], kind="stable")[:max_cells // 8]]
                candidates = np.setdiff1d(candidates, reserved)
                votes = sum((c["keep"] == 0).sum(axis=0) for c in layers)  # [n] pairs dropping each token
                order = candidates[np.lexsort((raw.mean(axis=0)[candidates], -votes[candidates]))]
            else:
                order = candidates[np.argsort(ranked, kind="stable")]
            expected[order[:n - max_cells]] = False
            evicting += 1
        np.testing.assert_array_equal(layers[0]["kept"].astype(bool), expected, err_msg=f"invocation at {seen}")
    assert evicting >= 5 and engine.policy_stats()["forced_evictions"] == 0
    assert engine.stats()["peak_cells"] <= max_cells + 64


def probe_distinctiveness(keys: np.ndarray) -> np.ndarray:
    """[pairs, cand, head_dim] -> [cand]: KeyDiff's score averaged over the pairs, as numpy computes it."""
    unit = keys / np.linalg.norm(keys, axis=2, keepdims=True)
    anchor = unit.mean(axis=1, keepdims=True)
    anchor /= np.linalg.norm(anchor, axis=2, keepdims=True)
    return -(unit * anchor).sum(axis=2).mean(axis=0)
