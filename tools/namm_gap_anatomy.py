#!/usr/bin/env python3
"""Where does a NAMM lose text? Sink's gap to the full cache, and the share a NAMM closes, per kind of token.

    .venv/bin/python tools/namm_gap_anatomy.py --namm smollm2-keys --out docs/results/namm_gap_anatomy

Every text sample of the NAMM's test set is scored one token per decode (as a chat decodes) with the full cache,
sink and the NAMM as shipped (its deployed settings) at peak cells = a fraction of the sample. Each scored token is
put in one kind by what came before it in the sample:

  - far repeat:    the three tokens ending at it occurred before, last more than `capacity` tokens back (out of
                   the recent window sink keeps): what copying from far context predicts (induction heads);
  - near repeat:   they occurred before, last within `capacity` tokens;
  - far word:      not a repeated three-token run, but the token itself occurred before, last more than `capacity`
                   tokens back (a name or word mentioned long ago);
  - new:           the rest.

Per kind: how many tokens, their share of sink's gap (summed NLL differences), and the share of that kind's gap the
NAMM closes, with a 95 % bootstrap interval over clusters of overlapping texts (eval_trained_namm's). It says which
tokens the remaining gap is made of, and so what a ranking signal would have to keep.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
sys.path.insert(0, os.fspath(ROOT / "tools"))

from eval_trained_namm import closed_interval  # noqa: E402
from namm_oracle_bound import shipped_test_set  # noqa: E402
from pymemory._loader import _core  # noqa: E402
from pymemory.errors import InvalidArgumentError  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402
from pymemory.namm.packaged import resolve_namm  # noqa: E402

KINDS = ("far repeat", "near repeat", "far word", "new")


def token_kinds(tokens: list[int], first_scored: int, horizon: int, run: int = 3) -> list[str]:
    """The kind (KINDS) of every token from index first_scored on, by what came before it in `tokens`: whether the
    `run` tokens ending at it occurred before (last more or less than `horizon` tokens back), else whether the
    token itself last occurred more than `horizon` tokens back."""
    last_run: dict[tuple, int] = {}
    last_token: dict[int, int] = {}
    kinds = []
    for i, token in enumerate(tokens):
        key = tuple(tokens[i - run + 1:i + 1]) if i >= run - 1 else None
        if i >= first_scored:
            if key is not None and key in last_run:
                kinds.append("far repeat" if i - last_run[key] > horizon else "near repeat")
            elif token in last_token and i - last_token[token] > horizon:
                kinds.append("far word")
            else:
                kinds.append("new")
        if key is not None:
            last_run[key] = i
        last_token[token] = i
    return kinds


def kind_sums(nll: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """Per kind: the summed NLL of its tokens (the shares below are ratios of sums, so token-weighted)."""
    labels = np.asarray(kinds)
    return {kind: float(nll[labels == kind].sum()) for kind in KINDS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namm", default="smollm2-keys", help="a shipped NAMM name: its file is scored as deployed")
    p.add_argument("--test-namm", default="smollm2-rate", help="the shipped NAMM whose JSON gives the test set")
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    p.add_argument("--text", type=int, default=24)
    p.add_argument("--sample-tokens", type=int, default=1024)
    p.add_argument("--test-seed", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.25, help="peak cells as a share of the sample")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        namm_file = resolve_namm(args.namm)
        _, config, _, model, samples, test_seed = shipped_test_set(
            resolve_namm(args.test_namm), args.text, 0, args.sample_tokens, args.test_seed)
    except InvalidArgumentError as e:
        p.error(str(e))
    capacity = int(round(args.sample_tokens * args.fraction))
    engines = {"full cache": _core.Engine(model, policy="none", n_sink=0, window=args.sample_tokens + 16,
                                          n_threads=args.threads),
               "sink": _core.Engine(model, policy="sink", n_sink=config.n_sink, window=capacity - config.n_sink,
                                    n_threads=args.threads),
               args.namm: _core.Engine(model, policy="namm", n_sink=config.n_sink, window=capacity - config.n_sink,
                                       namm_path=os.fspath(namm_file), n_threads=args.threads)}
    per_kind = {kind: {name: {"nll_per_sample": {}} for name in engines} for kind in KINDS + ("all",)}
    counts = {kind: 0 for kind in KINDS}
    for sample in samples:
        prompt, target = list(sample.prompt), list(sample.target)
        kinds = token_kinds(prompt + target, len(prompt), capacity)
        for kind in KINDS:
            counts[kind] += kinds.count(kind)
        for name, engine in engines.items():
            engine.reset()
            engine.feed(prompt)
            nll = np.asarray(engine.score(target, 1), np.float64)
            for kind, total in kind_sums(nll, kinds).items():
                per_kind[kind][name]["nll_per_sample"][sample.id] = total
            per_kind["all"][name]["nll_per_sample"][sample.id] = float(nll.sum())
        print(f"  {sample.id}: " + ", ".join(f"{name} {per_kind['all'][name]['nll_per_sample'][sample.id] / len(target):.3f}"
                                            for name in engines), flush=True)

    rows = []
    total_gap = sum(per_kind["all"]["sink"]["nll_per_sample"].values()) - sum(
        per_kind["all"]["full cache"]["nll_per_sample"].values())
    for kind in KINDS + ("all",):
        entry = per_kind[kind]
        gap = sum(entry["sink"]["nll_per_sample"].values()) - sum(entry["full cache"]["nll_per_sample"].values())
        closed = closed_interval(entry[args.namm], entry["sink"], entry["full cache"], span=args.sample_tokens)
        n = sum(counts.values()) if kind == "all" else counts[kind]
        rows.append({"kind": kind, "tokens": n, "share_of_tokens": n / sum(counts.values()),
                     "sink_gap_nats": gap, "share_of_sink_gap": gap / total_gap,
                     "namm_remaining_nats": sum(entry[args.namm]["nll_per_sample"].values()) - sum(
                         entry["full cache"]["nll_per_sample"].values()),
                     "closed": closed})
    remaining_total = rows[-1]["namm_remaining_nats"]
    for row in rows:
        row["share_of_namm_gap"] = row["namm_remaining_nats"] / remaining_total
    report = {**tool_metadata(sys.argv[0], sys.argv[1:]), "model": config.model, "namm": args.namm,
              "sample_tokens": args.sample_tokens, "capacity": capacity, "n_text": len(samples),
              "test_seed": test_seed, "rows": rows, "per_kind": per_kind}
    write_report_files(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"# Where `{report['namm']}` loses text: sink's gap per kind of token ({report['model']})", "",
             f"`{report['command']}` — commit {report['commit']}, {report['date']}, {report['machine']}", "",
             f"{report['n_text']} text samples of {report['sample_tokens']} tokens (seed {report['test_seed']}), the "
             f"second half scored one token per decode; {report['capacity']} peak cells for sink and the NAMM (as "
             "shipped). Kinds (tools/namm_gap_anatomy.py): a *far repeat* ends a three-token run seen before, last "
             f"more than {report['capacity']} tokens back; a *near repeat* one seen within that; a *far word* is a "
             f"token last seen more than {report['capacity']} tokens back, not in a repeated run; *new* the rest. "
             "Shares of gaps are ratios of summed NLL differences; 'closed' = the share of that kind's sink gap the "
             "NAMM closes, 95 % interval over clusters of overlapping texts.", "",
             "| kind | tokens | share of tokens | sink's gap (nats, summed) | share of sink's gap | NAMM's remaining gap "
             "(nats) | share of the NAMM's gap | NAMM closes [95 %] |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        c = row["closed"]
        closed = f"{c['closed']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" if c else "-"
        lines.append(f"| {row['kind']} | {row['tokens']} | {row['share_of_tokens']:.3f} | {row['sink_gap_nats']:.1f} "
                     f"| {row['share_of_sink_gap']:.3f} | {row['namm_remaining_nats']:.1f} | "
                     f"{row['share_of_namm_gap']:.3f} | {closed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
