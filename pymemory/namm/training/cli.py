"""`pymemory train-namm`: evolve a NAMM for a GGUF model (docs/namm-training.md)."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

from .config import COVARIANCES, DATA_SOURCES, MODES, WARM_STARTS, TrainConfig

_HELP = {
    "model": "GGUF file or asset name (default smollm2-135m-instruct)",
    "out_dir": "run directory (created; an existing run there with the same settings is resumed)",
    "data": f"training data, repeatable or comma-separated: {', '.join(DATA_SOURCES)} (default austen,passkey,kv)",
    "sample_tokens": "tokens per sample",
    "scored_tokens": "text samples: last tokens scored (retrieval samples score the answer)",
    "cache_fraction": "peak cells as a fraction of sample_tokens",
    "n_sink": "first tokens always kept",
    "namm_delay": "tokens between NAMM invocations (multiple of 16)",
    "ema_coefficient": "per-token coefficient of the NAMM's spectrogram moving average (released: 0.99)",
    "ema_bias_correction": "divide that moving average by its weight so far (1 - c^queries), a recency-weighted "
                           "rate over each token's life instead of an average that starts at zero",
    "mode": f"shared-cell rule: {', '.join(MODES)}",
    "quorum": "quorum mode: fraction of (layer, head) pairs that must drop a token",
    "key_weight": "budget modes: standard deviations of each token's key distinctiveness added to the NAMM's "
                  "ranked score while training and deployed (docs/namm.md, 'Keys'; 0 = attention alone)",
    "warm_start": f"where evolution starts: {', '.join(WARM_STARTS)}, or a NAMM GGUF (a path or a shipped name) "
                  "to continue from, weights and normalisation as they are (imitation: θ fitted to predict future "
                  "attention, docs/namm-training.md)",
    "warm_start_samples": "imitation: training samples captured for the fit",
    "warm_start_horizon": "imitation: tokens of future queries a token's target counts",
    "warm_start_steps": "imitation: Adam steps",
    "warm_start_target": "imitation: per_head (each layer and KV head its own attention), pooled (the mean "
                         "score over all of them predicts the whole model's attention, as budget mode ranks) or max "
                         "(the highest score over them predicts the highest pair's attention, as budget_max ranks) or past_rate "
                         "(each pair's score imitates the attention per query the token has received from it since "
                         "it arrived; for budget_zmax with --ema-bias-correction)",
    "population": "CMA-ES population (the original: 32)",
    "sigma0": "initial step size (the original: 0.065)",
    "covariance": f"CMA-ES covariance: {', '.join(COVARIANCES)} (docs/namm-training.md says why diagonal)",
    "generations": "generations to reach (a resumed run continues up to this)",
    "text_samples": "text samples per generation",
    "retrieval_samples": "retrieval samples per generation",
    "heldout_every": "generations between held-out evaluations of the CMA mean",
    "heldout_text": "held-out text samples",
    "heldout_retrieval": "held-out retrieval samples",
    "calibration_samples": "text samples for the feature normalisation statistics",
    "fixed_samples": "score every generation on the same samples (generation 0's) instead of fresh ones",
    "seed": "random seed (samples and CMA-ES)",
    "workers": "local worker processes (0 = in this process)",
    "threads": "CPU threads per worker (0 = cores / workers)",
    "dask": "Dask: local:N for a local cluster of N processes, or a scheduler address tcp://host:8786",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--out" if f.name == "out_dir" else "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "data":
            parser.add_argument(flag, action="append", default=None, help=_HELP[f.name])
            continue
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=_HELP[f.name])
            continue
        parser.add_argument(flag, dest=f.name, type=type(default), default=default,
                            help=f"{_HELP[f.name]} (default {default})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.data:
        values["data"] = [d.strip() for item in args.data for d in item.split(",") if d.strip()]
    else:
        values["data"] = TrainConfig().data
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from . import train_namm

    summary = train_namm(config_from_args(args), progress=not args.quiet)
    print(json.dumps(summary, indent=1, default=float))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-namm", help="train a NAMM for a GGUF model (CMA-ES through the engine)",
        description="Evolve the NAMM's 4,172 parameters with CMA-ES (pycma), scoring every candidate through "
        "pymemory's engine at a fixed memory against the full cache, on long text and synthetic retrieval. "
        "Writes ckpt.pt, namm.gguf, log.json and curve.png into --out; rerun the same command to resume.")
    add_arguments(parser)
    parser.set_defaults(func=run)
