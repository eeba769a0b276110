#!/usr/bin/env python3
"""Does a shipped NAMM keep its trainer's held-out score in every weight type? (JSON + markdown)

    .venv/bin/python tools/namm_quant_check.py --namm qwen2.5 --out docs/results/namm_quant_qwen

The shipped GGUF (f32) is read back and written again as f16, q8_0 and q4_0 (pymemory's converter, the same
path `convert-namm --type` takes from a checkpoint). Each runs through the engine on the trainer's own held-out
set (the shipped JSON's training config: held-out split, training seed, its held-out sample counts) and is scored
with the trainer's loss (gap to the full cache as a share of sink's, with the normalisers the run logged), so
the f32 row must reproduce the logged loss of the shipped generation, and every other row says what its weight
type costs.

`--noise-draws N` adds N f32 files whose two weight matrices carry random noise of q8_0's size (each weight moved
uniformly within ±d/2, d its q8_0 block's scale, as rounding to nearest moves it): how far the loss moves under
perturbations as large as q8_0's, i.e. whether a q8_0 row's difference is quantisation or the sensitivity of
eviction decisions to any change of that size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))

from pymemory._loader import _core  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
from pymemory.assets import resolve_model  # noqa: E402
from pymemory.namm.checkpoint import load_gguf  # noqa: E402
from pymemory.namm.gguf_format import PARAM_LAYOUT  # noqa: E402
from pymemory.namm.packaged import resolve_namm  # noqa: E402
from pymemory.namm.training.config import TrainConfig  # noqa: E402
from pymemory.namm.training.data import Corpus, SampleFactory, heldout_samples  # noqa: E402
from pymemory.namm.training.evaluator import Job, MemorySpec, make_executor, write_template  # noqa: E402
from pymemory.namm.training.trainer import _gaps, _loss  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namm", required=True, help="a shipped NAMM's name (its JSON holds the run's config and log)")
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    p.add_argument("--quants", default="f16,q8_0,q4_0")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--noise-draws", type=int, default=0, help="f32 files with q8_0-sized random noise (see above)")
    args = p.parse_args()
    if args.noise_draws < 0:
        p.error("--noise-draws must be >= 0")

    namm_file = resolve_namm(args.namm)
    shipped = json.loads(Path(namm_file).with_suffix(".json").read_text())
    config = TrainConfig.from_dict(shipped["config"])
    vector, _ = load_gguf(namm_file)
    _core.set_log_verbosity(0)
    model = _core.Model.load(os.fspath(resolve_model(config.model)))
    corpus = Corpus(model, config.text_sources(), config.sample_tokens)
    factory = SampleFactory(corpus, config.sample_tokens, config.scored_tokens, config.capacity)
    samples = heldout_samples(factory, config.seed, config.heldout_text, config.heldout_retrieval,
                              config.retrieval_sources())
    del model
    spec = MemorySpec.from_config(config, vector.feat_mean, vector.feat_var, 1)
    normalisers = {k: max(v, 0.01) for k, v in shipped["heldout_baselines"]["sink"].items() if k != "loss"}
    logged = next(h["loss"] for h in shipped["heldout"] if h["generation"] == shipped["generation"])

    tmp = tempfile.mkdtemp(prefix="namm-quant-")
    files = {"f32 (shipped file)": namm_file}
    for q in (q for q in args.quants.split(",") if q):
        files[q] = write_template(replace(vector, source=f"{vector.source} ({q})"), os.path.join(tmp, f"{q}.gguf"),
                                  spec, q)
    rng = np.random.default_rng(0)
    for k in range(args.noise_draws):
        noisy = replace(vector, theta=q8_0_sized_noise(vector.theta, rng), source=f"{vector.source} (noise {k + 1})")
        files[f"f32 + q8_0-sized noise, draw {k + 1}"] = write_template(noisy, os.path.join(tmp, f"noise{k}.gguf"),
                                                                       spec, "f32")
    executor = make_executor(args.workers, "", 1)
    rows, baselines = {}, {}
    try:
        refs = {r.sample_id: r.nll for r in executor.map(spec, [Job("full", s) for s in samples])}
        # The baselines again on this machine: llama.cpp is built for the CPU it runs on, so logits (and the
        # decisions they drive) shift between CPU families at one commit; sink's row shows that shift alone.
        for name in ("sink", "h2o"):
            gaps = _gaps(executor.map(spec, [Job(name, s) for s in samples]), refs)
            baselines[name] = {"loss": _loss(gaps, normalisers), "gaps": gaps,
                               "logged_loss": shipped["heldout_baselines"][name]["loss"]}
            print(f"  {name}: loss {baselines[name]['loss']:.4f}", flush=True)
        for name, path in files.items():
            results = executor.map(spec, [Job("namm_file", s, namm_file=path) for s in samples])
            gaps = _gaps(results, refs)
            rows[name] = {"loss": _loss(gaps, normalisers), "gaps": gaps, "file_bytes": os.path.getsize(path),
                          "nll_per_sample": {r.sample_id: r.nll for r in results},
                          "forced_evictions": sum(r.forced_evictions for r in results)}
            print(f"  {name}: loss {rows[name]['loss']:.4f}", flush=True)
    finally:
        executor.close()
    f32 = rows["f32 (shipped file)"]["loss"]
    for row in rows.values():
        row["vs_f32"] = row["loss"] / f32 - 1
    report = {**tool_metadata(sys.argv[0], sys.argv[1:]),
              "namm": args.namm, "model": config.model, "generation": shipped["generation"], "logged_loss": logged,
              "n_samples": len(samples), "rows": rows,
              "baselines": baselines}
    write_report_files(args.out, report, markdown(report))
    return 0


def q8_0_sized_noise(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """θ with W_qkv and W_o moved uniformly within ±d/2 per weight, d = the weight's q8_0 block scale (max |w| / 127
    over the block; a block is one output's 32 inputs in the GGUF's layout, i.e. one column of θ's [in, out])."""
    out = np.array(theta, np.float32)
    for name in ("W_qkv", "W_o"):
        start, end, shape = PARAM_LAYOUT[name]
        w = out[start:end].reshape(shape)  # [in, out]
        d = np.abs(w).max(axis=0, keepdims=True) / 127.0  # [1, out]
        out[start:end] = (w + rng.uniform(-0.5, 0.5, w.shape) * d).reshape(-1)
    return out


def markdown(report: dict) -> str:
    lines = [f"# NAMM `{report['namm']}` in every weight type ({report['model']})", "",
             f"`{report['command']}` — commit {report['commit']}, {report['date']}, {report['machine']}", "",
             f"The trainer's held-out set ({report['n_samples']} samples) scored with the trainer's loss (1 = sink, "
             f"0 = full cache). The run logged {report['logged_loss']:.4f} for generation {report['generation']}, "
             "the shipped one.", "",
             "| weights | file bytes | loss | vs f32 | text gap (nats) | retrieval gap (nats) | forced evictions |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        gaps = row["gaps"]
        lines.append(f"| {name} | {row['file_bytes']} | {row['loss']:.4f} | {row['vs_f32']:+.2%} | "
                     f"{gaps.get('text', float('nan')):.4f} | {gaps.get('retrieval', float('nan')):.4f} | "
                     f"{row['forced_evictions']} |")
    noise = [row["vs_f32"] for name, row in report["rows"].items() if "noise" in name]
    if noise:
        lines += ["", f"Noise draws ({len(noise)}): loss vs f32 from {min(noise):+.2%} to {max(noise):+.2%}, mean "
                  f"|difference| {np.mean(np.abs(noise)):.2%}, standard deviation {np.std(noise, ddof=1) if len(noise) > 1 else 0:.2%}."]
    if report.get("baselines"):
        lines += ["", "The logged scores came from the machine the run trained on; the baselines again here "
                  f"({report['machine']}):", "", "| policy | loss here | logged |", "|---|---|---|"]
        lines += [f"| {name} | {b['loss']:.4f} | {b['logged_loss']:.4f} |" for name, b in report["baselines"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
