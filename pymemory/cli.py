"""`pymemory` command line: one sub-command per capability.

Each capability module owns its sub-commands through a ``register_cli(subparsers)``
function that adds its parsers and sets ``func`` (a callable taking the parsed
namespace and returning an exit code). This file only wires them together, so a
module that needs heavy imports (torch, matplotlib) imports them inside ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Modules that contribute sub-commands, in the order `pymemory --help` lists them.
_COMMAND_MODULES = (
    "pymemory.commands",        # generate, chat
    "pymemory.assets",          # fetch
    "pymemory.namm.convert",    # convert-namm
    "pymemory.namm.training.cli",  # train-namm
    "pymemory.evaluation.cli",  # eval, bench
    "pymemory.server.cli",      # serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pymemory",
        description="Bounded-memory streaming generation on llama.cpp "
        "(attention sinks, learned NAMM eviction).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # capability not present in this build (e.g. a source tree without it)
            raise
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in reports
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        # Our own errors carry a message that says what to do; no traceback needed.
        print(f"pymemory: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
