#!/usr/bin/env python3
"""Convert a NAMM checkpoint into a NAMM GGUF (same as `pymemory convert-namm`); see docs/namm-gguf.md."""
import sys

from pymemory.namm.convert import main

if __name__ == "__main__":
    sys.exit(main())
