"""Streaming perplexity (StreamingLLM §4.1): one long document scored token by token through a memory policy.

Every token is predicted from exactly what the policy left in the cache (chunk = 1, the paper's setup); a larger
chunk decodes several tokens per call (for `recompute` that is the strided sliding-window baseline: the cache is
rebuilt once per chunk, so tokens in a chunk see between capacity - chunk and capacity previous tokens).
"""
from __future__ import annotations

import math
import time

import numpy as np

from .._loader import _core
from .policies import PolicySpec
from .report import Progress


def streaming_nll(model, tokens: np.ndarray, spec: PolicySpec, *, chunk: int = 1, n_threads: int = 0,
                  label: str = "") -> tuple[np.ndarray, dict, float]:
    """Per-token NLL (nats; entry 0 is NaN) of `tokens` streamed through one engine, its final stats and seconds."""
    engine = _core.Engine(model, n_threads=n_threads, **spec.engine_kwargs())
    nll = np.full(len(tokens), np.nan, dtype=np.float64)
    progress = Progress(len(tokens), label or spec.label)
    start = time.perf_counter()
    step = max(256, chunk)
    for begin in range(0, len(tokens), step):
        end = min(begin + step, len(tokens))
        nll[begin:end] = engine.score(tokens[begin:end].tolist(), chunk)
        progress.update(end)
    seconds = time.perf_counter() - start
    stats = engine.stats()
    policy_stats = engine.policy_stats()
    if policy_stats.get("policy"):  # attention-scored policies: who evicted, and which layers scored
        stats["policy_stats"] = {"forced_evictions": policy_stats["forced_evictions"],
                                 "invocations": len(policy_stats["invocations"]),
                                 "scored_layers": policy_stats["scored_layers"]}
    return nll, stats, seconds


def summarise(nll: np.ndarray, *, curve_points: int = 200, segment: int = 1024) -> dict:
    """PPL overall, a running-mean NLL curve and per-segment PPL (the collapse of `window` shows there)."""
    valid = nll[1:]
    n = len(valid)
    cumulative = np.cumsum(valid)
    at = np.unique(np.linspace(1, n, num=min(curve_points, n)).astype(int))
    return {
        "tokens": int(n),
        "nll": float(valid.mean()),
        "ppl": float(math.exp(valid.mean())),
        "nll_curve": [[int(k), float(cumulative[k - 1] / k)] for k in at],
        "segment_tokens": segment,
        "segment_ppl": [float(math.exp(valid[i:i + segment].mean())) for i in range(0, n, segment)],
    }


def evaluate(model, tokens: np.ndarray, specs: list[PolicySpec], *, chunk: int = 1, n_threads: int = 0) -> list[dict]:
    results = []
    for spec in specs:
        policy_chunk = int(spec.options.get("chunk", chunk))
        nll, stats, seconds = streaming_nll(model, tokens, spec, chunk=policy_chunk, n_threads=n_threads)
        results.append({
            "policy": spec.name,
            "label": spec.label,
            "n_sink": spec.n_sink,
            "window": spec.window,
            "capacity": spec.capacity,
            "chunk": policy_chunk,
            **summarise(nll),
            "seconds": round(seconds, 2),
            "tokens_per_s": round(len(tokens) / seconds, 1),
            "cache": stats,
        })
    return results
