"""A small reader for R's serialized data and lazy-load databases (`*.rdb` + `*.rdx`), without R.

Why it exists: the six Jane Austen novels (R package janeaustenr) are the closest thing to PG19 that installs
here, and Debian ships them as an R lazy-load database. Written from R's documented format (R Internals,
"Serialization Formats"; R's `serialize.c` and `makeLazyLoadDB`), reading only what data packages use:

* a serialization starts with `X\\n` (XDR, big-endian), the format version (2 or 3), the writer's and the
  minimal reader's R versions and, in version 3, the name of the native string encoding;
* every item starts with one 32-bit flags word: SEXP type in bits 0-7, "is object" bit 8, "has attributes"
  bit 9, "has tag" bit 10, and the `levels` (string encoding bits) from bit 12 up;
* the `.rdx` index is an RDS file (`saveRDS`, normally gzip) holding `list(variables = list(name =
  c(offset, length)), references = ..., compressed = TRUE | FALSE | 2 | 3)`; the value of `name` is the
  `length` bytes of the `.rdb` at `offset`: a 4-byte big-endian uncompressed length, then the compressed
  serialization (zlib for TRUE; for 2 and 3 a type byte first: 'Z' zlib, '2' bzip2, 'X' xz, '0' stored).

Supported: NULL, symbols, pairlists (attributes), lists, character (with NA and the UTF-8 / latin1 / bytes /
ASCII encodings), logical, integer, double, complex and raw vectors, attributes, and the reference table
(symbols written once, then referred to by index). Anything else (functions, environments, ALTREP, S4, byte
code) raises ValueError naming the type.
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXP type codes (R's Rinternals.h) and the serializer's pseudo-types (serialize.c).
NILSXP, SYMSXP, LISTSXP = 0, 1, 2
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
VECSXP, RAWSXP = 19, 24
NILVALUE_SXP, REFSXP = 254, 255

_TYPE_NAMES = {  # for error messages about types this reader does not handle
    3: "closure (function)", 4: "environment", 5: "promise", 6: "language object (call)", 7: "special function",
    8: "builtin function", 17: "dots", 18: "any", 20: "expression vector", 21: "byte code", 22: "external pointer",
    23: "weak reference", 25: "S4 object", 238: "ALTREP object", 239: "attribute pairlist", 240: "attribute call",
    241: "base environment", 242: "empty environment", 244: "byte-code reference", 245: "generic reference",
    246: "class reference", 247: "persistent reference", 248: "package environment", 249: "namespace",
    250: "base namespace", 251: "missing argument", 252: "unbound value", 253: "global environment",
}
_VECTOR_KINDS = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex",
                 STRSXP: "character", VECSXP: "list", RAWSXP: "raw"}

_HAS_ATTRIBUTES, _HAS_TAG = 1 << 9, 1 << 10  # bit 8 ("is object") only matters to R's dispatch
# CHARSXP `levels` bits (R's Defn.h): how the bytes of a string are encoded.
_BYTES, _LATIN1, _UTF8, _ASCII = 1 << 1, 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2**31)  # R's NA for integer and logical vectors


@dataclass
class RSymbol:
    """An R symbol (a name), e.g. the tag of an attribute."""

    name: str


@dataclass
class RVector:
    """An R vector: `kind` is R's typeof() ("character", "integer", "double", "logical", "complex", "raw" or
    "list"). Missing values (NA) are None, except in doubles, where R's NA is a NaN. Strings marked as bytes
    stay `bytes`."""

    kind: str
    values: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        """The `names` attribute as a Python list, or None when the vector has no names."""
        names = self.attributes.get("names")
        return names.values if isinstance(names, RVector) else None

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class RPairlist:
    """An R pairlist (as used for attributes and argument lists): (tag or None, value) pairs in order."""

    items: list[tuple[str | None, Any]]
    attributes: dict[str, Any] = field(default_factory=dict)


class _Unserializer:
    """Reads one XDR serialization stream (R's `ReadItem`), keeping the table that REFSXP items point into."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.references: list[RSymbol] = []
        self.native_encoding = "utf-8"

    def read_bytes(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise ValueError(f"R serialization ends early at byte {self.pos} (needs {count} more; truncated data?)")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def read_int(self) -> int:
        return struct.unpack(">i", self.read_bytes(4))[0]

    def read_length(self) -> int:
        length = self.read_int()
        if length == -1:  # a long vector (2^31 elements or more): upper and lower 32 bits follow
            upper, lower = struct.unpack(">II", self.read_bytes(8))
            return (upper << 32) | lower
        if length < 0:
            raise ValueError(f"negative vector length {length} at byte {self.pos - 4} (corrupted data)")
        return length

    def read_header(self) -> None:
        format_tag = self.read_bytes(2)
        if format_tag != b"X\n":
            raise ValueError(f"not an XDR R serialization (starts with {format_tag!r}, expected b'X\\n'); only "
                             "the binary XDR format that saveRDS and lazy-load databases use is supported")
        version = self.read_int()
        self.read_bytes(8)  # the writer's R version and the minimal R version to read it: not needed here
        if version == 3:
            name = self.read_bytes(self.read_int()).decode("ascii", errors="replace")
            try:
                self.native_encoding = codecs.lookup(name).name
            except LookupError:
                raise ValueError(f"R serialization uses native encoding {name!r}, which Python does not know")
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version} (this reader handles 2 and 3)")

    def read_item(self) -> Any:
        flags = self.read_int()
        sexp_type = flags & 0xFF
        if sexp_type == NILVALUE_SXP:
            return None
        if sexp_type == REFSXP:
            return self.reference(flags >> 8 or self.read_int())  # large indices do not fit in the flags word
        if sexp_type == SYMSXP:
            symbol = RSymbol(self.string(self.read_int()))  # the CHARSXP of the name, with its own flags word
            self.references.append(symbol)
            return symbol
        if sexp_type == LISTSXP:
            return self.pairlist(flags)
        if sexp_type in _VECTOR_KINDS:
            vector = RVector(_VECTOR_KINDS[sexp_type], self.vector_values(sexp_type))
            if flags & _HAS_ATTRIBUTES:
                vector.attributes = self.attributes(self.read_item())
            return vector
        if sexp_type == CHARSXP:
            raise ValueError(f"a string (CHARSXP) outside a character vector at byte {self.pos - 4}")
        name = _TYPE_NAMES.get(sexp_type, "unknown type")
        raise ValueError(f"unsupported R object type {sexp_type} ({name}) at byte {self.pos - 4}; this reader "
                         "handles data (vectors, lists, pairlists, symbols), not code or environments")

    def reference(self, index: int) -> RSymbol:
        if not 1 <= index <= len(self.references):
            raise ValueError(f"R serialization refers to object #{index}, but only {len(self.references)} "
                             "were stored (corrupted data)")
        return self.references[index - 1]

    def string(self, flags: int) -> str | bytes | None:
        """A CHARSXP whose flags word was already read: the string, None for NA, bytes for the "bytes" encoding."""
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"expected a string (CHARSXP) at byte {self.pos - 4}, found type {flags & 0xFF}")
        length = self.read_int()
        if length == -1:
            return None  # NA_character_
        raw = self.read_bytes(length)
        levels = flags >> 12
        if levels & _BYTES:
            return raw
        encoding = "latin-1" if levels & _LATIN1 else "utf-8" if levels & (_UTF8 | _ASCII) else self.native_encoding
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise ValueError(f"string at byte {self.pos - length} is not valid {encoding}: {exc}") from None

    def vector_values(self, sexp_type: int) -> list[Any]:
        length = self.read_length()
        if sexp_type == STRSXP:
            return [self.string(self.read_int()) for _ in range(length)]
        if sexp_type == VECSXP:
            return [self.read_item() for _ in range(length)]
        if sexp_type == RAWSXP:
            return list(self.read_bytes(length))
        if sexp_type == REALSXP:
            return list(struct.unpack(f">{length}d", self.read_bytes(8 * length)))
        if sexp_type == CPLXSXP:
            parts = struct.unpack(f">{2 * length}d", self.read_bytes(16 * length))  # (real, imaginary) pairs
            return [complex(parts[i], parts[i + 1]) for i in range(0, 2 * length, 2)]
        integers = struct.unpack(f">{length}i", self.read_bytes(4 * length))  # integer or logical
        if sexp_type == LGLSXP:
            return [None if v == NA_INTEGER else bool(v) for v in integers]
        return [None if v == NA_INTEGER else v for v in integers]

    def pairlist(self, flags: int) -> RPairlist:
        """Cons cells, read in a loop: each cell's CDR is the next cell's flags word (NILVALUE ends the list)."""
        items: list[tuple[str | None, Any]] = []
        attributes: dict[str, Any] = {}
        while True:
            if flags & _HAS_ATTRIBUTES:
                cell_attributes = self.attributes(self.read_item())
                if not items:  # a pairlist's attributes are those of its first cell
                    attributes = cell_attributes
            tag = self.read_item() if flags & _HAS_TAG else None
            if tag is not None and not isinstance(tag, RSymbol):
                raise ValueError(f"pairlist tag at byte {self.pos} is not a symbol (corrupted data)")
            items.append((tag.name if tag else None, self.read_item()))
            flags = self.read_int()
            if flags & 0xFF == NILVALUE_SXP:
                return RPairlist(items, attributes)
            if flags & 0xFF != LISTSXP:
                raise ValueError(f"dotted pairlist (a cell's tail is type {flags & 0xFF}) is not supported")

    @staticmethod
    def attributes(pairlist: Any) -> dict[str, Any]:
        if not isinstance(pairlist, RPairlist) or any(tag is None for tag, _ in pairlist.items):
            raise ValueError("attributes must be a pairlist with a name on every entry (corrupted data)")
        return dict(pairlist.items)


def unserialize(data: bytes) -> Any:
    """One uncompressed R serialization (as `serialize(x, NULL)` writes it, XDR format) -> Python objects:
    None, RSymbol, RVector or RPairlist. Raises ValueError on malformed data or unsupported types."""
    reader = _Unserializer(data)
    reader.read_header()
    value = reader.read_item()
    if reader.pos != len(data):
        raise ValueError(f"R serialization has {len(data) - reader.pos} unread bytes after its object "
                         "(a length is wrong or the data is corrupted)")
    return value


def read_rds(blob: bytes) -> Any:
    """The contents of an `.rds` file (saveRDS): gzip, bzip2, xz or no compression around one serialization."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    elif blob[:3] == b"BZh":
        blob = bz2.decompress(blob)
    elif blob[:6] == b"\xfd7zXZ\x00":
        blob = lzma.decompress(blob)
    return unserialize(blob)


def decompress_entry(blob: bytes, compression: int) -> bytes:
    """One `.rdb` entry -> the serialization inside; `compression` is the index's `compressed` (0-3)."""
    if compression == 0:
        return blob
    if len(blob) < 5:
        raise ValueError(f"lazy-load entry of {len(blob)} bytes is too short (corrupted database)")
    expected = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    if compression == 1:
        method, payload = b"Z", body
    elif compression in (2, 3):
        method, payload = body[:1], body[1:]
    else:
        raise ValueError(f"unknown lazy-load compression {compression} (R writes FALSE, TRUE, 2 or 3)")
    decompressors = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    if method not in decompressors:
        raise ValueError(f"unknown compression type byte {method!r} in a lazy-load entry (expected Z, 2, X or 0)")
    try:
        out = decompressors[method](payload)
    except (zlib.error, OSError, lzma.LZMAError) as exc:
        raise ValueError(f"lazy-load entry does not decompress ({exc}); the database is corrupted") from None
    if len(out) != expected:
        raise ValueError(f"lazy-load entry decompressed to {len(out)} bytes, its header says {expected}")
    return out


def read_lazyload_db(base: str | Path) -> dict[str, Any]:
    """Every variable of the lazy-load database `<base>.rdx` + `<base>.rdb` (e.g. a package's `data/Rdata`),
    as {name: value}."""
    base = Path(base)
    index_path, data_path = Path(f"{base}.rdx"), Path(f"{base}.rdb")
    for path in (index_path, data_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; give the database path without .rdb/.rdx")
    index = read_rds(index_path.read_bytes())
    fields = dict(zip(index.names or [], index.values)) if isinstance(index, RVector) else {}
    variables, compressed = fields.get("variables"), fields.get("compressed")
    named_list = isinstance(variables, RVector) and variables.kind == "list" and variables.names is not None
    if not named_list or not isinstance(compressed, RVector) or len(compressed) != 1:
        raise ValueError(f"{index_path} is not a lazy-load index (needs a named list 'variables' and "
                         "a 'compressed' flag)")
    compression = compressed.values[0]
    if compression not in (False, True, 2, 3):  # TRUE is zlib; True == 1 in Python
        raise ValueError(f"{index_path}: unknown compression {compression!r} (R writes FALSE, TRUE, 2 or 3)")
    compression = int(compression)
    data = data_path.read_bytes()
    result = {}
    for name, location in zip(variables.names, variables.values):
        if not isinstance(location, RVector) or len(location) != 2:
            raise ValueError(f"{index_path}: the location of {name!r} is not an (offset, length) pair")
        offset, length = (int(v) for v in location.values)  # doubles in databases over 2 GB
        if offset + length > len(data):
            raise ValueError(f"{data_path} is {len(data)} bytes, but {name!r} ends at byte {offset + length} "
                             "(truncated file?)")
        result[name] = unserialize(decompress_entry(data[offset:offset + length], compression))
    return result
