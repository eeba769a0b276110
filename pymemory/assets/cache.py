"""The asset cache on disk: where it is, what a verified file looks like, and the per-asset lock.

Layout under `cache_dir()`:
    models/<file>.gguf            a model, checked against the registry's size and sha256
    models/<file>.gguf.sha256ok   its record {size, mtime_ns, sha256}, written once the file was hashed
    texts/<name>/*.txt            a text's parts
    texts/<name>/manifest.json    {asset, sources: [{file, sha256}], files: [{name, size, mtime_ns, sha256}]}
    .locks/<name>.lock            held while one process fetches that asset

A model's size is checked on every use, its sha256 only when the file no longer matches its record, so later uses
stay cheap; a truncated, replaced or corrupted file fails the check and is fetched again (fetching.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from .errors import AssetError
from .registry import Asset

MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """$PYMEMORY_CACHE, else $XDG_CACHE_HOME/pymemory, else ~/.cache/pymemory (not created here)."""
    if os.environ.get("PYMEMORY_CACHE"):
        return Path(os.environ["PYMEMORY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pymemory"


# ---- verification -----------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, size: int, sha256: str) -> None:
    """Raises AssetError unless the file at `path` has exactly this size and sha256."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path} is missing")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise AssetError(f"{path} has {actual_size:,} bytes, expected {size:,} (truncated or a different file)")
    digest = sha256_of(path)
    if digest != sha256:
        raise AssetError(f"{path} has sha256 {digest}, expected {sha256} (corrupted or a different file)")


def record(path: Path, sha256: str) -> dict:
    """What a sidecar or a manifest entry records of a verified file."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _is_intact(path: Path, size: int, sha256: str, last_check: dict | None) -> bool:
    """Size always; the sha256 only when the file changed since `last_check` (its size/mtime/sha256 record)."""
    try:
        if path.stat().st_size != size:
            return False
        unchanged = last_check is not None and record(path, sha256).items() <= last_check.items()
        return unchanged or sha256_of(path) == sha256
    except FileNotFoundError:
        return False


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256ok")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- presence ---------------------------------------------------------------------------------------------------

def model_present(asset: Asset) -> bool:
    """Whether the model is in the cache and intact; (re)writes its sidecar after hashing it."""
    path = cache_dir() / asset.filename
    last_check = read_json(sidecar(path))
    if not _is_intact(path, asset.size, asset.sha256, last_check):
        return False
    current = record(path, asset.sha256)
    if current != last_check:
        with contextlib.suppress(OSError):  # a read-only cache still works; it hashes on each first use
            sidecar(path).write_text(json.dumps(current))
    return True


def text_manifest(asset: Asset) -> dict | None:
    """The manifest of a complete, intact text directory, or None."""
    directory = cache_dir() / asset.filename
    manifest = read_json(directory / MANIFEST)
    try:
        intact = bool(manifest["files"]) and all(
            _is_intact(directory / entry["name"], entry["size"], entry["sha256"], entry) for entry in manifest["files"])
    except (TypeError, KeyError):  # no manifest, or one edited by hand
        return None
    return manifest if intact else None


def present(asset: Asset) -> bool:
    return model_present(asset) if asset.kind == "model" else text_manifest(asset) is not None


@contextlib.contextmanager
def exclusive(root: Path, name: str) -> Iterator[None]:
    """Holds `<cache>/.locks/<name>.lock`: a second process fetching the same asset waits here."""
    lock_dir = root / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield
