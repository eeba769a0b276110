"""`pymemory eval ppl|passkey|streameval|ruler` and `pymemory bench`."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from .policies import PolicySpec, parse_policy
from .ruler import TASKS

DEFAULT_POLICIES = ["sink", "window", "recompute,chunk=32"]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _load_model(args):
    from .._loader import _core
    from ..assets import resolve_model

    _core.set_log_verbosity(0)
    path = os.fspath(resolve_model(args.model))
    return _core.Model.load(path), path


def _model_fields(model, path: str) -> dict:
    return {"model": Path(path).name, "model_description": model.info["description"], "model_path": path}


def _read_text(spec: str) -> tuple[str, str]:
    """FILE, or ASSET[:PART] (e.g. austen:prideprejudice)."""
    if os.path.exists(spec):
        return Path(spec).read_text(encoding="utf-8", errors="replace"), spec
    from .. import assets

    name, _, part = spec.partition(":")
    if name not in assets.ASSETS:
        raise FileNotFoundError(f"text {spec!r} is neither a file nor an asset (assets: "
                                f"{', '.join(n for n, a in assets.ASSETS.items() if a.kind == 'text')})")
    return assets.read_text(name, part=part or None), spec


def _write_reports(args, data: dict, meta: dict, title: str, body: str) -> None:
    """The JSON and markdown reports a command was asked for (--json, --md)."""
    from . import report

    if args.json:
        report.write_json(args.json, data)
    if args.md:
        report.write_markdown(args.md, title, meta, body)


def _specs(args, capacity_override: int | None = None) -> list[PolicySpec]:
    n_sink, window = args.n_sink, args.window
    if capacity_override is not None:
        window = capacity_override - n_sink
    return [parse_policy(p, n_sink, window) for p in (args.policy or DEFAULT_POLICIES)]


# ---- eval ppl -------------------------------------------------------------------------------------------------

def run_ppl(args) -> int:
    from . import ppl, report

    meta = report.run_metadata(args.argv)
    model, model_path = _load_model(args)
    text, text_name = _read_text(args.text)
    tokens = report.cached_token_ids(model, model_path, text)[: args.max_tokens + 1]
    results = ppl.evaluate(model, tokens, _specs(args), chunk=args.chunk, n_threads=args.threads or 0)
    data = {**meta, **_model_fields(model, model_path), "text": text_name, "results": results}
    rows = [[r["label"], r["chunk"], r["tokens"], r["ppl"], r["segment_ppl"][0], r["segment_ppl"][-1],
             r["tokens_per_s"], f'{r["cache"]["peak_cells"]}/{r["capacity"]}',
             r["cache"].get("policy_stats", {}).get("forced_evictions", "-")] for r in results]
    table = report.markdown_table(["policy", "chunk", "tokens", "PPL", "PPL first segment", "PPL last segment",
                                   "tokens/s", "peak cells", "forced evictions"], rows)
    print(table)
    _write_reports(args, data, meta, f"Streaming perplexity: {data['model']} on {text_name}", table)
    if args.plot:
        from .plots import perplexity_curves

        perplexity_curves(results, f"{data['model']} on {text_name}", args.plot)
    return 0


# ---- eval passkey / streameval ----------------------------------------------------------------------------------

def run_passkey(args) -> int:
    from . import report
    from .retrieval import passkey_grid

    meta = report.run_metadata(args.argv)
    model, model_path = _load_model(args)
    cells = []
    for capacity in args.caches:
        cells += passkey_grid(model, _specs(args, capacity), args.distances, args.samples, args.seed, args.threads or 0)
    return _retrieval_report(args, meta, model, model_path, cells, "distance", "needle distance (tokens)",
                             "Passkey retrieval")


def run_streameval(args) -> int:
    from . import report
    from .retrieval import streameval_run

    meta = report.run_metadata(args.argv)
    model, model_path = _load_model(args)
    cells = []
    for capacity in args.caches:
        for spec in _specs(args, capacity):
            for distance in args.distances:
                cells.append(streameval_run(model, spec, n_lines=args.lines, distance_lines=distance,
                                            seed=args.seed, n_threads=args.threads or 0))
    return _retrieval_report(args, meta, model, model_path, cells, "distance_lines", "query-answer distance (lines)",
                             "StreamEval")


def _retrieval_report(args, meta, model, model_path, cells, row_key, row_label, title) -> int:
    from . import report

    header = ["policy", "cache", row_key, "distance (tokens)", "accuracy"]
    rows = [[c["label"], c["capacity"], c[row_key], c.get("distance_tokens", c.get("distance")), f"{c['accuracy']:.0%}"]
            for c in cells]
    if row_key == "distance":  # passkey: the distance is in tokens already; show what the cache kept of the key
        header = ["policy", "cache", "distance (tokens)", "accuracy", "key tokens still cached"]
        rows = [[c["label"], c["capacity"], c["distance"], f"{c['accuracy']:.0%}",
                 "-" if c.get("key_tokens_kept") is None else f"{c['key_tokens_kept']:.0%}"] for c in cells]
    table = report.markdown_table(header, rows)
    print(table)
    data = {**meta, **_model_fields(model, model_path), "cells": cells}
    _write_reports(args, data, meta, f"{title}: {data['model']}", table)
    if args.plot:
        from .plots import accuracy_heatmaps

        accuracy_heatmaps(cells, row_key, row_label, f"{title}: {data['model']}", args.plot)
    return 0


# ---- eval ruler ---------------------------------------------------------------------------------------------------

def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def run_ruler_command(args) -> int:
    from . import report, ruler

    config = ruler.RulerConfig(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                               context_tokens=args.context, ratios=tuple(args.ratios),
                               policies=tuple(args.policy or ruler.DEFAULT_POLICIES), samples=args.samples,
                               seed=args.seed, n_sink=args.n_sink)
    ruler.check_config(config)  # before loading anything
    for text in config.policies:
        if text.strip() != "full":
            parse_policy(text, config.n_sink, 100)
    meta = report.run_metadata(args.argv)
    model, model_path = _load_model(args)
    prose, _ = _read_text(args.prose)
    bar = report.Progress(1, "ruler")
    result = ruler.run_ruler(model, config, prose, n_threads=args.threads or 0,
                             progress=lambda done, total: (setattr(bar, "total", total), bar.update(done)))
    data = {**meta, **_model_fields(model, model_path), "prose": args.prose, **result}
    body = ruler.markdown(result)
    print(body)
    _write_reports(args, data, meta, f"RULER-style tasks through bounded caches: {data['model']}", body)
    if args.plot:
        from .plots import ruler_curves

        ruler_curves(result, f"RULER-style tasks, {data['model']}, {config.context_tokens}-token context",
                     args.plot)
    return 0


# ---- bench --------------------------------------------------------------------------------------------------------

def run_bench(args) -> int:
    from . import bench, report
    from .policies import parse_policy

    meta = report.run_metadata(args.argv)
    model, model_path = _load_model(args)
    threads = args.threads or os.cpu_count() or 1  # explicit: llama-cpp-python defaults to half the cores
    prompt = bench.filler_tokens(model, max(args.caches + [4096]) + 64)
    data = {**meta, **_model_fields(model, model_path), "rounds": args.rounds, "decode_tokens": args.tokens}
    sections = []

    if args.long_run:
        spec = parse_policy(args.long_run_policy, args.n_sink, args.window)
        marks = sorted({10_000, args.long_run // 2, *range(100_000, args.long_run, 100_000)})

        def long_run_section(result: dict) -> str:
            first, last = result["records"][0], result["records"][-1]
            table = report.markdown_table(
                ["tokens", "RSS MiB", "peak RSS MiB", "cells used", "max pos", "seconds"],
                [[r["tokens"], r["rss_mib"], r["peak_rss_mib"], r["cells_used"], r["max_pos"], r["seconds"]]
                 for r in result["records"]])
            status = "" if result["done"] else "**In progress** (report rewritten at every checkpoint).\n\n"
            return (f"## Memory over {args.long_run:,} tokens ({spec.label})\n\n{status}{table}\n\nPeak RSS at "
                    f"{last['tokens']:,} tokens vs after {first['tokens']:,}: "
                    f"{last['peak_rss_mib'] - first['peak_rss_mib']:+.1f} MiB; {result['tokens_per_s']} tokens/s; "
                    f"peak cells {result['peak_cells']}; "
                    + (f"{result['sampled_tokens']:,} tokens sampled, the rest fed as prose {args.long_run_chunk} "
                       "at a time." if args.long_run_chunk else "every token sampled."))

        def checkpoint(result: dict) -> None:  # a run killed after hours still leaves its measurements
            data["long_run"] = result
            _write_reports(args, data, meta, f"pymemory bench: {data['model']}", long_run_section(result))

        result = bench.long_run(model, spec, args.long_run, marks, threads, args.long_run_chunk, checkpoint)
        data["long_run"] = result
        sections.append(long_run_section(result))
    suites = [] if args.long_run else args.suite.split(",")

    if "speed" in suites:
        rows = []
        data["speed"] = []
        for capacity in args.caches:
            spec = parse_policy("sink", args.n_sink, capacity - args.n_sink)
            spec = PolicySpec(spec.name, spec.n_sink, spec.window, {"flash_attention": "off"})
            ours = bench.DecodeRun(model, spec, threads, prompt)
            theirs = bench.LlamaCppPythonRun(model_path, capacity, threads, prompt)
            timing = bench.interleaved({"sink": lambda: ours.tokens_per_s(args.tokens),
                                        "llama-cpp-python C loop": lambda: theirs.c_loop_tokens_per_s(args.tokens),
                                        "llama-cpp-python generate": lambda: theirs.generate_tokens_per_s(args.tokens)},
                                       args.rounds)
            prefill = bench.prefill_tokens_per_s(model, spec, prompt[:2048], threads)
            sink = timing["sink"]["median"]
            c_loop = timing["llama-cpp-python C loop"]["median"]
            generate = timing["llama-cpp-python generate"]["median"]
            data["speed"].append({"capacity": capacity, "timing": timing, "ratio_c_loop": bench.ratio(sink, c_loop),
                                  "ratio_generate": bench.ratio(sink, generate), "sink_prefill_tok_s": prefill})
            rows.append([capacity, sink, c_loop, f"{sink / c_loop:.3f}", generate, f"{sink / generate:.3f}", prefill])
            del theirs
        sections.append(f"## Decode: sink vs llama-cpp-python plain decode ({threads} threads and flash attention off "
                        "in all)\n\n" + report.markdown_table(
                            ["cache", "sink tok/s", "llama-cpp-python C loop tok/s", "ratio", "llama-cpp-python "
                             "generate tok/s", "ratio", "sink prefill tok/s (2048 tokens streamed)"], rows))

    if "recompute" in suites:
        rows = []
        data["recompute"] = []
        for capacity in args.caches:
            sink = bench.DecodeRun(model, parse_policy("sink", args.n_sink, capacity - args.n_sink), threads, prompt)
            rec = bench.DecodeRun(model, parse_policy("recompute", 0, capacity), threads, prompt)
            n_rec = max(2, min(args.tokens, 4096 // capacity))
            timing = bench.interleaved({"sink": lambda: sink.tokens_per_s(args.tokens),
                                        "recompute": lambda: rec.tokens_per_s(n_rec, warmup=1)}, args.rounds)
            speedup = bench.ratio(timing["sink"]["median"], timing["recompute"]["median"])
            data["recompute"].append({"capacity": capacity, "timing": timing, "speedup": speedup})
            rows.append([capacity, timing["sink"]["median"], timing["recompute"]["median"], f"{speedup:.1f}x"])
        sections.append("## Decode: sink vs sliding window with re-computation\n\n" +
                        report.markdown_table(["cache", "sink tok/s", "recompute tok/s", "sink speed-up"], rows))

    if "evict_chunk" in suites:
        capacity = 1024
        runs = {c: bench.DecodeRun(model, PolicySpec("sink", args.n_sink, capacity - args.n_sink, {"evict_chunk": c}),
                                   threads, prompt) for c in (1, 4, 16, 64)}
        timing = bench.interleaved({f"evict_chunk={c}": (lambda r=r: r.tokens_per_s(max(args.tokens, 128)))
                                    for c, r in runs.items()}, args.rounds)
        data["evict_chunk"] = {"capacity": capacity, "timing": timing}
        base = timing["evict_chunk=1"]["median"]
        sections.append(f"## Effect of evict_chunk (sink, cache {capacity})\n\n" + report.markdown_table(
            ["evict_chunk", "decode tok/s", "vs evict_chunk=1"],
            [[k.split("=")[1], v["median"], f"{v['median'] / base:.3f}"] for k, v in timing.items()]))

    if "flash" in suites:
        capacity = max(args.caches)
        runs = {fa: bench.DecodeRun(model, PolicySpec("sink", args.n_sink, capacity - args.n_sink,
                                                      {"flash_attention": fa}), threads, prompt)
                for fa in ("off", "on")}
        timing = bench.interleaved({f"flash {fa}": (lambda r=r: r.tokens_per_s(args.tokens)) for fa, r in runs.items()},
                                   args.rounds)
        data["flash_attention"] = {"capacity": capacity, "timing": timing}
        sections.append(f"## Flash attention (sink, cache {capacity})\n\n" + report.markdown_table(
            ["setting", "decode tok/s"], [[k, v["median"]] for k, v in timing.items()]))

    namm_path, namm_options = None, {}
    if "attention" in suites or "memory" in suites:
        # A NAMM GGUF or a shipped NAMM's name: it runs with the settings it was trained with (mode, moving average)
        # and the interval it is deployed at (its file's), as users run it. A random NAMM has no mode: it runs in
        # budget mode, since a held budget is what the memory and speed comparisons measure.
        if args.namm:
            from ..namm.checkpoint import run_settings
            from ..namm.packaged import resolve_namm

            namm_path = resolve_namm(args.namm)
            data["namm_settings"] = run_settings(namm_path)
        else:
            namm_path = bench.random_namm_gguf(tempfile.mkdtemp(prefix="pymemory-bench-"))
            namm_options = {"namm_mode": "budget"}
        data["namm"] = args.namm or "random weights"

    if "memory" in suites:
        rows = []
        data["memory"] = []
        for capacity in args.caches:
            window = capacity - args.n_sink
            specs = [PolicySpec("none", 0, capacity), PolicySpec("sink", args.n_sink, window),
                     PolicySpec("recompute", 0, capacity), PolicySpec("h2o", args.n_sink, window, {"reindex": True})]
            if capacity > 512 + args.n_sink:  # namm needs room for one 512-token window above what it keeps
                specs.append(PolicySpec("namm", args.n_sink, window, {"namm_path": namm_path, **namm_options,
                                                                       "reindex": True}))
            for spec in specs:
                # Policy "none" cannot stream past its cache: it gets exactly a full cache, the others 2x.
                n_prompt = capacity - 1 if spec.name == "none" else 2 * capacity
                n_decode = 0 if spec.name == "none" else (2 if spec.name == "recompute" else 64)
                r = bench.peak_rss(model_path, spec, n_prompt, n_decode, threads)
                data["memory"].append({"capacity": capacity, "policy": spec.label, **r})
                rows.append([capacity, spec.label, n_prompt + n_decode, r["model_loaded_rss_mib"], r["peak_rss_mib"],
                             round(r["peak_rss_mib"] - r["model_loaded_rss_mib"], 1)])
        sections.append("## Peak memory per policy and cache size (one fresh process each)\n\n" + report.markdown_table(
            ["cache", "policy", "tokens streamed", "RSS after model load MiB", "peak RSS MiB", "peak - model MiB"],
            rows))

    if "attention" in suites:
        rows = []
        data["attention"] = []
        sink, sink_default = "sink", "sink, flash attention auto"
        for capacity in args.attention_caches:
            window = capacity - args.n_sink
            specs = {  # the attention-scored policies read probabilities, so their like-for-like sink has FA off
                sink: PolicySpec("sink", args.n_sink, window, {"flash_attention": "off"}),
                sink_default: PolicySpec("sink", args.n_sink, window),
                # As users run them: absolute positions, compacted only before the model's training context
                # (never within these streams), so no K-shift; and h2o re-indexed after every eviction, like sink.
                "h2o": PolicySpec("h2o", args.n_sink, window),
                "h2o, reindex=True": PolicySpec("h2o", args.n_sink, window, {"reindex": True}),
            }
            for variant in args.namm_variant or ["none"]:  # the NAMM in budget mode ("none"), or with options
                named = variant != "none"
                options = parse_policy(f"namm,{variant}" if named else "namm", args.n_sink, window).options
                specs[f"namm {variant}" if named else "namm"] = PolicySpec(
                    "namm", args.n_sink, window, {"namm_path": namm_path, **namm_options, **options})
            runs = {name: bench.DecodeRun(model, spec, threads, prompt) for name, spec in specs.items()}
            # Every engine fills its cache once and then continues its stream, args.tokens per round (a multiple
            # of every NAMM interval timed, so each round holds the same share of invocations).
            decode = bench.interleaved({name: (lambda r=r: r.continue_tokens_per_s(args.tokens))
                                         for name, r in runs.items()}, args.rounds, alternate_order=True)
            prefill_policy_ms: dict[str, list[dict]] = {name: [] for name in specs}
            prefill = bench.interleaved({name: (lambda name=name, spec=spec: bench.prefill_tokens_per_s(
                model, spec, prompt[:2 * capacity], threads, prefill_policy_ms[name])) for name, spec in specs.items()},
                args.prefill_rounds or args.rounds, alternate_order=True)
            policy_ms = {name: runs[name].policy_ms_per_token for name in specs}
            prefill_ms = {name: {k: statistics.median(r[k] for r in rounds) for k in bench.POLICY_PARTS}
                          for name, rounds in prefill_policy_ms.items()}
            ratios = {kind: {name: {ref: bench.round_ratios(timing, name, ref) for ref in (sink, sink_default)}
                             for name in specs} for kind, timing in (("decode", decode), ("prefill", prefill))}
            data["attention"].append({"capacity": capacity, "decode": decode, "prefill": prefill, "ratios": ratios,
                                      "policy_ms_per_token": policy_ms, "prefill_policy_ms_per_token": prefill_ms,
                                      "decode_tokens_per_round": args.tokens})
            for name in specs:
                rows.append([capacity, name, decode[name]["median"], _ratio_cell(ratios["decode"][name][sink]),
                             f"{ratios['decode'][name][sink_default]['median']:.3f}", prefill[name]["median"],
                             _ratio_cell(ratios["prefill"][name][sink]),
                             f"{ratios['prefill'][name][sink_default]['median']:.3f}",
                             round(policy_ms[name]["observe"], 2), round(policy_ms[name]["decide"], 2),
                             f"{1000 / prefill[name]['median']:.2f}", round(prefill_ms[name]["observe"], 2),
                             round(prefill_ms[name]["decide"], 2)])
        settings = data.get("namm_settings")
        trained = (f" (trained every {settings['trained_delay']})"
                   if settings and settings["trained_delay"] != settings["namm_delay"] else "")
        pooled = f", {settings['neighbours']} neighbours" if settings and settings.get("neighbours") else ""
        pooled += (f", key weight {settings['key_weight']:g}" if settings and settings.get("key_weight") else "")
        pooled += (f", values merged at cosine >= {settings['merge_threshold']:g}"
                   if settings and settings.get("merge_threshold") is not None else "")
        which = (f"NAMM {args.namm} as deployed: {settings['mode'] or 'quorum'} mode, every {settings['namm_delay']} "
                 f"tokens{trained}, moving average {settings['ema_coefficient']}"
                 f"{' bias-corrected' if settings['ema_bias_correction'] else ''}{pooled}") if settings else \
            "random NAMM weights, invoked every 512 tokens"
        sections.append(
            f"## Attention-scored policies vs sink (decode includes NAMM invocations; {which})\n\n"
            f"{args.rounds} rounds; in each, every engine decodes the next {args.tokens} tokens of its own stream "
            "(cache full, evicting), the order reversed every other round. 'vs sink' is the median over rounds of "
            "the speed ratio to sink measured in the same round [quartiles]: sink with flash attention off (as the "
            "attention-scored policies must run), and sink as it runs by default (flash attention auto). Prefill "
            f"streams 2 x cache tokens into a fresh engine ({args.prefill_rounds or args.rounds} rounds). The last "
            "columns split the policy's own time per decoded token over all rounds: reading attention inside "
            "llama_decode (GQA means and spectrogram folds for namm, per-cell sums for h2o) and deciding (NAMM "
            "invocations: features, BAM, selection); then the same per prefilled token (medians over the prefill "
            "rounds) beside the whole prefill's time per token.\n\n" + report.markdown_table(
                ["cache", "policy", "decode tok/s", "vs sink [quartiles]", "vs sink FA auto", "prefill tok/s",
                 "vs sink [quartiles]", "vs sink FA auto", "tap ms/token", "decide ms/token",
                 "prefill ms/token", "prefill tap ms/token", "prefill decide ms/token"], rows))

    body = "\n\n".join(sections)
    print(body)
    _write_reports(args, data, meta, f"pymemory bench: {data['model']}", body)
    return 0


def _ratio_cell(ratio: dict) -> str:
    low, high = ratio["quartiles"]
    return f"{ratio['median']:.3f} [{low:.3f}, {high:.3f}]"


# ---- wiring -------------------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, plot: bool = True) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file or asset name (default: the default model)")
    p.add_argument("--policy", action="append", default=None,
                   help="NAME[:SINKS+WINDOW][,key=value...] (repeatable; default: sink, window, recompute)")
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--window", type=int, default=252)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--md", default=None, help="write a markdown report here")
    if plot:
        p.add_argument("--plot", default=None, help="write a PNG figure here")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="streaming perplexity, passkey, StreamEval and RULER-style retrieval")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="TASK")

    p = ev_sub.add_parser("ppl", help="perplexity of one long text streamed through each policy")
    _common(p)
    p.add_argument("--text", required=True, help="a text file, or an asset such as austen:prideprejudice")
    p.add_argument("--max-tokens", type=int, default=20_000)
    p.add_argument("--chunk", type=int, default=1, help="tokens scored per decode (1 = the paper's per-token)")
    p.set_defaults(func=run_ppl)

    p = ev_sub.add_parser("passkey", help="passkey retrieval against needle distance and cache size")
    _common(p)
    p.add_argument("--distances", type=_ints, default=[100, 200, 400, 800], help="needle-to-question tokens")
    p.add_argument("--caches", type=_ints, default=[256, 512, 1024])
    p.add_argument("--samples", type=int, default=5, help="random keys per cell")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_passkey)

    p = ev_sub.add_parser("streameval", help="StreamEval-style retrieval: line values queried while streaming")
    _common(p)
    p.add_argument("--distances", type=_ints, default=[5, 10, 20, 40], help="query-answer distance in lines")
    p.add_argument("--caches", type=_ints, default=[256, 512, 1024])
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_streameval)

    p = ev_sub.add_parser("ruler", help="RULER's synthetic tasks through bounded caches at kvpress's ratios")
    p.add_argument("--model", "-m", default=None, help="GGUF file or asset name (default: the default model)")
    p.add_argument("--context", type=int, default=1024, help="prompt length in tokens (default 1024)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated among {', '.join(TASKS)}")
    p.add_argument("--ratios", type=_floats, default=[0.75, 0.5, 0.25, 0.125],
                   help="cache sizes as fractions of the context, sinks included (default: kvpress's)")
    p.add_argument("--policy", action="append", default=None,
                   help="full, or NAME[,key=value...] as in the other commands (repeatable; default: full, sink, "
                   "h2o, tova, namm,namm_path=smollm2)")
    p.add_argument("--samples", type=int, default=2, help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--prose", default="austen:prideprejudice",
                   help="haystack prose and cwe vocabulary: a text file or an asset such as austen:emma")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--md", default=None, help="write a markdown report here")
    p.add_argument("--plot", default=None, help="write a PNG figure here")
    p.set_defaults(func=run_ruler_command)

    b = subparsers.add_parser("bench", help="decode/prefill throughput and memory per policy and cache size")
    _common(b, plot=False)
    b.add_argument("--suite", default="speed,recompute,evict_chunk,flash",
                   help="comma-separated: speed, recompute, evict_chunk, flash, memory, attention")
    b.add_argument("--caches", type=_ints, default=[256, 512, 1024, 2048])
    b.add_argument("--attention-caches", type=_ints, default=[1024, 4096])
    b.add_argument("--tokens", type=int, default=64, help="decode steps timed per measurement")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    b.add_argument("--prefill-rounds", type=int, default=0,
                   help="attention suite: rounds of the prefill measurement (default: --rounds)")
    b.add_argument("--namm", default=None,
                   help="NAMM GGUF or shipped name for the attention and memory suites (default: random weights)")
    b.add_argument("--namm-variant", action="append", default=[], metavar="KEY=VALUE[,...]",
                   help="attention suite: time NAMM with these engine options, e.g. namm_layers=10,namm_delay=128 "
                        "(repeatable, one row each; 'none' = as the file says; default: one row as the file says)")
    b.add_argument("--long-run", type=int, default=0, metavar="N",
                   help="instead: stream N tokens through one policy and record RSS at 10,000, every 100,000 and N")
    b.add_argument("--long-run-chunk", type=int, default=0, metavar="K",
                   help="with --long-run: feed K tokens of prose between sampled tokens (0: sample every token)")
    b.add_argument("--long-run-policy", default="sink", help="with --long-run: NAME[,key=value...] (default sink)")
    b.set_defaults(func=run_bench)
    ev.set_defaults(func=lambda args: (ev.print_help(), 2)[1])
