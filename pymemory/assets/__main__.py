"""``python -m pymemory.assets [NAME ...] [--list]``: the same as ``pymemory fetch``."""
from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["fetch", *sys.argv[1:]]))
