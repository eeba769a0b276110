"""NAMM (Sakana AI, "An Evolved Universal Transformer Memory") in pymemory.

- ``NammModel``: the C++ scorer (a ggml graph) loading a NAMM GGUF.
- ``NammReference`` (with ``NammParams``): the readable PyTorch reference, the same one-invocation API
  (needs torch: ``pip install "pymemory[namm]"``).
- ``load_checkpoint`` / ``load_vectors`` / ``load_gguf`` read parameters into a ``NammVector``; ``write_gguf``
  writes the NAMM GGUF (``pymemory convert-namm``; format: docs/namm-gguf.md). ``NammHparams``: the constants.

Importing this package needs neither torch, gguf nor the compiled extension; each name loads what it needs on use.
"""
from __future__ import annotations

from .checkpoint import NammCheckpointError, NammVector, load_checkpoint, load_gguf, load_vectors
from .gguf_format import NammHparams

__all__ = ["NammModel", "NammReference", "NammParams", "NammHparams", "NammVector", "NammCheckpointError",
           "load_checkpoint", "load_vectors", "load_gguf", "write_gguf"]


def __getattr__(name: str):
    if name == "NammModel":
        from .scorer import NammModel

        return NammModel
    if name in ("NammReference", "NammParams"):
        from . import reference

        return getattr(reference, name)
    if name == "write_gguf":
        from .convert import write_gguf

        return write_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
