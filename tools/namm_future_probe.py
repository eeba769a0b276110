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
  - a token-level classifier of the hindsight keep set on per-token aggregates (z-max, z-top-3, predicted sum);
  - simulated future queries, read from the model rather than from attention so far: the last `--window`
    queries' contents (before RoPE) placed at `--offsets` positions over the next `--horizon`, attending to the
    cells cached then (kvpress's expected attention assumes the same: the next queries resemble the last ones,
    and RoPE alone moves them), and the same queries at their own positions (no move), summed over the pairs;
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
from value_capture import ValueCapture, rope_settings, rotate  # noqa: E402
from namm_oracle_bound import (LlamaHarness, add_probe_arguments, attention_received, harness_header,  # noqa: E402
                               probe_test_set, record_result, run_sample, summarise, table_lines)
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
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
        """[pairs, cand]: share of the attention of queries now .. now + horizon - 1 (fewer at the sample's end), per
        query, as a multiple of a uniform share (capped as the warm start's targets are)."""
        queries = min(horizon, self.n_tokens - now)
        got = self.before[:, now + queries, cand] - self.before[:, now, cand]
        return np.minimum(got / queries * now, LOG_CEIL)

    def future(self, now: int, cand: np.ndarray, horizon: int | None) -> np.ndarray:
        """[cand]: the attention queries from `now` on give each candidate (all later ones, or the next `horizon`),
        summed over the pairs: hindsight."""
        end = self.n_tokens if horizon is None else min(now + horizon, self.n_tokens)
        return (self.before[:, end, cand] - self.before[:, now, cand]).sum(axis=0)


def with_constant(x: np.ndarray) -> np.ndarray:
    """[..., F] -> [..., F + 1]: a constant column last (the fits' intercept)."""
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def per_pair_predicted(x: np.ndarray, per_pair: np.ndarray) -> np.ndarray:
    """[pairs, m, F] with weights [pairs, F + 1] -> [pairs, m]: each pair's own linear predictor."""
    return np.einsum("pmf,pf->pm", with_constant(x), per_pair)


def expanded(x: np.ndarray) -> np.ndarray:
    """[..., F] -> [..., F + F(F+1)/2 + 1]: the features, their pairwise products and squares, and a constant."""
    f = x.shape[-1]
    products = [x[..., i] * x[..., j] for i in range(f) for j in range(i, f)]
    return with_constant(np.concatenate([x, np.stack(products, axis=-1)], axis=-1))


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
                 per_time: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [pairs, m, F], targets [pairs, m] and the invocation of each block of `per_time` [m / per_time], at
    every invocation with `per_time` non-sink tokens before it and at least `delay` queries after it (the last
    ones, as the evictions a rule makes, see fewer than `horizon`), on `per_time` of those tokens drawn at random
    (the capture kept everything)."""
    xs, ys, nows = [], [], []
    first = max(2, -(-(per_time + n_sink + 1) // delay)) * delay  # the first invocation with per_time candidates
    for now in range(first, signals.n_tokens - delay + 1, delay):
        cand = rng.choice(np.arange(n_sink, now - 1), size=per_time, replace=False)
        xs.append(signals.features(now, cand))
        ys.append(signals.target(now, cand, horizon))
        nows.append(now)
    if not xs:
        raise ValueError(f"samples of {signals.n_tokens} tokens leave no invocation with {per_time} candidates and "
                         f"{delay} queries after it: use longer samples or a smaller --per-time")
    return np.concatenate(xs, axis=1), np.concatenate(ys, axis=1), np.array(nows)


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


def fit_token_ranker(x: np.ndarray, y: np.ndarray, shared: np.ndarray, per_time: int, nows: np.ndarray,
                     kept: int, n_sink: int) -> np.ndarray:
    """Logistic regression of "among the `kept` candidates the next queries attend to most (summed over the pairs)"
    on the token features and their products: weights [T'] (the decision a budget rule makes, not the whole
    ranking, which recency dominates). Block b's tokens are drawn from the nows[b] - n_sink - 1 candidates of an
    uncut cache, so the share labelled is kept / that; blocks where everything would be kept teach nothing."""
    features, labels = [], []
    for block, start in enumerate(range(0, x.shape[1], per_time)):
        keep = kept / (nows[block] - n_sink - 1)
        if keep >= 1.0:
            continue
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


RULES = {"zmax": "z-max of pairs: EMA 0.998 bias-corrected (the NAMM's rule)",
         "shared": "predicted future share, one predictor for every pair, log-sum-exp over pairs",
         "per-pair": "predicted future share, a linear predictor per pair, log-sum-exp over pairs",
         "classifier": "token-level classifier of the hindsight keep set: z-max, z-top-3, predicted sum, age",
         "simulated": "simulated future queries: the last {window} queries moved to {offsets} positions over the "
                      "next {horizon}, summed over pairs",
         "recent": "the last {window} queries at their own positions, summed over pairs",
         "hindsight-horizon": "hindsight: sum over pairs of the next {horizon} queries' attention",
         "hindsight": "hindsight: sum over pairs of all future attention"}
FITTED = ("shared", "per-pair", "classifier")


class FutureQueries:
    """One sample's queries before RoPE and keys after it (llama.cpp's own, captured with the full cache), to
    predict the attention of queries not yet seen: recent queries' contents at future positions, as kvpress's
    expected attention assumes (the next queries resemble the last ones; RoPE alone moves them)."""

    def __init__(self, capture: ValueCapture, tokens: list[int], n_pairs: int, rope: tuple[float, int]):
        queries = capture.projections(tokens, "Qcur-")
        keys = capture.projections(tokens, "Kcur-")
        self.base, self.rope_type = rope
        layers = capture.n_layer
        n_kv = n_pairs // layers
        d = keys[0].shape[-1]
        n_head = queries[0].shape[0] // layers
        check = rotate(queries[0], np.arange(len(tokens)), *rope)
        if not np.allclose(check, queries[-1], rtol=1e-3, atol=1e-3 * np.abs(queries[-1]).max()):
            raise RuntimeError("llama.cpp's queries after RoPE differ from this RoPE of its queries before it")
        # [layer, KV head, group, token, d]: query head g·group + j reads KV head g
        self.queries = queries[0].reshape(layers, n_kv, n_head // n_kv, len(tokens), d)
        # [layer, KV head, token, d], rounded as llama.cpp's default f16 cache stores them
        self.keys = keys[-1].reshape(layers, n_kv, len(tokens), d).astype(np.float16).astype(np.float32)
        self.scale = 1.0 / np.sqrt(d)

    def attention(self, sources: np.ndarray, at: np.ndarray, cached: np.ndarray) -> np.ndarray:
        """[pairs, len(cached)]: the attention the queries of positions `sources`, placed at positions `at` (same
        length), would give the `cached` positions, averaged over the queries and each KV head's group; a query
        reads only the cached positions up to its own (causal), normalised over those."""
        layers, n_kv, group, _, d = self.queries.shape
        q = rotate(self.queries[:, :, :, sources], at, self.base, self.rope_type)  # [L, KV, group, m, d]
        q = q.reshape(layers, n_kv, group * len(sources), d).astype(np.float16).astype(np.float32)  # as ggml's CPU
        # matrix product meets an f16 cache
        logits = q @ self.keys[:, :, cached].transpose(0, 1, 3, 2) * self.scale  # [L, KV, group·m, cached]
        later = np.tile(cached[None, :] > np.asarray(at)[:, None], (group, 1))  # [group·m, cached]: not yet seen
        logits[..., later] = -np.inf
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        return probs.mean(axis=2).reshape(layers * n_kv, len(cached))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(p, 8, 16, "the predictors are fit on")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {list(RULES)}; sink always runs")
    p.add_argument("--horizon", type=int, default=256, help="queries whose attention a prediction targets")
    p.add_argument("--per-time", type=int, default=96, help="tokens per invocation in the fit")
    p.add_argument("--window", type=int, default=32, help="recent queries the simulated future queries copy")
    p.add_argument("--offsets", type=int, default=8, help="future positions each simulated query is placed at")
    args = p.parse_args()
    chosen = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not chosen or set(chosen) - set(RULES):
        p.error(f"--rules: {sorted(set(chosen) - set(RULES)) or 'none'} not among {list(RULES)}")
    _, config, model_path, model, samples, test_seed = probe_test_set(p, args)
    delay, n_sink = config.namm_delay, config.n_sink
    if args.horizon % delay or not 0 < args.horizon < config.sample_tokens - 2 * delay:
        p.error(f"--horizon must be a multiple of {delay} below {config.sample_tokens - 2 * delay}")
    if not 0 < args.window <= delay or args.offsets < 1:
        p.error(f"--window must be in [1, {delay}] and --offsets at least 1")
    names = {k: v.format(window=args.window, offsets=args.offsets, horizon=args.horizon) for k, v in RULES.items()}

    fit_quality, test_quality, fitted = {}, {"shared": [], "per pair": []}, {}
    if set(chosen) & set(FITTED):
        corpus = Corpus(model, config.text_sources(), config.sample_tokens)
        factory = SampleFactory(corpus, config.sample_tokens, config.scored_tokens, config.capacity)
        fit_samples = generation_samples(factory, config.seed, 10 ** 6, args.fit_text, 0, ())
        print(f"capturing attention of {len(fit_samples)} training-split samples", flush=True)
        rng = np.random.default_rng(0)
        fit_x, fit_y, fit_nows = [], [], []
        for per_layer, sample in zip(capture_invocations(model, fit_samples, delay, args.threads), fit_samples):
            x, y, nows = fit_examples(Signals(attention_received(per_layer, sample.n_tokens)), delay, n_sink,
                                      args.horizon, rng, args.per_time)
            fit_x.append(x)
            fit_y.append(y)
            fit_nows.append(nows)
        x, y = np.concatenate(fit_x, axis=1), np.concatenate(fit_y, axis=1)  # [pairs, m, F], [pairs, m]
        shared = fit_poisson(expanded(x).reshape(-1, len(FEATURES) * (len(FEATURES) + 3) // 2 + 1), y.reshape(-1))
        linear = with_constant(x)  # [pairs, m, F + 1]
        per_pair = np.stack([fit_poisson(linear[i], y[i]) for i in range(x.shape[0])])  # [pairs, F + 1]
        kept = int(round(config.sample_tokens * args.fraction)) - delay - n_sink - 1  # candidates an invocation keeps
        ranker = fit_token_ranker(x, y, shared, args.per_time, np.concatenate(fit_nows), kept, n_sink)
        fitted = {"fit_samples": len(fit_samples), "shared_weights": shared.tolist(),
                  "per_pair_weights": per_pair.tolist(), "token_ranker_weights": ranker.tolist()}
        fit_quality = {"shared": summed_rank_correlation(expanded(x) @ shared, y, args.per_time),
                       "per pair": summed_rank_correlation(per_pair_predicted(x, per_pair), y,
                                                           args.per_time)}
        print("fit rank correlation of the sums " + ", ".join(f"{k} {v:.3f}" for k, v in fit_quality.items()),
              flush=True)

    print(f"capturing attention of {len(samples)} held-out samples", flush=True)
    captures = capture_invocations(model, samples, delay, args.threads)
    del model
    harness = LlamaHarness(model_path, config.sample_tokens + 64, args.threads)
    projections = ValueCapture(model_path, args.threads) if {"simulated", "recent"} & set(chosen) else None
    rope = rope_settings(projections) if projections else None
    rows: dict[str, dict[str, dict]] = {}
    record = partial(record_result, rows)
    capacity = int(round(config.sample_tokens * args.fraction))
    reconstruction = []
    for sample, per_layer in zip(samples, captures):
        tokens, n_prompt = list(sample.prompt) + list(sample.target), len(sample.prompt)
        signals = Signals(attention_received(per_layer, sample.n_tokens))
        future_queries = None
        if projections is not None:
            future_queries = FutureQueries(projections, tokens, signals.received.shape[0], rope)
            last = len(tokens) - 1  # llama.cpp's attention of the last query, recomputed here
            recomputed = future_queries.attention(np.array([last]), np.array([last]), np.arange(len(tokens)))
            reconstruction.append(float(np.abs(recomputed - signals.received[:, last]).max()))
        if fitted:
            tx, ty, _ = fit_examples(signals, delay, n_sink, args.horizon, np.random.default_rng(1), args.per_time)
            test_quality["shared"].append(summed_rank_correlation(expanded(tx) @ shared, ty, args.per_time))
            test_quality["per pair"].append(summed_rank_correlation(
                per_pair_predicted(tx, per_pair), ty, args.per_time))

        def causal(score):
            """A rule that reads only what precedes `now`; at the end of the sample nothing is left to score."""
            return lambda now, cand: cand if now >= signals.n_tokens else score(now, cand)

        def predicted_sum(weights_of, now: int, cand: np.ndarray) -> np.ndarray:
            return np.logaddexp.reduce(weights_of(signals.features(now, cand)), axis=0)  # [cand]

        def queried(future: bool, now: int, cand: np.ndarray) -> np.ndarray:
            cached = np.concatenate([np.arange(n_sink), cand, [now - 1]])
            sources = np.arange(now - args.window, now)
            if future:  # each recent query placed at `offsets` positions spread over the next `horizon`
                at = now - 1 + (np.arange(1, args.offsets + 1) * args.horizon) // args.offsets
                sources, at = np.tile(sources, len(at)), np.repeat(at, args.window)
            else:
                at = sources
            return future_queries.attention(sources, at, cached)[:, n_sink:n_sink + len(cand)].sum(axis=0)

        def hindsight(horizon, now: int, cand: np.ndarray) -> np.ndarray:
            return signals.future(now, cand, horizon)

        rules = {
            "zmax": lambda now, cand: ema_scores(signals.emas[0.998], 0.998, now, cand, True, 1),
            "shared": partial(predicted_sum, lambda f: expanded(f) @ shared) if fitted else None,
            "per-pair": partial(predicted_sum, lambda f: per_pair_predicted(f, per_pair))
            if fitted else None,
            "classifier": (lambda now, cand: expanded(token_features(signals.features(now, cand), shared)) @ ranker)
            if fitted else None,
            "simulated": partial(queried, True), "recent": partial(queried, False),
            "hindsight-horizon": partial(hindsight, args.horizon), "hindsight": partial(hindsight, None)}
        record("full", "full cache", sample, *run_sample(harness, tokens, n_prompt, 10 ** 9, delay, n_sink, None))
        record(f"{capacity}", "sink", sample,
               *run_sample(harness, tokens, n_prompt, capacity, delay, n_sink, lambda now, cand: cand))
        for key in chosen:
            record(f"{capacity}", names[key], sample,
                   *run_sample(harness, tokens, n_prompt, capacity, delay, n_sink, causal(rules[key])))
        print(f"  {sample.id}: " + ", ".join(f"{k[:40]} {v['nll'][sample.id]:.3f}" for t, e in rows.items()
                                             for k, v in e.items()), flush=True)

    text_ids = [s.id for s in samples]
    report = {**tool_metadata(sys.argv[0], sys.argv[1:]),
              "model": config.model, "namm": args.namm, "sample_tokens": config.sample_tokens, "delay": delay,
              "n_sink": n_sink, "n_text": len(text_ids), "n_retrieval": 0, "test_seed": test_seed,
              "horizon": args.horizon, "features": list(FEATURES), "token_features": list(TOKEN_FEATURES),
              **fitted, "fit_rank_correlation": fit_quality,
              "test_rank_correlation_median": {k: float(np.median(v)) for k, v in test_quality.items() if v},
              "attention_recomputed_max_error": max(reconstruction) if reconstruction else None,
              "tables": summarise(rows, text_ids, [], "full cache", config.sample_tokens), "nll_per_sample": rows}
    write_report_files(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = harness_header(report, "Predicted future attention, summed over the pairs",
                           "the attention (and queries and keys)", "tools/namm_future_probe.py")
    if "fit_samples" in report:
        lines.append(
            f"Fitted predictors: each (layer, KV head) pair's share of the next {report['horizon']} queries' "
            f"attention, by Poisson regression on {report['fit_samples']} training-split texts from "
            f"{', '.join(report['features'])}; rank correlation of predicted and real future attention summed over "
            "the pairs (median over invocations): fit " +
            ", ".join(f"{k} {v:.3f}" for k, v in report["fit_rank_correlation"].items()) + "; held-out " +
            ", ".join(f"{k} {v:.3f}" for k, v in report["test_rank_correlation_median"].items()) + ".")
    if report.get("attention_recomputed_max_error") is not None:
        lines.append("Simulated queries: llama.cpp's queries before RoPE, rotated to the positions named, against its "
                     "keys after RoPE, softmax over the cells cached then (largest difference between llama.cpp's "
                     "attention of a sample's last query and this recomputation: "
                     f"{report['attention_recomputed_max_error']:.1e}).")
    return "\n\n".join(lines) + "\n\n" + "\n".join(table_lines(report)) + "\n"


if __name__ == "__main__":
    sys.exit(main())
