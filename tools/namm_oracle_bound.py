#!/usr/bin/env python3
"""How much of sink's gap could any attention-scored eviction close? A hindsight oracle on the NAMM test set.

    .venv/bin/python tools/namm_oracle_bound.py --namm smollm2 --out docs/results/namm_oracle_bound

A NAMM, h2o or tova must guess, when it evicts, which cached tokens the model will read later. The oracle is told:
every token's attention from all later queries (summed over layers and KV heads), measured once with the full
cache on the same sample (the engine's capture API, the numbers the NAMM reads). At every invocation it evicts the
tokens that will receive the least of it, under the trained NAMM's schedule and budget rule (every `delay` tokens
the cache is cut to capacity - delay cells, so peak cells = capacity; the first n_sink tokens and the newest stay). It knows the
question of a retrieval sample before the question arrives, so it bounds what any policy that scores tokens by
attention, query-aware or not, could keep.

Eviction runs on llama.cpp through llama-cpp-python's C API on the same GGUF (positions absolute, cells removed
with llama_memory_seq_rm; the engine's policies cannot take external scores). The same harness also runs sink
(evict the oldest) and the full cache, which are checked against the engine's own sink and full cache on the same
samples, run here side by side with h2o, tova and the shipped NAMM (the evaluation of eval_trained_namm.py).
Samples: the shipped NAMM's held-out split and test seed (its JSON's training config, seed + 1).
"""
from __future__ import annotations

import argparse
from functools import partial
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
sys.path.insert(0, os.fspath(ROOT / "tools"))

from eval_trained_namm import closed_interval, test_split  # noqa: E402
from pymemory._loader import _core  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
from pymemory.assets import resolve_model  # noqa: E402
from pymemory.errors import InvalidArgumentError, ModelNotFoundError  # noqa: E402
from pymemory.namm.packaged import resolve_namm  # noqa: E402
from pymemory.namm.training.config import TrainConfig  # noqa: E402
from pymemory.namm.training.data import Corpus, SampleFactory, heldout_samples  # noqa: E402
from pymemory.namm.training.evaluator import Job, MemorySpec, make_executor  # noqa: E402
from pymemory.namm.training.warm_start import LOG_CEIL, LOG_FLOOR, capture_invocations  # noqa: E402


def attention_received(invocations: list[list[dict]], n_tokens: int) -> np.ndarray:
    """[layer·KV head, query, key] attention from one sample's full-cache captures (layer-major pairs)."""
    n_head = invocations[0][0]["attention"].shape[0]
    received = np.zeros((len(invocations) * n_head, n_tokens, n_tokens), np.float32)
    for layer_index, layer in enumerate(invocations):
        for capture in layer:
            positions = capture["positions"]  # the cached tokens' positions: every token so far (nothing evicted)
            rows = capture["attention"]  # [H, R, n]
            first_query = positions[-1] - rows.shape[1] + 1  # the window's rows are its newest tokens
            pairs = slice(layer_index * n_head, (layer_index + 1) * n_head)
            received[pairs, first_query:first_query + rows.shape[1], positions] = rows
    return received


def mean_log_share(received: np.ndarray, rows: int, n_cached: int) -> np.ndarray:
    """The NAMM's aggregation of a per-pair target: the warm start's log share of each pair's attention
    (received [pairs, n] from `rows` queries over n_cached tokens), averaged over the pairs."""
    return np.log(np.clip(received / rows * n_cached, LOG_FLOOR, LOG_CEIL)).mean(axis=0)


class LlamaHarness:
    """One llama.cpp context driven token by token: decode batches at given positions, remove given positions."""

    def __init__(self, model_path: str, n_ctx: int, n_threads: int, flash_attn: bool = False):
        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(model_path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=n_threads,
                                   n_threads_batch=n_threads, verbose=False, flash_attn=flash_attn)
        self.ctx = self.llm.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.memory, True)

    def decode(self, tokens: list[int], first_pos: int, scored: list[int]) -> dict[int, np.ndarray]:
        """Decodes tokens at positions first_pos...; log-probabilities of the next token after each index in
        `scored` (indices into tokens)."""
        b = self.batch
        b.n_tokens = len(tokens)
        wanted = set(scored)
        for i, token in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, first_pos + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = i in wanted
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed in the oracle harness")
        out = {}
        for i in scored:
            logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
            logits = logits.astype(np.float64)
            out[i] = logits - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))
        return out

    def remove(self, position: int) -> None:
        self.lc.llama_memory_seq_rm(self.memory, 0, position, position + 1)


def run_sample(harness: LlamaHarness, tokens: list[int], n_prompt: int, capacity: int, delay: int, n_sink: int,
               keep_score, before_evict=None) -> tuple[float, int]:
    """Mean NLL of tokens[n_prompt:] when every `delay` tokens the cache is cut to capacity - delay cells by
    evicting the lowest keep_score(boundary, positions) (None: keep everything); before_evict(harness, positions)
    runs before each eviction (tools/kv_merge.py). Returns (NLL, peak cells)."""
    harness.clear()
    cached: list[int] = []
    nll, peak = [], 0
    for begin in range(0, len(tokens), delay):
        chunk = tokens[begin:begin + delay]
        scored = [i for i in range(len(chunk)) if n_prompt <= begin + i + 1 < len(tokens)]
        logprobs = harness.decode(chunk, begin, scored)
        nll += [-logprobs[i][tokens[begin + i + 1]] for i in scored]
        cached += range(begin, begin + len(chunk))
        peak = max(peak, len(cached))
        if keep_score is not None and len(cached) > capacity - delay:
            # The newest token stays (the NAMM's rule too): llama.cpp continues a sequence after its last position.
            candidates = np.asarray(cached[n_sink:-1])
            scores = keep_score(begin + len(chunk), candidates)
            n_evict = len(cached) - (capacity - delay)
            evict = candidates[np.argsort(scores, kind="stable")[:n_evict]]
            if before_evict is not None:
                before_evict(harness, evict)
            for position in evict:
                harness.remove(int(position))
            gone = set(int(p) for p in evict)
            cached = [p for p in cached if p not in gone]
    if n_prompt == 0 or not nll:
        raise ValueError("a sample needs a prompt and scored tokens")
    return float(np.mean(nll)), peak


def shipped_test_set(namm_file: str, n_text: int, n_retrieval: int, sample_tokens: int = 0,
                     test_seed: int | None = None):
    """A shipped NAMM's test set (its JSON's training config, held-out split, seed + 1 unless `test_seed`; samples
    of `sample_tokens`, default the run's, scoring the second half): (the JSON, its TrainConfig with that length,
    the model's path, the loaded model, the samples, the seed). InvalidArgumentError as test_split says."""
    shipped = json.loads(Path(namm_file).with_suffix(".json").read_text())
    config, seed = test_split(TrainConfig.from_dict(shipped["config"]), sample_tokens, test_seed)
    _core.set_log_verbosity(0)
    model_path = os.fspath(resolve_model(config.model))
    model = _core.Model.load(model_path)
    corpus = Corpus(model, config.text_sources(), config.sample_tokens)
    factory = SampleFactory(corpus, config.sample_tokens, config.scored_tokens, config.capacity)
    samples = heldout_samples(factory, seed, n_text, n_retrieval, config.retrieval_sources())
    return shipped, config, model_path, model, samples, seed


def record_result(rows: dict, table: str, policy: str, sample, nll: float, peak: int) -> None:
    """rows[table][policy]: the sample's NLL and the policy's peak cells so far."""
    entry = rows.setdefault(table, {}).setdefault(policy, {"nll": {}, "peak_cells": 0})
    entry["nll"][sample.id] = nll
    entry["peak_cells"] = max(entry["peak_cells"], peak)


def summarise(rows: dict, text_ids: list[str], answer_ids: list[str], full_key: str = "full cache (engine)",
              span: int | None = None) -> dict:
    """Per table and policy: mean NLL, gap to the full cache (rows["full"][full_key]: the engine's, or the harness's)
    and the share of the table's sink gap closed,
    for text and answers, over the samples the policy ran (a question-only oracle runs on retrieval only). The
    interval of that share resamples texts that overlap (samples of `span` tokens from one novel) together."""
    full = rows["full"][full_key]["nll"]
    tables = {}
    for name, entry in rows.items():
        table = tables[name] = {}
        for policy, e in entry.items():
            out = table[policy] = {"peak_cells": e["peak_cells"]}
            for kind, ids in (("text", text_ids), ("answer", answer_ids)):
                ids = [i for i in ids if i in e["nll"]]
                if not ids:
                    continue
                out[f"{kind}_nll"] = float(np.mean([e["nll"][i] for i in ids]))
                out[f"{kind}_gap"] = out[f"{kind}_nll"] - float(np.mean([full[i] for i in ids]))
                if kind == "answer":
                    out["answer_prob"] = float(np.mean([math.exp(-e["nll"][i]) for i in ids]))
        sink = table.get("sink", {})
        for policy, out in table.items():
            for kind in ("text", "answer"):
                if sink.get(f"{kind}_gap", 0) > 0 and f"{kind}_gap" in out:
                    out[f"{kind}_closed"] = 1 - out[f"{kind}_gap"] / sink[f"{kind}_gap"]
            if policy != "sink" and "text_closed" in out:  # its 95 % bootstrap interval over the text samples
                interval = closed_interval(*({"nll_per_sample": nll}
                                             for nll in (entry[policy]["nll"], entry["sink"]["nll"], full)), span=span)
                if interval is not None:
                    out["text_closed_interval"] = [interval["low"], interval["high"]]
    return tables


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namm", default="smollm2", help="a shipped NAMM name: its JSON gives the model and test split")
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    p.add_argument("--text", type=int, default=8)
    p.add_argument("--retrieval", type=int, default=8)
    p.add_argument("--fractions", default="0.25,0.5")
    p.add_argument("--horizon", type=int, default=256, help="queries ahead for the windowed oracles (the warm "
                   "start's --warm-start-horizon)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    namm_file = resolve_namm(args.namm)
    shipped, config, model_path, model, samples, _ = shipped_test_set(namm_file, args.text, args.retrieval)
    delay, n_sink = config.namm_delay, config.n_sink

    print(f"capturing attention of {len(samples)} samples with the full cache", flush=True)
    received = [attention_received(per_layer, s.n_tokens)
                for s, per_layer in zip(samples, capture_invocations(model, samples, delay, args.threads))]
    del model

    harness = LlamaHarness(model_path, config.sample_tokens + 64, args.threads)
    rows: dict[str, dict[str, dict[str, float]]] = {}

    record = partial(record_result, rows)

    for index, sample in enumerate(samples):
        tokens, n_prompt = list(sample.prompt) + list(sample.target), len(sample.prompt)
        # ahead[p, q, k]: attention of pair p to token k from queries >= q (row N: none); future: summed over pairs
        ahead = np.zeros((received[index].shape[0], len(tokens) + 1, len(tokens)), np.float32)
        ahead[:, :-1] = np.cumsum(received[index][:, ::-1], axis=1)[:, ::-1]
        future = ahead.sum(axis=0, dtype=np.float64)

        def next_queries(now: int) -> tuple[np.ndarray, int]:
            end = min(now + args.horizon, len(tokens))
            return ahead[:, now] - ahead[:, end], end - now

        def aggregated_share(now: int, cand: np.ndarray) -> np.ndarray:
            received, rows = next_queries(now)
            return mean_log_share(received[:, cand], rows, now)
        record("full", "full cache (harness)", sample, *run_sample(harness, tokens, n_prompt, 10 ** 9, delay, n_sink,
                                                                    None))
        for fraction in (float(f) for f in args.fractions.split(",")):
            capacity = int(round(config.sample_tokens * fraction))
            table = f"{capacity}"
            record(table, "sink (harness)", sample,
                   *run_sample(harness, tokens, n_prompt, capacity, delay, n_sink, lambda now, cand: cand))
            record(table, "oracle: future attention", sample, *run_sample(
                harness, tokens, n_prompt, capacity, delay, n_sink,
                lambda now, cand: future[now, cand] if now < len(tokens) else cand))
            record(table, f"oracle: next {args.horizon} queries", sample, *run_sample(
                harness, tokens, n_prompt, capacity, delay, n_sink,
                lambda now, cand: next_queries(now)[0][:, cand].sum(axis=0) if now < len(tokens) else cand))
            record(table, f"oracle: next {args.horizon} queries, mean log share over pairs", sample, *run_sample(
                harness, tokens, n_prompt, capacity, delay, n_sink,
                lambda now, cand: aggregated_share(now, cand) if now < len(tokens) else cand))
            if sample.question:  # what the answer needs: the question's (and answer's) attention only
                asked = len(sample.prompt) - sample.question
                record(table, "oracle: the question's attention", sample, *run_sample(
                    harness, tokens, n_prompt, capacity, delay, n_sink,
                    lambda now, cand: future[max(now, asked), cand] if now < len(tokens) else cand))
        print(f"  {sample.id}: " + ", ".join(f"{t}/{k} {v['nll'][sample.id]:.3f}" for t, e in rows.items()
                                             for k, v in e.items()), flush=True)

    print("engine policies on the same samples", flush=True)
    executor = make_executor(args.workers, "", 1)
    mean, var = tuple(shipped["feature_mean"]), tuple(shipped["feature_var"])
    try:
        def spec_for(capacity: int) -> MemorySpec:
            return MemorySpec.from_config(config, mean, var, 1, capacity)

        for r in executor.map(spec_for(config.capacity), [Job("full", s) for s in samples]):
            rows["full"].setdefault("full cache (engine)", {"nll": {}, "peak_cells": config.sample_tokens})[
                "nll"][r.sample_id] = r.nll
        for fraction in (float(f) for f in args.fractions.split(",")):
            capacity = int(round(config.sample_tokens * fraction))
            for name, job in (("sink", Job("sink", samples[0])), ("h2o", Job("h2o", samples[0])),
                              ("tova", Job("tova", samples[0])),
                              (f"NAMM {args.namm}", Job("namm_file", samples[0], namm_file=namm_file))):
                results = executor.map(spec_for(capacity), [Job(job.memory, s, namm_file=job.namm_file)
                                                            for s in samples])
                for r in results:
                    e = rows[f"{capacity}"].setdefault(name, {"nll": {}, "peak_cells": 0})
                    e["nll"][r.sample_id] = r.nll
                    e["peak_cells"] = max(e["peak_cells"], r.peak_cells)
    finally:
        executor.close()
    Path(args.out).with_suffix(".raw.json").write_text(json.dumps(rows))

    text_ids = [s.id for s in samples if s.kind == "text"]
    answer_ids = [s.id for s in samples if s.kind != "text"]
    tables = summarise(rows, text_ids, answer_ids)
    report = {**tool_metadata(sys.argv[0], sys.argv[1:]),
              "model": config.model, "namm": args.namm, "sample_tokens": config.sample_tokens, "delay": delay,
              "n_sink": n_sink, "n_text": len(text_ids), "n_retrieval": len(answer_ids), "test_seed": config.seed + 1,
              "tables": tables, "nll_per_sample": rows}
    write_report_files(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"# Hindsight oracle: what attention-scored eviction could close ({report['model']})", "",
             f"`{report['command']}` — commit {report['commit']}, {report['date']}, {report['machine']}", "",
             f"The NAMM `{report['namm']}`'s test set ({report['n_text']} text + {report['n_retrieval']} retrieval "
             f"samples of {report['sample_tokens']} tokens, seed {report['test_seed']}). Every policy evicts every "
             f"{report['delay']} tokens down to capacity - {report['delay']} cells (peak cells = capacity) and keeps "
             f"the first {report['n_sink']}. 'oracle' evicts the tokens that the full cache's later queries attend "
             "least (summed over layers and KV heads; it has seen the question); 'the question's attention' counts "
             "only the queries from the question on (retrieval samples); 'next N queries' counts the N queries "
             "after the invocation, summed over (layer, KV head) pairs or, as the NAMM's budget rule aggregates its "
             "warm start's target, as the mean over pairs of the log of each pair's share (clipped to "
             "[0.01, 50] uniform shares). Rows marked (harness) run on "
             "llama.cpp through llama-cpp-python with absolute positions; the others are pymemory's engine. "
             "'closed' = share of the engine's sink gap to the full cache that a policy closes.", ""]
    return "\n".join(lines + table_lines(report)) + "\n"


def add_probe_arguments(p, fit_text: int, text: int, fit_what: str) -> None:
    """The arguments every fitted probe on a shipped NAMM's 1,024-token test set takes."""
    p.add_argument("--namm", default="smollm2-rate", help="a shipped NAMM name: its JSON gives the model and split")
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    p.add_argument("--fit-text", type=int, default=fit_text, help=f"training-split text samples {fit_what}")
    p.add_argument("--text", type=int, default=text, help="held-out text samples")
    p.add_argument("--sample-tokens", type=int, default=1024)
    p.add_argument("--test-seed", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)


def probe_test_set(p, args):
    """shipped_test_set for add_probe_arguments' arguments (texts only); an unknown NAMM or a split it refuses ends
    the command as a usage error."""
    try:
        return shipped_test_set(resolve_namm(args.namm), args.text, 0, args.sample_tokens, args.test_seed)
    except (InvalidArgumentError, ModelNotFoundError) as e:
        p.error(str(e))


def harness_header(report: dict, title: str, captured: str, tool: str) -> list[str]:
    """The opening lines of a probe report on the harness: title, command, and the schedule every rule ran under."""
    return [f"# {title} ({report['model']})",
            f"`{report['command']}` — commit {report['commit']}, {report['date']}, {report['machine']}",
            f"{report['n_text']} held-out texts of {report['sample_tokens']} tokens (seed {report['test_seed']}): "
            f"every {report['delay']} tokens the cache is cut to capacity - {report['delay']} cells (peak = "
            f"capacity), keeping the first {report['n_sink']} and the newest token, by each rule's score, through "
            f"llama.cpp with {captured} captured once with the full cache ({tool})."]


def table_lines(report: dict) -> list[str]:
    """The markdown table of summarise()'s tables: per cache size and policy, text and answer NLL, gap, closed (with
    its 95 % bootstrap interval)."""
    def interval(e: dict) -> str:
        return " [{:+.3f}, {:+.3f}]".format(*e["text_closed_interval"]) if "text_closed_interval" in e else ""

    lines = ["| peak cells | policy | text NLL | text gap | text closed | answer NLL | answer closed | answer p |",
             "|---|---|---|---|---|---|---|---|"]
    for name, table in report["tables"].items():
        for policy, e in table.items():
            def f(key, fmt="{:.4f}"):
                return fmt.format(e[key]) if key in e else "-"
            lines.append(f"| {name if name != 'full' else report['sample_tokens']} | {policy} | {f('text_nll')} | "
                         f"{f('text_gap')} | {f('text_closed', '{:+.3f}')}{interval(e)} | "
                         f"{f('answer_nll', '{:.3f}')} | "
                         f"{f('answer_closed', '{:+.3f}')} | {f('answer_prob', '{:.3f}')} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
