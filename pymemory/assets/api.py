"""What the rest of pymemory calls: names in, verified paths and texts out, fetching whatever is missing first."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import ModelLoadError, ModelNotFoundError
from .cache import MANIFEST, cache_dir, model_present, present, read_json, text_manifest
from .errors import AssetError
from .fetching import ensure
from .registry import ASSETS, DEFAULT_MODEL, AssetInfo, lookup


def fetch(names: str | Iterable[str] = (DEFAULT_MODEL,)) -> None:
    """Makes sure each named asset is in the cache and verified, downloading what is missing or damaged.
    All names are checked before anything is downloaded."""
    assets = [lookup(name) for name in ([names] if isinstance(names, str) else names)]
    for asset in assets:
        ensure(asset)


def model_path(name: str = DEFAULT_MODEL, *, download: bool = True) -> Path:
    """The verified GGUF file of a registered model, fetched first when missing and `download` is true."""
    asset = lookup(name, "model")
    if not present(asset):
        if not download:
            raise AssetError(f"model {name!r} is not in the cache ({cache_dir() / asset.filename}); "
                             f"run: pymemory fetch {name}")
        ensure(asset)
    return cache_dir() / asset.filename


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None -> the default model (fetched when missing); a registered model name -> that model; anything else
    is the path of a model file, which must exist."""
    if model is None:
        return model_path(DEFAULT_MODEL)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a .gguf path, a model name or None, not {type(model).__name__}")
    if isinstance(model, str) and model in ASSETS:
        return model_path(model)
    path = Path(model).expanduser()
    if path.is_file():
        return path
    known = ", ".join(n for n, a in ASSETS.items() if a.kind == "model")
    if path.exists():  # a directory or a device: there is something, but not a model file
        what = "a directory" if path.is_dir() else "not a file"
        raise ModelLoadError(f"model path is not a regular file: {os.fspath(model)!r} is {what}; give the path of "
                             f"a .gguf file or one of: {known}")
    raise ModelNotFoundError(f"model file not found: {os.fspath(model)!r} does not exist; give the path of a "
                             f".gguf file or one of: {known}")


def text_paths(name: str) -> list[Path]:
    """The .txt files of a text asset (fetched when missing): Austen in order of publication, others by name."""
    asset = lookup(name, "text")
    ensure(asset)
    directory = cache_dir() / asset.filename
    return [directory / entry["name"] for entry in read_json(directory / MANIFEST)["files"]]


def text_path(name: str, part: str) -> Path:
    """One part of a text asset, by file stem: text_path("austen", "prideprejudice")."""
    paths = text_paths(name)
    for path in paths:
        if path.stem == part:
            return path
    raise AssetError(f"{name!r} has no part {part!r}; its parts: {', '.join(p.stem for p in paths)}")


def read_text(name: str, *, part: str | None = None) -> str:
    """A text asset as one string (parts separated by a blank line), or one part of it verbatim."""
    if part is not None:
        return text_path(name, part).read_text(encoding="utf-8")
    return "\n\n".join(p.read_text(encoding="utf-8").rstrip("\n") for p in text_paths(name)) + "\n"


def list_assets() -> list[AssetInfo]:
    """Every registered asset and whether it is in the cache (verifying it: hashes a file on its first check)."""
    infos = []
    for asset in ASSETS.values():
        if asset.kind == "model":
            is_present, size = model_present(asset), asset.size
        else:
            manifest = text_manifest(asset)
            is_present = manifest is not None
            size = sum(entry["size"] for entry in manifest["files"]) if is_present else None
        infos.append(AssetInfo(asset.name, asset.kind, is_present, cache_dir() / asset.filename, size,
                               asset.description))
    return infos
