"""A small reader for R's lazy-load databases (`*.rdb` + `*.rdx`), enough to read data shipped in R packages.

Why: the six Jane Austen novels (janeaustenr) are the closest thing to PG19 that installs here, and they come as a
Debian package holding an R lazy-load database. Written from R's documented serialization format (R Internals,
"Serialization Formats"): XDR stream 'X\\n', versions 2 and 3, the SEXP types data packages use. Anything else
raises ValueError naming the type.

Layout: each object in the .rdb is `[4-byte big-endian length][compressed serialization]` at the offset the .rdx
index gives; the .rdx itself is one such blob holding a list with `variables` (name -> (offset, length)).
"""
from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXP types (R's Rinternals.h) and the serializer's pseudo-types (serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 9, 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, RAWSXP, S4SXP = 19, 20, 24, 25
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP, BASEENV_SXP, EMPTYENV_SXP = 238, 239, 240, 241, 242
PACKAGESXP, NAMESPACESXP, BASENAMESPACE_SXP, MISSINGARG_SXP = 248, 249, 250, 251
UNBOUNDVALUE_SXP, GLOBALENV_SXP, NILVALUE_SXP, REFSXP, PERSISTSXP = 252, 253, 254, 255, 247

NA_INTEGER = -(2**31)
_LATIN1, _UTF8, _BYTES = 1 << 2, 1 << 3, 1 << 1


@dataclass
class RObject:
    """An R value with attributes (names, class, ...). `value` is a Python list, str, number or None."""

    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else names


@dataclass
class RSymbol:
    name: str


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.refs: list[Any] = []

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("R serialization ends early (truncated data)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.bytes(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            upper, lower = self.int(), self.int()
            n = (upper << 32) + (lower & 0xFFFFFFFF)
        return n

    def header(self) -> None:
        if self.bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialization (only the binary XDR format 'X' is supported)")
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            self.bytes(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        sexp = flags & 0xFF
        levels, has_attr, has_tag = flags >> 12, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexp == NILVALUE_SXP:
            return None
        if sexp in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP):
            return RSymbol(f"<special {sexp}>")
        if sexp == REFSXP:
            index = flags >> 8
            return self.refs[(index if index else self.int()) - 1]
        if sexp in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            self.int()  # 0
            value = RObject([self.item() for _ in range(self.int())], {"kind": sexp})
            self.refs.append(value)
            return value
        if sexp == SYMSXP:
            symbol = RSymbol(self.item())
            self.refs.append(symbol)
            return symbol
        if sexp == ENVSXP:
            env = RObject({}, {})
            self.refs.append(env)
            self.int()  # locked
            enclos, frame, hashtab, attrib = self.item(), self.item(), self.item(), self.item()
            env.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            return env
        if sexp in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP):
            return self.pairlist(has_attr, has_tag)
        if sexp == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_STRING
            raw = self.bytes(n)
            return raw.decode("latin-1" if levels & _LATIN1 else "utf-8", errors="replace")
        if sexp == ALTREP_SXP:
            return self.altrep()
        if sexp in (LGLSXP, INTSXP):
            n = self.length()
            values = [None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self.bytes(4 * n))]
            if sexp == LGLSXP:
                values = [None if v is None else bool(v) for v in values]
        elif sexp == REALSXP:
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.bytes(8 * n)))
        elif sexp == CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self.bytes(16 * n))
            values = [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
        elif sexp in (STRSXP, VECSXP, EXPRSXP):
            values = [self.item() for _ in range(self.length())]
        elif sexp == RAWSXP:
            values = list(self.bytes(self.length()))
        elif sexp == S4SXP:
            values = None
        else:
            raise ValueError(f"unsupported R object type {sexp} in serialization")
        obj = RObject(values)
        if has_attr:
            obj.attributes = self.attributes(self.item())
        return obj

    def pairlist(self, has_attr: bool, has_tag: bool) -> RObject:
        attributes = self.attributes(self.item()) if has_attr else {}
        tag = self.item() if has_tag else None
        car = self.item()
        cdr = self.item()
        entries = [(tag.name if isinstance(tag, RSymbol) else None, car)]
        if isinstance(cdr, RObject) and isinstance(cdr.value, list) and cdr.attributes.get("pairlist"):
            entries += cdr.value
        return RObject(entries, {**attributes, "pairlist": True})

    @staticmethod
    def attributes(pairlist: Any) -> dict[str, Any]:
        if not isinstance(pairlist, RObject) or not pairlist.attributes.get("pairlist"):
            return {}
        return {name: value for name, value in pairlist.value if name}

    def altrep(self) -> RObject:
        info, state, attr = self.item(), self.item(), self.item()
        kind = info.value[0][1].name if isinstance(info, RObject) and info.value else "?"
        if kind == "compact_intseq" and isinstance(state, RObject):
            n, start, step = (int(v) for v in state.value)
            obj = RObject(list(range(start, start + n * step, step)))
        elif kind in ("wrap_integer", "wrap_real", "wrap_string", "wrap_logical") and isinstance(state, RObject):
            obj = state.value[0][1] if state.attributes.get("pairlist") else state.value[0]
        else:
            raise ValueError(f"unsupported ALTREP class {kind!r} in serialization")
        if isinstance(attr, RObject):
            obj.attributes.update(self.attributes(attr))
        return obj


def unserialize(data: bytes) -> Any:
    reader = _Reader(data)
    reader.header()
    return reader.item()


def decompress(blob: bytes) -> bytes:
    """`[4-byte big-endian length][payload]`; payload zlib (R_compress1) or a type byte then zlib/bzip2/xz/raw."""
    if len(blob) < 5:
        raise ValueError("compressed R object is too short")
    expected = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    kind = body[:1]
    if kind == b"Z":
        out = zlib.decompress(body[1:])
    elif kind == b"2":
        out = bz2.decompress(body[1:])
    elif kind == b"X":
        out = lzma.decompress(body[1:])
    elif kind == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != expected:
        raise ValueError(f"decompressed R object has {len(out)} bytes, expected {expected}")
    return out


def read_rds(blob: bytes) -> Any:
    """A whole-file serialization as saveRDS writes it: gzip, bzip2 or xz around the stream (or none)."""
    if blob[:2] == b"\x1f\x8b":
        blob = zlib.decompress(blob, 16 + zlib.MAX_WBITS)
    elif blob[:3] == b"BZh":
        blob = bz2.decompress(blob)
    elif blob[:6] == b"\xfd7zXZ\x00":
        blob = lzma.decompress(blob)
    return unserialize(blob)


def read_lazyload_db(base: str | Path) -> dict[str, Any]:
    """All variables of `<base>.rdb` / `<base>.rdx`, as {name: RObject}."""
    base = Path(base)
    rdx = base.with_suffix(".rdx").read_bytes()
    index = read_rds(rdx) if rdx[:2] in (b"\x1f\x8b", b"BZ", b"\xfd7") else unserialize(decompress(rdx))
    if not isinstance(index, RObject) or "variables" not in (index.names or []):
        raise ValueError(f"{base}.rdx is not a lazy-load index (no 'variables')")
    variables = index.value[index.names.index("variables")]
    data = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, location in zip(variables.names or [], variables.value):
        offset, length = (int(v) for v in location.value)
        out[name] = unserialize(decompress(data[offset:offset + length]))
    return out
