#!/usr/bin/env python3
"""Which hindsight target should the imitation warm start fit, under which shared-cell rule? Side by side (JSON + md).

    .venv/bin/python tools/namm_warm_targets.py --out docs/results/namm_warm_targets

Budget mode evicts the tokens with the lowest *mean* NAMM score over every (layer, KV head). The `per_head` fit
teaches each head's score to predict that head's future attention; the `pooled` fit teaches the mean score to
predict the attention the token receives from the whole model, the ranking the hindsight oracle found worth most.
Both are fitted on the same captured training-split samples (the trainer's warm-start recipe: horizon 256, the
question's attention for retrieval samples, 600 Adam steps), then tested on held-out samples (seed + 1) at 25 %
and 50 % of the sample length beside the full cache, sink, h2o, tova and the shipped NAMM, with paired
differences to sink and their 95 % bootstrap intervals. Each fit is also written as a NAMM GGUF next to the report.

`--modes budget,budget_max,budget_zmax` deploys every fit under each shared-cell rule (namm_policy.h): budget ranks
tokens by keep votes then the mean score over the pairs, budget_max by the highest score any pair gives them, so a
signal that lives in a few heads (a pass key's) is not outvoted, and budget_zmax by the highest score standardised
within its pair (a pair whose scores all run high does not outrank the rest). The `max` fit (budget_max only) fits the highest score over
the pairs to the highest pair's own future attention.

`--ema-coefficients 0.99,0.998` repeats the capture and every fit with NAMMs whose spectrogram moving average has
that per-token coefficient (the released 0.99 remembers about 100 queries; 0.998 about 500), so the features can
carry the attention a token drew when it arrived (a pass key's, results.md "One head's signal"). A "c" after a
coefficient (`0.998c`) gives those NAMMs a bias-corrected average (`ema_bias_correction`: divided by the weight
1 - c^queries its queries carry, so a new token's average is not near zero), results.md "A rate, not a sum".
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))

from eval_trained_namm import (add_fit_test_arguments, capture_for_fits, fit_summary, paired_table,  # noqa: E402
                               side_by_side)

from pymemory._loader import _core  # noqa: E402
from pymemory.assets import resolve_model  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
from pymemory.namm.checkpoint import NammVector  # noqa: E402
from pymemory.namm.gguf_format import DEPLOY_MODES, MAX_MODES, RELEASED  # noqa: E402
from pymemory.namm.packaged import resolve_namm  # noqa: E402
from pymemory.namm.training.data import Corpus, SampleFactory, heldout_samples  # noqa: E402
from pymemory.namm.training.evaluator import Job, MemorySpec, make_executor, write_template  # noqa: E402
from pymemory.namm.training.warm_start import TARGETS, examples_from, fit_imitation  # noqa: E402

SAMPLE_TOKENS, SCORED, DELAY, N_SINK, HORIZON = 512, 256, 32, 4, 256
BUDGET_MODES = tuple(m for m in DEPLOY_MODES if m != "quorum")
RETRIEVAL = ["passkey", "kv"]


def fit_targets(args, model, factory, ema: float, corrected: bool, label: str) -> tuple[dict, dict, tuple]:
    """(fit reports, θ per target, feature statistics) from one capture of the fit samples with EMA coefficient
    `ema` (bias-corrected when `corrected`); names are the target plus `label`."""
    train, captured, mean, var = capture_for_fits(model, factory, args, RETRIEVAL, DELAY, ema, corrected)
    hparams = replace(RELEASED, delay=DELAY, ema_coefficient=ema, ema_bias_correction=corrected)
    fits, thetas = {}, {}
    for target in args.targets.split(","):
        examples = examples_from(train, captured, DELAY, HORIZON, N_SINK, target)
        thetas[target], report = fit_imitation(examples, mean, var, steps=args.steps, seed=args.seed,
                                               hparams=hparams)
        fits[target + label] = fit_summary(target + label, report)
    return fits, thetas, (mean, var)


def ema_coefficients(text: str) -> list[tuple[float, bool]]:
    """(coefficient, bias-corrected) per comma-separated item: 0.998, or 0.998c for the corrected average."""
    try:
        values = [(float(v.rstrip("c")), v.endswith("c")) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or any(not 0.0 < v < 1.0 for v, _ in values):
        raise ValueError(f"--ema-coefficients takes comma-separated values in (0, 1), each optionally followed by c "
                         f"(bias-corrected) (got {text!r})")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fit_test_arguments(parser, fit_text=12, fit_retrieval=6, test_text=16, test_retrieval=8)
    parser.add_argument("--namm", default="smollm2", help="shipped NAMM run beside the fits ('' for none)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--targets", default="per_head,pooled", help=f"comma-separated fits: {', '.join(TARGETS)}")
    parser.add_argument("--ema-coefficients", default="0.99", help="comma-separated per-token coefficients of the "
                        "NAMMs' spectrogram moving average (the released NAMM: 0.99); every fit is repeated for each")
    parser.add_argument("--modes", default="budget", help="comma-separated shared-cell rules each fit is deployed "
                        "with: budget, budget_max")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in BUDGET_MODES for m in modes):
        parser.error(f"--modes takes a comma-separated subset of {', '.join(BUDGET_MODES)} (got {args.modes!r})")
    if not args.targets or any(t not in TARGETS for t in args.targets.split(",")):
        parser.error(f"--targets takes a comma-separated subset of {', '.join(TARGETS)} (got {args.targets!r})")
    if "max" in args.targets.split(",") and not set(MAX_MODES) & set(modes):
        parser.error("--targets max fits what budget_max ranks by: add budget_max or budget_zmax to --modes")
    try:
        emas = ema_coefficients(args.ema_coefficients)
    except ValueError as exc:
        parser.error(str(exc))
    _core.set_log_verbosity(0)
    report = {**tool_metadata(sys.argv[0], sys.argv[1:]), "model": args.model, "sample_tokens": SAMPLE_TOKENS,
              "namm_delay": DELAY, "horizon": HORIZON, "test_text": args.test_text,
              "test_retrieval": args.test_retrieval, "modes": modes,
              "ema_coefficients": [f"{v:g}" + "c" * c for v, c in emas]}
    model = _core.Model.load(os.fspath(resolve_model(args.model)))
    corpus = Corpus(model, ["austen"], SAMPLE_TOKENS)
    factory = SampleFactory(corpus, SAMPLE_TOKENS, SCORED, SAMPLE_TOKENS // 4)
    report["fits"], files = {}, {}
    for ema, corrected in emas:
        label = "" if len(emas) == 1 and not corrected else f", EMA {ema:g}" + (" corrected" if corrected else "")
        fits, thetas, (mean, var) = fit_targets(args, model, factory, ema, corrected, label)
        report["fits"].update(fits)
        full_spec = MemorySpec(args.model, SAMPLE_TOKENS, SAMPLE_TOKENS, N_SINK, DELAY, "budget", 1.0,
                               SAMPLE_TOKENS - DELAY, tuple(map(float, mean)), tuple(map(float, var)), 1, ema,
                               corrected)
        for target, theta in thetas.items():
            vector = NammVector(theta.astype("float32"), mean, var, f"namm_warm_targets {args.model} {target}{label}")
            for mode in modes:
                if target == "max" and mode not in MAX_MODES:
                    continue  # fitted to the highest score over the pairs: meaningless ranked by the mean
                name = (target if mode == "budget" else f"{target}, {mode}") + label
                suffix = (f"_{target}" if mode == "budget" else f"_{target}_{mode}") + ("" if not label else f"_ema{ema:g}" + "c" * corrected)
                files[name] = write_template(vector, f"{args.out}{suffix}.gguf", replace(full_spec, mode=mode))
    test = heldout_samples(factory, args.seed + 1, args.test_text, args.test_retrieval, RETRIEVAL)
    del model
    executor = make_executor(args.workers, "", 1)
    try:
        extra = {}
        if args.namm:
            extra[f"shipped NAMM ({args.namm})"] = Job("namm_file", test[0], namm_file=resolve_namm(args.namm))
        extra.update({f"warm start, {t}": Job("namm_file", test[0], namm_file=f) for t, f in files.items()})
        tables = side_by_side(executor, full_spec, test, extra)
    finally:
        executor.close()
    report["tables"] = tables
    write_report_files(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"# The warm start's target and its shared-cell rule ({report['model']})", "",
             f"`{report['command']}` — commit {report['commit']}, {report['date']}, {report['machine']}", "",
             "| fit | examples | variance explained | median Spearman | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {f['examples']} | {f['explained']:.3f} | {f['rank_correlation_median']:.3f} | "
              f"{f['seconds']:.0f} |" for n, f in report["fits"].items()]
    lines += ["", f"Held-out test: {report['test_text']} texts and {report['test_retrieval']} retrievals (passkey, "
              f"key-value lines) of {report['sample_tokens']} tokens, seed 1; the NAMMs run every "
              f"{report['namm_delay']} tokens, the fits in the mode their name gives (budget if none), the shipped NAMM in budget mode. 'vs sink' = "
              "mean per-sample NLL difference (nats, negative = better) with its 95 % "
              "paired bootstrap interval.", ""]
    lines += paired_table(report["tables"], report["sample_tokens"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
