"""NAMMs shipped inside the package (`pymemory/data/namm/<name>.gguf`, each with its training command and log), and
the one rule that turns a `namm_path` argument into a file: an existing path wins, else a shipped name."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError

PACKAGED_DIR = Path(__file__).resolve().parent.parent / "data" / "namm"


def packaged_namms() -> dict[str, Path]:
    """Shipped NAMM GGUFs by name (file stem), e.g. {"smollm2": .../smollm2.gguf}."""
    if not PACKAGED_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(PACKAGED_DIR.glob("*.gguf"))}


def resolve_namm(namm: str | os.PathLike) -> str:
    """The NAMM GGUF to load for `namm`: a file path, or the name of a shipped NAMM. Raises ModelNotFoundError
    naming the shipped ones otherwise."""
    path = Path(os.fspath(namm)).expanduser()
    if path.is_file():
        return os.fspath(path)
    shipped = packaged_namms()
    if str(namm) in shipped:
        return os.fspath(shipped[str(namm)])
    names = ", ".join(shipped) or "none in this build"
    raise ModelNotFoundError(
        f"NAMM file not found: {os.fspath(namm)!r}; give a NAMM GGUF path (pymemory convert-namm / train-namm) "
        f"or the name of a shipped NAMM ({names})")
