#!/usr/bin/env python3
"""How NAMM's per-(layer, KV head) decisions survive llama.cpp's shared cells, measured on real decoding.

The original keeps a different token set in every (layer, KV head); a llama.cpp cell is one token for all of them.
For each shared-cell mode this streams one text through the engine and records, at every invocation, the cells
before and after, the union and the intersection of the per-(layer, head) keep sets (computed by the scorer the
tests hold to the PyTorch reference), and the Jaccard agreement of the kept cells with each. The perplexity of the
same text through each mode, and through sink and h2o at the same capacity, is reported beside it.

Random NAMM weights (no trained checkpoint is public), so the perplexities say what the eviction costs, not what a
trained NAMM would achieve. Writes OUT.json and OUT.md.

    python tools/namm_agreement.py --out docs/results/namm_agreement
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from pymemory import assets
from pymemory._loader import _core
from pymemory.evaluation import bench, report


def run(model, tokens: list[int], label: str, chunk: int, n_threads: int, **kwargs) -> dict:
    engine = _core.Engine(model, n_threads=n_threads, **kwargs)
    start = time.perf_counter()
    nll = np.asarray(engine.score(tokens, chunk), dtype=np.float64)[1:]
    seconds = time.perf_counter() - start
    records = engine.policy_stats().get("invocations", [])
    row = {"mode": label, "ppl": math.exp(float(nll.mean())), "tokens": len(tokens), "seconds": round(seconds, 1),
           "peak_cells": engine.stats()["peak_cells"], "invocations": len(records),
           "forced_evictions": engine.policy_stats().get("forced_evictions", 0), "records": records}
    if records:
        mean = lambda key: statistics.fmean(r[key] for r in records)  # noqa: E731
        row.update({key: round(mean(key), 3) for key in ("cells_before", "cells_after", "union_size",
                                                         "intersection_size", "jaccard_union",
                                                         "jaccard_intersection")})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=6144)
    parser.add_argument("--cache", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=64, help="tokens scored per decode")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)

    meta = report.run_metadata(["tools/namm_agreement.py", *(argv if argv is not None else sys.argv[1:])])
    meta["command"] = meta["command"].removeprefix("pymemory ")
    _core.set_log_verbosity(0)
    path = os.fspath(assets.resolve_model(args.model))
    model = _core.Model.load(path)
    tokens = model.tokenize(assets.read_text("austen", part="prideprejudice"), True, False)[: args.tokens]
    namm = bench.random_namm_gguf(tempfile.mkdtemp(prefix="pymemory-agreement-"))
    window = args.cache - 4
    common = dict(n_sink=4, window=window)
    rows = [
        run(model, tokens, "namm quorum 1.0 (keep the union)", args.chunk, args.threads, policy="namm",
            namm_path=namm, namm_mode="quorum", quorum=1.0, **common),
        run(model, tokens, "namm quorum 0.5", args.chunk, args.threads, policy="namm", namm_path=namm,
            namm_mode="quorum", quorum=0.5, **common),
        run(model, tokens, f"namm budget {args.cache - 512}", args.chunk, args.threads, policy="namm",
            namm_path=namm, namm_mode="budget", **common),
        run(model, tokens, "h2o (same capacity)", args.chunk, args.threads, policy="h2o", **common),
        run(model, tokens, "sink (same capacity)", args.chunk, args.threads, policy="sink", **common),
    ]
    header = ["mode", "PPL", "cells before", "cells after", "union", "intersection", "Jaccard(kept, union)",
              "Jaccard(kept, intersection)", "forced evictions"]
    table = report.markdown_table(header, [
        [r["mode"], round(r["ppl"], 3), r.get("cells_before", "-"), r.get("cells_after", "-"),
         r.get("union_size", "-"), r.get("intersection_size", "-"), r.get("jaccard_union", "-"),
         r.get("jaccard_intersection", "-"), r["forced_evictions"]] for r in rows])
    intro = (f"{len(tokens):,} tokens of Pride and Prejudice through a {args.cache}-cell cache on {model.info['description']}; "
             "means over the invocations (one per 512 tokens); random NAMM weights.")
    print(intro + "\n\n" + table)
    report.write_json(args.out + ".json", {**meta, "model": os.path.basename(path), "rows": rows})
    report.write_markdown(args.out + ".md", "NAMM on shared cells: agreement with the per-head keep sets", meta,
                          intro + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
