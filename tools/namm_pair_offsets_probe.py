#!/usr/bin/env python3
"""Does an offset per (layer, KV head) on budget_zmax's standardised scores move its keep set toward the bound?

    .venv/bin/python tools/namm_pair_offsets_probe.py --namm smollm2-rate --out docs/results/namm_pair_offsets

budget_zmax ranks a token by the highest of its standardised scores over the (layer, KV head) pairs: every pair is
one equal voice. At 25 % of 1,024 tokens that rule is at its own hindsight bound (44 % of sink's text gap), while
hindsight of the attention summed over the pairs closes 57 % (docs/results.md, "The bound at 1,024 tokens"); the
pass key probe found one head that singles the needle out and is outvoted. A NAMM cannot weigh pairs unequally: its
network is shared by every layer and head. An offset per pair, added to its standardised scores before the maximum,
can — a vector as model-specific as the normalisation statistics a NAMM already carries.

This probe fits such offsets by CMA-ES (pycma) on training-split texts only: each candidate vector replays the
NAMM's schedule and budget rule (every `delay` tokens the cache is cut to capacity − delay; sinks and the newest
token stay) on attention captured once with the full cache, and is scored by the hindsight-sum bound's own currency:
the attention every later query would have given the tokens it evicts, summed over the pairs, as a share of the
whole (no model run per candidate). The fitted offsets (per pair, and one per layer) then evict on held-out texts
through the oracle's llama.cpp harness (tools/namm_oracle_bound.py) beside the rule without offsets, sink, the full
cache and the hindsight sum.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
sys.path.insert(0, os.fspath(ROOT / "tools"))

from namm_aggregation_probe import moving_averages  # noqa: E402
from namm_oracle_bound import (LlamaHarness, add_probe_arguments, attention_received, harness_header,  # noqa: E402
                               probe_test_set, record_result, run_sample, summarise, table_lines)
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
from pymemory.namm.training.data import Corpus, SampleFactory, generation_samples  # noqa: E402
from pymemory.namm.training.warm_start import capture_invocations  # noqa: E402

COEFFICIENT = 0.998  # budget_zmax's rule: the bias-corrected 0.998 average of the attention received


class Replay:
    """One sample's attention, reduced to what the schedule reads at each invocation: the log corrected average of
    every earlier token per pair, and the attention every later query gives it, summed over the pairs."""

    def __init__(self, received: np.ndarray, delay: int):
        pairs, n, _ = received.shape  # [pairs, query, key]
        ema = moving_averages(received, COEFFICIENT)  # [pairs, query + 1, key]
        after = received.sum(axis=0)[::-1].cumsum(axis=0)[::-1]  # [query, key]: from this query on, all pairs
        self.after = np.ascontiguousarray(after, np.float32)
        self.n_tokens, self.total = n, float(received.sum())
        self.log_average: dict[int, np.ndarray] = {}  # now -> [pairs, now]
        self.future: dict[int, np.ndarray] = {}  # now -> [now]
        for now in range(delay, n, delay):
            age = np.maximum(now - np.arange(now), 1)
            average = ema[:, now, :now] / (1 - COEFFICIENT ** age)[None, :]
            self.log_average[now] = np.log(np.maximum(average, 1e-9)).astype(np.float32)
            self.future[now] = self.after[now, :now]

    def scores(self, now: int, cand: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """[cand]: the highest over the pairs of each pair's standardised log average plus the pair's offset."""
        log = self.log_average[now][:, cand]
        z = (log - log.mean(axis=1, keepdims=True)) / np.maximum(log.std(axis=1, keepdims=True), 1e-9)
        return (z + offsets[:, None]).max(axis=0)

    def lost(self, offsets: np.ndarray, capacity: int, delay: int, n_sink: int) -> float:
        """The share of all attention (every query, every pair) that later queries would have given the tokens the
        schedule evicts under these offsets: what the hindsight-sum oracle minimises greedily."""
        cached = np.arange(0)
        lost = 0.0
        for now in range(delay, self.n_tokens, delay):
            cached = np.concatenate([cached, np.arange(now - delay, now)])
            if len(cached) <= capacity - delay:
                continue
            cand = cached[n_sink:-1]
            n_evict = len(cached) - (capacity - delay)
            evict = cand[np.argsort(self.scores(now, cand, offsets), kind="stable")[:n_evict]]
            lost += float(self.future[now][evict].sum())
            cached = np.setdiff1d(cached, evict, assume_unique=True)
        return lost / self.total


def replays(model, samples, delay: int, threads: int) -> list[Replay]:
    """Each sample's Replay, captured one sample at a time (a 1,024-token capture holds hundreds of MB)."""
    return [Replay(attention_received(capture_invocations(model, [s], delay, threads)[0], s.n_tokens), delay)
            for s in samples]


def fit_offsets(replays: list[Replay], expand: np.ndarray, capacity: int, delay: int, n_sink: int,
                generations: int, sigma: float, seed: int) -> tuple[np.ndarray, list[float]]:
    """CMA-ES over len(set(expand)) offsets (pair p gets x[expand[p]]), minimising the mean share lost; the first
    offset is held at 0 (only differences between pairs change a maximum). Returns the pair offsets and the best
    loss per generation."""
    import cma

    n = int(expand.max()) + 1

    def pair_offsets(x: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], x])[expand]

    def loss(x: np.ndarray) -> float:
        return float(np.mean([r.lost(pair_offsets(x), capacity, delay, n_sink) for r in replays]))

    es = cma.CMAEvolutionStrategy(np.zeros(n - 1), sigma, {"seed": seed, "verbose": -9, "maxiter": generations})
    curve = []
    while not es.stop():
        xs = es.ask()
        losses = [loss(x) for x in xs]
        es.tell(xs, losses)
        curve.append(min(losses))
        if len(curve) % 10 == 0:
            print(f"  generation {len(curve)}: best lost share {min(curve):.5f}", flush=True)
    return pair_offsets(es.result.xbest), curve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(p, 12, 24, "the offsets are fit on")
    p.add_argument("--generations", type=int, default=150, help="CMA-ES generations per fit")
    p.add_argument("--sigma", type=float, default=0.5, help="CMA-ES initial step, in standard deviations")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hindsight", action="store_true", help="also run the hindsight-sum oracle (for scale)")
    args = p.parse_args()
    if args.fit_text < 1 or args.text < 1 or args.generations < 1 or args.sigma <= 0:
        p.error("--fit-text, --text and --generations must be at least 1 and --sigma positive")
    _, config, model_path, model, samples, test_seed = probe_test_set(p, args)
    delay, n_sink = config.namm_delay, config.n_sink
    capacity = int(round(config.sample_tokens * args.fraction))
    if not 2 * delay + n_sink < capacity < config.sample_tokens:
        p.error(f"--fraction gives {capacity} cells: it must lie between {2 * delay + n_sink} and the sample length")
    n_layer = int(model.info["n_layer"])

    corpus = Corpus(model, config.text_sources(), config.sample_tokens)
    factory = SampleFactory(corpus, config.sample_tokens, config.scored_tokens, config.capacity)
    fit_samples = generation_samples(factory, config.seed, 10 ** 6, args.fit_text, 0, ())
    print(f"capturing attention of {len(fit_samples)} training-split samples", flush=True)
    fit = replays(model, fit_samples, delay, args.threads)
    n_pairs = fit[0].log_average[delay].shape[0]
    print(f"capturing attention of {len(samples)} held-out samples", flush=True)
    test = replays(model, samples, delay, args.threads)
    del model

    groupings = {"per pair": np.arange(n_pairs), "per layer": np.arange(n_pairs) // (n_pairs // n_layer)}
    offsets, fits = {"none": np.zeros(n_pairs)}, {}
    for name, expand in groupings.items():
        started = time.time()
        print(f"fitting offsets {name} ({int(expand.max()) + 1} values)", flush=True)
        offsets[name], curve = fit_offsets(fit, expand, capacity, delay, n_sink, args.generations, args.sigma,
                                           args.seed)
        fits[name] = {"offsets": offsets[name].tolist(), "best_per_generation": curve,
                      "seconds": time.time() - started}
    proxy = {name: {"fit": float(np.mean([r.lost(o, capacity, delay, n_sink) for r in fit])),
                    "held_out": float(np.mean([r.lost(o, capacity, delay, n_sink) for r in test]))}
             for name, o in offsets.items()}
    print("lost share " + ", ".join(f"{k}: fit {v['fit']:.5f} held-out {v['held_out']:.5f}"
                                    for k, v in proxy.items()), flush=True)

    names = {"none": "z-max of pairs: EMA 0.998 bias-corrected (budget_zmax's rule)",
             "per pair": "same + an offset per (layer, KV head), fitted", "per layer": "same + an offset per layer, fitted"}
    harness = LlamaHarness(model_path, config.sample_tokens + 64, args.threads)
    rows: dict[str, dict[str, dict]] = {}
    record = partial(record_result, rows)
    for sample, replay in zip(samples, test):
        tokens, n_prompt = list(sample.prompt) + list(sample.target), len(sample.prompt)
        record("full", "full cache", sample, *run_sample(harness, tokens, n_prompt, 10 ** 9, delay, n_sink, None))
        record(f"{capacity}", "sink", sample,
               *run_sample(harness, tokens, n_prompt, capacity, delay, n_sink, lambda now, cand: cand))
        for key, o in offsets.items():
            rule = partial(replay.scores, offsets=o)
            record(f"{capacity}", names[key], sample, *run_sample(
                harness, tokens, n_prompt, capacity, delay, n_sink,
                lambda now, cand, rule=rule: cand if now >= replay.n_tokens else rule(now, cand)))
        if args.hindsight:
            record(f"{capacity}", "hindsight: sum over pairs of all future attention", sample, *run_sample(
                harness, tokens, n_prompt, capacity, delay, n_sink,
                lambda now, cand: cand if now >= replay.n_tokens else replay.after[now, cand]))
        print(f"  {sample.id}: " + ", ".join(f"{k[:30]} {v['nll'][sample.id]:.3f}" for e in rows.values()
                                             for k, v in e.items()), flush=True)

    report = {**tool_metadata(sys.argv[0], sys.argv[1:]),
              "model": config.model, "namm": args.namm, "sample_tokens": config.sample_tokens, "delay": delay,
              "n_sink": n_sink, "n_text": len(samples), "n_retrieval": 0, "test_seed": test_seed,
              "fit_samples": len(fit_samples), "fits": fits, "lost_share": proxy,
              "tables": summarise(rows, [s.id for s in samples], [], "full cache", config.sample_tokens),
              "nll_per_sample": rows}
    write_report_files(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = harness_header(report, "Offsets per (layer, KV head) on budget_zmax's rule", "the attention",
                           "tools/namm_pair_offsets_probe.py")
    lines.append(f"Offsets fitted by CMA-ES on {report['fit_samples']} training-split texts to the share of all "
                 "future attention (summed over the pairs) that the evicted tokens would have received:")
    proxy = ["| offsets | lost share, fit texts | lost share, held-out texts |", "|---|---|---|"] + [
        f"| {k} | {v['fit']:.5f} | {v['held_out']:.5f} |" for k, v in report["lost_share"].items()]
    return "\n\n".join(lines) + "\n\n" + "\n".join(proxy) + "\n\n" + "\n".join(table_lines(report)) + "\n"


if __name__ == "__main__":
    sys.exit(main())
