"""`pymemory generate` and `pymemory chat`: streaming generation and interactive chat from the terminal."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from typing import Iterator, TextIO

from .streaming import CHAT_SAMPLING, NAMM_MODES, POLICIES, SamplingOptions, StreamingLLM


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and memory-policy flags shared by every command that runs a model."""
    g = parser.add_argument_group("model and memory")
    g.add_argument("--model", "-m", default=None,
                   help="GGUF file or asset name (default: SmolLM2-135M-Instruct, fetched on first use)")
    g.add_argument("--policy", choices=POLICIES, default="sink", help="KV memory policy (default: sink)")
    g.add_argument("--n-sink", type=int, default=4, help="attention-sink tokens kept forever (default 4)")
    g.add_argument("--window", type=int, default=1020, help="recent tokens kept (default 1020)")
    g.add_argument("--evict-chunk", type=int, default=None,
                   help="tokens evicted at once when full (default window/16, at least 16; 1 = per token)")
    g.add_argument("--reindex", action=argparse.BooleanOptionalAction, default=None,
                   help="compact positions after evictions (default: on for sink-style policies; h2o/tova/namm keep "
                        "absolute positions and compact only before passing the model's training context)")
    g.add_argument("--h2o-recent", type=int, default=None, help="h2o, tova: recent tokens always kept (default window/2 for h2o, 0 for tova)")
    g.add_argument("--namm", dest="namm_path", default=None, help="namm: the NAMM GGUF (see convert-namm)")
    g.add_argument("--namm-mode", choices=NAMM_MODES, default=None,
                   help="namm: evict by quorum of (layer, head) votes, or hold --max-cells by votes then mean score "
                   "(budget), by each token's highest score over the pairs (budget_max), its highest score "
                   "standardised within each pair (budget_zmax), or as budget after keeping the max_cells/8 tokens "
                   "with the highest standardised score (budget_mix) (default: what the NAMM file was trained with, "
                   "else quorum)")
    g.add_argument("--quorum", type=float, default=None,
                   help="namm quorum: fraction of (layer, head) pairs that must drop a token (default: the file's, "
                   "else 1.0 = all)")
    g.add_argument("--max-cells", type=int, default=None, help="namm budget: cells kept after each invocation")
    g.add_argument("--namm-delay", type=int, default=None,
                   help="namm: tokens between invocations, a multiple of 16 (default: the file's)")
    g.add_argument("--namm-layers", type=int, default=None,
                   help="namm: score this many layers, spread over the depth (default all; fewer cost less)")
    g.add_argument("--namm-defer-evictions", action=argparse.BooleanOptionalAction, default=True,
                   help="namm budget modes: evict what an invocation gives up only as new tokens need the room, so "
                        "the cache stays at its peak (default on; --no-namm-defer-evictions evicts at the invocation, "
                        "as the original NAMM does)")
    g.add_argument("--namm-neighbours", type=int, default=None,
                   help="namm budget modes: rank each token by the highest score among itself and this many nearest "
                        "cached tokens on each side (default: the file's, else 0)")
    g.add_argument("--namm-key-weight", type=float, default=None,
                   help="namm budget modes: add this many standard deviations of each token's key distinctiveness "
                        "(KeyDiff on the keys before RoPE) to the score it ranks by (default: the file's, else 0)")
    g.add_argument("--namm-merge-threshold", type=float, default=None,
                   help="namm: merge the values of each token it gives up into the kept token of the most similar "
                        "key, at this centred cosine or more (-1..1; default: off)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (-1 = all)")
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int, defaults: dict | None = None) -> None:
    """Sampling flags; `defaults` overrides generate()'s raw defaults (chat passes CHAT_SAMPLING)."""
    d = {**{f.name: f.default for f in fields(SamplingOptions)}, **(defaults or {})}
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens,
                   help=f"tokens to generate (default {max_tokens}; -1 = no limit)")
    g.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=d["repeat_penalty"],
                   help=f"1 = off (default {d['repeat_penalty']})")
    g.add_argument("--repeat-last-n", type=int, default=d["repeat_last_n"], help="-1 = whole context, 0 = off")
    g.add_argument("--dry-multiplier", type=float, default=d["dry_multiplier"],
                   help=f"DRY repetition penalty, 0 = off (default {d['dry_multiplier']}; 0.8 is common)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")


def open_model(args: argparse.Namespace, **extra: object) -> StreamingLLM:
    return StreamingLLM(
        args.model,
        policy=args.policy,
        n_sink=args.n_sink,
        window=args.window,
        evict_chunk=args.evict_chunk,
        n_threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        seed=args.seed,
        verbose=args.verbose,
        reindex=args.reindex,
        h2o_recent=args.h2o_recent,
        namm_path=args.namm_path,
        namm_mode=args.namm_mode,
        quorum=args.quorum,
        max_cells=args.max_cells,
        namm_delay=args.namm_delay,
        namm_layers=args.namm_layers,
        namm_defer_evictions=args.namm_defer_evictions,
        namm_neighbours=args.namm_neighbours,
        namm_key_weight=args.namm_key_weight,
        namm_merge_threshold=args.namm_merge_threshold,
        **extra,
    )


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_tokens=None if args.max_tokens < 0 else args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        dry_multiplier=args.dry_multiplier,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def format_cache_line(llm: StreamingLLM, n_generated: int, elapsed: float, policy_stats: dict | None = None) -> str:
    s = llm.stats
    rate = f" | {n_generated / elapsed:.1f} tok/s" if elapsed > 0 else ""
    line = (
        f"[cache {s.cells_used}/{s.capacity} cells (peak {s.peak_cells}) | stream {s.tokens_seen:,} tokens | "
        f"evicted {s.tokens_evicted:,} in {s.evictions:,} steps | max pos {s.max_pos}{rate}"
    )
    policy_stats = llm.policy_stats if policy_stats is None else policy_stats
    invocations = policy_stats["invocations"]
    if invocations:
        last = invocations[-1]
        line += (f" | {llm.policy}: {len(invocations)} invocations, last {last['cells_before']}->"
                 f"{last['cells_after']} cells")
        kept = last.get("layer_kept") or []
        if kept:
            line += f", per layer kept {min(kept)}-{max(kept)} (mean {sum(kept) / len(kept):.0f})"
        if policy_stats.get("forced_evictions"):
            line += f", forced evictions {policy_stats['forced_evictions']:,}"
    return line + "]"


def format_layer_lines(llm: StreamingLLM, policy_stats: dict | None = None) -> list[str]:
    """The last invocation's cache size for every layer (the original NAMM's per-layer mem_stats), if any."""
    stats = llm.policy_stats if policy_stats is None else policy_stats
    invocations = stats["invocations"]
    if not invocations or not invocations[-1].get("layer_kept"):
        return []
    kept = invocations[-1]["layer_kept"]
    layers = stats.get("scored_layers") or list(range(len(kept)))  # sliding-window models: global layers only
    return [f"[{llm.policy} invocation {len(invocations)}: cells kept per layer " +
            " ".join(f"L{layer}:{n}" for layer, n in zip(layers, kept)) + "]"]


def status_lines(llm: StreamingLLM, n_generated: int, elapsed: float) -> list[str]:
    """The cache line, then the per-layer line of attention-scored policies; policy stats are read once."""
    policy_stats = llm.policy_stats
    return [format_cache_line(llm, n_generated, elapsed, policy_stats), *format_layer_lines(llm, policy_stats)]


def stream_to(out: TextIO, pieces: Iterator[str], llm: StreamingLLM, status_every: float,
              status: TextIO) -> int:
    """Writes pieces as they come; every `status_every` seconds prints the cache line to `status`."""
    n = 0
    start = last = time.perf_counter()
    for piece in pieces:
        out.write(piece)
        out.flush()
        n += 1
        now = time.perf_counter()
        if status_every > 0 and now - last >= status_every:
            status.write("\n" + format_cache_line(llm, n, now - start) + "\n")
            status.flush()
            last = now
    return n


# ---- generate ----------------------------------------------------------------------------------------------

def run_generate(args: argparse.Namespace) -> int:
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    elif args.prompt is not None:
        prompt = args.prompt
    elif not sys.stdin.isatty():
        prompt = sys.stdin.read()
    else:
        raise ValueError("give a prompt: pymemory generate \"Once upon a time\" (or --prompt-file FILE, or stdin)")
    with open_model(args) as llm:
        start = time.perf_counter()
        n = 0
        try:
            n = stream_to(sys.stdout, llm.generate(prompt, **sampling_kwargs(args)), llm, args.status_every,
                          sys.stderr)
        except KeyboardInterrupt:
            sys.stderr.write("\n[stopped]\n")
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            sys.stderr.write("\n".join(status_lines(llm, n, time.perf_counter() - start)) + "\n")
    return 0


# ---- chat --------------------------------------------------------------------------------------------------

CHAT_HELP = "commands: /stats  /reset  /quit   (Ctrl-C stops a reply; Ctrl-D or /quit leaves)"


def run_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    with open_model(args, pin_system_prompt=args.pin_system_prompt, chat_template=args.chat_template) as llm:
        pending_system = args.system
        if interactive:
            print(f"pymemory chat — {llm!r}\n{CHAT_HELP}", file=sys.stderr)
        if args.load:
            from .chat_session import load_chat

            n = load_chat(llm, args.load)
            if pending_system:
                print("[--system ignored: the loaded conversation keeps its own]", file=sys.stderr)
            pending_system = None
            print(f"[resumed {n} messages from {args.load}: {llm.stats.cells_used} cells restored, nothing re-read]",
                  file=sys.stderr)
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/stats":
                print("\n".join(status_lines(llm, 0, 0)), file=sys.stderr)
                continue
            if text == "/reset":
                llm.reset()
                pending_system = args.system
                print("[conversation cleared]", file=sys.stderr)
                continue
            messages = [{"role": "user", "content": line}]
            if pending_system:
                messages.insert(0, {"role": "system", "content": pending_system})
                pending_system = None
            reply = llm.chat(messages, **sampling_kwargs(args))
            try:
                stream_to(sys.stdout, reply, llm, 0, sys.stderr)
            except KeyboardInterrupt:
                reply.close()  # stop this reply only; the partial reply stays in the conversation
                sys.stdout.write(" [stopped]")
            sys.stdout.write("\n")
            sys.stdout.flush()
            if args.show_cache:
                print(format_cache_line(llm, 0, 0), file=sys.stderr)
        if args.save and llm.messages:
            from .chat_session import save_chat

            save_chat(llm, args.save)
            print(f"[session saved to {args.save}; continue it with --load {args.save}]", file=sys.stderr)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "generate", help="stream a continuation of a prompt at bounded memory",
        description="Stream text from a GGUF model; the KV cache never exceeds n_sink + window cells.",
    )
    g.add_argument("prompt", nargs="?", default=None, help="prompt text (or --prompt-file, or stdin)")
    g.add_argument("--prompt-file", default=None, help="read the prompt from a file")
    g.add_argument("--status-every", type=float, default=0.0,
                   help="print a cache status line to stderr every N seconds (0 = only at the end)")
    g.add_argument("--quiet", "-q", action="store_true", help="no final cache line")
    add_model_arguments(g)
    add_sampling_arguments(g, max_tokens=256)
    g.set_defaults(func=run_generate)

    c = subparsers.add_parser(
        "chat", help="interactive streaming chat that never runs out of context",
        description="Chat with a GGUF model. Old turns stream out of the cache under the memory policy; "
        "Ctrl-C stops the current reply, Ctrl-D quits.",
    )
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--pin-system-prompt", action="store_true", help="keep BOS + the system prompt as sinks")
    c.add_argument("--chat-template", default=None, help="override the GGUF's chat template (e.g. chatml)")
    c.add_argument("--show-cache", action="store_true", help="print the cache line after every reply")
    c.add_argument("--save", default=None, metavar="FILE",
                   help="on exit, save the conversation and its cache to FILE (a pymemory session file)")
    c.add_argument("--load", default=None, metavar="FILE",
                   help="resume a conversation saved with --save (or by pymemory serve) without re-reading it")
    add_model_arguments(c)
    add_sampling_arguments(c, max_tokens=512, defaults=CHAT_SAMPLING)
    c.set_defaults(func=run_chat)
