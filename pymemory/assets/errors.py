"""The two errors an asset fetch raises; both are `PymemoryError`s whose message says what to run or check."""
from __future__ import annotations

from ..errors import PymemoryError


class AssetError(PymemoryError, RuntimeError):
    """An asset could not be fetched or verified; the message says what to run or check."""


class RegistryUnreachableError(AssetError):
    """The package index or the Debian mirror could not be reached (no network, proxy or DNS trouble)."""
