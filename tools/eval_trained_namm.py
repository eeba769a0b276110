#!/usr/bin/env python3
"""Held-out evaluation of a trained NAMM against every other policy at equal peak cells (JSON + markdown + PNG).

    .venv/bin/python tools/eval_trained_namm.py --run runs/smollm2 --out docs/results/namm_trained_smollm2 \
        --transfer-model qwen2.5-coder-0.5b-instruct

On a fresh held-out test set (the run's held-out split, a seed the run never used): at peak cells = 25 % and 50 %
of the sample length, perplexity of held-out text and answer log-likelihood of held-out retrieval for the full
cache, sink, h2o, tova, a random NAMM, the run's warm start before evolution (if any), other NAMMs given with
--also, and the trained NAMM (its GGUF as shipped, f32; at 25 % also f16, q8_0, q4_0
converted from its ckpt.pt); the trainer's own held-out score reproduced from the shipped file; and the NAMM
applied zero-shot to another model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))

from pymemory._loader import _core  # noqa: E402
from pymemory.assets import resolve_model  # noqa: E402
from pymemory.errors import InvalidArgumentError  # noqa: E402
from pymemory.evaluation.report import tool_metadata  # noqa: E402
from pymemory.namm import load_checkpoint  # noqa: E402
from pymemory.namm.checkpoint import gguf_settings  # noqa: E402
from pymemory.namm.convert import write_gguf  # noqa: E402
from pymemory.namm.training.config import TrainConfig  # noqa: E402
from pymemory.namm.training.data import Corpus, SampleFactory, heldout_samples  # noqa: E402
from pymemory.namm.training.evaluator import Job, MemorySpec, make_executor  # noqa: E402

QUANTS = ("f16", "q8_0", "q4_0")
BASELINES = ("h2o", "tova", "random")


def summarise(results, refs: dict[str, float]) -> dict:
    text = [r for r in results if ":text:" in r.sample_id]
    retrieval = [r for r in results if ":text:" not in r.sample_id]
    out = {"peak_cells": max(r.peak_cells for r in results), "forced_evictions": sum(r.forced_evictions for r in results),
           "nll_per_sample": {r.sample_id: float(r.nll) for r in results}}
    if text:
        nll = float(np.mean([r.nll for r in text]))
        out.update(text_ppl=math.exp(nll), text_nll=nll, text_gap=nll - float(np.mean([refs[r.sample_id] for r in text])))
    if retrieval:
        nll = float(np.mean([r.nll for r in retrieval]))
        out.update(answer_nll=nll, answer_gap=nll - float(np.mean([refs[r.sample_id] for r in retrieval])),
                   answer_prob=float(np.mean([math.exp(-r.nll) for r in retrieval])))
    return out


def run_policies(executor, spec: MemorySpec, samples, policies: dict[str, Job], refs: dict[str, float]) -> dict:
    out = {}
    for name, template in policies.items():
        started = time.perf_counter()
        results = executor.map(spec, [replace(template, sample=s) for s in samples])
        out[name] = summarise(results, refs)
        out[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"  {name:<22} {json.dumps({k: round(v, 4) for k, v in out[name].items() if k != 'nll_per_sample'})}",
              flush=True)
    return out


def side_by_side(executor, full_spec: MemorySpec, samples, extra: dict[str, Job],
                 fractions=(0.25, 0.5)) -> dict:
    """The full cache, then at each fraction of the sample length sink, h2o, tova and the `extra` policies (job
    templates; their sample is replaced), as paired_table renders them."""
    full = executor.map(full_spec, [Job("full", s) for s in samples])
    refs = {r.sample_id: r.nll for r in full}
    tables = {"full cache": summarise(full, refs)}
    for fraction in fractions:
        capacity = int(full_spec.sample_tokens * fraction)
        spec = replace(full_spec, capacity=capacity, max_cells=capacity - full_spec.namm_delay)
        policies = {m: Job(m, samples[0]) for m in ("sink", "h2o", "tova")}
        policies.update(extra)
        print(f"{capacity} cells", flush=True)
        tables[f"{fraction:.0%}"] = run_policies(executor, spec, samples, policies, refs)
    return tables


def capture_for_fits(model, factory, args, retrieval_kinds, namm_delay: int, ema_coefficient: float | None = None,
                     ema_bias_correction: bool = False):
    """The trainer's warm-start inputs for a tool that fits variants side by side: feature statistics from two
    calibration texts, then one capture of args.fit_text + args.fit_retrieval training samples (the trainer's
    seeds), the EMAs those of a NAMM with `ema_coefficient` (default the released one). Returns (samples, captured
    invocations, feature mean, feature variance); the statistics are of bias-corrected EMAs with
    `ema_bias_correction` (the captures keep the engine's raw EMAs either way)."""
    from pymemory.namm.training.calibration import feature_statistics
    from pymemory.namm.training.data import CALIBRATION_SEED_OFFSET, WARM_START_SEED_OFFSET, generation_samples
    from pymemory.namm.training.warm_start import capture_invocations

    calibration = generation_samples(factory, args.seed + CALIBRATION_SEED_OFFSET, 0, 2, 0, [])
    mean, var = feature_statistics(model, calibration, namm_delay, args.threads, ema_coefficient, ema_bias_correction)
    train = generation_samples(factory, args.seed + WARM_START_SEED_OFFSET, 0, args.fit_text, args.fit_retrieval,
                               retrieval_kinds)
    return train, capture_invocations(model, train, namm_delay, args.threads, ema_coefficient), mean, var


def fit_summary(name: str, report: dict) -> dict:
    """The part of fit_imitation's report a tool publishes (printed as it arrives)."""
    summary = {k: report[k] for k in ("examples", "explained", "rank_correlation_median", "seconds")}
    print(f"fit {name}: {summary}", flush=True)
    return summary


def add_fit_test_arguments(parser: argparse.ArgumentParser, fit_text: int, fit_retrieval: int, test_text: int,
                           test_retrieval: int) -> None:
    """The options of the tools that fit warm starts on captured samples and test them side by side."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    parser.add_argument("--fit-text", type=int, default=fit_text)
    parser.add_argument("--fit-retrieval", type=int, default=fit_retrieval)
    parser.add_argument("--test-text", type=int, default=test_text)
    parser.add_argument("--test-retrieval", type=int, default=test_retrieval)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def closed(entry: dict, sink: dict, key: str) -> float | None:
    """Fraction of sink's gap to the full cache that this policy closes (1 = as good as the full cache)."""
    if key not in entry or sink.get(key, 0) <= 0:
        return None
    return 1.0 - entry[key] / sink[key]


def paired_difference(entry: dict, sink: dict, text: bool, resamples: int = 4000) -> tuple[float, float, float] | None:
    """Mean per-sample NLL difference policy - sink over the text (or retrieval) samples, with a 95 % bootstrap
    interval over samples (paired: each sample is scored by both). Negative = better than sink."""
    a, b = entry.get("nll_per_sample", {}), sink.get("nll_per_sample", {})
    ids = sorted(k for k in a if k in b and (":text:" in k) == text)
    if len(ids) < 2:
        return None
    d = np.array([a[k] - b[k] for k in ids])
    means = d[np.random.default_rng(0).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def overlap_clusters(ids: list[str], span: int | None) -> np.ndarray:
    """A cluster number per sample id: samples drawn from overlapping token ranges [offset, offset + span) of one
    text ("h3:text:austen/persuasion@80372") share one, so a bootstrap that resamples clusters does not count shared
    text as independent evidence. span None, or a sample that is not text: its own cluster."""
    ranges = []
    for i, sample_id in enumerate(ids):
        _, kind, source = (sample_id.split(":", 2) + ["", ""])[:3]
        part, _, offset = source.rpartition("@")
        ranges.append((part, int(offset), i) if span and kind == "text" and offset.isdigit() else (sample_id, 0, i))
    cluster = np.zeros(len(ids), dtype=np.int64)
    current, last_part, last_end = -1, None, 0
    for part, start, i in sorted(ranges):
        if part != last_part or not span or start >= last_end:
            current += 1
            last_part, last_end = part, start
        last_end = max(last_end, start + (span or 0))
        cluster[i] = current
    return cluster


def closed_interval(entry: dict, sink: dict, full: dict, resamples: int = 10000, span: int | None = None) -> dict | None:
    """Share of sink's text gap to the full cache that a policy closes, (mean sink - mean policy) / (mean sink -
    mean full) over the text samples, with a 95 % bootstrap interval that resamples the samples (all three
    scored on each; with `span`, the sample length, clusters of samples that share text: overlap_clusters) and the
    share of resamples in which it reaches one half (the issue's goal)."""
    per = [e.get("nll_per_sample", {}) for e in (entry, sink, full)]
    ids = sorted(k for k in per[0] if ":text:" in k and all(k in p for p in per[1:]))
    if len(ids) < 2:
        return None
    policy, sink_nll, full_nll = (np.array([p[k] for k in ids]) for p in per)
    cluster = overlap_clusters(ids, span)
    n_clusters = int(cluster.max()) + 1
    # per-cluster sums: the ratio of mean differences is the ratio of summed differences over any resample
    sums = [np.bincount(cluster, weights=v, minlength=n_clusters) for v in (policy, sink_nll, full_nll)]
    picks = np.random.default_rng(0).integers(0, n_clusters, (resamples, n_clusters))
    policy_sums, sink_sums, full_sums = (v[picks].sum(axis=1) for v in sums)
    gaps = sink_sums - full_sums
    shares = (sink_sums - policy_sums) / np.where(gaps > 0, gaps, np.nan)
    share = (sink_nll.mean() - policy.mean()) / (sink_nll.mean() - full_nll.mean())
    valid = shares[np.isfinite(shares)]
    if valid.size == 0:  # sink never worse than the full cache in any resample: no gap to close
        return None
    return {"closed": float(share), "low": float(np.quantile(valid, 0.025)), "high": float(np.quantile(valid, 0.975)),
            "p_half": float(np.mean(valid >= 0.5)), "n_text": len(ids), "n_clusters": n_clusters}


def paired_table(tables: dict, sample_tokens: int) -> list[str]:
    """Markdown rows: the full cache, then per cache size each policy's text and answer NLL with its paired
    difference to sink there. `tables` = {"full cache": summary, label: {policy: summary}}."""
    full = tables["full cache"]
    lines = ["| cache | policy | text NLL | vs sink [95 % CI] | answer NLL | vs sink [95 % CI] | answer p |",
             "|---|---|---|---|---|---|---|",
             f"| {sample_tokens} | full cache | {full['text_nll']:.4f} | | {full['answer_nll']:.3f} | | "
             f"{full['answer_prob']:.3f} |"]
    for label, table in tables.items():
        if label == "full cache":
            continue
        sink = table["sink"]
        for name, e in table.items():
            cells = []
            for text in (True, False):
                d = paired_difference(e, sink, text) if name != "sink" else None
                cells.append(f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "–")
            lines.append(f"| {e['peak_cells']} | {name} | {e['text_nll']:.4f} | {cells[0]} | {e['answer_nll']:.3f} | "
                         f"{cells[1]} | {e['answer_prob']:.3f} |")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# Trained NAMM: held-out evaluation ({report['model']})", "",
             f"`{report['command']}`", "",
             f"{report['date']}, commit {report['commit']}, {report['machine']}", "",
             f"Held-out test set: {report['n_text']} text samples and {report['n_retrieval']} retrieval samples "
             f"(passkey and key-value lines) of {report['sample_tokens']} tokens from the run's held-out split "
             f"({', '.join(report['heldout_parts'])}), seed {report['test_seed']} (the run never saw them). Text: "
             f"perplexity of the last {report['scored_tokens']} tokens; retrieval: mean NLL of the answer tokens "
             "and mean per-token probability. 'closed' = fraction of sink's gap to the full cache that the policy "
             "closes (1 = full cache, 0 = sink, negative = worse than sink). 'vs sink' = mean per-sample NLL "
             "difference to sink (nats; negative = better) with its 95 % paired bootstrap interval: an interval "
             "that contains 0 is no measured difference; the text share closed carries its own 95 % bootstrap "
             "interval over the texts (tools/namm_closed_intervals.py)." +
             (f" The target tokens were decoded {report['score_chunk']} per batch (sink evicts at least a batch's "
              "worth before each)." if report.get("score_chunk") else "") +
             (f" Every NAMM here runs zero-shot: trained on {report['namm_trained_on']}, not on this model."
              if report.get("namm_trained_on", report["model"]) != report["model"] else ""), ""]
    for label, table in report["tables"].items():
        lines += [f"## {label}", "", "| policy | peak cells | text PPL | text gap (nats) | text closed | text vs sink "
                  "[95 % CI] | answer NLL | answer gap | answer closed | answer vs sink [95 % CI] | answer p |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        sink, full = table.get("sink", {}), table.get("full cache")
        for name, e in table.items():
            share = (closed_interval(e, sink, full, span=report["sample_tokens"])
                     if full and sink and name not in ("sink", "full cache") else None)
            share_cell = "" if share is None else f" [{share['low']:+.3f}, {share['high']:+.3f}]"
            def f(key, fmt="{:.4f}"):
                return fmt.format(e[key]) if e.get(key) is not None else "-"
            c_text, c_ans = closed(e, sink, "text_gap"), closed(e, sink, "answer_gap")

            def vs_sink(text: bool) -> str:
                d = None if e is sink else paired_difference(e, sink, text)
                return "-" if d is None else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"

            lines.append(f"| {name} | {e['peak_cells']} | {f('text_ppl', '{:.3f}')} | {f('text_gap')} | "
                         f"{'-' if c_text is None else f'{c_text:+.3f}'}{share_cell} | {vs_sink(True)} | "
                         f"{f('answer_nll', '{:.3f}')} | {f('answer_gap', '{:.3f}')} | "
                         f"{'-' if c_ans is None else f'{c_ans:+.3f}'} | {vs_sink(False)} | "
                         f"{f('answer_prob', '{:.3f}')} |")
        lines.append("")
    r = report["reproduction"]
    if r is None:
        return "\n".join(lines)
    lines += ["## Reproduction of the trainer's held-out score from the shipped file", "",
              f"Trainer (in-memory parameters, generation {r['generation']}): loss {r['trainer_loss']:.4f}; shipped "
              f"GGUF (f32) through the engine on the same samples: {r['file_loss']:.4f} "
              f"(difference {r['file_loss'] - r['trainer_loss']:+.2e}).", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = report["tables"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("text_gap", "answer_gap"), ("held-out text: NLL gap to full cache",
                                                                 "held-out retrieval: answer NLL gap to full cache")):
        labels = list(tables)
        names = [n for n in tables[labels[0]] if n != "full cache"]
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = [tables[label].get(n, {}).get(key, np.nan) for n in names]
            ax.bar(np.arange(len(names)) + i * width, values, width, label=label)
        ax.set_xticks(np.arange(len(names)) + width * (len(labels) - 1) / 2)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="black", lw=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_config(run_arg: str) -> tuple[TrainConfig, Path | None, dict | None]:
    """--run's training config; when --run names a shipped NAMM (its name or its .json, whose JSON carries the run's
    config and log: the runs/ directories are not kept) rather than a train-namm run directory (config.json,
    log.json, ckpt.pt), also its GGUF and that JSON."""
    from pymemory.namm.packaged import packaged_namms

    run = Path(run_arg)
    if run.is_dir():
        return TrainConfig.from_dict(json.loads((run / "config.json").read_text())), None, None
    gguf = packaged_namms().get(run_arg) or run.with_suffix(".gguf")
    info = json.loads(gguf.with_suffix(".json").read_text())
    return TrainConfig.from_dict(info["config"]), gguf, info


def test_split(config: TrainConfig, sample_tokens: int = 0, test_seed: int | None = None) -> tuple[TrainConfig, int]:
    """A test set of a run's held-out split: its config at `sample_tokens` (default the run's length; the second half
    scored) and the seed (default the run's seed + 1). InvalidArgumentError for a length the trainer refuses, or for
    the run's own seed, whose held-out samples chose the shipped generation."""
    if sample_tokens and sample_tokens != config.sample_tokens:
        config = replace(config, sample_tokens=sample_tokens, scored_tokens=sample_tokens // 2).validate()
    seed = config.seed + 1 if test_seed is None else test_seed
    if seed == config.seed:
        raise InvalidArgumentError(f"--test-seed {seed} is the run's seed: its held-out samples chose the shipped "
                                   "generation, so they are not a test set; pick another seed")
    return config, seed


def run_log_and_vector(run_arg: str, shipped: Path | None, info: dict | None):
    """(training log, NammVector) of --run: a run's log.json and ckpt.pt, or a shipped NAMM's JSON and f32 GGUF."""
    from pymemory.namm.checkpoint import load_gguf

    if shipped is None:
        run = Path(run_arg)
        return json.loads((run / "log.json").read_text()), load_checkpoint(run / "ckpt.pt", trust_pickle=True)
    vector, _ = load_gguf(shipped)
    return info, vector if vector.iteration is not None else replace(vector, iteration=info["generation"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a train-namm run directory (config.json, log.json, ckpt.pt), or a "
                   "shipped NAMM's name (its JSON holds the run's config and log; its GGUF is the vector)")
    p.add_argument("--namm", default=None, help="the shipped NAMM GGUF (default: RUN/namm.gguf)")
    p.add_argument("--out", required=True, help="report path without extension (.json, .md, .png written)")
    p.add_argument("--text", type=int, default=8, help="held-out text samples")
    p.add_argument("--retrieval", type=int, default=8, help="held-out retrieval samples")
    p.add_argument("--fractions", default="0.25,0.5", help="peak cells as fractions of the sample length")
    p.add_argument("--transfer-model", default=None, help="also apply the NAMM zero-shot to this model (25 %%)")
    p.add_argument("--transfer-samples", type=int, default=4, help="text and retrieval samples each for transfer")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-reproduce", action="store_true", help="skip re-scoring the trainer's held-out set")
    p.add_argument("--quants", default=",".join(QUANTS),
                   help="weight types converted from ckpt.pt and scored at the training fraction ('' for none)")
    p.add_argument("--skip-warm-start", action="store_true", help="do not score the run's warm start alone")
    p.add_argument("--layer-subsets", default="",
                   help="comma-separated layer counts: also the trained NAMM scoring only that many layers "
                        "(namm_layers; what a cheaper deployment loses)")
    p.add_argument("--sample-tokens", type=int, default=0,
                   help="test samples of this many tokens instead of the run's, the last half scored, peak cells the "
                        "same fractions of them (the NAMM runs with its trained settings): do the policies compare "
                        "the same way on longer context? Needs --no-reproduce and --quants ''")
    p.add_argument("--model", default=None,
                   help="score every policy on this model instead of the run's (a registered name or a GGUF path): "
                        "the NAMMs run zero-shot, at every fraction, on that model's tokens of the same held-out "
                        "texts. Needs --no-reproduce and --quants ''")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="comma-separated subset of %(default)s scored beside sink, the full cache and the trained NAMM "
                        "('' for none: a larger test of the trained NAMM against sink alone)")
    p.add_argument("--test-seed", type=int, default=None,
                   help="the test set's seed (default: the run's seed + 1); the run's own seed is its held-out "
                        "selection set and is refused")
    p.add_argument("--also", action="append", default=[], metavar="NAME=GGUF",
                   help="another NAMM GGUF to score beside the trained one (e.g. an earlier shipped NAMM)")
    p.add_argument("--score-chunk", type=int, default=None, metavar="TOKENS",
                   help="target tokens decoded per batch while scoring, every policy (default: the run's trained "
                        "interval; a NAMM's own invocations split batches further). Sink evicts at least a batch's "
                        "worth before each batch, so batches larger than its eviction chunk shrink its cache")
    p.add_argument("--also-immediate", action="store_true",
                   help="also score the trained NAMM evicting at each invocation (namm_defer_evictions=False, the "
                        "original's timing) beside the engine's default, which evicts as new tokens need the room")
    p.add_argument("--also-reindexed", action="store_true",
                   help="also score each --also NAMM with positions compacted after every eviction (reindex=True, as "
                        "sink does) beside the engine's default (absolute positions)")
    p.add_argument("--also-merged", type=float, action="append", default=[], metavar="COSINE",
                   help="also score each --also NAMM with the values of the tokens it gives up merged into the kept "
                        "token of the most similar key at this centred-cosine threshold (namm_merge_threshold; "
                        "repeatable)")
    p.add_argument("--also-merged-at-once", action="store_true",
                   help="score the --also-merged rows evicting at each invocation (namm_defer_evictions=False)")
    p.add_argument("--also-sink-score-chunk", type=int, default=None, metavar="TOKENS",
                   help="also score sink with this many tokens per batch (a row beside sink at --score-chunk)")
    p.add_argument("--only-also", action="store_true",
                   help="score the --also NAMMs beside sink and the full cache, not the run's own (a larger test of "
                        "one variant; its rows keep their --also names, so namm_closed_intervals.py --pool joins them "
                        "to another run's). Needs --also, --no-reproduce and --quants ''")
    args = p.parse_args()
    if (args.also_reindexed or args.also_merged) and not args.also:
        p.error("--also-reindexed and --also-merged re-score the --also NAMMs: give at least one --also")
    if any(not -1.0 <= t <= 1.0 for t in args.also_merged):
        p.error(f"--also-merged takes cosines between -1 and 1 (got {args.also_merged})")
    if args.only_also:
        clashes = [flag for flag, on in (("--no-reproduce missing", not args.no_reproduce),
                                         ("--quants not ''", bool(args.quants)), ("no --also", not args.also),
                                         ("--layer-subsets", bool(args.layer_subsets)),
                                         ("--also-immediate", args.also_immediate),
                                         ("--transfer-model", bool(args.transfer_model))) if on]
        if clashes:
            p.error("--only-also leaves the run's own NAMM out, so it needs --also, --no-reproduce and --quants '' "
                    f"and takes nothing that scores the run's NAMM ({', '.join(clashes)})")
    for flag, value in (("--score-chunk", args.score_chunk), ("--also-sink-score-chunk", args.also_sink_score_chunk)):
        if value is not None and value < 1:
            p.error(f"{flag} must be a positive number of tokens (got {value})")

    try:
        config, shipped_file, shipped_info = run_config(args.run)
    except (OSError, ValueError, KeyError) as e:
        p.error(f"--run {args.run!r} is neither a train-namm run directory nor a shipped NAMM: {e}")
    run = Path(args.run) if shipped_file is None else shipped_file.parent
    if args.sample_tokens not in (0, config.sample_tokens) and (not args.no_reproduce or args.quants):
        p.error("--sample-tokens changes the samples, so the trainer's held-out score and the weight types (both "
                "measured at the run's length) cannot be reproduced: add --no-reproduce --quants ''")
    try:
        config, test_seed = test_split(config, args.sample_tokens, args.test_seed)
    except InvalidArgumentError as e:
        p.error(str(e))
    trained_on = config.model
    if args.model and args.model != config.model:
        if not args.no_reproduce or args.quants:
            p.error("--model scores another model than the run's, so the trainer's held-out score and the weight "
                    "types (both measured on the run's model) cannot be reproduced: add --no-reproduce --quants ''")
        try:
            resolve_model(args.model)
        except (OSError, ValueError) as e:
            p.error(f"--model {args.model!r}: {e}")
        config = replace(config, model=args.model)
    baselines = [b for b in args.baselines.split(",") if b]
    if any(b not in BASELINES for b in baselines):
        p.error(f"--baselines takes a comma-separated subset of {','.join(BASELINES)} (got {args.baselines!r})")
    log, vector = run_log_and_vector(args.run, shipped_file, shipped_info)
    namm_file = os.path.abspath(args.namm or shipped_file or run / "namm.gguf")
    mean, var = tuple(map(float, vector.feat_mean)), tuple(map(float, vector.feat_var))
    tmp = tempfile.mkdtemp(prefix="namm-eval-")
    _core.set_log_verbosity(0)
    executor = make_executor(args.workers, "", 1)
    report = {**tool_metadata(sys.argv[0], sys.argv[1:]),
              "model": config.model, "namm_trained_on": trained_on, "sample_tokens": config.sample_tokens,
              "scored_tokens": config.scored_tokens,
              "n_text": args.text, "n_retrieval": args.retrieval, "test_seed": test_seed,
              "run_generation": vector.iteration, "namm_file": os.path.relpath(namm_file, ROOT),
              "score_chunk": args.score_chunk or config.namm_delay, "tables": {}}
    try:
        def spec_for(model: str, capacity: int) -> MemorySpec:
            return MemorySpec.from_config(config, mean, var, 1, capacity, model)

        def samples_for(model_name: str, seed: int, n_text: int, n_retrieval: int):
            model = _core.Model.load(os.fspath(resolve_model(model_name)))
            corpus = Corpus(model, config.text_sources(), config.sample_tokens)
            factory = SampleFactory(corpus, config.sample_tokens, config.scored_tokens, config.capacity)
            return corpus, heldout_samples(factory, seed, n_text, n_retrieval, config.retrieval_sources())

        corpus, samples = samples_for(config.model, test_seed, args.text, args.retrieval)
        report["heldout_parts"] = [n for n, _ in corpus.parts["heldout"]]
        random_theta = tuple(map(float, np.random.default_rng(config.seed + 77).normal(0.0, config.sigma0, 4172)))
        # The run's starting point when it was warm-started: what the imitation fit alone gives, before evolution.
        state_file = run / "state.pkl"
        warm_theta = None
        if shipped_file is None and state_file.exists():
            import pickle

            with open(state_file, "rb") as f:
                warm = pickle.load(f).get("warm_start_theta")
            warm_theta = None if warm is None else tuple(map(float, warm))
        others = {}
        for item in args.also:
            name, _, path = item.partition("=")
            if not path or not Path(path).exists():
                p.error(f"--also needs NAME=GGUF with an existing file (got {item!r})")
            others[name] = os.path.abspath(path)
        layer_subsets = [int(k) for k in args.layer_subsets.split(",") if k]
        quants = [q for q in args.quants.split(",") if q]
        if any(q not in QUANTS for q in quants):
            p.error(f"--quants takes a comma-separated subset of {','.join(QUANTS)} (got {args.quants!r})")
        quant_files = {}
        file_settings = gguf_settings(namm_file)  # the weight types run as the file does (its deployed interval)
        for q in quants:
            quant_files[q] = write_gguf(replace(vector, source=f"{vector.source} ({q})", settings=file_settings),
                                        os.path.join(tmp, f"namm-{q}.gguf"), q)["output"]
        full_spec = spec_for(config.model, config.capacity)
        print("full cache", flush=True)
        refs = {r.sample_id: r.nll for r in executor.map(full_spec, [Job("full", s, score_chunk=args.score_chunk)
                                                                      for s in samples])}
        full_entry = summarise([type("R", (), {"sample_id": k, "nll": v, "peak_cells": config.sample_tokens,
                                                "forced_evictions": 0})() for k, v in refs.items()], refs)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            capacity = int(round(config.sample_tokens * fraction))
            label = f"{config.model}, peak cells {capacity} = {fraction:.0%} of {config.sample_tokens}"
            print(label, flush=True)
            baseline_jobs = {"h2o": ("h2o", Job("h2o", samples[0])), "tova": ("tova", Job("tova", samples[0])),
                             "random": ("random NAMM", Job("namm", samples[0], random_theta))}
            policies = {"sink": Job("sink", samples[0])}
            if args.also_sink_score_chunk:
                policies[f"sink, scored {args.also_sink_score_chunk} tokens per batch"] = Job(
                    "sink", samples[0], score_chunk=args.also_sink_score_chunk)
            policies.update(baseline_jobs[key] for key in BASELINES if key in baselines)
            if warm_theta is not None and not args.skip_warm_start:
                policies["warm start only (no evolution)"] = Job("namm", samples[0], warm_theta)
            # NAMM files run as they are deployed (their own interval); the trainer's reproduction below, as trained.
            policies.update({name: Job("namm_file", samples[0], namm_file=path, namm_delay=0)
                             for name, path in others.items()})
            for threshold in args.also_merged:
                timing = ", evicting at once" if args.also_merged_at_once else ""
                policies.update({f"{name}, values merged (cosine >= {threshold:g}){timing}": Job(
                    "namm_file", samples[0], namm_file=path, namm_delay=0, merge_threshold=threshold,
                    namm_defer_evictions=not args.also_merged_at_once) for name, path in others.items()})
            if args.also_reindexed:
                policies.update({f"{name}, positions re-indexed": Job("namm_file", samples[0], namm_file=path,
                                                                      namm_delay=0, reindex=True)
                                 for name, path in others.items()})
            if args.also_immediate:
                policies["trained NAMM, evicting at each invocation"] = Job(
                    "namm_file", samples[0], namm_file=namm_file, namm_delay=0, namm_defer_evictions=False)
            if not args.only_also:
                policies["trained NAMM (f32)"] = Job("namm_file", samples[0], namm_file=namm_file, namm_delay=0)
            for k in layer_subsets:
                policies[f"trained NAMM, {k} layers scored"] = Job("namm_file", samples[0], namm_file=namm_file,
                                                                    namm_layers=k, namm_delay=0)
            if fraction == config.cache_fraction:
                policies.update({f"trained NAMM ({q})": Job("namm_file", samples[0], namm_file=quant_files[q],
                                                            namm_delay=0) for q in quants})
            policies = {name: job if job.score_chunk else replace(job, score_chunk=args.score_chunk)
                        for name, job in policies.items()}
            table = {"full cache": full_entry}
            table.update(run_policies(executor, spec_for(config.model, capacity), samples, policies, refs))
            report["tables"][label] = table
        # The trainer's own held-out set, through the shipped file: does it reproduce the logged loss?
        report["reproduction"] = None
        if args.no_reproduce:
            trainer_heldout = []
        else:
            _, trainer_heldout = samples_for(config.model, config.seed, config.heldout_text, config.heldout_retrieval)
        if trainer_heldout:
            from pymemory.namm.training.trainer import _gaps, _loss

            tr_refs = {r.sample_id: r.nll for r in executor.map(full_spec, [Job("full", s) for s in trainer_heldout])}
            file_results = executor.map(full_spec, [Job("namm_file", s, namm_file=namm_file) for s in trainer_heldout])
            normalisers = {k: max(v, 0.01) for k, v in log["heldout_baselines"]["sink"].items() if k != "loss"}
            best = next(h for h in log["heldout"] if h["generation"] == vector.iteration)
            report["reproduction"] = {"generation": vector.iteration, "trainer_loss": best["loss"],
                                      "file_loss": _loss(_gaps(file_results, tr_refs), normalisers)}
        if args.transfer_model:
            t_corpus, t_samples = samples_for(args.transfer_model, test_seed, args.transfer_samples,
                                              args.transfer_samples)
            t_spec = spec_for(args.transfer_model, config.capacity)
            label = (f"zero-shot transfer to {args.transfer_model}, peak cells {config.capacity} = "
                     f"{config.cache_fraction:.0%} of {config.sample_tokens}")
            print(label, flush=True)
            t_refs = {r.sample_id: r.nll for r in executor.map(t_spec, [Job("full", s) for s in t_samples])}
            t_full = summarise([type("R", (), {"sample_id": k, "nll": v, "peak_cells": config.sample_tokens,
                                                "forced_evictions": 0})() for k, v in t_refs.items()], t_refs)
            table = {"full cache": t_full}
            table.update(run_policies(executor, t_spec, t_samples, {
                "sink": Job("sink", t_samples[0]), "h2o": Job("h2o", t_samples[0]), "tova": Job("tova", t_samples[0]),
                "random NAMM": Job("namm", t_samples[0], random_theta),
                "trained NAMM (f32)": Job("namm_file", t_samples[0], namm_file=namm_file, namm_delay=0)}, t_refs))
            report["tables"][label] = table
    finally:
        executor.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
