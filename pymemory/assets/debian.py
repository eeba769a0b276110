"""Reading a Debian package (.deb) with the standard library: an `ar` archive whose data.tar.* holds the files.

Falls back to `dpkg-deb` for compressions `tarfile` cannot read (zstd). Nothing is installed; apt is not needed.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

from .errors import AssetError


def deb_data(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened with the standard library."""
    blob = deb.read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise AssetError(f"{deb.name} is not a Debian package (no ar archive header)")
    offset = 8
    while offset + 60 <= len(blob):  # 60-byte member headers: name(16) mtime(12) uid(6) gid(6) mode(8) size(10)
        name = blob[offset:offset + 16].decode("ascii").strip().rstrip("/")
        size = int(blob[offset + 48:offset + 58])
        if name.startswith("data.tar"):
            body = blob[offset + 60:offset + 60 + size]
            try:
                return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
            except tarfile.ReadError:  # e.g. zstd, which tarfile cannot read: let dpkg unpack it
                if shutil.which("dpkg-deb") is None:
                    raise AssetError(f"{deb.name}: cannot read {name} (install dpkg or zstd support)") from None
                unpacked = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
                if unpacked.returncode != 0:
                    raise AssetError(f"dpkg-deb cannot unpack {deb.name}: {unpacked.stderr.decode()}") from None
                return tarfile.open(fileobj=io.BytesIO(unpacked.stdout))
        offset += 60 + size + size % 2  # members are 2-byte aligned
    raise AssetError(f"{deb.name} has no data.tar member")
