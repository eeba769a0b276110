#!/usr/bin/env python3
"""How sure is "closes X % of sink's text gap"? Bootstrap intervals of that share from eval_trained_namm reports.

    .venv/bin/python tools/namm_closed_intervals.py --out docs/results/namm_closed_intervals \\
        docs/results/namm_rate_smollm2.json docs/results/namm_rate_qwen.json

The issue's goal is a share of a gap, a ratio of two noisy means: on 12 texts its paired interval says whether
"half" is met, missed or not decidable. Reads the per-sample NLLs the reports already hold (no model is run):
for each table and policy, the share closed with a 95 % bootstrap interval over text samples (sink, the full
cache and the policy resampled together) and the share of resamples that reach one half.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval_trained_namm import closed_interval, paired_difference  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402


def intervals(report: dict) -> dict[str, dict[str, dict]]:
    """{table: {policy: closed_interval(...)}} for every table with a sink and a full-cache entry."""
    out = {}
    for table, entries in report["tables"].items():
        if "sink" not in entries or "full cache" not in entries:
            continue
        rows = {name: closed_interval(entry, entries["sink"], entries["full cache"],
                                      span=report.get("sample_tokens"))
                for name, entry in entries.items() if name not in ("sink", "full cache")}
        out[table] = {name: row for name, row in rows.items() if row is not None}
    return out


def versus(report: dict, reference: str) -> dict[str, dict[str, dict]]:
    """{table: {policy: {"text"|"answer": (mean, low, high)}}}: each policy's mean per-sample NLL difference to the
    policy named `reference` in the same table (nats, negative = better), with its 95 % paired bootstrap interval."""
    out = {}
    for table, entries in report["tables"].items():
        if reference not in entries:
            continue
        out[table] = {}
        for name, entry in entries.items():
            if name in (reference, "full cache"):
                continue
            kinds = {kind: paired_difference(entry, entries[reference], kind == "text") for kind in ("text", "answer")}
            out[table][name] = {kind: d for kind, d in kinds.items() if d is not None}
    return out


def joined(reports: list[dict], paths: list[str]) -> dict:
    """One report holding every policy of `reports`' tables, for comparisons across runs on the same samples: a
    policy present in several must have scored every sample identically in each (the runs reproduced it), else
    ValueError; tables and samples are those of the first report."""
    out = {**reports[0], "tables": {t: dict(e) for t, e in reports[0]["tables"].items()},
           "commit": ", ".join(str(r.get("commit")) for r in reports)}
    for report, path in zip(reports[1:], paths[1:]):
        for table, entries in report["tables"].items():
            if table not in out["tables"]:
                raise ValueError(f"{path} has a table {table!r} that {paths[0]} lacks")
            mine = out["tables"][table]
            for name, entry in entries.items():
                if name not in mine:
                    mine[name] = entry
                elif mine[name]["nll_per_sample"] != entry["nll_per_sample"]:
                    raise ValueError(f"{name!r} in {table!r} scored differently in {path} than before: the runs do "
                                     "not reproduce each other, so their rows cannot be compared")
    return out


def pooled(reports: list[dict], paths: list[str]) -> dict:
    """One report whose samples are all of `reports`' samples, for one test set drawn in several runs (other seeds,
    the same model, sample length and policies): each table keeps the policies every report scored in it, each
    sample id is prefixed with its report's number ("1/h0:text:…"; overlapping stretches of one text still share a
    bootstrap cluster across runs). Refuses runs of another model or sample length, and a table or the sink or
    full-cache row that one report lacks (ValueError)."""
    first = reports[0]
    for report, path in zip(reports[1:], paths[1:]):
        for key in ("model", "sample_tokens"):
            if report.get(key) != first.get(key):
                raise ValueError(f"{path} has {key} {report.get(key)!r}, {paths[0]} {first.get(key)!r}: only runs "
                                 "of one model and sample length pool into one test set")
    tables = {}
    for table in first["tables"]:
        missing = [path for report, path in zip(reports, paths) if table not in report["tables"]]
        if missing:
            raise ValueError(f"table {table!r} is missing from {', '.join(missing)}")
        names = [n for n in first["tables"][table] if all(n in r["tables"][table] for r in reports)]
        for needed in ("sink", "full cache"):
            if needed not in names:
                raise ValueError(f"table {table!r}: every report needs a {needed!r} row to pool")
        tables[table] = {n: {"nll_per_sample": {f"{i}/{sample}": nll for i, r in enumerate(reports)
                                                for sample, nll in r["tables"][table][n]["nll_per_sample"].items()}}
                         for n in names}
    return {**first, "tables": tables, "commit": ", ".join(str(r.get("commit")) for r in reports),
            "test_seed": [r.get("test_seed") for r in reports]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="eval_trained_namm.py JSON reports; with --pool, A.json,B.json is "
                   "one test set's runs on the same samples, joined before pooling (as --join joins them)")
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    p.add_argument("--versus", default=None, metavar="POLICY", help="also each policy's paired NLL difference to "
                   "this policy of the same table (e.g. another NAMM), text and answers")
    p.add_argument("--join", action="store_true", help="treat the reports as one (runs on the same samples whose "
                   "shared rows reproduce each other exactly), so that --versus compares across them")
    p.add_argument("--pool", action="store_true", help="treat the reports as one larger test set (runs of the "
                   "same model and sample length on other samples, e.g. other seeds): the policies all of them "
                   "scored, over all their samples")
    args = p.parse_args()
    if args.join and args.pool:
        p.error("--join (one sample set, policies from several runs) and --pool (one policy set, samples from "
                "several runs) exclude each other: give one")
    data = {**tool_metadata(sys.argv[0], sys.argv[1:]), "reports": {}}
    lines = ["# Share of sink's text gap closed, with bootstrap intervals", "",
             f"`{data['command']}` — commit {data['commit']}, {data['date']}, {data['machine']}", "",
             "Computed from the per-sample NLLs of the reports named (no model run; each report's header names "
             "the commit and machine that scored them). 'closed' = (sink − policy) / (sink − full cache) on the "
             "mean text NLL; the 95 % interval resamples the text samples (10,000 draws, the three policies "
             "paired; samples drawn from overlapping stretches of one novel are resampled together, as one "
             "cluster); 'P(≥ ½)' is the share of draws in which the policy closes at least half.", ""]
    groups = [arg.split(",") if args.pool else [arg] for arg in args.reports]
    try:
        loaded = [[json.loads(Path(path).read_text()) for path in group] for group in groups]
        reports = [runs[0] if len(runs) == 1 else joined(runs, group) for runs, group in zip(loaded, groups)]
        paths = list(args.reports)
        if args.join or args.pool:
            reports, paths = [(joined if args.join else pooled)(reports, paths)], [" + ".join(paths)]
    except ValueError as e:
        p.error(str(e))
    for path, report in zip(paths, reports):
        table = intervals(report)
        data["reports"][path] = {"commit": report.get("commit"), "tables": table}
        against = versus(report, args.versus) if args.versus else {}
        if args.versus:
            data["reports"][path]["versus"] = {"reference": args.versus, "tables": against}
        lines += [f"## {path} ({report.get('model')}, commit {report.get('commit')})", ""]
        for name, rows in table.items():
            lines += [f"### {name}", "", "| policy | texts (clusters) | closed | 95 % interval | P(≥ ½) |",
                      "|---|---|---|---|---|"]
            lines += [f"| {policy} | {r['n_text']} ({r['n_clusters']}) | {r['closed']:+.3f} | "
                      f"[{r['low']:+.3f}, {r['high']:+.3f}] | {r['p_half']:.2f} |" for policy, r in rows.items()]
            lines.append("")
            if against.get(name):
                lines += [f"Against `{args.versus}` (mean per-sample NLL difference, nats, negative = better; 95 % "
                          "paired bootstrap interval):", "", "| policy | text | answers |", "|---|---|---|"]
                cell = lambda d: "-" if d is None else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"  # noqa: E731
                lines += [f"| {policy} | {cell(d.get('text'))} | {cell(d.get('answer'))} |"
                          for policy, d in against[name].items()]
                lines.append("")
    write_report_files(args.out, data, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
