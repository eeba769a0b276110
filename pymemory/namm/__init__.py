"""NAMM (Sakana AI, "An Evolved Universal Transformer Memory") in pymemory.

- ``NammModel``: the C++ scorer (a ggml graph) loading a NAMM GGUF — ``pymemory.namm.NammModel(path)``.
- ``NammReference``: the readable PyTorch reference (needs torch: ``pip install "pymemory[namm]"``).
- ``load_checkpoint`` / ``load_vectors`` / ``write_gguf``: the converter (``pymemory convert-namm``).

Importing this package needs neither torch nor the compiled extension; each name loads what it needs on use.
"""
from __future__ import annotations

from .checkpoint import NammCheckpointError, NammParams, load_checkpoint, load_vectors

__all__ = ["NammModel", "NammReference", "NammCheckpointError", "NammParams", "load_checkpoint", "load_vectors",
           "write_gguf"]


def __getattr__(name: str):
    if name == "NammModel":
        from .scorer import NammModel

        return NammModel
    if name == "NammReference":
        from .reference import NammReference

        return NammReference
    if name == "write_gguf":
        from .convert import write_gguf

        return write_gguf
    raise AttributeError(name)
