"""`pymemory serve`: the command line of the OpenAI-compatible server (see pymemory/server/__init__.py)."""
from __future__ import annotations

import argparse
import logging
import sys


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ModuleNotFoundError as exc:
        raise RuntimeError(f"pymemory serve needs the server extra ({exc.name} is missing): "
                           "pip install 'pymemory[server]'") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    config = ServerConfig(
        model=args.model, model_alias=args.model_alias, policy=args.policy, n_sink=args.n_sink, window=args.window,
        evict_chunk=args.evict_chunk, reindex=args.reindex, h2o_recent=args.h2o_recent, namm_path=args.namm_path,
        namm_mode=args.namm_mode, quorum=args.quorum, max_cells=args.max_cells, namm_delay=args.namm_delay,
        namm_layers=args.namm_layers, namm_defer_evictions=args.namm_defer_evictions,
        namm_neighbours=args.namm_neighbours, namm_key_weight=args.namm_key_weight,
        namm_merge_threshold=args.namm_merge_threshold,
        parallel=args.parallel, max_queue=args.max_queue, queue_timeout=args.queue_timeout, api_key=args.api_key,
        sessions_dir=args.sessions_dir, save_every_turn=args.save_every_turn, default_max_tokens=args.max_tokens,
        pin_system_prompt=args.pin_system_prompt, chat_template=args.chat_template, n_threads=args.threads,
        n_gpu_layers=args.n_gpu_layers, verbose=args.verbose,
    )
    app = create_app(config)
    state = app.state.pymemory
    print(f"pymemory serve: {state.model_id} ({config.policy}, {state.capacity} cells x {config.parallel} slots) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if not args.verbose else "info")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from ..commands import add_model_arguments

    s = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server whose conversations never overflow",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models. Each of --parallel slots streams "
        "its conversation through a bounded cache (the system prompt pinned); continuing conversations prefill "
        "only their new tokens; idle ones go to --sessions-dir.",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--parallel", type=int, default=1, help="slots: conversations served at once (default 1)")
    s.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a slot; more get 429 (default 16)")
    s.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a queued request waits before 503 (default 60)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--sessions-dir", default=None,
                   help="save idle conversations here and resume them (also after a restart)")
    s.add_argument("--save-every-turn", action="store_true",
                   help="with --sessions-dir: also write each conversation after every reply, so that a crashed "
                        "server resumes it (costs one session write per turn, after the reply)")
    s.add_argument("--model-alias", default=None, help="model id clients use (default: the GGUF file name)")
    s.add_argument("--max-tokens", type=int, default=1024, help="reply length when a request sets none")
    s.add_argument("--no-pin-system-prompt", dest="pin_system_prompt", action="store_false",
                   help="let the policy evict the system prompt like any other tokens")
    s.add_argument("--chat-template", default=None, help="override the GGUF's chat template (e.g. chatml)")
    add_model_arguments(s)
    s.set_defaults(func=run_serve)
