"""The session file: a conversation's cache saved to disk, for `pymemory serve --sessions-dir` and
`pymemory chat --save/--load`.

Layout (integers little-endian)::

    b"PMSESS" | u8 version (1) | u32 n | header: n bytes of UTF-8 JSON | u64 m | state: m bytes | u32 crc32

The header says what the state is (kind, the text the cache holds, the messages of a chat, the model and memory
settings, when it was saved); the state is ``Engine.save_state()``: the KV cells as llama.cpp stores them plus
pymemory's cache mirror, pinned prefix and counters (cpp/engine_state.cpp), which ``Engine.load_state()`` checks
against the engine it goes into. The CRC covers everything before it, so a truncated or damaged file is refused
with :class:`SessionFileError` before any of it reaches llama.cpp. Files are written to a temporary name and
renamed, so a crash never leaves half a file under the real name.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

from .errors import InvalidArgumentError

MAGIC = b"PMSESS"
VERSION = 1
SUFFIX = ".pmsession"


class SessionFileError(InvalidArgumentError):
    """A session file that cannot be read: missing, truncated, damaged, or from another format version."""


def write_session(path: str | os.PathLike, header: dict, state: bytes) -> None:
    path = Path(path)
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    body = MAGIC + bytes([VERSION]) + struct.pack("<I", len(head)) + head + struct.pack("<Q", len(state)) + state
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(body)
        f.write(struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise SessionFileError(f"session file not found: {os.fspath(path)!r}") from None
    except OSError as exc:
        raise SessionFileError(f"cannot read session file {os.fspath(path)!r}: {exc.strerror}") from None


def _read_header(f, path: Path) -> tuple[dict, bytes]:
    prefix = f.read(len(MAGIC) + 5)
    if len(prefix) < len(MAGIC) + 5 or prefix[: len(MAGIC)] != MAGIC:
        raise SessionFileError(f"{os.fspath(path)!r} is not a pymemory session file (no 'PMSESS' magic)")
    version = prefix[len(MAGIC)]
    if version != VERSION:
        raise SessionFileError(f"{os.fspath(path)!r} is session format version {version}; this pymemory reads "
                               f"version {VERSION}")
    (n,) = struct.unpack("<I", prefix[len(MAGIC) + 1:])
    head = f.read(n)
    if len(head) != n:
        raise SessionFileError(f"session file {os.fspath(path)!r} is truncated (in its header)")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SessionFileError(f"session file {os.fspath(path)!r} is damaged (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SessionFileError(f"session file {os.fspath(path)!r} is damaged (its header is not an object)")
    return header, prefix + head


def read_header(path: str | os.PathLike) -> dict:
    """The header alone (no integrity check of the state): for listing sessions without loading them."""
    path = Path(path)
    with _open(path) as f:
        return _read_header(f, path)[0]


def read_session(path: str | os.PathLike) -> tuple[dict, bytes]:
    """Header and engine state, after checking the file's length and CRC."""
    path = Path(path)
    with _open(path) as f:
        header, raw_head = _read_header(f, path)
        size_field = f.read(8)
        if len(size_field) != 8:
            raise SessionFileError(f"session file {os.fspath(path)!r} is truncated (no state)")
        (m,) = struct.unpack("<Q", size_field)
        state = f.read(m)
        crc_field = f.read(4)
        if len(state) != m or len(crc_field) != 4:
            raise SessionFileError(f"session file {os.fspath(path)!r} is truncated ({len(state)} of {m} state "
                                   "bytes)")
        if f.read(1):
            raise SessionFileError(f"session file {os.fspath(path)!r} is damaged (bytes after its checksum)")
    crc = zlib.crc32(state, zlib.crc32(size_field, zlib.crc32(raw_head))) & 0xFFFFFFFF
    if struct.unpack("<I", crc_field)[0] != crc:
        raise SessionFileError(f"session file {os.fspath(path)!r} is damaged (checksum mismatch)")
    return header, state
