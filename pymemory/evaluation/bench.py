"""Throughput and memory of the memory policies, side by side in one run.

The machines this runs on are noisy and shared, so every comparison interleaves its configurations in rounds
(A B C A B C ...) and reports medians and ratios of medians measured in the same run. Decode speed is timed on
the pure loop (sample + feed of one token) with the cache already full, so evictions happen while timing.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Callable

from .._loader import _core
from .policies import PolicySpec

POLICY_PARTS = ("observe", "decide")  # the keys of policy_seconds


def filler_tokens(model, n: int) -> list[int]:
    """n tokens of ordinary prose (Pride and Prejudice when cached, else a fixed paragraph repeated)."""
    try:
        from ..assets import read_text

        text = read_text("austen", part="prideprejudice")[: max(20_000, n * 8)]
    except Exception:  # the bench must also run offline
        text = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 2000)
    tokens = model.tokenize(text, True, False)
    while len(tokens) < n:
        tokens += tokens
    return tokens[:n]


class DecodeRun:
    """A policy engine with a full cache, ready to time decode steps."""

    def __init__(self, model, spec: PolicySpec, n_threads: int, prompt: list[int]):
        self.model, self.spec = model, spec
        self.engine = _core.Engine(model, n_threads=n_threads, **spec.engine_kwargs())
        self.prompt = prompt[: spec.capacity]
        self.sampler = _core.Sampler(model, _core.SamplingParams(temperature=0.0))

    def _fill(self, warmup: int) -> None:
        self.engine.reset()
        self.engine.feed(self.prompt)
        for _ in range(warmup):
            self.engine.feed([self.engine.sample(self.sampler)])

    def tokens_per_s(self, n_tokens: int, warmup: int = 4) -> float:
        self._fill(warmup)
        before = policy_seconds(self.engine)
        start = time.perf_counter()
        for _ in range(n_tokens):
            self.engine.feed([self.engine.sample(self.sampler)])
        seconds = time.perf_counter() - start
        after = policy_seconds(self.engine)
        # Where an attention-scored policy's time went in the timed steps (ms per token), for the report.
        self.policy_ms_per_token = {k: 1000 * (after[k] - before[k]) / n_tokens for k in after}
        return n_tokens / seconds

    def continue_tokens_per_s(self, n_tokens: int, warmup: int = 4) -> float:
        """Decode speed over the next n tokens of one continuing stream (filled once, never reset): rounds of
        several runs then alternate at a fine grain, and the policy's time accumulates over all of them."""
        if not getattr(self, "_filled", False):
            self._fill(warmup)
            self._filled, self._timed_tokens, self._first = True, 0, policy_seconds(self.engine)
        start = time.perf_counter()
        for _ in range(n_tokens):
            self.engine.feed([self.engine.sample(self.sampler)])
        seconds = time.perf_counter() - start
        self._timed_tokens += n_tokens
        now = policy_seconds(self.engine)
        self.policy_ms_per_token = {k: 1000 * (now[k] - self._first[k]) / self._timed_tokens for k in now}
        return n_tokens / seconds


def policy_seconds(engine) -> dict:
    """An attention-scored policy's own time so far: reading attention ("observe") and deciding ("decide")."""
    stats = engine.policy_stats()
    return {k: stats.get(f"{k}_seconds", 0.0) for k in POLICY_PARTS}


class LlamaCppPythonRun:
    """Plain decode with llama-cpp-python on a context of the same size (flash attention off, its default), filled
    to capacity - n_tokens - warmup first, so the baseline never shifts or evicts.

    Two loops: `c_loop` is greedy sampling + one-token decode through llama-cpp-python's C bindings (the same work
    as our decode step, no Python sampling); `generate` is `Llama.generate`, the loop its users run.
    """

    def __init__(self, model_path: str, capacity: int, n_threads: int, prompt: list[int]):
        import llama_cpp

        if n_threads <= 0:
            raise ValueError("pass the thread count explicitly: llama-cpp-python defaults to half the cores, "
                             "which would make the comparison unfair")
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path, n_ctx=capacity, n_batch=min(capacity, 512), n_threads=n_threads,
                                   n_threads_batch=n_threads, verbose=False, flash_attn=False)
        self.capacity = capacity
        self.prompt = prompt
        self.greedy = llama_cpp.llama_sampler_init_greedy()

    def __del__(self):
        if getattr(self, "greedy", None) is not None:
            self.llama_cpp.llama_sampler_free(self.greedy)

    def _prompt(self, n_tokens: int, warmup: int) -> list[int]:
        return self.prompt[: self.capacity - n_tokens - warmup - 1]

    def c_loop_tokens_per_s(self, n_tokens: int, warmup: int = 4) -> float:
        lc = self.llama_cpp
        self.llm.reset()
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        self.llm.eval(self._prompt(n_tokens, warmup))
        token = (lc.llama_token * 1)()
        start = 0.0
        for step in range(warmup + n_tokens):
            if step == warmup:
                start = time.perf_counter()
            token[0] = lc.llama_sampler_sample(self.greedy, self.llm.ctx, -1)
            # a null position array: llama.cpp continues after the last cached position
            if lc.llama_decode(self.llm.ctx, lc.llama_batch_get_one(token, 1)) != 0:
                raise RuntimeError("llama_decode failed in the llama-cpp-python baseline")
        return n_tokens / (time.perf_counter() - start)

    def generate_tokens_per_s(self, n_tokens: int, warmup: int = 4) -> float:
        self.llm.reset()
        generated = 0
        start = 0.0
        for _ in self.llm.generate(self._prompt(n_tokens, warmup), top_k=1, temp=0.0, repeat_penalty=1.0,
                                   reset=True):
            generated += 1
            if generated == warmup:
                start = time.perf_counter()
            if generated == warmup + n_tokens:
                break
        return n_tokens / (time.perf_counter() - start)


def interleaved(measurements: dict[str, Callable[[], float]], rounds: int,
                alternate_order: bool = False) -> dict[str, dict]:
    """Runs every measurement once per round; median and all samples per name. With alternate_order the order is
    reversed every other round, so that a machine whose speed drifts during a round favours no one over a pair
    of rounds (compare two names with round_ratios)."""
    names = list(measurements)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in (names[::-1] if alternate_order and round_index % 2 else names):
            samples[name].append(measurements[name]())
    return {name: {"median": statistics.median(v), "samples": [round(x, 2) for x in v]} for name, v in samples.items()}


def round_ratios(timing: dict[str, dict], name: str, reference: str) -> dict:
    """name's speed over reference's, round by round: the median and quartiles of those ratios. Speeds of one
    round were taken seconds apart, so a shared machine's slow and fast minutes move both alike."""
    ratios = [a / b for a, b in zip(timing[name]["samples"], timing[reference]["samples"])]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "quartiles": [low, high],
            "samples": [round(x, 4) for x in ratios]}


def prefill_tokens_per_s(model, spec: PolicySpec, tokens: list[int], n_threads: int,
                         policy_ms: list[dict] | None = None) -> float:
    """Tokens per second of one prefill into a fresh engine. policy_ms, when given, receives the policy's own
    time per prefilled token ({"observe": ms, "decide": ms}), to show where a prefill's time goes."""
    engine = _core.Engine(model, n_threads=n_threads, **spec.engine_kwargs())
    start = time.perf_counter()
    engine.feed(tokens)
    seconds = time.perf_counter() - start
    if policy_ms is not None:
        policy_ms.append({k: 1000 * s / len(tokens) for k, s in policy_seconds(engine).items()})
    return len(tokens) / seconds


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def long_run(model, spec: PolicySpec, n_tokens: int, checkpoints: list[int], n_threads: int,
             text_chunk: int = 0, on_checkpoint=None) -> dict:
    """Streams n_tokens through the policy and records RSS at the checkpoints.

    text_chunk=0 generates every token (end-of-generation tokens fed like any other). text_chunk=K alternates K
    tokens of prose fed in one batch with one sampled token: the same feed, eviction, K-shift and sampling paths
    at prefill speed (a 1,000,000-token soak in about two hours on 2 cores instead of three). on_checkpoint(result so
    far) runs at every checkpoint."""
    engine = _core.Engine(model, n_threads=n_threads, **spec.engine_kwargs())
    sampler = _core.Sampler(model, _core.SamplingParams(temperature=0.8, seed=1))
    engine.feed(model.tokenize("Chapter 1.\n\nThe house stood at the end of the lane,", True, False))
    prose = filler_tokens(model, 200_000)[1:] if text_chunk else []
    gc.collect()
    records = []
    peak_cells = 0
    start = time.perf_counter()
    wanted = sorted(set(checkpoints + [n_tokens]))
    fed = sampled = 0
    next_mark = 0

    def summary(done: bool) -> dict:
        return {"policy": spec.label, "tokens": fed, "sampled_tokens": sampled, "text_chunk": text_chunk,
                "records": list(records), "peak_cells": peak_cells, "done": done,
                "tokens_per_s": round(fed / (time.perf_counter() - start), 1)}

    while fed < n_tokens:
        if text_chunk:
            offset = (fed - sampled) % len(prose)
            chunk = prose[offset:offset + min(text_chunk, n_tokens - fed - 1)]  # may stop short at the wrap
            if chunk:
                engine.feed(chunk)
                fed += len(chunk)
        engine.feed([engine.sample(sampler)])
        fed += 1
        sampled += 1
        while next_mark < len(wanted) and fed >= wanted[next_mark]:
            rss, hwm = rss_mib()
            stats = engine.stats()
            peak_cells = max(peak_cells, stats["peak_cells"])
            records.append({"tokens": fed, "rss_mib": round(rss, 1), "peak_rss_mib": round(hwm, 1),
                            "cells_used": stats["cells_used"], "max_pos": stats["max_pos"],
                            "seconds": round(time.perf_counter() - start, 1)})
            next_mark += 1
            if on_checkpoint is not None and fed < n_tokens:
                on_checkpoint(summary(False))
    return summary(True)


def _peak_rss_child(model_path: str, kwargs: dict, n_prompt: int, n_decode: int, n_threads: int, queue) -> None:
    _core.set_log_verbosity(0)
    model = _core.Model.load(model_path)
    base_rss = rss_mib()[0]
    engine = _core.Engine(model, n_threads=n_threads, **kwargs)
    engine.feed(filler_tokens(model, n_prompt))
    sampler = _core.Sampler(model, _core.SamplingParams(temperature=0.0))
    for _ in range(n_decode):
        engine.feed([engine.sample(sampler)])
    rss, hwm = rss_mib()
    queue.put({"rss_mib": round(rss, 1), "peak_rss_mib": round(hwm, 1), "model_loaded_rss_mib": round(base_rss, 1),
               "cells_used": engine.stats()["cells_used"], "n_ctx_physical": engine.stats()["n_ctx_physical"]})


def peak_rss(model_path: str, spec: PolicySpec, n_prompt: int, n_decode: int, n_threads: int) -> dict:
    """Peak RSS (VmHWM) of a fresh process that loads the model, streams n_prompt tokens through the policy and
    decodes n_decode more: a process's peak cannot be reset, so every configuration gets its own."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_peak_rss_child,
                        args=(model_path, spec.engine_kwargs(), n_prompt, n_decode, n_threads, queue))
    child.start()
    try:
        result = queue.get(timeout=3600)
    finally:
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the memory measurement of {spec.label} failed (exit code {child.exitcode})")
    return result


def random_namm_gguf(directory: str, weight_type: str = "f32", seed: int = 0) -> str:
    """A NAMM GGUF with random weights (for speed only: the trained weights are not public)."""
    from ..namm import load_checkpoint
    from ..namm.convert import write_gguf
    from ..namm.testing import write_random_checkpoint

    ckpt = os.path.join(directory, f"random-namm-{seed}.pt")
    write_random_checkpoint(ckpt, seed=seed)
    return write_gguf(load_checkpoint(ckpt, trust_pickle=True), os.path.join(directory, f"random-namm-{seed}-"
                                                                                       f"{weight_type}.gguf"),
                      weight_type)["output"]


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")
