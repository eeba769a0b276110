#!/usr/bin/env python3
"""`pymemory serve` side by side with `llama_cpp.server` (llama-cpp-python's OpenAI server) on the same model and
context size, in one run (issue 12). Both are started as subprocesses on localhost and driven with the official
`openai` client. Writes docs/results/server_bench.{json,md}.

    .venv/bin/pip install sse-starlette starlette-context pydantic-settings   # llama_cpp.server's own deps
    .venv/bin/python tools/bench_server.py                     # SmolLM2, 512 cells, 2 threads

Measured:
  1. overflow: one conversation, turn after turn, until llama_cpp.server answers with an error (its context is
     full); pymemory continues the same conversation for as many turns again.
  2. decode speed of a streamed reply (tokens / s between the first and the last token; goal >= 0.95x).
  3. time to first token of the next turn of a ~4,000-token conversation: pymemory continuing its session vs.
     re-prefilling the conversation (a fresh session of the same text; goal >= 10x), vs. llama_cpp.server with a
     context large enough to hold it (it reuses the longest common token prefix of the previous prompt), and
     pymemory after the session came back from disk (--sessions-dir, another session in between).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["Tell me about the moon.", "How do I boil an egg?", "Describe a cat.", "Why is the sky blue?",
             "Give me a tip for sleeping well.", "What is a prime number?", "Name three rivers."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not start; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def client_for(port: int):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=1200)


def streamed(client, model: str, messages: list, max_tokens: int, **extra) -> dict:
    """One streamed chat turn: time to first token, decode rate, text."""
    t0 = time.perf_counter()
    first = last = None
    pieces = []
    n = 0
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, **extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
            pieces.append(chunk.choices[0].delta.content)
    ttft = (first or time.perf_counter()) - t0
    rate = (n - 1) / (last - first) if first and last and last > first else float("nan")
    return {"ttft_s": round(ttft, 4), "chunks": n, "tok_per_s": round(rate, 2), "text": "".join(pieces)}


def overflow(client, model: str, max_turns: int, extra: dict) -> dict:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for turn in range(max_turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        try:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0,
                                               **extra)
        except Exception as exc:  # noqa: BLE001 - the point is to record what the server answers
            status = getattr(exc, "status_code", None)
            return {"turns_ok": turn, "failed_at": turn, "status": status, "error": str(exc)[:300]}
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    return {"turns_ok": max_turns, "failed_at": None}


def long_conversation(target_tokens: int) -> list:
    text = ("The keeper of the lighthouse wrote in his log every evening: the weather, the ships, the gulls, "
            "and what the sea had brought to the shore. ")
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    while sum(len(m["content"]) for m in messages) < target_tokens * 4:
        messages += [{"role": "user", "content": text * 3}, {"role": "assistant", "content": "Noted. " + text}]
    return messages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-ctx", type=int, default=512, help="cache size of both servers (pymemory: n_sink + window)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reply-tokens", type=int, default=256)
    ap.add_argument("--conversation-tokens", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved streamed replies per server (medians)")
    ap.add_argument("--out", default="docs/results/server_bench")
    args = ap.parse_args()

    try:
        import llama_cpp.server.app  # noqa: F401
    except ModuleNotFoundError as exc:
        print(f"llama_cpp.server needs {exc.name}: .venv/bin/pip install sse-starlette starlette-context "
              "pydantic-settings", file=sys.stderr)
        return 2
    from pymemory import assets

    model_path = os.fspath(assets.resolve_model(args.model))
    work = Path(tempfile.mkdtemp(prefix="pymemory-bench-"))
    py = sys.executable
    n_sink = 4

    def pymemory_cmd(port: int, sessions: Path | None = None, parallel: int = 1) -> list[str]:
        cmd = [py, "-m", "pymemory.cli", "serve", "--model", model_path, "--port", str(port), "--n-sink",
               str(n_sink), "--window", str(args.n_ctx - n_sink), "--threads", str(args.threads), "--parallel",
               str(parallel), "--max-tokens", str(args.reply_tokens)]
        return cmd + (["--sessions-dir", str(sessions)] if sessions else [])

    def llama_cmd(port: int, n_ctx: int) -> list[str]:
        return [py, "-m", "llama_cpp.server", "--model", model_path, "--port", str(port), "--n_ctx", str(n_ctx),
                "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]

    from pymemory.evaluation.report import run_metadata

    meta = run_metadata(["tools/bench_server.py"] + sys.argv[1:])
    result: dict = {**meta, "command": ".venv/bin/python " + meta["command"].removeprefix("pymemory "),
                    "cpus": os.cpu_count(), "model": args.model, "n_ctx": args.n_ctx, "threads": args.threads,
                    "rounds": args.rounds}
    reply_prompt = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    try:
        # 1 + 2 at the same context size, both servers up; streamed replies interleaved round by round.
        lp, pp = free_port(), free_port()
        llama = start(llama_cmd(lp, args.n_ctx), lp, work / "llama_server.log")
        ours = start(pymemory_cmd(pp), pp, work / "pymemory_server.log")
        lc, pc = client_for(lp), client_for(pp)
        lmodel, pmodel = lc.models.list().data[0].id, pc.models.list().data[0].id
        result["llama_cpp_overflow"] = overflow(lc, lmodel, 200, {})
        turns = result["llama_cpp_overflow"]["turns_ok"]
        result["pymemory_overflow"] = overflow(pc, pmodel, 2 * max(turns, 10), {})
        rates: dict[str, list[float]] = {"llama_cpp": [], "pymemory": []}
        for _ in range(args.rounds):
            rates["llama_cpp"].append(streamed(lc, lmodel, reply_prompt, args.reply_tokens)["tok_per_s"])
            rates["pymemory"].append(streamed(pc, pmodel, reply_prompt, args.reply_tokens)["tok_per_s"])
        stop(llama)
        stop(ours)
        result["stream_tok_per_s"] = rates
        result["llama_cpp_stream"] = {"tok_per_s": statistics.median(rates["llama_cpp"])}
        result["pymemory_stream"] = {"tok_per_s": statistics.median(rates["pymemory"])}
        result["decode_ratio"] = round(result["pymemory_stream"]["tok_per_s"] /
                                       result["llama_cpp_stream"]["tok_per_s"], 3)

        # 3: the next turn of a long conversation.
        convo = long_conversation(args.conversation_tokens)
        sessions = work / "sessions"
        ours = start(pymemory_cmd(pp, sessions), pp, work / "pymemory_server2.log")
        pc = client_for(pp)
        first = streamed(pc, pmodel, convo + [{"role": "user", "content": "Hello?"}], 16,
                         extra_headers={"X-Session-Id": "long"})  # reads the conversation once
        convo_turn = convo + [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": first["text"]}]
        nxt = convo_turn + [{"role": "user", "content": "Summarise the log in one sentence."}]
        cont = streamed(pc, pmodel, nxt, 16, extra_headers={"X-Session-Id": "long"})
        fresh = streamed(pc, pmodel, nxt, 16, extra_headers={"X-Session-Id": "fresh-copy"})  # re-prefill it all
        # another session takes the only slot, so "long" goes to disk; then it comes back
        streamed(pc, pmodel, [{"role": "user", "content": "Unrelated."}], 8, extra_headers={"X-Session-Id": "other"})
        nxt2 = nxt + [{"role": "assistant", "content": cont["text"]}, {"role": "user", "content": "Thanks!"}]
        restored = streamed(pc, pmodel, nxt2, 16, extra_headers={"X-Session-Id": "long"})
        stop(ours)
        big = args.conversation_tokens + 1024
        llama = start(llama_cmd(lp, big), lp, work / "llama_server2.log")
        lc = client_for(lp)
        streamed(lc, lmodel, convo_turn[:-1], 16)  # it reads the conversation once too
        llama_next = streamed(lc, lmodel, nxt, 16)
        stop(llama)
        result["next_turn_ttft_s"] = {"pymemory_continuing": cont["ttft_s"], "pymemory_reprefill": fresh["ttft_s"],
                                      "pymemory_from_disk": restored["ttft_s"],
                                      f"llama_cpp_n_ctx_{big}": llama_next["ttft_s"]}
        result["speedup_vs_reprefill"] = round(fresh["ttft_s"] / cont["ttft_s"], 1)
    finally:
        shutil.rmtree(work / "sessions", ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    t = result["next_turn_ttft_s"]
    m = result["machine"]
    md = ["# pymemory serve vs llama_cpp.server\n", f"`{result['command']}`\n",
          f"{result['date']}, commit {result['commit']}, {m['cpu']} ({result['cpus']} cores, load "
          f"{m['load_average'][0]}), {args.threads} threads, model {args.model}, context {args.n_ctx} cells; decode "
          f"rates are medians of {args.rounds} interleaved streamed replies of {args.reply_tokens} tokens.\n",
          "| | llama_cpp.server | pymemory serve |", "|---|---|---|",
          f"| conversation turns before an error | {result['llama_cpp_overflow']['turns_ok']} "
          f"({result['llama_cpp_overflow'].get('status')}) | {result['pymemory_overflow']['turns_ok']} "
          f"(failed at {result['pymemory_overflow']['failed_at']}) |",
          f"| streamed reply, tokens/s | {result['llama_cpp_stream']['tok_per_s']} | "
          f"{result['pymemory_stream']['tok_per_s']} ({result['decode_ratio']}x) |",
          "", f"Next turn of a ~{args.conversation_tokens}-token conversation, time to first token (s): " +
          ", ".join(f"{k} {v}" for k, v in t.items()) +
          f"; continuing vs re-prefill: {result['speedup_vs_reprefill']}x."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
