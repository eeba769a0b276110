"""Runs KV-cache-type combinations on a real model, one after another, for tests/test_kv_types.py.

Input (stdin): JSON {"model": path, "namm": path or null, "combos": [[type_k, type_v, flash_attention, policy], ...]}.
Output (stdout): for each combo a line "start <i>" before it runs, then one JSON line {"i", "status": "ok" | "error",
"error": class name, "message": ...}. Run in a subprocess: when a combination crashes the process, the parent sees
which one was running and starts a new worker with the rest.
"""
from __future__ import annotations

import json
import sys

import numpy as np


def run_combo(core, model, namm_path, type_k: str, type_v: str, flash: str, policy: str) -> dict:
    import pymemory

    # Tiny: a 16-cell cache (24 for namm, which needs n_sink + its 16-token period + 1), filled, then two batches
    # that each evict 4 tokens and, for shifting policies, re-rotate the cached keys.
    kwargs = dict(n_sink=4, window=12, evict_chunk=4, n_threads=1, type_k=type_k, type_v=type_v,
                  flash_attention=flash)
    name = policy
    if policy.endswith("+reindex"):
        name, kwargs["reindex"] = policy[: -len("+reindex")], True
    if name == "namm":
        kwargs.update(namm_path=namm_path, namm_delay=16, window=20)
    capacity = kwargs["n_sink"] + kwargs["window"]
    tokens = [100 + (i * 37) % 1000 for i in range(capacity + 8)]
    try:
        engine = core.Engine(model, policy=name, **kwargs)
        engine.feed(tokens[:capacity])
        if name != "none":  # policy none never evicts
            engine.feed(tokens[capacity:capacity + 4])
            engine.feed(tokens[capacity + 4:])
        if not np.isfinite(engine.last_logits()).all():
            return {"status": "error", "error": "NaN", "message": "non-finite logits"}
        stats = engine.stats()
        if name != "none" and stats["evictions"] == 0:
            return {"status": "error", "error": "NoEviction", "message": "the run never evicted"}
        return {"status": "ok"}
    except pymemory.PymemoryError as exc:
        return {"status": "error", "error": type(exc).__name__, "message": str(exc)}


def main() -> None:
    from pymemory._loader import _core

    job = json.load(sys.stdin)
    _core.set_log_verbosity(0)
    model = _core.Model.load(job["model"])
    for i, combo in enumerate(job["combos"]):
        print(f"start {i}", flush=True)
        result = run_combo(_core, model, job.get("namm"), *combo)
        print(json.dumps({"i": i, **result}), flush=True)


if __name__ == "__main__":
    main()
