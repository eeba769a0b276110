#!/usr/bin/env python3
"""Can a causal predictor of each pair's future attention, summed over the pairs, reach the hindsight sum's bound?

    .venv/bin/python tools/namm_future_probe.py --namm smollm2-rate --out docs/results/namm_future_probe

The bound at 25 % of 1,024 tokens (docs/results.md, "The bound at 1,024 tokens") ranks tokens by the attention
every later query gives them, summed over the (layer, KV head) pairs: 57 % of sink's text gap closed, where the
NAMM's own rule (z-max over pairs of a causal rate) is at its bound, 44 %. The causal sums tried so far fail
(h2o's past sum keeps the oldest tokens, the past rate keeps the newest: local heads give a young token much
attention that it will not get again). The missing piece is a *prediction* of each pair's future attention from
what a NAMM can see (the token's age and its attention so far at several time scales), aggregated as the bound
is: log-sum-exp over the pairs of predicted log future shares.

This probe fits such predictors by Poisson regression (log link) on training-split samples (never the test set), with the target
each pair's share of the attention of the next `--horizon` queries, and then evicts by them on held-out
samples through the oracle's llama.cpp harness (tools/namm_oracle_bound.py: same schedule and budget rule as the
NAMM, attention captured once with the full cache):

  - one predictor for every pair (a NAMM's form: its weights are shared by every layer and head), on the
    features and their pairwise products;
  - one linear predictor per pair (more than a NAMM can express; what knowing the layer would add);
  - the NAMM's rule (z-max of the corrected 0.998 average), and the hindsight sums over the next `--horizon`
    queries and over every later query, for scale.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
sys.path.insert(0, os.fspath(ROOT / "tools"))

from namm_aggregation_probe import ema_scores, moving_averages  # noqa: E402
from namm_oracle_bound import (LlamaHarness, attention_received, record_result, run_sample,  # noqa: E402
                               shipped_test_set, summarise, table_lines)
from pymemory.errors import InvalidArgumentError  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
from pymemory.namm.packaged import resolve_namm  # noqa: E402
from pymemory.namm.training.data import Corpus, SampleFactory, generation_samples  # noqa: E402
from pymemory.namm.training.warm_start import LOG_CEIL, LOG_FLOOR, capture_invocations  # noqa: E402

COEFFICIENTS = (0.9, 0.99, 0.998)  # the time scales of the attention-so-far features
FEATURES = tuple(f"log corrected EMA {c}" for c in COEFFICIENTS) + ("log rate since arrival", "log age")
RIDGE = 1e-3


class Signals:
    """One sample's full-cache attention and what a causal predictor may read from it at any query count `now`."""

    def __init__(self, received: np.ndarray):
        self.received = received  # [pairs, query, key]
        pairs, n, _ = received.shape
        self.before = np.zeros((pairs, n + 1, n), np.float32)  # [pairs, q + 1, key]: summed over queries < q
        self.before[:, 1:] = np.cumsum(received, axis=1)
        self.emas = {c: moving_averages(received, c) for c in COEFFICIENTS}  # [pairs, q + 1, key]

    @property
    def n_tokens(self) -> int:
        return self.received.shape[1]

    def features(self, now: int, cand: np.ndarray) -> np.ndarray:
        """[pairs, cand, F]: log shares (multiples of a uniform share over the `now` tokens so far), log age."""
        age = np.maximum(now - cand, 1).astype(np.float32)
        columns = []
        for c in COEFFICIENTS:
            average = self.emas[c][:, now, cand] / (1 - c ** age)[None, :]
            columns.append(average * now)
        columns.append(self.before[:, now, cand] / age[None, :] * now)
        out = [np.log(np.clip(x, LOG_FLOOR, LOG_CEIL)) for x in columns]
        out.append(np.broadcast_to(np.log(age)[None, :], out[0].shape))
        return np.stack(out, axis=-1).astype(np.float32)

    def target(self, now: int, cand: np.ndarray, horizon: int) -> np.ndarray:
        """[pairs, cand]: share of the attention of queries now .. now + horizon - 1, as a multiple of a uniform
        share (capped as the warm start's targets are)."""
        got = self.before[:, now + horizon, cand] - self.before[:, now, cand]
        return np.minimum(got / horizon * now, LOG_CEIL)

    def future(self, now: int, cand: np.ndarray, horizon: int | None) -> np.ndarray:
        """[cand]: the attention queries from `now` on give each candidate (all later ones, or the next `horizon`),
        summed over the pairs: hindsight."""
        end = self.n_tokens if horizon is None else min(now + horizon, self.n_tokens)
        return (self.before[:, end, cand] - self.before[:, now, cand]).sum(axis=0)


def expanded(x: np.ndarray) -> np.ndarray:
    """[..., F] -> [..., F + F(F+1)/2 + 1]: the features, their pairwise products and squares, and a constant."""
    f = x.shape[-1]
    products = [x[..., i] * x[..., j] for i in range(f) for j in range(i, f)]
    return np.concatenate([x, np.stack(products, axis=-1), np.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def fit_poisson(x: np.ndarray, y: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Weights [F'] of log E[y | x] = x @ w (Poisson regression, log link, small ridge on standardised columns; the
    last column is the constant), by damped Newton steps. The mean, not the geometric mean that least squares on
    log y gives: summed over the pairs, the predictions must add up as the attention does."""
    scale = np.maximum(x.std(axis=0), 1e-6)
    scale[-1] = 1.0
    xs = (x / scale).astype(np.float64)
    y = y.astype(np.float64)
    w = np.zeros(xs.shape[1])
    w[-1] = np.log(max(y.mean(), 1e-9))

    def loss(w):
        eta = np.clip(xs @ w, -30, 30)
        return float(np.mean(np.exp(eta) - y * eta) + 0.5 * RIDGE * w[:-1] @ w[:-1])

    current = loss(w)
    for _ in range(iterations):
        mu = np.exp(np.clip(xs @ w, -30, 30))
        ridge = RIDGE * np.eye(len(w))
        ridge[-1, -1] = 0.0
        gradient = xs.T @ (mu - y) / len(xs) + ridge @ w
        hessian = (xs * mu[:, None]).T @ xs / len(xs) + ridge + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        rate = 1.0
        while rate > 1e-4 and loss(w - rate * step) > current:
            rate /= 2
        if rate <= 1e-4:
            break
        w = w - rate * step
        previous, current = current, loss(w)
        if previous - current < 1e-7:
            break
    return w / scale


def fit_examples(signals: Signals, delay: int, n_sink: int, horizon: int, rng: np.random.Generator,
                 per_time: int) -> tuple[np.ndarray, np.ndarray]:
    """Features [pairs, m, F] and targets [pairs, m] at every invocation with `horizon` queries after it and
    `per_time` non-sink tokens before it, on `per_time` of those drawn at random (the capture kept everything)."""
    xs, ys = [], []
    first = max(2, -(-(per_time + n_sink + 1) // delay)) * delay  # the first invocation with per_time candidates
    for now in range(first, signals.n_tokens - horizon + 1, delay):
        cand = rng.choice(np.arange(n_sink, now - 1), size=per_time, replace=False)
        xs.append(signals.features(now, cand))
        ys.append(signals.target(now, cand, horizon))
    return np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)


TOKEN_FEATURES = ("z-max over pairs of log EMA 0.998", "mean of the 3 highest z over pairs of log EMA 0.998",
                  "z-max over pairs of log EMA 0.9", "log predicted future share summed over pairs (shared)",
                  "log EMA 0.99 share summed over pairs", "log age")


def standardised(values: np.ndarray) -> np.ndarray:
    """[pairs, cand]: each pair's values standardised over the candidates."""
    return (values - values.mean(axis=1, keepdims=True)) / np.maximum(values.std(axis=1, keepdims=True), 1e-9)


def token_features(x: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """[pairs, cand, F] (one invocation's candidates) -> [cand, T]: per-token aggregates over the pairs, each
    standardisation over these candidates, as budget_zmax standardises over the cache."""
    z998, z9 = standardised(x[..., 2]), standardised(x[..., 0])
    return np.stack([z998.max(axis=0), np.sort(z998, axis=0)[-3:].mean(axis=0), z9.max(axis=0),
                     np.logaddexp.reduce(expanded(x) @ shared, axis=0), np.logaddexp.reduce(x[..., 1], axis=0),
                     x[0, :, 4]], axis=-1)


def fit_token_ranker(x: np.ndarray, y: np.ndarray, shared: np.ndarray, per_time: int, keep: float) -> np.ndarray:
    """Logistic regression of "among the `keep` share of its invocation's candidates that the next queries attend
    to most (summed over the pairs)" on the token features and their products: weights [T'] (the decision a budget
    rule makes, not the whole ranking, which recency dominates)."""
    features, labels = [], []
    for start in range(0, x.shape[1], per_time):
        features.append(token_features(x[:, start:start + per_time], shared))
        total = y[:, start:start + per_time].sum(axis=0)
        labels.append(total >= np.quantile(total, 1.0 - keep))
    design = expanded(np.concatenate(features)).astype(np.float64)
    label = np.concatenate(labels).astype(np.float64)
    scale = np.maximum(design.std(axis=0), 1e-6)
    scale[-1] = 1.0
    design = design / scale
    w = np.zeros(design.shape[1])
    for _ in range(50):  # Newton steps on the mean log loss plus a small ridge
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -30, 30)))
        gradient = design.T @ (p - label) / len(design) + RIDGE * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(design) + RIDGE * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return w / scale


def summed_rank_correlation(log_prediction: np.ndarray, y: np.ndarray, per_time: int) -> float:
    """Median over invocations of Spearman's correlation between the predicted and the real attention summed over
    the pairs ([pairs, m] each, m = invocations x per_time, in fit_examples' order)."""
    predicted = np.exp(log_prediction).sum(axis=0).reshape(-1, per_time)
    real = y.sum(axis=0).reshape(-1, per_time)
    out = [np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1] for a, b in zip(predicted, real)]
    return float(np.median(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namm", default="smollm2-rate", help="a shipped NAMM name: its JSON gives the model and split")
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    p.add_argument("--fit-text", type=int, default=8, help="training-split text samples the predictors are fit on")
    p.add_argument("--text", type=int, default=16, help="held-out text samples")
    p.add_argument("--sample-tokens", type=int, default=1024)
    p.add_argument("--test-seed", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--horizon", type=int, default=256, help="queries whose attention a prediction targets")
    p.add_argument("--per-time", type=int, default=96, help="tokens per invocation in the fit")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        _, config, model_path, model, samples, test_seed = shipped_test_set(
            resolve_namm(args.namm), args.text, 0, args.sample_tokens, args.test_seed)
    except InvalidArgumentError as e:
        p.error(str(e))
    delay, n_sink = config.namm_delay, config.n_sink
    if args.horizon % delay or not 0 < args.horizon < config.sample_tokens - 2 * delay:
        p.error(f"--horizon must be a multiple of {delay} below {config.sample_tokens - 2 * delay}")

    corpus = Corpus(model, config.text_sources(), config.sample_tokens)
    factory = SampleFactory(corpus, config.sample_tokens, config.scored_tokens, config.capacity)
    fit_samples = generation_samples(factory, config.seed, 10 ** 6, args.fit_text, 0, ())
    print(f"capturing attention of {len(fit_samples)} training-split samples", flush=True)
    rng = np.random.default_rng(0)
    fit_x, fit_y = [], []
    for per_layer, sample in zip(capture_invocations(model, fit_samples, delay, args.threads), fit_samples):
        x, y = fit_examples(Signals(attention_received(per_layer, sample.n_tokens)), delay, n_sink, args.horizon,
                            rng, args.per_time)
        fit_x.append(x)
        fit_y.append(y)
    x, y = np.concatenate(fit_x, axis=1), np.concatenate(fit_y, axis=1)  # [pairs, m, F], [pairs, m]
    shared = fit_poisson(expanded(x).reshape(-1, len(FEATURES) * (len(FEATURES) + 3) // 2 + 1), y.reshape(-1))
    linear = np.concatenate([x, np.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)  # [pairs, m, F + 1]
    per_pair = np.stack([fit_poisson(linear[i], y[i]) for i in range(x.shape[0])])  # [pairs, F + 1]
    keep = (config.sample_tokens * args.fraction - delay) / (0.75 * config.sample_tokens)  # of a mean cache
    ranker = fit_token_ranker(x, y, shared, args.per_time, keep)
    fit_quality = {"shared": summed_rank_correlation(expanded(x) @ shared, y, args.per_time),
                   "per pair": summed_rank_correlation(np.einsum("pmf,pf->pm", linear, per_pair), y, args.per_time)}
    print("fit rank correlation of the sums " + ", ".join(f"{k} {v:.3f}" for k, v in fit_quality.items()), flush=True)

    print(f"capturing attention of {len(samples)} held-out samples", flush=True)
    captures = capture_invocations(model, samples, delay, args.threads)
    del model
    harness = LlamaHarness(model_path, config.sample_tokens + 64, args.threads)
    rows: dict[str, dict[str, dict]] = {}
    record = partial(record_result, rows)
    capacity = int(round(config.sample_tokens * args.fraction))
    test_quality: dict[str, list[float]] = {"shared": [], "per pair": []}
    for sample, per_layer in zip(samples, captures):
        tokens, n_prompt = list(sample.prompt) + list(sample.target), len(sample.prompt)
        signals = Signals(attention_received(per_layer, sample.n_tokens))
        tx, ty = fit_examples(signals, delay, n_sink, args.horizon, np.random.default_rng(1), args.per_time)
        test_quality["shared"].append(summed_rank_correlation(expanded(tx) @ shared, ty, args.per_time))
        test_quality["per pair"].append(summed_rank_correlation(
            np.einsum("pmf,pf->pm", np.concatenate([tx, np.ones(tx.shape[:-1] + (1,), tx.dtype)], -1), per_pair), ty,
            args.per_time))

        def predicted_sum(weights_of, now: int, cand: np.ndarray) -> np.ndarray:
            if now >= signals.n_tokens:
                return cand
            return np.logaddexp.reduce(weights_of(signals.features(now, cand)), axis=0)  # [cand]

        def ranked(now: int, cand: np.ndarray) -> np.ndarray:
            if now >= signals.n_tokens:
                return cand
            return expanded(token_features(signals.features(now, cand), shared)) @ ranker

        def causal_zmax(now: int, cand: np.ndarray) -> np.ndarray:
            return cand if now >= signals.n_tokens else ema_scores(signals.emas[0.998], 0.998, now, cand, True, 1)

        def hindsight(horizon, now: int, cand: np.ndarray) -> np.ndarray:
            return cand if now >= signals.n_tokens else signals.future(now, cand, horizon)

        rules = {
            "z-max of pairs: EMA 0.998 bias-corrected (the NAMM's rule)": causal_zmax,
            "predicted future share, one predictor for every pair, log-sum-exp over pairs":
                partial(predicted_sum, lambda f: expanded(f) @ shared),
            "predicted future share, a linear predictor per pair, log-sum-exp over pairs":
                partial(predicted_sum, lambda f: np.einsum(
                    "pmf,pf->pm", np.concatenate([f, np.ones(f.shape[:-1] + (1,), f.dtype)], -1), per_pair)),
            "token-level classifier of the hindsight keep set: z-max, z-top-3, predicted sum, age": ranked,
            f"hindsight: sum over pairs of the next {args.horizon} queries' attention": partial(hindsight,
                                                                                                args.horizon),
            "hindsight: sum over pairs of all future attention": partial(hindsight, None)}
        record("full", "full cache", sample, *run_sample(harness, tokens, n_prompt, 10 ** 9, delay, n_sink, None))
        record(f"{capacity}", "sink", sample,
               *run_sample(harness, tokens, n_prompt, capacity, delay, n_sink, lambda now, cand: cand))
        for name, rule in rules.items():
            record(f"{capacity}", name, sample, *run_sample(harness, tokens, n_prompt, capacity, delay, n_sink, rule))
        print(f"  {sample.id}: " + ", ".join(f"{k[:40]} {v['nll'][sample.id]:.3f}" for t, e in rows.items()
                                             for k, v in e.items()), flush=True)

    text_ids = [s.id for s in samples]
    report = {**tool_metadata(sys.argv[0], sys.argv[1:]),
              "model": config.model, "namm": args.namm, "sample_tokens": config.sample_tokens, "delay": delay,
              "n_sink": n_sink, "n_text": len(text_ids), "n_retrieval": 0, "test_seed": test_seed,
              "fit_samples": len(fit_samples), "horizon": args.horizon, "features": list(FEATURES),
              "token_features": list(TOKEN_FEATURES), "token_ranker_weights": ranker.tolist(),
              "fit_rank_correlation": fit_quality, "test_rank_correlation_median": {k: float(np.median(v)) for k, v in test_quality.items()},
              "shared_weights": shared.tolist(), "per_pair_weights": per_pair.tolist(),
              "tables": summarise(rows, text_ids, [], "full cache", config.sample_tokens), "nll_per_sample": rows}
    write_report_files(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"# Predicted future attention, summed over the pairs ({report['model']})", "",
             f"`{report['command']}` — commit {report['commit']}, {report['date']}, {report['machine']}", "",
             f"Predictors of each (layer, KV head) pair's log share of the next {report['horizon']} queries' "
             f"attention, fitted by Poisson regression on {report['fit_samples']} training-split texts from "
             f"{', '.join(report['features'])} (tools/namm_future_probe.py), then used on "
             f"{report['n_text']} held-out texts of {report['sample_tokens']} tokens (seed {report['test_seed']}): "
             f"every {report['delay']} tokens the cache is cut to capacity - {report['delay']} cells (peak = "
             f"capacity), keeping the first {report['n_sink']} and the newest token, through llama.cpp with the "
             "attention captured once with the full cache. Rank correlation of predicted and real future attention "
             "summed over the pairs (median over invocations): fit " +
             ", ".join(f"{k} {v:.3f}" for k, v in report["fit_rank_correlation"].items()) + "; held-out median " +
             ", ".join(f"{k} {v:.3f}" for k, v in report["test_rank_correlation_median"].items()) + ".", ""]
    return "\n".join(lines + table_lines(report)) + "\n"


if __name__ == "__main__":
    sys.exit(main())
