#!/usr/bin/env python3
"""NAMM scorer time per invocation against cached tokens, per weight type: one layer, CPU backend.

Setup: random NAMM weights in the evo-memory checkpoint format (no trained weights are public), converted to
f32/f16/q8_0/q4_0; one layer with --heads KV heads (Llama-3-8B: 8); n cached tokens per head = n - 512 retained
ones (random EMA and history) plus the invocation's 512 new ones; random causal attention [heads, 512, n].

Columns: one NammModel.step() (median wall time) split into features (the window's 32 STFT frames folded into the
EMA: a ggml graph), BAM (recency and normalisation, the network: a ggml graph) and selection (host: top-K, gather);
the rest of the total is input validation and state copies. "32 x fold_frame" is the same features computed in
the streaming form, one call per 16 queries, as the engine does. Writes OUT.json and OUT.md and prints the table.

    python tools/bench_namm_scorer.py --threads 2 --out reports/namm_scorer
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pymemory.evaluation import report
from pymemory.namm import NammModel, load_checkpoint, write_gguf
from pymemory.namm.testing import write_random_checkpoint

DELAY = 512


def causal_attention(rng: np.random.Generator, heads: int, n: int) -> np.ndarray:
    """float32 [heads, 512, n]: uniform random rows over the visible keys, normalised (cheap at 32K tokens)."""
    attn = rng.random((heads, DELAY, n), dtype=np.float32)
    n_old = n - DELAY
    attn[:, :, n_old:] *= np.tril(np.ones((DELAY, DELAY), np.float32))  # new query t sees new keys <= t
    attn /= attn.sum(axis=2, keepdims=True)
    return attn


def repeats_for(n: int, repeats: int) -> int:
    return repeats if n <= 4096 else max(1, repeats // 2) if n <= 8192 else 1


def bench_size(model: NammModel, rng: np.random.Generator, heads: int, n: int, repeats: int) -> dict:
    n_old = n - DELAY
    positions = np.tile(np.arange(n_old), (heads, 1))  # [heads, n_old]
    ema = rng.uniform(0.0, 0.03, (heads, n_old, 17)).astype(np.float32)
    history = rng.uniform(0.0, 1.0 / n, (heads, n_old, 16)).astype(np.float32)
    attn = causal_attention(rng, heads, n)
    new_pos = np.arange(n_old, n)
    samples = []
    for _ in range(repeats):
        state = model.state_from_arrays(positions, ema, history)
        start = time.perf_counter()
        _, _, timings = model.step(state, attn, new_pos, return_timings=True)
        total_ms = (time.perf_counter() - start) * 1e3
        state = model.state_from_arrays(positions, ema, history)
        state.append(new_pos)
        start = time.perf_counter()
        for frame in range(DELAY // 16):
            model.fold_frame(state, attn[:, 16 * frame:16 * (frame + 1)])
        samples.append({"total_ms": total_ms, **timings, "streaming_features_ms": (time.perf_counter() - start) * 1e3})
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024,2048,4096,8192,16384,32768", help="cached tokens per head")
    parser.add_argument("--types", default="f32,f16,q8_0,q4_0")
    parser.add_argument("--heads", type=int, default=8, help="KV heads of the layer (Llama-3-8B: 8)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per size up to 4K tokens (halved to 8K, then 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="reports/namm_scorer", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(n < DELAY for n in sizes) or args.heads < 1 or args.repeats < 1:
        parser.error(f"sizes must be >= {DELAY} (the invocation's new tokens); heads and repeats >= 1")
    meta = report.run_metadata()
    meta["command"] = "python tools/bench_namm_scorer.py " + " ".join(argv if argv is not None else sys.argv[1:])

    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="namm-bench-") as tmp:
        directory = Path(tmp)
        write_random_checkpoint(directory / "ckpt.pt", seed=0)
        vector = load_checkpoint(directory / "ckpt.pt", trust_pickle=True)
        models = {t: NammModel(write_gguf(vector, directory / f"{t}.gguf", t)["output"], n_threads=args.threads)
                  for t in args.types.split(",")}
    for weight_type, model in models.items():
        for n in sizes:
            repeats = repeats_for(n, args.repeats)
            med = bench_size(model, np.random.default_rng(n), args.heads, n, repeats)
            results.append({"weight_type": weight_type, "cached_tokens": n, "heads": args.heads, "repeats": repeats,
                            **med})
            rows.append([weight_type, n, med["total_ms"], med["features_ms"], med["bam_ms"], med["selection_ms"],
                         med["streaming_features_ms"]])
            print(" ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in rows[-1]), flush=True)
    table = report.markdown_table(["weights", "cached tokens", "step ms", "features ms", "BAM ms", "selection ms",
                                   "32 x fold_frame ms"], rows)
    out = Path(args.out)
    setup = {"heads": args.heads, "threads": args.threads, "device": model.device, "delay": DELAY}
    report.write_json(out.with_suffix(".json"), {**meta, **setup, "results": results})
    report.write_markdown(out.with_suffix(".md"), f"NAMM scorer: one invocation of one layer with {args.heads} KV "
                          f"heads, {model.device} backend, {args.threads} threads, median", meta,
                          __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2] + "\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
