"""Exceptions raised by pymemory. Each message says what went wrong and what to do.

They subclass the built-in exception a caller would naturally catch (ValueError for bad input,
FileNotFoundError for a missing model, RuntimeError for failures at run time) as well as
:class:`PymemoryError`, so ``except pymemory.PymemoryError`` catches everything of ours.
"""
from __future__ import annotations


class PymemoryError(Exception):
    """Base class of every pymemory exception."""


class InvalidArgumentError(PymemoryError, ValueError):
    """A parameter or input is invalid; the message names it and the accepted values."""


class ModelNotFoundError(PymemoryError, FileNotFoundError):
    """The model path does not exist."""


class ModelLoadError(PymemoryError, ValueError):
    """The file is not a loadable GGUF model (not GGUF, truncated, unsupported architecture)."""


class UnsupportedModelError(PymemoryError, ValueError):
    """The model cannot run the requested memory policy or feature; the message says what works instead."""


class CacheFullError(PymemoryError, RuntimeError):
    """The tokens do not fit in the cache and the policy does not evict (policy "none")."""


class ClosedError(PymemoryError, RuntimeError):
    """The object was used after close()."""


class LlamaError(PymemoryError, RuntimeError):
    """llama.cpp reported a failure while running."""


class SupersededError(PymemoryError, RuntimeError):
    """A generator of a StreamingLLM was superseded: a newer generate(), chat(), reset() or close() on the same
    object (from this thread or another) took over its stream, so it stops instead of mixing two streams."""


__all__ = [
    "PymemoryError",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "ModelLoadError",
    "UnsupportedModelError",
    "CacheFullError",
    "ClosedError",
    "LlamaError",
    "SupersededError",
]
