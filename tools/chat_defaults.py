#!/usr/bin/env python3
"""Chat sampler defaults chosen by measurement (issue 11): scripted multi-turn chats through a small cache, one
interrupted reply per chat (Ctrl-C in `pymemory chat`), for each candidate sampler setting; counts the replies that
degenerate (one word n-gram filling most of the reply) and those that run to the token limit. JSON + markdown.

    .venv/bin/python tools/chat_defaults.py --out docs/results/chat_defaults_smollm2

Candidates use llama.cpp's own samplers only (repetition penalties, DRY), on top of generate()'s truncation and
temperature defaults. The chosen setting becomes pymemory.CHAT_SAMPLING (used by chat() and `pymemory chat`).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pymemory import StreamingLLM  # noqa: E402
from pymemory.evaluation.report import markdown_table, run_metadata, write_json, write_markdown  # noqa: E402

# Complete penalty settings (chat() would otherwise apply CHAT_SAMPLING under the ones not given).
NO_PENALTY = {"repeat_penalty": 1.0, "repeat_last_n": 64, "dry_multiplier": 0.0}
CANDIDATES = {
    "none (generate() defaults)": NO_PENALTY,
    "repeat_penalty 1.1 (last 64)": {**NO_PENALTY, "repeat_penalty": 1.1},
    "DRY 0.8": {**NO_PENALTY, "dry_multiplier": 0.8},
    "repeat_penalty 1.1 + DRY 0.8": {**NO_PENALTY, "repeat_penalty": 1.1, "dry_multiplier": 0.8},
}

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a pirate. Answer every question like a pirate would.",
    "You are a concise assistant. Keep answers short.",
    "You are a friendly tutor who explains things simply.",
    "You are a travel guide who loves recommending places.",
]
QUESTIONS = [
    "Tell me about the moon.", "How do I boil an egg?", "What is a prime number?", "Why is the sky blue?",
    "Write a short poem about rain.", "Give me three tips for sleeping well.", "What is photosynthesis?",
    "Describe a cat to someone who has never seen one.", "How does a bicycle work?", "What should I cook tonight?",
    "Explain gravity in simple words.", "What is the capital of France and why is it famous?",
    "Tell me a story about a dragon.", "How do I learn to play the guitar?", "What are clouds made of?",
    "Why do we have seasons?", "Give me a recipe for pancakes.", "What is the difference between a virus and "
    "bacteria?", "How can I be more productive?", "Describe the ocean.", "What is a computer?",
    "Tell me about the history of tea.", "How do birds fly?", "What is your favourite book and why?",
    "Explain what a rainbow is.", "How do I make friends in a new city?", "What is the internet?",
    "Write a haiku about winter.", "Why do leaves change colour in autumn?", "Continue, please.",
]

WORD = re.compile(r"\w+", re.UNICODE)


def degeneration(text: str, max_n: int = 12) -> tuple[float, str]:
    """Largest share of the reply's words covered by the repeats of one word n-gram (n = 1..max_n) that occurs
    at least 3 times, and that n-gram. A fluent reply stays well below 0.5; a loop is close to 1."""
    words = [w.lower() for w in WORD.findall(text)]
    best, best_gram = 0.0, ""
    for n in range(1, min(max_n, len(words)) + 1):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        gram, count = counts.most_common(1)[0]
        if count < 3:
            continue
        # Non-overlapping occurrences, so a long run of one word is not counted n times over.
        covered, i = 0, 0
        while i <= len(words) - n:
            if tuple(words[i:i + n]) == gram:
                covered += n
                i += n
            else:
                i += 1
        share = covered / len(words)
        if share > best:
            best, best_gram = share, " ".join(gram)
    return best, best_gram


def run_chat(llm: StreamingLLM, index: int, turns: int, max_tokens: int, interrupt_turn: int, interrupt_after: int,
             sampling: dict) -> list[dict]:
    rng = random.Random(index)
    llm.reset()
    system = SYSTEMS[index % len(SYSTEMS)]
    questions = rng.sample(QUESTIONS, turns)
    replies = []
    for turn, question in enumerate(questions):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}] if turn == 0 \
            else question
        pieces, n_tokens = [], 0
        stream = llm.chat(messages, max_tokens=max_tokens, seed=1000 * index + turn, **sampling)
        for piece in stream:
            pieces.append(piece)
            n_tokens += 1
            if turn == interrupt_turn and n_tokens >= interrupt_after:
                stream.close()  # as Ctrl-C does in `pymemory chat`: the partial reply stays in the conversation
                break
        text = "".join(pieces)
        if turn == interrupt_turn:
            continue  # the interrupted reply itself is not judged; the replies after it are
        share, gram = degeneration(text)
        replies.append({"chat": index, "turn": turn, "after_interrupt": turn > interrupt_turn,
                        "pieces": n_tokens, "hit_limit": n_tokens >= max_tokens, "degeneration": round(share, 3),
                        "gram": gram, "text": text})
    return replies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--chats", type=int, default=50)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=252)
    ap.add_argument("--interrupt-turn", type=int, default=1, help="turn (0-based) whose reply is interrupted")
    ap.add_argument("--interrupt-after", type=int, default=12, help="text pieces before the interruption")
    ap.add_argument("--threshold", type=float, default=0.5, help="degenerate: one n-gram covers this share")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names of CANDIDATES")
    ap.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    args = ap.parse_args()
    names = [n for n in args.candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        ap.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")

    meta = run_metadata(["tools/chat_defaults.py"] + sys.argv[1:])
    meta["command"] = meta["command"].removeprefix("pymemory ")
    report = {**meta, "model": args.model, "chats": args.chats, "turns": args.turns, "max_tokens": args.max_tokens,
              "cache": f"n_sink {args.n_sink} + window {args.window}, system prompt pinned",
              "interrupt": {"turn": args.interrupt_turn, "after_pieces": args.interrupt_after},
              "threshold": args.threshold, "candidates": {}}
    with StreamingLLM(args.model, n_sink=args.n_sink, window=args.window, pin_system_prompt=True,
                      n_threads=args.threads) as llm:
        for name in names:
            started = time.perf_counter()
            replies, evictions = [], 0
            for i in range(args.chats):
                replies += run_chat(llm, i, args.turns, args.max_tokens, args.interrupt_turn, args.interrupt_after,
                                    CANDIDATES[name])
                evictions += llm.stats.tokens_evicted
            degenerate = [r for r in replies if r["degeneration"] >= args.threshold]
            after = [r for r in replies if r["after_interrupt"]]
            entry = {
                "sampling": CANDIDATES[name], "replies": len(replies),
                "degenerate": len(degenerate), "degenerate_share": len(degenerate) / len(replies),
                "degenerate_after_interrupt": sum(r["degeneration"] >= args.threshold for r in after),
                "replies_after_interrupt": len(after),
                "hit_limit": sum(r["hit_limit"] for r in replies),
                "median_degeneration": statistics.median(r["degeneration"] for r in replies),
                "mean_pieces": statistics.mean(r["pieces"] for r in replies),
                "tokens_evicted": evictions, "seconds": round(time.perf_counter() - started, 1),
                "examples": [{k: r[k] for k in ("chat", "turn", "degeneration", "gram", "text")}
                             for r in sorted(degenerate, key=lambda r: -r["degeneration"])[:3]],
            }
            report["candidates"][name] = entry
            print(f"{name}: {entry['degenerate']}/{entry['replies']} degenerate, {entry['hit_limit']} at the limit, "
                  f"{entry['tokens_evicted']} tokens evicted, {entry['seconds']} s", flush=True)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    rows = [[name, e["replies"], e["degenerate"], f"{e['degenerate_share']:.1%}",
             f"{e['degenerate_after_interrupt']}/{e['replies_after_interrupt']}", e["hit_limit"],
             round(e["median_degeneration"], 3), round(e["mean_pieces"], 1), e["tokens_evicted"]]
            for name, e in report["candidates"].items()]
    body = (f"{args.model}: {args.chats} scripted chats of {args.turns} turns (5 system prompts, 30 questions, fixed "
            f"seeds), {report['cache']}; the reply of turn {args.interrupt_turn + 1} is interrupted after "
            f"{args.interrupt_after} pieces and not judged. A reply is degenerate when the repeats of one word n-gram "
            f"(n = 1..12, at least 3 times) cover >= {args.threshold:.0%} of its words. At most {args.max_tokens} "
            "tokens per reply; temperature 0.8, top_k 40, top_p 0.95, min_p 0.05 in every row.\n\n"
            + markdown_table(["sampler", "replies", "degenerate", "share", "degenerate after the interruption",
                              "at the token limit", "median n-gram share", "mean pieces", "tokens evicted"], rows))
    write_markdown(out.with_suffix(".md"), f"Chat sampler defaults ({args.model})", meta, body)
    print(json.dumps({n: e["degenerate"] for n, e in report["candidates"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
