#!/usr/bin/env python3
"""Can one head's signal save a needle? Shared-cell aggregation rules for attention-scored eviction, probed.

    .venv/bin/python tools/namm_aggregation_probe.py --namm smollm2 --out docs/results/namm_aggregation_probe

Every shared-cell policy here (h2o, tova, the NAMM's budget mode) evicts by one number per token aggregated over
all (layer, KV head) pairs, so a signal that lives in a few heads (docs/results.md, "Why no policy keeps the pass
key": one KV head ranks the pass key's digits at 0.83, the model-wide sum at 0.21) is outvoted. This probe runs
*causal* scores, the attention each token has received so far (what h2o reads), under different aggregations
over the pairs, on the NAMM test set, through the oracle's llama.cpp harness (tools/namm_oracle_bound.py: same
schedule and budget rule as the NAMM, attention captured once with the full cache):

  - sum:            the model-wide sum (h2o's score; the engine's h2o also keeps a recent window, here none);
  - top-k of pairs: each pair's attention per query since the token arrived, as a multiple of that pair's mean
                    over the candidates, averaged over the token's k highest pairs (k = 1 is the max);
  - recent top-1:   the maximum over pairs of the rate over the last 128 queries only (what a NAMM's spectrogram
                    moving average sees, about 100 queries), to tell whether its inputs could carry the signal;
  - quota:          each pair nominates its highest tokens in turn (round robin over the pairs) until the budget
                    is filled, so every head keeps its own favourites;
  - EMA top-1:      the maximum over pairs of a per-query exponential moving average of the attention, as the
                    NAMM's spectrogram state keeps it (from zero when the token arrives, so a new token's average
                    starts low), or bias-corrected (divided by the weight its queries so far carry, 1 - c^queries,
                    which makes it a recency-weighted rate), relative to the pair's mean; "z-max" standardises each
                    pair's log average over the candidates instead (what budget_zmax does with a NAMM's scores);
                    "z-top-k" averages the k highest standardised pairs, "z-mean" all of them;
  - + newest R kept: a rule with the last R positions protected (a recent window, as h2o keeps);
  - hindsight:      not causal: ranked by the attention from every *later* query (sum over pairs, top-1 of the
                    pairs' future rates relative to their mean, or z-max of them), what a NAMM that predicted the
                    future perfectly could do with each aggregation (tools/namm_oracle_bound.py's oracle, per pair);
  - values:         what attention-only rules cannot see (tools/value_capture.py): the attention weighted by the
                    token's value norm (VATP's score), or the output displacement a_qk ||v_k - o_q|| (how far
                    evicting the token moves each query's attention output; CAOTE's), causal (the z-max rule of
                    its corrected 0.998 average) and in hindsight (summed over the later queries).

A rule that keeps the pass key must do so without losing text: both are reported.
"""
from __future__ import annotations

import argparse
from functools import partial
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
sys.path.insert(0, os.fspath(ROOT / "tools"))

from eviction_signals import (copies_among, duplicate_of_better, key_distinctiveness,  # noqa: E402
                              row_standardised, separator_mask, standardised, token_surprisal)
from value_capture import ValueCapture, output_displacement  # noqa: E402
from kv_merge import ValueMerger  # noqa: E402
from namm_oracle_bound import (LlamaHarness, attention_received, record_result, run_sample,  # noqa: E402
                               shipped_test_set, summarise, table_lines)
from pymemory.errors import InvalidArgumentError  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
from pymemory.namm.packaged import resolve_namm  # noqa: E402
from pymemory.namm.training.warm_start import capture_invocations  # noqa: E402


KEYED = "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE"  # what `smollm2-keys` ranks by
# Signals added to it (name, weight): tools/eviction_signals.py, docs/results.md "Surprisal, separators, values, rarity"
KEYED_VARIANTS = (("surprisal", 0.25), ("surprisal", 0.5), ("surprisal", -0.25), ("surprisal", -0.5), ("separators", 0.5),
                  ("separators", 1.0), ("ValueDiff", 0.5), ("ValueDiff", 0.25), ("rarity", 0.25), ("rarity", 0.5),
                  ("a last copy", 0.5))


# Evicted tokens' values merged into the kept token of the most similar key, per (layer, KV head), at a centred
# cosine threshold (tools/kv_merge.py); None: the cache state read and written back unchanged (the control)
MERGE_THRESHOLDS = (None, 0.8, 0.6)


def merged_variant(threshold: float | None) -> str:
    if threshold is None:
        return f"{KEYED}; cache state written back unchanged at each eviction"
    return f"{KEYED}; evicted values merged into the most similar kept key (centred cosine >= {threshold:g})"


def keyed_variant(signal: str, weight: float) -> str:
    """The rule name of KEYED plus `weight` of a signal: standard deviations of a score, or a bonus for a kind."""
    if signal in ("separators", "a last copy"):
        return f"{KEYED} + {weight:g} for {signal}"
    return f"{KEYED} {'+' if weight > 0 else '-'} {abs(weight):g} x {signal} z"


RULES = ("sum over pairs (h2o's score, no recent window)", "mean rate over pairs", "top-1 of pairs (max)",
         "top-3 of pairs", "top-9 of pairs", "top-1 of pairs over the last 128 queries", "quota per pair",
         "top-1 of pairs: EMA 0.998 from zero", "top-1 of pairs: EMA 0.998 bias-corrected",
         "top-1 of pairs: EMA 0.99 bias-corrected", "z-max of pairs: EMA 0.998 bias-corrected",
         "z-max of pairs: EMA 0.998 bias-corrected + newest 32 kept",
         "z-max of pairs: EMA 0.998 bias-corrected + newest 64 kept",
         "hindsight: sum over pairs of all future attention", "hindsight: top-1 of pairs of the future rate",
         "hindsight: z-max of pairs of the future rate",
         "z-mean of pairs: EMA 0.998 bias-corrected", "z-top-3 of pairs: EMA 0.998 bias-corrected",
         "z-top-9 of pairs: EMA 0.998 bias-corrected", "z-max of pairs: EMA 0.995 bias-corrected",
         "z-max of pairs: EMA 0.999 bias-corrected", "z-max of pairs: rate since arrival",
         "z-max of pairs: EMA 0.998 bias-corrected x value norm",
         "z-max of pairs: EMA 0.998 bias-corrected of the output displacement",
         "hindsight: sum over pairs of future attention x value norm",
         "hindsight: z-max of pairs of the future rate x value norm",
         "hindsight: sum over pairs of the future output displacement",
         "hindsight: z-max of pairs of the future output displacement",
         "z-max of pairs: EMA 0.998 bias-corrected; max over ±1 cached neighbours",
         "z-max of pairs: EMA 0.998 bias-corrected; max over ±3 cached neighbours",
         "z-max of pairs: EMA 0.998 bias-corrected; each pair's z averaged over ±2 cached neighbours",
         "z-max of pairs: EMA 0.998 bias-corrected; max over ±2 cached neighbours",
         "z-max of pairs: EMA 0.998 bias-corrected; max with the previous cached neighbour",
         "z-max of pairs: EMA 0.998 bias-corrected; max with the next cached neighbour",
         "z-max of pairs: EMA 0.998 bias-corrected; max over ±1 cached neighbours 0.5 lower",
         "z-max of pairs: EMA 0.998 bias-corrected; max over ±1 cached neighbours 1 lower",
         "KeyDiff: each key's distance from the cached keys' mean direction, mean over pairs",
         "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z",
         "z-max of pairs: EMA 0.998 bias-corrected + 1 x KeyDiff z",
         "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE",
         "z-max of pairs: each pair's EMA 0.998 bias-corrected z + 0.5 x its KeyDiff z",
         "z-max of pairs: EMA 0.998 bias-corrected - 0.5 x duplicate z",
         "z-max of pairs: EMA 0.998 bias-corrected - 1 x duplicate z",
         "z-max of pairs: EMA 0.998 bias-corrected - 0.25 x duplicate z",
         "surprisal: each token's own NLL in context (Selective Context's self-information)",
         "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x surprisal z",
         "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x z-max of pairs of KeyDiff of the keys before RoPE",
         *(keyed_variant(signal, weight) for signal, weight in KEYED_VARIANTS),
         *(merged_variant(threshold) for threshold in MERGE_THRESHOLDS))
MERGE_RULES = {merged_variant(threshold): threshold for threshold in MERGE_THRESHOLDS}
VALUE_RULES = tuple(r for r in RULES if "value norm" in r or "displacement" in r)  # these need captured values
KEY_RULES = tuple(r for r in RULES if "KeyDiff" in r or "duplicate" in r)  # these need captured keys and values
SURPRISAL_RULES = tuple(r for r in RULES if "surprisal" in r)  # these need each token's NLL in context


def relative_rate(past: np.ndarray, now: int, cand: np.ndarray, queries: int | None = None) -> np.ndarray:
    """[pairs, cand]: attention per query since each candidate arrived (or over the last `queries` queries, when
    `past` holds only theirs), as a multiple of the pair's mean."""
    seen = now - cand if queries is None else np.minimum(now - cand, queries)
    rate = past[:, cand] / np.maximum(seen, 1)[None, :]
    return rate / np.maximum(rate.mean(axis=1, keepdims=True), 1e-12)


def top_k_of_pairs(past: np.ndarray, now: int, cand: np.ndarray, k: int) -> np.ndarray:
    rate = relative_rate(past, now, cand)
    return np.sort(rate, axis=0)[-k:].mean(axis=0)


def moving_averages(received: np.ndarray, coefficient: float) -> np.ndarray:
    """[pairs, query + 1, key]: after each query, every key's exponential moving average of the attention it
    received (weight 1 - c per query, from zero before the key arrived), the NAMM spectrogram state's form."""
    ema = np.zeros((received.shape[0], received.shape[1] + 1, received.shape[2]), np.float32)
    for query in range(received.shape[1]):
        ema[:, query + 1] = coefficient * ema[:, query] + (1 - coefficient) * received[:, query]
    return ema


def ema_scores(ema: np.ndarray, coefficient: float, now: int, cand: np.ndarray, corrected: bool,
               z_top: int = 0, weight: np.ndarray | None = None, radius: int = 0) -> np.ndarray:
    """z_top 0: the highest over the pairs of the average relative to the pair's mean; k > 0: the mean of the k
    highest standardised log averages (k = 1: budget_zmax's rule); -1: their mean over every pair. weight
    [pairs, cand] (e.g. value norms) multiplies the averages first; radius > 0 averages each pair's standardised
    values over that many cached neighbours on each side (standardised_top)."""
    average = ema[:, now, cand]  # [pairs, cand]
    if corrected:  # the weight the queries since arrival carry; the key's own query is its first
        average = average / (1 - coefficient ** np.maximum(now - cand, 1))[None, :]
    if weight is not None:
        average = average * weight
    return standardised_top(average, z_top, radius) if z_top else relative_max(average)


def relative_max(values: np.ndarray) -> np.ndarray:
    """[pairs, cand] -> [cand]: the highest over the pairs of each value as a multiple of its pair's mean."""
    return (values / np.maximum(values.mean(axis=1, keepdims=True), 1e-12)).max(axis=0)


def standardised_top(values: np.ndarray, k: int = 1, radius: int = 0) -> np.ndarray:
    """[pairs, cand] -> [cand]: each pair's log values standardised over the candidates (radius > 0: then averaged
    over every candidate's `radius` cached neighbours on each side, fewer at the ends), then the mean of the k
    highest over the pairs (k = 1: budget_zmax's rule, the highest; -1: the mean over every pair)."""
    log = np.log(np.maximum(values, 1e-9))
    z = row_standardised(log)
    if radius:
        kernel = np.ones(2 * radius + 1)
        counts = np.convolve(np.ones(z.shape[1]), kernel, mode="same")
        z = np.stack([np.convolve(row, kernel, mode="same") for row in z]) / counts[None, :]
    return z.mean(axis=0) if k < 0 else np.sort(z, axis=0)[-k:].mean(axis=0)


def newest_kept(rule, newest: int):
    """`rule` with the candidates among the last `newest` positions always kept (a protected recent window)."""
    def protected(now: int, cand: np.ndarray) -> np.ndarray:
        scores = np.asarray(rule(now, cand), np.float64).copy()
        scores[cand >= now - newest] = np.inf
        return scores
    return protected


def neighbour_max(rule, before: int, after: int | None = None, discount: float = 0.0):
    """`rule` with each candidate scored by the highest score among itself and its `before` earlier and `after`
    later nearest cached neighbours (chronological order; after defaults to before), a neighbour's score lowered by
    `discount`: a token one pair singles out keeps the words around it, as SnapKV pools its scores over neighbouring
    positions. A maximum over the pairs commutes with this one, so pooling each pair first is the same rule."""
    after = before if after is None else after

    def pooled(now: int, cand: np.ndarray) -> np.ndarray:
        scores = np.asarray(rule(now, cand), np.float64)
        best = scores.copy()
        for d in range(1, before + 1):  # candidate i reads the one d earlier
            best[d:] = np.maximum(best[d:], scores[:-d] - discount)
        for d in range(1, after + 1):  # and the one d later
            best[:-d] = np.maximum(best[:-d], scores[d:] - discount)
        return best
    return pooled


def standardised_pooled_max(values: np.ndarray, radius: int) -> np.ndarray:
    """budget_zmax's rule with each pair's standardised values averaged over `radius` cached neighbours."""
    return standardised_top(values, 1, radius)


def quota_scores(past: np.ndarray, now: int, cand: np.ndarray) -> np.ndarray:
    """Keep order from a round robin over pairs, each taking its highest not yet taken token: the token taken
    in round r by pair p scores -(r * pairs + p), so the lowest scores (taken last, or never) are evicted."""
    rate = relative_rate(past, now, cand)
    order = np.argsort(-rate, axis=1, kind="stable")  # [pairs, cand]: each pair's favourites first
    score = np.full(len(cand), -np.inf)
    taken = np.zeros(len(cand), bool)
    cursor = np.zeros(order.shape[0], int)
    rank = 0
    while not taken.all():
        for p in range(order.shape[0]):
            while cursor[p] < order.shape[1] and taken[order[p, cursor[p]]]:
                cursor[p] += 1
            if cursor[p] < order.shape[1]:
                token = order[p, cursor[p]]
                taken[token] = True
                score[token] = -rank
                rank += 1
    return score


def parse_rules(text: str) -> list[str]:
    """The rule names of a comma-separated list; a name may itself hold commas ("sum over pairs (h2o's score, no
    recent window)"), so pieces are joined until they name a rule. ValueError names what is not a rule."""
    chosen, piece = [], ""
    for part in text.split(","):
        piece = f"{piece},{part}" if piece else part
        if piece.strip() in RULES:
            chosen.append(piece.strip())
            piece = ""
    if piece:
        raise ValueError(f"unknown rule {piece.strip()!r}")
    return chosen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namm", default="smollm2", help="a shipped NAMM name: its JSON gives the model and test split")
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    p.add_argument("--text", type=int, default=8)
    p.add_argument("--retrieval", type=int, default=16)
    p.add_argument("--fractions", default="0.25,0.5")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rules", default="", help="comma-separated rule names to run (default: all); sink always runs")
    p.add_argument("--sample-tokens", type=int, default=0, help="sample length (default: the NAMM's training "
                   "length); the second half is scored")
    p.add_argument("--test-seed", type=int, default=None, help="held-out sample seed (default: the run's seed + 1)")
    args = p.parse_args()
    try:
        chosen = parse_rules(args.rules) if args.rules else list(RULES)
    except ValueError as e:
        p.error(f"--rules: {e}; the rules are {list(RULES)}")

    try:
        _, config, model_path, model, samples, test_seed = shipped_test_set(
            resolve_namm(args.namm), args.text, args.retrieval, args.sample_tokens, args.test_seed)
    except InvalidArgumentError as e:
        p.error(str(e))
    delay, n_sink = config.namm_delay, config.n_sink
    print(f"capturing attention of {len(samples)} samples with the full cache", flush=True)
    captures = capture_invocations(model, samples, delay, args.threads)
    del model

    harness = LlamaHarness(model_path, config.sample_tokens + 64, args.threads)
    value_capture = ValueCapture(model_path, args.threads) if set(chosen) & set(VALUE_RULES + KEY_RULES) else None
    rows: dict[str, dict[str, dict]] = {}

    record = partial(record_result, rows)

    for sample, per_layer in zip(samples, captures):
        tokens, n_prompt = list(sample.prompt) + list(sample.target), len(sample.prompt)
        received = attention_received(per_layer, sample.n_tokens)  # [pairs, query, key]
        signals = {"attention": received}  # [pairs, query, key]: what each query gives each key
        norms = keys = unrotated = values = None
        if value_capture is not None:
            values = value_capture.values(tokens)  # [pairs, key, head_dim]
            norms = np.linalg.norm(values, axis=2)  # [pairs, key]
            if set(chosen) & set(VALUE_RULES):
                signals["displacement"] = output_displacement(received, values)
            if set(chosen) & set(KEY_RULES):
                unrotated, keys = value_capture.projections(tokens, "Kcur-")  # [pairs, key, head_dim] each
        surprisal = token_surprisal(harness, tokens) if set(chosen) & set(SURPRISAL_RULES) else None
        separators = separator_mask(harness, tokens) if any("separators" in r for r in chosen) else None
        cumulative: dict[str, np.ndarray] = {}  # per signal: [pairs, q + 1, key], summed over the queries < q

        def before_of(signal: str) -> np.ndarray:
            if signal not in cumulative:
                total = np.zeros((received.shape[0], len(tokens) + 1, len(tokens)), np.float32)
                total[:, 1:] = np.cumsum(signals[signal], axis=1)
                cumulative[signal] = total
            return cumulative[signal]
        before = before_of("attention")

        def top_1_recent(now: int, cand: np.ndarray, queries: int) -> np.ndarray:
            if now >= len(tokens):
                return cand
            recent = before[:, now] - before[:, max(now - queries, 0)]
            return relative_rate(recent, now, cand, queries).max(axis=0)

        emas: dict[tuple, np.ndarray] = {}  # per (signal, coefficient), computed when a chosen rule first reads it

        def ema_rule(coefficient: float, corrected: bool, z_top: int = 0, signal: str = "attention",
                     value_weighted: bool = False, radius: int = 0):
            def rule(now: int, cand: np.ndarray) -> np.ndarray:
                if now >= len(tokens):
                    return cand
                if (signal, coefficient) not in emas:
                    emas[signal, coefficient] = moving_averages(signals[signal], coefficient)
                weight = norms[:, cand] if value_weighted else None
                return ema_scores(emas[signal, coefficient], coefficient, now, cand, corrected, z_top, weight,
                                  radius)
            return rule

        def hindsight(aggregate, signal: str = "attention", value_weighted: bool = False):
            """Ranked by what every later query gives (told, not predicted; tools/namm_oracle_bound.py)."""
            def rule(now: int, cand: np.ndarray) -> np.ndarray:
                if now >= len(tokens):
                    return cand
                total = before_of(signal)
                after = total[:, len(tokens), cand] - total[:, now, cand]
                return aggregate(after * norms[:, cand] if value_weighted else after)
            return rule

        def with_duplicates(rule, weight: float):
            """`rule` minus `weight` standard deviations of how closely a better-ranked candidate duplicates each."""
            def rule_less_duplicates(now: int, cand: np.ndarray) -> np.ndarray:
                base = np.asarray(rule(now, cand), np.float64)
                if now >= len(tokens):
                    return base
                return base - weight * standardised(duplicate_of_better(keys[:, cand], values[:, cand], base))
            return rule_less_duplicates

        def with_keydiff(rule, weight: float, rotated: bool = True, of_values: bool = False, z_max: bool = False):
            """`rule` plus `weight` standard deviations of KeyDiff's score (mean over the pairs; z_max: the highest of
            each pair's standardised score), on the keys or (of_values) on the values."""
            def rule_plus_keydiff(now: int, cand: np.ndarray) -> np.ndarray:
                base = np.asarray(rule(now, cand), np.float64)
                if now >= len(tokens):
                    return base
                vectors = values if of_values else keys if rotated else unrotated
                distinct = key_distinctiveness(vectors[:, cand])  # [pairs, cand]
                distinct = row_standardised(distinct).max(axis=0) if z_max else distinct.mean(axis=0)
                return base + weight * standardised(distinct)
            return rule_plus_keydiff

        def plus(rule, term):
            """`rule` plus term(cand) [cand] (scores past the sample's end, where rules return positions, untouched)."""
            def rule_plus_term(now: int, cand: np.ndarray) -> np.ndarray:
                base = np.asarray(rule(now, cand), np.float64)
                return base if now >= len(tokens) else base + term(cand)
            return rule_plus_term

        def with_surprisal(rule, weight: float):
            """`rule` plus `weight` standard deviations (over the candidates) of each token's surprisal."""
            return plus(rule, lambda cand: weight * standardised(surprisal[cand]))

        def with_separators(rule, bonus: float):
            """`rule` plus `bonus` for the separators (in the units of a rule that ends standardised)."""
            return plus(rule, lambda cand: bonus * separators[cand])

        token_array = np.asarray(tokens)

        def with_rarity(rule, weight: float, last_copy: bool = False):
            """`rule` plus `weight` standard deviations of the token's rarity among the candidates (minus the log of
            its copies there), or (last_copy) plus `weight` where it is the only copy."""
            def rarity(cand: np.ndarray) -> np.ndarray:
                copies = copies_among(token_array, cand)
                return weight * (copies == 1) if last_copy else weight * standardised(-np.log(copies))
            return plus(rule, rarity)

        def pairwise_keydiff(coefficient: float, weight: float):
            """Each pair's budget_zmax z plus `weight` times its own standardised KeyDiff score, then the maximum."""
            def rule(now: int, cand: np.ndarray) -> np.ndarray:
                if now >= len(tokens):
                    return cand
                if ("attention", coefficient) not in emas:
                    emas["attention", coefficient] = moving_averages(signals["attention"], coefficient)
                average = emas["attention", coefficient][:, now, cand] / (
                    1 - coefficient ** np.maximum(now - cand, 1))[None, :]
                log = np.log(np.maximum(average, 1e-9))
                distinct = key_distinctiveness(keys[:, cand])
                return (row_standardised(log) + weight * row_standardised(distinct)).max(axis=0)
            return rule

        def keyed():
            """The rule `smollm2-keys` ranks by: budget_zmax's plus half a standard deviation of KeyDiff before RoPE."""
            return with_keydiff(ema_rule(0.998, True, 1), 0.5, rotated=False)

        added = {"surprisal": with_surprisal, "separators": with_separators,
                 "ValueDiff": partial(with_keydiff, of_values=True), "rarity": with_rarity,
                 "a last copy": partial(with_rarity, last_copy=True)}

        def causal(rule):
            return lambda now, cand: rule(before[:, now], now, cand) if now < len(tokens) else cand

        rules = {"sum over pairs (h2o's score, no recent window)": causal(lambda past, now, cand: past[:, cand].sum(axis=0)),
                 "mean rate over pairs": causal(lambda past, now, cand: relative_rate(past, now, cand).mean(axis=0)),
                 "top-1 of pairs (max)": causal(lambda past, now, cand: top_k_of_pairs(past, now, cand, 1)),
                 "top-3 of pairs": causal(lambda past, now, cand: top_k_of_pairs(past, now, cand, 3)),
                 "top-9 of pairs": causal(lambda past, now, cand: top_k_of_pairs(past, now, cand, 9)),
                 "top-1 of pairs over the last 128 queries": lambda now, cand: top_1_recent(now, cand, 128),
                 "quota per pair": causal(quota_scores),
                 "top-1 of pairs: EMA 0.998 from zero": ema_rule(0.998, False),
                 "top-1 of pairs: EMA 0.998 bias-corrected": ema_rule(0.998, True),
                 "top-1 of pairs: EMA 0.99 bias-corrected": ema_rule(0.99, True),
                 "z-max of pairs: EMA 0.998 bias-corrected": ema_rule(0.998, True, 1),
                 "z-max of pairs: EMA 0.998 bias-corrected + newest 32 kept": newest_kept(ema_rule(0.998, True, 1), 32),
                 "z-max of pairs: EMA 0.998 bias-corrected + newest 64 kept": newest_kept(ema_rule(0.998, True, 1), 64),
                 "hindsight: sum over pairs of all future attention": hindsight(lambda after: after.sum(axis=0)),
                 "hindsight: top-1 of pairs of the future rate": hindsight(relative_max),
                 "hindsight: z-max of pairs of the future rate": hindsight(partial(standardised_top, k=1)),
                 "z-mean of pairs: EMA 0.998 bias-corrected": ema_rule(0.998, True, -1),
                 "z-top-3 of pairs: EMA 0.998 bias-corrected": ema_rule(0.998, True, 3),
                 "z-top-9 of pairs: EMA 0.998 bias-corrected": ema_rule(0.998, True, 9),
                 "z-max of pairs: EMA 0.995 bias-corrected": ema_rule(0.995, True, 1),
                 "z-max of pairs: EMA 0.999 bias-corrected": ema_rule(0.999, True, 1),
                 "z-max of pairs: rate since arrival": causal(
                     lambda past, now, cand: standardised_top(past[:, cand] / np.maximum(now - cand, 1)[None, :])),
                 "z-max of pairs: EMA 0.998 bias-corrected x value norm": ema_rule(0.998, True, 1,
                                                                                  value_weighted=True),
                 "z-max of pairs: EMA 0.998 bias-corrected of the output displacement": ema_rule(
                     0.998, True, 1, signal="displacement"),
                 "hindsight: sum over pairs of future attention x value norm": hindsight(
                     lambda after: after.sum(axis=0), value_weighted=True),
                 "hindsight: z-max of pairs of the future rate x value norm": hindsight(
                     partial(standardised_top, k=1), value_weighted=True),
                 "hindsight: sum over pairs of the future output displacement": hindsight(
                     lambda after: after.sum(axis=0), signal="displacement"),
                 "hindsight: z-max of pairs of the future output displacement": hindsight(
                     partial(standardised_top, k=1), signal="displacement"),
                 "z-max of pairs: EMA 0.998 bias-corrected; max over ±1 cached neighbours": neighbour_max(
                     ema_rule(0.998, True, 1), 1),
                 "z-max of pairs: EMA 0.998 bias-corrected; max over ±3 cached neighbours": neighbour_max(
                     ema_rule(0.998, True, 1), 3),
                 "z-max of pairs: EMA 0.998 bias-corrected; each pair's z averaged over ±2 cached neighbours":
                     ema_rule(0.998, True, 1, radius=2),
                 "z-max of pairs: EMA 0.998 bias-corrected; max over ±2 cached neighbours": neighbour_max(
                     ema_rule(0.998, True, 1), 2),
                 "z-max of pairs: EMA 0.998 bias-corrected; max with the previous cached neighbour": neighbour_max(
                     ema_rule(0.998, True, 1), 1, 0),
                 "z-max of pairs: EMA 0.998 bias-corrected; max with the next cached neighbour": neighbour_max(
                     ema_rule(0.998, True, 1), 0, 1),
                 "z-max of pairs: EMA 0.998 bias-corrected; max over ±1 cached neighbours 0.5 lower": neighbour_max(
                     ema_rule(0.998, True, 1), 1, 1, 0.5),
                 "z-max of pairs: EMA 0.998 bias-corrected; max over ±1 cached neighbours 1 lower": neighbour_max(
                     ema_rule(0.998, True, 1), 1, 1, 1.0),
                 "KeyDiff: each key's distance from the cached keys' mean direction, mean over pairs":
                     lambda now, cand: key_distinctiveness(keys[:, cand]).mean(axis=0) if now < len(tokens) else cand,
                 "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z": with_keydiff(ema_rule(0.998, True, 1), 0.5),
                 "z-max of pairs: EMA 0.998 bias-corrected + 1 x KeyDiff z": with_keydiff(ema_rule(0.998, True, 1), 1.0),
                 "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x KeyDiff z of the keys before RoPE": with_keydiff(
                     ema_rule(0.998, True, 1), 0.5, rotated=False),
                 "z-max of pairs: each pair's EMA 0.998 bias-corrected z + 0.5 x its KeyDiff z": pairwise_keydiff(
                     0.998, 0.5),
                 "z-max of pairs: EMA 0.998 bias-corrected - 0.5 x duplicate z": with_duplicates(
                     ema_rule(0.998, True, 1), 0.5),
                 "z-max of pairs: EMA 0.998 bias-corrected - 1 x duplicate z": with_duplicates(
                     ema_rule(0.998, True, 1), 1.0),
                 "z-max of pairs: EMA 0.998 bias-corrected - 0.25 x duplicate z": with_duplicates(
                     ema_rule(0.998, True, 1), 0.25),
                 "surprisal: each token's own NLL in context (Selective Context's self-information)":
                     lambda now, cand: surprisal[cand] if now < len(tokens) else cand,
                 "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x surprisal z": with_surprisal(
                     ema_rule(0.998, True, 1), 0.5),
                 "z-max of pairs: EMA 0.998 bias-corrected + 0.5 x z-max of pairs of KeyDiff of the keys before "
                 "RoPE": with_keydiff(ema_rule(0.998, True, 1), 0.5, rotated=False, z_max=True),
                 **{keyed_variant(signal, weight): added[signal](keyed(), weight) for signal, weight in KEYED_VARIANTS},
                 **{name: keyed() for name in MERGE_RULES}}
        assert list(rules) == list(RULES)
        rules = {k: v for k, v in rules.items() if k in chosen}
        record("full", "full cache", sample, *run_sample(harness, tokens, n_prompt, 10 ** 9, delay,
                                                                   n_sink, None))
        for fraction in (float(f) for f in args.fractions.split(",")):
            capacity = int(round(config.sample_tokens * fraction))
            record(f"{capacity}", "sink", sample,
                   *run_sample(harness, tokens, n_prompt, capacity, delay, n_sink, lambda now, cand: cand))
            for name, rule in rules.items():
                merger = ValueMerger(keys.shape[2], n_sink, MERGE_RULES[name]) if name in MERGE_RULES else None
                record(f"{capacity}", name, sample, *run_sample(harness, tokens, n_prompt, capacity, delay, n_sink,
                                                                rule, merger))
                if merger is not None and merger.offered:
                    print(f"    {name}: {merger.merged / merger.offered:.0%} of evicted values merged", flush=True)
        print(f"  {sample.id}: " + ", ".join(f"{t}/{k} {v['nll'][sample.id]:.3f}" for t, e in rows.items()
                                             for k, v in e.items()), flush=True)

    text_ids = [s.id for s in samples if s.kind == "text"]
    answer_ids = [s.id for s in samples if s.kind != "text"]
    report = {**tool_metadata(sys.argv[0], sys.argv[1:]),
              "model": config.model, "namm": args.namm, "sample_tokens": config.sample_tokens, "delay": delay,
              "n_sink": n_sink, "n_text": len(text_ids), "n_retrieval": len(answer_ids), "test_seed": test_seed,
              "tables": summarise(rows, text_ids, answer_ids, "full cache", config.sample_tokens), "nll_per_sample": rows}
    write_report_files(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"# Shared-cell aggregation of attention-so-far: can one head save a needle? ({report['model']})", "",
             f"`{report['command']}` — commit {report['commit']}, {report['date']}, {report['machine']}", "",
             f"The NAMM `{report['namm']}`'s test set ({report['n_text']} text + {report['n_retrieval']} retrieval "
             f"samples of {report['sample_tokens']} tokens, seed {report['test_seed']}), on llama.cpp through "
             f"llama-cpp-python with absolute positions. Every {report['delay']} tokens each policy cuts the cache to "
             f"capacity - {report['delay']} cells (peak cells = capacity), keeping the first {report['n_sink']} and "
             "the newest token, by the attention every token has received so far (causal: what h2o reads), "
             "aggregated over the (layer, KV head) pairs as named (tools/namm_aggregation_probe.py). 'rate' = "
             "attention per query since the token arrived, as a multiple of the pair's mean over the candidates. "
             "'closed' = share of sink's gap to the full cache that a policy closes.", ""]
    return "\n".join(lines + table_lines(report)) + "\n"


if __name__ == "__main__":
    sys.exit(main())
