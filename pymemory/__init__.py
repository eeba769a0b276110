"""pymemory: stream text from a local GGUF model for as long as you want, at bounded memory.

Quick start::

    from pymemory import StreamingLLM
    with StreamingLLM(n_sink=4, window=252) as llm:      # default model, fetched on first use
        for piece in llm.generate("Once upon a time", max_tokens=2000):
            print(piece, end="", flush=True)
        print(llm.stats)                                # the cache never exceeds 256 cells

Layers: ``pymemory._core`` (raw C++ bindings) -> :class:`StreamingLLM` (text, chat, stats).
"""
from __future__ import annotations

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _error_names
from .streaming import CHAT_SAMPLING, POLICIES, CacheStats, SamplingOptions, StreamingLLM

__version__ = "0.1.0"
__all__ = ["StreamingLLM", "CacheStats", "SamplingOptions", "POLICIES", "CHAT_SAMPLING", *_error_names]
