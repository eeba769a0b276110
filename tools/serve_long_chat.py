#!/usr/bin/env python3
"""The long-conversation acceptance run of `pymemory serve` (issue 12): N turns (default 300) through a
512-cell cache with the official `openai` client, a system prompt whose instruction must still hold at the end,
memory flat throughout. Writes docs/results/serve_long_chat.{json,md}.

    .venv/bin/python tools/serve_long_chat.py                    # 300 turns, n_sink 4 + window 508
    .venv/bin/python tools/serve_long_chat.py --turns 300 --no-pin   # control: the system prompt may be evicted

The instruction checked is a secret the system prompt alone holds ("the password is tulip"): SmolLM2-135M does
not follow reply-prefix instructions even on the first turn, but it does repeat a fact from its context, so the
check fails when the system prompt has left the cache (see the --no-pin control).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

SYSTEM = "You are a helpful assistant. The secret password is 'tulip'. If the user asks for the password, say it."
QUESTIONS = ["Tell me about the moon.", "How do I boil an egg?", "Name a color.", "What is 2+2?", "Describe a cat.",
             "Why is the sky blue?", "Give me a tip for sleeping well.", "What is a prime number?"]


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=508)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-pin", action="store_true", help="control run: do not pin the system prompt")
    ap.add_argument("--out", default="docs/results/serve_long_chat")
    args = ap.parse_args()

    import openai
    import uvicorn

    from pymemory.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(model=args.model, n_sink=args.n_sink, window=args.window, n_threads=args.threads,
                                  pin_system_prompt=not args.no_pin))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id

    messages = [{"role": "system", "content": SYSTEM}]
    rows, errors = [], []
    rss0 = rss_mib()
    t0 = time.perf_counter()
    for turn in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        try:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                               temperature=0, extra_headers={"X-Session-Id": "long-chat"})
        except openai.APIError as exc:
            errors.append({"turn": turn, "error": str(exc)})
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        mem = r.model_extra["pymemory"]
        rows.append({"turn": turn, "cells_used": mem["cells_used"], "n_pinned": mem["n_pinned"],
                     "tokens_evicted": mem["tokens_evicted"], "prefilled": mem["prefilled_tokens"],
                     "prompt_tokens": r.usage.prompt_tokens, "rss_mib": round(rss_mib(), 1)})
        if turn % 25 == 0:
            print(f"turn {turn}: {rows[-1]}", file=sys.stderr)
    messages.append({"role": "user", "content": "What is the secret password?"})
    final = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                           temperature=0, extra_headers={"X-Session-Id": "long-chat"})
    answer = final.choices[0].message.content
    server.should_exit = True
    thread.join(timeout=60)

    from pymemory.evaluation.report import run_metadata

    capacity = args.n_sink + args.window
    meta = run_metadata(["tools/serve_long_chat.py"] + sys.argv[1:])
    result = {
        **meta, "command": ".venv/bin/python " + meta["command"].removeprefix("pymemory "),
        "cpus": os.cpu_count(), "model": args.model, "turns": args.turns, "capacity": capacity,
        "pin_system_prompt": not args.no_pin,
        "errors": errors, "max_cells": max(r["cells_used"] for r in rows),
        "conversation_tokens": rows[-1]["prompt_tokens"], "tokens_evicted": rows[-1]["tokens_evicted"],
        "max_prefilled_after_first": max(r["prefilled"] for r in rows[1:]),
        "rss_first_mib": rows[0]["rss_mib"], "rss_last_mib": rows[-1]["rss_mib"], "rss_start_mib": rss0,
        "final_answer": answer, "instruction_obeyed": "tulip" in answer.lower(),
        "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    out = Path(args.out + ("_nopin" if args.no_pin else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(
        f"# pymemory serve: {args.turns}-turn conversation through {capacity} cells\n\n"
        f"`{result['command']}`\n\n{result['date']}, commit {result['commit']}, {result['machine']['cpu']} "
        f"({result['cpus']} cores, load {result['machine']['load_average'][0]}), model {args.model}, greedy, "
        f"max_tokens {args.max_tokens}, system prompt {'pinned' if not args.no_pin else 'NOT pinned (control)'}.\n\n"
        f"| errors | conversation tokens | evicted | max cells | max prefill after turn 1 | RSS first → last turn "
        f"| password at the end |\n|---|---|---|---|---|---|---|\n"
        f"| {len(errors)} | {result['conversation_tokens']:,} | {result['tokens_evicted']:,} | "
        f"{result['max_cells']} / {capacity} | {result['max_prefilled_after_first']} | "
        f"{result['rss_first_mib']} → {result['rss_last_mib']} MiB | "
        f"{'yes' if result['instruction_obeyed'] else 'no'}: {answer!r} |\n")
    print(out.with_suffix(".md").read_text())
    return 0 if not errors and result["instruction_obeyed"] == (not args.no_pin) else 1


if __name__ == "__main__":
    sys.exit(main())
