"""Loads the compiled core so that the process holds exactly one copy of llama.cpp.

llama-cpp-python ships two identical copies of libllama/libggml (``site-packages/lib`` for CMake and
``site-packages/llama_cpp/lib`` for ``import llama_cpp``). Loading both would give two ggml backend
registries in one process. We preload the files that ``import llama_cpp`` uses, with RTLD_GLOBAL; the
extension's DT_NEEDED entries (by soname) then resolve to those already-loaded libraries, and a later
``import llama_cpp`` maps the same files again (same inode, so the loader reuses them).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path


def llama_cpp_lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ImportError(
            "pymemory needs llama-cpp-python==0.3.36 (it provides llama.cpp's shared libraries). "
            "Install it first: pip install llama-cpp-python==0.3.36 (see README for GPU builds)."
        )
    return Path(spec.origin).parent / "lib"


def _preload_llama_libraries() -> None:
    if not sys.platform.startswith("linux") and sys.platform != "darwin":
        return  # Windows resolves DLLs by name from the loader path; nothing to preload
    lib_dir = llama_cpp_lib_dir()
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    # Dependency order: ggml-base <- ggml <- llama.
    for name in ("ggml-base", "ggml", "llama"):
        path = lib_dir / f"lib{name}{suffix}"
        if path.exists():
            ctypes.CDLL(os.fspath(path), mode=ctypes.RTLD_GLOBAL)


_preload_llama_libraries()

from . import _core  # noqa: E402  (must follow the preload)

__all__ = ["_core", "llama_cpp_lib_dir"]
