#!/usr/bin/env python3
"""Why no eviction policy keeps the pass key, and what the warm start's target changes (JSON + markdown).

    .venv/bin/python tools/namm_retrieval_probe.py --out docs/results/namm_retrieval_probe

1. **Signals.** Passkey samples (training split) stream through the all-zero NAMM with nothing evicted, the
   engine capturing every layer. At every invocation after the needle and before the question, the needle's digit
   tokens are ranked among the cached tokens older than one interval (sinks excluded) by each signal a
   query-agnostic policy has: attention received so far summed over the model (h2o's score), the shipped NAMM's mean
   score, the spectrogram's DC term (recent attention), and the best single (layer, KV head). A rank of 0.5 means
   the needle looks like any haystack token; keeping 25 % of a 512-token sample needs about the top 20 %.
2. **Targets.** The imitation warm start fitted to two hindsight targets on the same captured samples: future
   attention for every sample (`future`), or, for retrieval samples, the attention of the question's queries
   (`question`, what the trainer now uses), each evaluated on held-out text and passkey samples at 25 % and 50 %
   of the sample length beside the full cache, sink, h2o and tova.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))

from eval_trained_namm import (add_fit_test_arguments, capture_for_fits, fit_summary, paired_table,  # noqa: E402
                               side_by_side)

from pymemory._loader import _core  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
from pymemory.assets import resolve_model  # noqa: E402
from pymemory.namm.reference import NammReference  # noqa: E402
from pymemory.namm.training.data import Corpus, SampleFactory, heldout_samples  # noqa: E402
from pymemory.namm.training.evaluator import Job, MemorySpec, make_executor  # noqa: E402
from pymemory.namm.training.warm_start import capture_invocations, examples_from, fit_imitation  # noqa: E402

SAMPLE_TOKENS, SCORED, DELAY, N_SINK = 512, 256, 32, 4


def needle_positions(model, factory, sample) -> tuple[np.ndarray, np.ndarray]:
    """(all needle positions, its digit positions) of a passkey sample."""
    key = sample.id.split(":passkey:")[1].split("@")[0]
    depth = int(sample.id.split("@")[1].split(":")[0])
    needle = factory.passkey_needle(key)
    start = len(factory.corpus.bos) + depth
    if list(sample.prompt[start:start + len(needle)]) != needle:
        raise RuntimeError(f"needle not found where {sample.id} says")
    digits = [i for i, t in enumerate(needle) if model.detokenize([t], False).decode(errors="replace").strip().isdigit()]
    return np.arange(start, start + len(needle)), start + np.asarray(digits)


def signals(model, factory, namm: NammReference, n_samples: int, seed: int) -> dict:
    n_layer = int(model.info["n_layer"])
    rng = random.Random(f"probe/{seed}")
    ranks: dict[str, list[float]] = {"h2o (attention so far, all layers)": [], "shipped NAMM mean score": [],
                                     "spectrogram DC (recent attention)": []}
    per_head: dict[tuple[int, int], list[float]] = {}
    question_share = []
    for s in range(n_samples):
        sample = factory.passkey("train", rng, f"probe{s}")
        whole, digits = needle_positions(model, factory, sample)
        question_start = len(sample.prompt) - sample.question
        invocations = capture_invocations(model, [sample], DELAY)[0]  # [layer][invocation]
        received = [None] * n_layer  # per layer [H, n]: attention received so far (nothing is evicted)
        asked, rows = 0.0, 0
        for k in range(len(invocations[0])):
            positions = invocations[0][k]["positions"]
            old = (np.arange(positions.size) >= N_SINK) & (positions < positions[-1] - DELAY)
            is_digit = np.isin(positions, digits) & old
            judged = positions[-1] >= whole[-1] + 2 * DELAY and positions[-1] < question_start
            totals = {name: np.zeros(positions.size) for name in ranks}
            for layer in range(n_layer):
                inv = invocations[layer][k]
                got = inv["attention"].sum(axis=1)  # [H, n]
                if received[layer] is not None:
                    got[:, :received[layer].shape[1]] += received[layer]
                received[layer] = got
                R = inv["attention"].shape[1]
                asking = positions[-R:] >= question_start
                if asking.any():  # where the question's attention goes (sinks excluded)
                    a = inv["attention"][:, asking, :].sum(axis=(0, 1))
                    asked += float(a[np.isin(positions, whole)].sum()) / max(float(a[N_SINK:].sum()), 1e-12)
                    rows += 1
                if not judged:
                    continue
                X = namm.features_from_ema(np.tile(positions, (inv["ema"].shape[0], 1)), inv["ema"])
                totals["h2o (attention so far, all layers)"] += got.sum(axis=0)
                totals["shipped NAMM mean score"] += namm.scores_from_features(X).mean(axis=0)
                totals["spectrogram DC (recent attention)"] += inv["ema"][:, :, 0].mean(axis=0)
                for h in range(got.shape[0]):
                    per_head.setdefault((layer, h), []).append(_rank(got[h], old, is_digit))
            if judged:
                for name, score in totals.items():
                    ranks[name].append(_rank(score, old, is_digit))
        question_share.append(asked / max(rows, 1))
    best = sorted(per_head.items(), key=lambda kv: -np.mean(kv[1]))[:3]
    return {"samples": n_samples, "invocations_judged": len(next(iter(ranks.values()))),
            "digit_rank": {name: float(np.mean(v)) for name, v in ranks.items()},
            "best_heads": [{"layer": l, "kv_head": h, "digit_rank": float(np.mean(v)), "lowest": float(np.min(v))}
                           for (l, h), v in best],
            "question_attention_on_needle": float(np.mean(question_share))}


def _rank(score: np.ndarray, old: np.ndarray, is_digit: np.ndarray) -> float:
    """Mean over the needle's digits of the share of older tokens that score below it (1 = top)."""
    return float((score[old][None, :] < score[is_digit][:, None]).mean())


def targets(args, model, factory) -> dict:
    train, captured, mean, var = capture_for_fits(model, factory, args, ["passkey"], DELAY)  # one capture, both fits
    fits, thetas = {}, {}
    for name, samples in (("question", train), ("future", [dataclasses.replace(s, question=0) for s in train])):
        examples = examples_from(samples, captured, DELAY, 256, N_SINK)
        theta, report = fit_imitation(examples, mean, var, steps=600, seed=args.seed)
        thetas[name] = tuple(map(float, theta))
        fits[name] = fit_summary(name, report)
    test = heldout_samples(factory, args.seed + 1, args.test_text, args.test_retrieval, ["passkey"])
    executor = make_executor(args.workers, "", 1)
    try:
        full_spec = MemorySpec(args.model, SAMPLE_TOKENS, SAMPLE_TOKENS, N_SINK, DELAY, "budget", 1.0,
                               SAMPLE_TOKENS - DELAY, tuple(map(float, mean)), tuple(map(float, var)), 1)
        tables = side_by_side(executor, full_spec, test,
                              {f"warm start, {n} target": Job("namm", test[0], thetas[n]) for n in thetas})
    finally:
        executor.close()
    return {"fits": fits, "test_text": args.test_text, "test_retrieval": args.test_retrieval, "tables": tables}


def markdown(report: dict) -> str:
    s = report["signals"]
    lines = ["# Can a query-agnostic policy find the pass key? (" + report["model"] + ")", "",
             f"`{report['command']}` — commit {report['commit']}, {report['date']}, {report['machine']}", "",
             f"## Signals: the needle's digits ranked among older cached tokens ({s['samples']} passkey samples, "
             f"{s['invocations_judged']} invocations between the needle and the question; 1 = top, 0.5 = like any "
             "haystack token)", "", "| signal | mean rank of the digits |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in s["digit_rank"].items()]
    lines += [f"| best single head: layer {h['layer']}, KV head {h['kv_head']} (attention so far) | {h['digit_rank']:.3f} "
              f"(lowest {h['lowest']:.3f}) |" for h in s["best_heads"]]
    lines += ["", f"Share of the question's attention (sinks excluded) on the needle's tokens: "
              f"{s['question_attention_on_needle']:.3f}.", "",
              f"## Warm-start targets (held out: {report['targets']['test_text']} texts, "
              f"{report['targets']['test_retrieval']} passkeys)", "",
              "| fit | examples | variance explained | median Spearman |", "|---|---|---|---|"]
    lines += [f"| {n} | {f['examples']} | {f['explained']:.3f} | {f['rank_correlation_median']:.3f} |"
              for n, f in report["targets"]["fits"].items()]
    lines += [""] + paired_table(report["targets"]["tables"], report["sample_tokens"])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fit_test_arguments(parser, fit_text=10, fit_retrieval=6, test_text=6, test_retrieval=12)
    parser.add_argument("--namm", default="smollm2", help="shipped NAMM whose scores are ranked")
    parser.add_argument("--probe-samples", type=int, default=8)
    args = parser.parse_args()
    _core.set_log_verbosity(0)
    from pymemory.namm.packaged import resolve_namm

    report = {**tool_metadata(sys.argv[0], sys.argv[1:]),
              "model": args.model, "sample_tokens": SAMPLE_TOKENS, "namm_delay": DELAY}
    model = _core.Model.load(os.fspath(resolve_model(args.model)))
    corpus = Corpus(model, ["austen"], SAMPLE_TOKENS)
    factory = SampleFactory(corpus, SAMPLE_TOKENS, SCORED, SAMPLE_TOKENS // 4)
    namm = NammReference.from_gguf(resolve_namm(args.namm))
    report["signals"] = signals(model, factory, namm, args.probe_samples, args.seed)
    print(json.dumps(report["signals"]), flush=True)
    report["targets"] = targets(args, model, factory)
    write_report_files(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
