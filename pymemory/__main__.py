"""``python -m pymemory ...``: the same command line as the ``pymemory`` script (pymemory/cli.py)."""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
