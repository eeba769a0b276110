"""The training loop: CMA-ES (pycma) over the NAMM's 4,172 parameters, every candidate scored through pymemory's
engine on samples shared by the generation, relative to the full cache (docs/namm-training.md).

Resumable: after every generation the whole state (the pickled CMA-ES, the log, the statistics) is written
atomically to `state.pkl`; running the same command again continues from the last finished generation.
"""
from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import replace

import numpy as np

from ...errors import InvalidArgumentError
from ...evaluation.report import machine_summary
from .config import TrainConfig, prepare_out_dir
from .data import (CALIBRATION_SEED_OFFSET, WARM_START_SEED_OFFSET, Corpus, SampleFactory, generation_samples,
                   heldout_samples)
from .evaluator import Job, MemorySpec, make_executor
from .outputs import plot_curve, write_checkpoint, write_json

STATE_FILE = "state.pkl"
BASELINES = ("sink", "h2o")


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise InvalidArgumentError(f"train-namm needs the {module} package: pip install \"pymemory[{extra}]\"") \
            from exc


GAP_FLOOR = 0.01  # nats: a generation where sink loses less than this on a kind counts it as losing this much


def _gaps(results, references: dict[str, float]) -> dict[str, float]:
    """Mean NLL above the full cache (nats per scored token) per kind ('text', 'retrieval'), over samples."""
    by_kind: dict[str, list[float]] = {}
    for r in results:
        kind = "text" if ":text:" in r.sample_id else "retrieval"
        by_kind.setdefault(kind, []).append(r.nll - references[r.sample_id])
    return {k: float(np.mean(v)) for k, v in by_kind.items()}


def _loss(gaps: dict[str, float], sink_gaps: dict[str, float]) -> float:
    """The minimised fitness: per kind, the gap to the full cache as a fraction of sink's mean gap on the held-out
    set, averaged over kinds (on held-out data: 1 = as good as sink, 0 = as good as the full cache), so text and
    retrieval weigh the same although retrieval gaps are ~50x larger in nats. Fixed normalisers keep the loss a
    weighted sum of NLLs, which CMA-ES ranks exactly as the NLLs themselves."""
    return float(np.mean([gaps[k] / max(sink_gaps[k], GAP_FLOOR) for k in gaps]))


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True):
        self.config = config.validate()
        self.progress = progress
        self.cma = _require("cma", "train")
        _require("torch", "namm")
        _require("gguf", "namm")
        _require("matplotlib", "eval")
        self.out, self.resuming = prepare_out_dir(config)
        from ..._loader import _core
        from ...assets import resolve_model

        _core.set_log_verbosity(0)
        self.model = _core.Model.load(os.fspath(resolve_model(config.model)))
        corpus = Corpus(self.model, config.text_sources(), min_tokens=config.sample_tokens)
        self.factory = SampleFactory(corpus, config.sample_tokens, config.scored_tokens, config.capacity)
        self.retrieval_kinds = config.retrieval_sources()
        self.heldout = heldout_samples(self.factory, config.seed, config.heldout_text, config.heldout_retrieval,
                                       self.retrieval_kinds)
        threads = config.threads or max(1, (os.cpu_count() or 1) // max(1, config.workers))
        self.threads = threads
        self.state = self._load_state() if self.resuming else None

    # ---- state ----------------------------------------------------------------------------------------------

    def _load_state(self) -> dict | None:
        path = self.out / STATE_FILE
        if not path.exists():
            return None
        with open(path, "rb") as f:
            return pickle.load(f)

    def _save_state(self) -> None:
        path = self.out / STATE_FILE
        partial = path.with_name(STATE_FILE + ".partial")
        with open(partial, "wb") as f:
            pickle.dump(self.state, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, path)

    def _new_state(self) -> dict:
        from .calibration import feature_statistics

        c = self.config
        t0 = time.perf_counter()
        namm_file = c.warm_start_namm()
        if namm_file:  # the NAMM as it is: its weights read features normalised by its own statistics
            from ..checkpoint import load_gguf

            vector, _ = load_gguf(namm_file)
            mean, var = vector.feat_mean.astype(np.float32), vector.feat_var.astype(np.float32)
            rng_samples = []
        else:
            rng_samples = generation_samples(self.factory, c.seed + CALIBRATION_SEED_OFFSET, 0,
                                             c.calibration_samples, 0, [])
            mean, var = feature_statistics(self.model, rng_samples, c.namm_delay, self.threads, c.ema_coefficient,
                                           c.ema_bias_correction)
        options = {"popsize": c.population, "seed": c.seed + 1, "verbose": -9, "CMA_diagonal": c.covariance ==
                   "diagonal", "tolx": 0, "tolfun": 0, "tolflatfitness": 10 ** 9, "tolfunhist": 0,
                   "tolstagnation": 10 ** 9}
        t1 = time.perf_counter()
        if namm_file:
            start, warm = vector.theta.astype(np.float64), {"namm": namm_file, "source": vector.source}
        else:
            start, warm = self._warm_start(mean, var)
        es = self.cma.CMAEvolutionStrategy(start, c.sigma0, options)
        return {"es": es, "generation": 0, "feat_mean": mean, "feat_var": var, "warm_start": warm,
                "warm_start_theta": start if warm else None, "warm_start_seconds": time.perf_counter() - t1,
                "calibration_tokens": sum(s.n_tokens for s in rng_samples),
                "calibration_seconds": time.perf_counter() - t0, "records": [], "heldout": [],
                "heldout_refs": None, "heldout_baselines": None, "best_heldout": math.inf, "wall_seconds": 0.0}

    def _warm_start(self, feat_mean: np.ndarray, feat_var: np.ndarray) -> tuple[np.ndarray, dict | None]:
        """CMA-ES's initial mean: θ = 0, or the imitation fit on its own training samples (warm_start.py)."""
        c = self.config
        if c.warm_start == "none":
            return np.zeros(4172), None
        from .warm_start import capture_examples, fit_imitation

        n_retrieval = c.warm_start_samples // 3 if self.retrieval_kinds else 0
        samples = generation_samples(self.factory, c.seed + WARM_START_SEED_OFFSET, 0,
                                     c.warm_start_samples - n_retrieval, n_retrieval, self.retrieval_kinds)
        t0 = time.perf_counter()
        examples = capture_examples(self.model, samples, c.namm_delay, c.warm_start_horizon, c.n_sink, self.threads,
                                    c.warm_start_target, c.ema_coefficient)
        capture_seconds = time.perf_counter() - t0
        theta, report = fit_imitation(examples, feat_mean, feat_var, steps=c.warm_start_steps, seed=c.seed,
                                      hparams=c.namm_hparams())
        report.update(samples=[smp.id for smp in samples], capture_seconds=capture_seconds)
        return theta.astype(np.float64), report

    def spec(self) -> MemorySpec:
        c, s = self.config, self.state
        return MemorySpec.from_config(c, s["feat_mean"], s["feat_var"], self.threads)

    # ---- the run --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm import tqdm

        c = self.config
        if self.state is None:
            self.state = self._new_state()
            self._save_state()
        s = self.state
        spec = self.spec()
        executor = make_executor(c.workers, c.dask, self.threads)
        bar = tqdm(total=c.generations, initial=s["generation"], desc="train-namm", unit="gen",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            if s["heldout_refs"] is None:
                self._heldout_baselines(executor, spec)
                self._save_state()
            if s.get("warm_start_theta") is not None and not any(h["generation"] == 0 for h in s["heldout"]):
                self._record_start()
                self._save_state()
            while s["generation"] < c.generations:
                started = time.perf_counter()
                record = self._generation(executor, spec, s["generation"])
                g = s["generation"] = s["generation"] + 1
                if g % c.heldout_every == 0 or g == c.generations:
                    self._heldout_eval(executor, spec, g)
                record["seconds"] = time.perf_counter() - started
                s["records"].append(record)
                s["wall_seconds"] += record["seconds"]
                self._save_state()
                self._write_log()
                bar.set_postfix(best=f"{record['best_loss']:.3f}", cma_mean=f"{record['cma_mean_loss']:.3f}",
                                heldout=f"{s['heldout'][-1]['loss']:.3f}" if s["heldout"] else "-")
                bar.update(1)
        finally:
            bar.close()
            executor.close()
        self._write_log()
        return self.summary()

    def _generation(self, executor, spec: MemorySpec, generation: int) -> dict:
        c, es = self.config, self.state["es"]
        samples = generation_samples(self.factory, c.seed, 0 if c.fixed_samples else generation, c.text_samples,
                                     c.retrieval_samples, self.retrieval_kinds)
        t0 = time.perf_counter()
        refs = executor.map(spec, [Job("full", smp) for smp in samples])
        references = {r.sample_id: r.nll for r in refs}
        sink_gaps = self.normalisers()
        t1 = time.perf_counter()
        candidates = es.ask()
        members = [tuple(map(float, x)) for x in candidates] + [tuple(map(float, es.mean))]
        jobs = [Job("namm", smp, theta, tag=i) for i, theta in enumerate(members) for smp in samples]
        t2 = time.perf_counter()
        results = executor.map(spec, jobs)
        t3 = time.perf_counter()
        per_member = [[r for r in results if r.tag == i] for i in range(len(members))]
        gaps = [_gaps(rs, references) for rs in per_member]
        all_losses = [_loss(g, sink_gaps) for g in gaps]
        losses = all_losses[:-1]
        es.tell(candidates, losses)
        t4 = time.perf_counter()
        best = int(np.argmin(losses))
        return {
            "generation": generation + 1,
            "samples": [smp.id for smp in samples],
            "best_loss": losses[best], "mean_loss": float(np.mean(losses)), "median_loss": float(np.median(losses)),
            "cma_mean_loss": all_losses[-1], "cma_mean_text_gap": gaps[-1].get("text"),
            "cma_mean_retrieval_gap": gaps[-1].get("retrieval"),
            "best_text_gap": gaps[best].get("text"), "best_retrieval_gap": gaps[best].get("retrieval"),
            "sigma": float(es.sigma),
            "peak_cells": max(r.peak_cells for r in results),
            "forced_evictions": sum(r.forced_evictions for r in results),
            "time": {"reference_s": t1 - t0, "candidates_s": t3 - t2, "cma_s": (t2 - t1) + (t4 - t3),
                     "job_s": sum(r.seconds for r in results), "policy_s": sum(r.policy_seconds for r in results),
                     "reference_job_s": sum(r.seconds for r in refs)},
        }

    def normalisers(self) -> dict[str, float]:
        """Sink's mean held-out gap per kind (at least GAP_FLOOR): the loss's fixed per-kind scale."""
        return {k: max(v, GAP_FLOOR) for k, v in self.state["heldout_baselines"]["sink"].items() if k != "loss"}

    def _heldout_baselines(self, executor, spec: MemorySpec) -> None:
        s, c = self.state, self.config
        refs = executor.map(spec, [Job("full", smp) for smp in self.heldout])
        s["heldout_refs"] = {r.sample_id: r.nll for r in refs}
        baselines = {}
        for name in BASELINES:
            baselines[name] = _gaps(executor.map(spec, [Job(name, smp) for smp in self.heldout]), s["heldout_refs"])
        rng = np.random.default_rng(c.seed + 77)
        random_theta = tuple(map(float, rng.normal(0.0, c.sigma0, 4172)))
        baselines["random namm"] = _gaps(executor.map(spec, [Job("namm", smp, random_theta) for smp in self.heldout]),
                                         s["heldout_refs"])
        baselines["zero namm"] = _gaps(executor.map(spec, [Job("namm", smp) for smp in self.heldout]),
                                       s["heldout_refs"])
        if s.get("warm_start_theta") is not None:
            warm = tuple(map(float, s["warm_start_theta"]))
            baselines["warm start"] = _gaps(executor.map(spec, [Job("namm", smp, warm) for smp in self.heldout]),
                                            s["heldout_refs"])
        sink = dict(baselines["sink"])
        for gaps in baselines.values():
            gaps["loss"] = _loss({k: v for k, v in gaps.items() if k != "loss"}, sink)
        s["heldout_full_nll"] = float(np.mean(list(s["heldout_refs"].values())))
        s["heldout_baselines"] = baselines

    def _record_start(self) -> None:
        """The warm start is generation 0 of the held-out curve, and the run's model until evolution beats it on
        held-out data: a run never ships something worse than where it started."""
        s = self.state
        gaps = s["heldout_baselines"]["warm start"]
        entry = {"generation": 0, "loss": gaps["loss"], "text_gap": gaps.get("text"),
                 "retrieval_gap": gaps.get("retrieval")}
        s["heldout"].insert(0, entry)
        if entry["loss"] < s["best_heldout"]:
            s["best_heldout"] = entry["loss"]
            s["best_generation"] = 0
            self._write_model(s["es"], 0, entry["loss"], theta=s["warm_start_theta"])

    def _heldout_eval(self, executor, spec: MemorySpec, generation: int) -> None:
        s, es = self.state, self.state["es"]
        theta = tuple(map(float, es.mean))
        gaps = _gaps(executor.map(spec, [Job("namm", smp, theta) for smp in self.heldout]), s["heldout_refs"])
        loss = _loss(gaps, self.normalisers())
        entry = {"generation": generation, "loss": loss, "text_gap": gaps.get("text"),
                 "retrieval_gap": gaps.get("retrieval")}
        s["heldout"].append(entry)
        if loss < s["best_heldout"]:
            s["best_heldout"] = loss
            s["best_generation"] = generation
            self._write_model(es, generation, loss)

    def _write_model(self, es, generation: int, heldout_gap: float, theta: np.ndarray | None = None) -> None:
        """ckpt.pt (the run's best held-out CMA mean, as the original keeps its best-eval checkpoint) and its GGUF."""
        from ..checkpoint import load_checkpoint
        from ..convert import write_gguf
        from .evaluator import deploy_settings

        s = self.state
        ckpt = self.out / "ckpt.pt"
        write_checkpoint(ckpt, es, s["feat_mean"], s["feat_var"], generation, heldout_gap, s["calibration_tokens"],
                         mean=theta, settings=deploy_settings(self.spec()))
        # The converter's own reading of what we wrote, run settings included: namm.gguf is what convert-namm makes.
        vector = load_checkpoint(ckpt, trust_pickle=True)
        write_gguf(replace(vector, source=f"pymemory train-namm {self.config.model} generation {generation}"),
                   self.out / "namm.gguf")

    def _write_log(self) -> None:
        s, c = self.state, self.config
        records = s["records"]
        times = [r["time"] for r in records]
        log = {
            "config": c.to_dict(),
            "machine": machine_summary(),  # held-out scores reproduce exactly on this CPU family only
            "capacity": c.capacity, "max_cells": c.max_cells,
            "generation": s["generation"],
            "feature_mean": [float(v) for v in s["feat_mean"]], "feature_var": [float(v) for v in s["feat_var"]],
            "calibration_seconds": s["calibration_seconds"],
            "warm_start": s.get("warm_start"),
            "heldout_samples": [smp.id for smp in self.heldout],
            "heldout_full_nll": s.get("heldout_full_nll"),
            "heldout_baselines": s["heldout_baselines"],
            "heldout": s["heldout"],
            "best_heldout_loss": s["best_heldout"] if math.isfinite(s["best_heldout"]) else None,
            "best_generation": s.get("best_generation"),
            "wall_seconds": s["wall_seconds"],
            "seconds_per_generation_median": float(np.median([r["seconds"] for r in records])) if records else None,
            "time_split_median": {k: float(np.median([t[k] for t in times])) for k in times[0]} if times else {},
            "records": records,
        }
        write_json(self.out / "log.json", log)
        baselines = {k: v["loss"] for k, v in (s["heldout_baselines"] or {}).items() if k in ("sink", "h2o")}
        plot_curve(self.out / "curve.png", records, s["heldout"], baselines,
                   f"{os.path.basename(c.model)}: cache {c.capacity} of {c.sample_tokens} tokens, {c.mode}, "
                   f"delay {c.namm_delay}, population {c.population}")

    def summary(self) -> dict:
        s = self.state
        return {"out_dir": os.fspath(self.out), "generation": s["generation"],
                "best_heldout_loss": s["best_heldout"], "best_generation": s.get("best_generation"),
                "heldout_baselines": s["heldout_baselines"], "heldout": s["heldout"][-1] if s["heldout"] else None}


def train_namm(config: TrainConfig, progress: bool = True) -> dict:
    """Runs (or resumes) a training run; returns its summary. Files: docs/namm-training.md, "Outputs"."""
    return Trainer(config, progress).run()
