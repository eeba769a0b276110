"""Scoring samples through pymemory's engine, in this process, in worker processes, or on a Dask cluster.

A job is (what memory, which sample): a NAMM candidate θ, the full cache (the reference), or a baseline policy
(sink, h2o) at the same peak cells. Workers keep one model and one engine per memory kind and reuse them for every
job: a candidate's parameters go into the engine's NAMM in memory (`Engine.set_namm_parameters`), never to a file
per candidate. Each worker writes its own f32 template NAMM GGUF once (the normalisation statistics and schedule,
zero weights), so remote workers need no shared file system, only the model (a path or an asset name they can
fetch).
"""
from __future__ import annotations

import atexit

import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable, Sequence

import numpy as np

from .data import Sample


@dataclass(frozen=True)
class MemorySpec:
    """Everything a worker needs to build its engines (picklable, small)."""

    model: str
    capacity: int  # peak cells of every bounded policy
    sample_tokens: int
    n_sink: int
    namm_delay: int
    mode: str
    quorum: float
    max_cells: int
    feat_mean: tuple[float, ...]
    feat_var: tuple[float, ...]
    threads: int = 0
    ema_coefficient: float = 0.99  # the NAMM's spectrogram moving average, per token (the released value)
    ema_bias_correction: bool = False  # whether the NAMM reads that average divided by its weight so far
    key_weight: float = 0.0  # budget modes: key distinctiveness (standard deviations) added to the ranked score

    @classmethod
    def from_config(cls, config, feat_mean, feat_var, threads: int = 0, capacity: int | None = None,
                    model: str | None = None) -> "MemorySpec":
        """The spec of a training run's settings (a TrainConfig) and statistics; `capacity` and `model` override
        the run's (evaluations at other budgets, zero-shot on another model). Budget modes keep capacity - delay."""
        capacity = config.capacity if capacity is None else capacity
        return cls(model or config.model, capacity, config.sample_tokens, config.n_sink, config.namm_delay,
                   config.mode, config.quorum, capacity - config.namm_delay, tuple(map(float, feat_mean)),
                   tuple(map(float, feat_var)), threads, config.ema_coefficient, config.ema_bias_correction,
                   config.key_weight)


@dataclass(frozen=True)
class Job:
    memory: str  # "namm" | "namm_file" | "full" | "sink" | "h2o" | "tova"
    sample: Sample
    theta: tuple[float, ...] | None = None  # namm only; None = all zeros
    tag: int = 0  # the caller's index (candidate number), returned as is
    namm_file: str = ""  # namm_file only: a NAMM GGUF used as is (any weight type, its own settings)
    namm_layers: int = 0  # namm and namm_file: attention layers scored (0 = all; the engine's namm_layers)
    # namm_file only: tokens between invocations; None = the spec's (the run's trained interval), 0 = the file's own
    # default (its deployed interval when it records one, else the trained one)
    namm_delay: int | None = None
    # Target tokens decoded per batch while scoring; None = the spec's namm_delay (the engine splits batches further
    # at a NAMM's invocations). Sink-style policies evict at least a batch's worth before it, so larger batches
    # leave them a smaller cache on average (docs/results.md, "Scored 16 tokens at a time").
    score_chunk: int | None = None
    namm_defer_evictions: bool = True  # namm and namm_file: the engine's setting (False: evict at each invocation)
    # namm and namm_file: compact positions after every eviction (the engine's reindex); None = the engine's default
    # (absolute positions, compacted only before the model's training context)
    reindex: bool | None = None
    # namm and namm_file: the engine's namm_merge_threshold (values of given-up tokens merged into kept ones); None = off
    merge_threshold: float | None = None


@dataclass(frozen=True)
class JobResult:
    tag: int
    sample_id: str
    nll: float  # mean NLL (nats) of the sample's target tokens
    seconds: float
    peak_cells: int
    policy_seconds: float  # time inside the memory policy (attention tap + decisions)
    forced_evictions: int


class _Worker:
    """One model and its engines, kept for the life of the process."""

    def __init__(self, spec: MemorySpec):
        from ..._loader import _core
        from ...assets import resolve_model
        from ..checkpoint import NammVector

        self.spec = spec
        _core.set_log_verbosity(0)
        self._core = _core
        self.model = _core.Model.load(os.fspath(resolve_model(spec.model)))
        self.engines: dict[str, object] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="namm-worker-")
        zero = NammVector(np.zeros(4172, np.float32), np.asarray(spec.feat_mean, np.float32),
                          np.asarray(spec.feat_var, np.float32), "pymemory train-namm template")
        self.template = write_template(zero, os.path.join(self._tmp.name, "template.gguf"), spec)

    def engine(self, memory: str, namm_file: str = "", namm_layers: int = 0, namm_delay: int | None = None,
               namm_defer_evictions: bool = True, reindex: bool | None = None, merge_threshold: float | None = None):
        key = f"{memory}:{namm_file}:{namm_layers}:{namm_delay}:{namm_defer_evictions}:{reindex}:{merge_threshold}"
        if key not in self.engines:
            s = self.spec
            common = dict(n_threads=s.threads)
            if memory in ("namm", "namm_file"):
                common["namm_defer_evictions"] = namm_defer_evictions
                if reindex is not None:
                    common["reindex"] = reindex
                if merge_threshold is not None:
                    common["namm_merge_threshold"] = merge_threshold
            if memory == "namm_file":
                kwargs = dict(policy="namm", n_sink=s.n_sink, window=s.capacity - s.n_sink, namm_path=namm_file,
                              namm_delay=s.namm_delay if namm_delay is None else namm_delay, namm_layers=namm_layers)
            elif memory == "full":
                kwargs = dict(policy="none", n_sink=0, window=s.sample_tokens + 16)
            elif memory == "namm":
                kwargs = dict(policy="namm", n_sink=s.n_sink, window=s.capacity - s.n_sink, namm_path=self.template,
                              namm_mode=s.mode, quorum=s.quorum, max_cells=s.max_cells, namm_delay=s.namm_delay,
                              namm_layers=namm_layers)
            elif memory in ("sink", "h2o", "tova"):
                kwargs = dict(policy=memory, n_sink=s.n_sink, window=s.capacity - s.n_sink)
            else:
                raise ValueError(f"unknown memory {memory!r}")
            self.engines[key] = self._core.Engine(self.model, **kwargs, **common)
        return self.engines[key]

    def run(self, job: Job) -> JobResult:
        engine = self.engine(job.memory, job.namm_file, job.namm_layers, job.namm_delay, job.namm_defer_evictions,
                             job.reindex, job.merge_threshold)
        if job.memory == "namm":
            theta = np.zeros(4172, np.float32) if job.theta is None else np.asarray(job.theta, np.float32)
            engine.set_namm_parameters(namm_tensors(theta, self.spec))
        start = time.perf_counter()
        engine.reset()
        policy_before = _policy_counters(engine)
        engine.feed(list(job.sample.prompt))
        # Scored in chunks (the invocation period unless the job says): each chunk sees the cache the policy left.
        nll = engine.score(list(job.sample.target), job.score_chunk or self.spec.namm_delay)
        seconds = time.perf_counter() - start
        policy_after = _policy_counters(engine)
        return JobResult(job.tag, job.sample.id, float(np.mean(nll)), seconds, int(engine.stats()["peak_cells"]),
                         policy_after[0] - policy_before[0], policy_after[1])


def _policy_counters(engine) -> tuple[float, int]:
    """(seconds spent in the policy so far, forced evictions since the last reset)."""
    p = engine.policy_stats()
    return float(p.get("observe_seconds", 0.0)) + float(p.get("decide_seconds", 0.0)), int(p.get("forced_evictions", 0))


def namm_tensors(theta: np.ndarray, spec: MemorySpec) -> dict[str, np.ndarray]:
    from ..checkpoint import NammVector
    from ..convert import ggml_tensors

    return ggml_tensors(NammVector(np.asarray(theta, np.float32), np.asarray(spec.feat_mean, np.float32),
                                   np.asarray(spec.feat_var, np.float32)))


def deploy_settings(spec: MemorySpec) -> dict:
    """How a NAMM trained under `spec` is to run (checkpoint.SETTINGS_KEY): recorded in the run's ckpt.pt and GGUF."""
    settings = {"namm_delay": spec.namm_delay, "ema_coefficient": spec.ema_coefficient,
                "ema_bias_correction": spec.ema_bias_correction, "mode": spec.mode, "quorum": spec.quorum}
    if spec.key_weight:
        settings["deploy_key_weight"] = spec.key_weight
    return settings


def write_template(vector, path: str, spec: MemorySpec, weight_type: str = "f32") -> str:
    """A NAMM GGUF carrying the run's schedule, features and deployment settings (delay, EMA coefficient, mode,
    quorum, key weight), the ones a run's ckpt.pt records (write_gguf takes them from the vector): the engines
    of candidates read their key weight from it."""
    from dataclasses import replace

    from ..convert import write_gguf

    return write_gguf(replace(vector, settings=deploy_settings(spec)), path, weight_type)["output"]


_WORKERS: dict[MemorySpec, _Worker] = {}
# Release the process's model and engines while the interpreter is whole, not in whatever order its shutdown would
# tear modules down.
atexit.register(_WORKERS.clear)


def run_job(spec: MemorySpec, job: Job) -> JobResult:
    """Entry point in any process (local, pool worker, Dask worker): reuses that process's worker."""
    worker = _WORKERS.get(spec)
    if worker is None:
        _WORKERS.clear()  # one model per process: a new spec replaces the old engines
        worker = _WORKERS[spec] = _Worker(spec)
    return worker.run(job)


# ---- executors: run a list of jobs, results in order ------------------------------------------------------------

class Executor:
    description = ""

    def map(self, spec: MemorySpec, jobs: Sequence[Job], on_done: Callable[[], None] | None = None) -> list[JobResult]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _gather(futures, on_done) -> list[JobResult]:
    """Results of concurrent.futures or Dask futures, in submission order."""
    out = []
    for future in futures:
        out.append(future.result())
        if on_done:
            on_done()
    return out


class InProcessExecutor(Executor):
    description = "in process"

    def map(self, spec, jobs, on_done=None):
        out = []
        for job in jobs:
            out.append(run_job(spec, job))
            if on_done:
                on_done()
        return out


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: a run killed with SIGKILL or SIGTERM gives its workers no chance to be shut down, and a
    worker blocked on the task queue would otherwise stay (holding a loaded model) forever."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class ProcessPool(Executor):
    """Local worker processes (spawned: a forked llama.cpp thread pool is not safe); they exit with their parent."""

    def __init__(self, workers: int):
        self.description = f"{workers} local worker processes"
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                        initializer=_exit_with_parent, initargs=(os.getpid(),))

    def map(self, spec, jobs, on_done=None):
        return _gather([self.pool.submit(run_job, spec, job) for job in jobs], on_done)

    def close(self):
        self.pool.shutdown(cancel_futures=True)


class DaskExecutor(Executor):
    """A Dask distributed cluster: `local:N` starts a LocalCluster of N processes, anything else is a scheduler
    address (workers started with `dask worker tcp://host:8786` on machines that have pymemory)."""

    def __init__(self, address: str, threads: int):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:
            raise ImportError('distributed training needs Dask: pip install "pymemory[distributed]"') from exc
        self.cluster = None
        if address.startswith("local:"):
            n = int(address.split(":", 1)[1])
            self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
            self.client = Client(self.cluster)
        else:
            self.client = Client(address)
        self.description = f"Dask cluster {self.client.scheduler.address}"

    def map(self, spec, jobs, on_done=None):
        return _gather([self.client.submit(run_job, spec, job, pure=False) for job in jobs], on_done)

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(workers: int, dask: str, threads: int) -> Executor:
    if dask:
        return DaskExecutor(dask, threads)
    if workers >= 1:
        return ProcessPool(workers)
    return InProcessExecutor()
