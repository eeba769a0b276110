"""The R serialization and lazy-load reader, on small streams built here byte by byte as R writes them."""
from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib

import pytest

from pymemory.rdata import (RPairlist, RVector, decompress_entry, read_lazyload_db, read_rds,
                            unserialize)

# ---- a tiny writer for R's XDR serialization (R Internals, "Serialization Formats") ------------------------------

HAS_ATTRIBUTES, HAS_TAG = 1 << 9, 1 << 10
ASCII, UTF8, LATIN1, BYTES = 64, 8, 4, 2  # CHARSXP levels, stored from bit 12 of the flags word
NILVALUE = struct.pack(">i", 254)


def ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 3, native_encoding: str = "UTF-8") -> bytes:
    out = b"X\n" + ints(version, 0x040201, 0x030500)  # written by R 4.2.1, readable by R >= 3.5.0
    if version == 3:
        out += ints(len(native_encoding)) + native_encoding.encode()
    return out


def charsxp(text: str | bytes | None, levels: int = UTF8) -> bytes:
    if text is None:
        return ints(9, -1)  # NA_character_
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    return ints(9 | levels << 12, len(raw)) + raw


def symbol(name: str) -> bytes:
    return ints(1) + charsxp(name, ASCII)


def reference(index: int) -> bytes:
    return ints(255 | index << 8)


def pairlist(*entries: tuple[bytes | None, bytes]) -> bytes:
    """Cons cells: (tag bytes or None, value bytes) each, then the NILVALUE that ends the list."""
    return b"".join(ints(2 | (HAS_TAG if tag else 0)) + (tag or b"") + value for tag, value in entries) + NILVALUE


def vector(sexp_type: int, length: int, body: bytes, attributes: bytes = b"") -> bytes:
    return ints(sexp_type | (HAS_ATTRIBUTES if attributes else 0), length) + body + attributes


def strsxp(*items: str | None, attributes: bytes = b"") -> bytes:
    return vector(16, len(items), b"".join(charsxp(i) for i in items), attributes)


def intsxp(*values: int, attributes: bytes = b"") -> bytes:
    return vector(13, len(values), ints(*values), attributes)


NA_INTEGER = -(2**31)


# ---- values ------------------------------------------------------------------------------------------------------

def test_strings_with_na_and_every_encoding():
    body = vector(16, 6, charsxp("Emma") + charsxp(None) + charsxp("naïve — 日本") + charsxp("plain", ASCII)
                  + charsxp("caf\xe9".encode("latin-1"), LATIN1) + charsxp(b"\xff\x00raw", BYTES))
    value = unserialize(header() + body)
    assert isinstance(value, RVector) and value.kind == "character"
    assert value.values == ["Emma", None, "naïve — 日本", "plain", "café", b"\xff\x00raw"]
    assert value.names is None and value.attributes == {}


def test_unflagged_strings_use_the_native_encoding_of_the_stream():
    latin1 = charsxp("Bront\xeb".encode("latin-1"), levels=0)
    assert unserialize(header(3, "latin1") + vector(16, 1, latin1)).values == ["Brontë"]
    assert unserialize(header(2) + vector(16, 1, charsxp("ë".encode(), levels=0))).values == ["ë"]  # v2: UTF-8
    with pytest.raises(ValueError, match="not valid utf-8"):
        unserialize(header(2) + vector(16, 1, latin1))
    with pytest.raises(ValueError, match="Python does not know"):
        unserialize(header(3, "EBCDIC-nonsense") + NILVALUE)


def test_atomic_vectors_and_their_missing_values():
    assert unserialize(header() + intsxp(1, NA_INTEGER, -7)).values == [1, None, -7]
    logical = unserialize(header() + vector(10, 3, ints(1, 0, NA_INTEGER)))
    assert logical.kind == "logical" and logical.values == [True, False, None]
    doubles = unserialize(header() + vector(14, 3, struct.pack(">3d", 2.5, -math.inf, math.nan))).values
    assert doubles[:2] == [2.5, -math.inf] and math.isnan(doubles[2])
    assert unserialize(header() + vector(15, 1, struct.pack(">2d", 1.0, -2.0))).values == [1 - 2j]
    assert unserialize(header() + vector(24, 3, b"\x00\x7f\xff")).values == [0, 127, 255]
    assert unserialize(header() + NILVALUE) is None


def test_long_vector_length_form():
    # R writes -1 and then the length's upper and lower 32 bits for vectors of 2^31 elements or more.
    assert unserialize(header() + ints(13, -1, 0, 2) + ints(5, 6)).values == [5, 6]
    with pytest.raises(ValueError, match="needs 17179869184 more"):  # 2^32 integers: the upper half counts
        unserialize(header() + ints(13, -1, 1, 0) + ints(5, 6))


def test_nested_lists_names_attributes_and_symbol_references():
    # list(a = 1L, b = list(c = "x", d = NULL)) with class "book". R writes a symbol once, where it first
    # occurs, and later refers to it by its position in reading order: the inner list's attributes come
    # after its elements and before the outer list's, so `names` is symbol #1 and `class` #2.
    inner = vector(19, 2, strsxp("x") + NILVALUE, pairlist((symbol("names"), strsxp("c", "d"))))
    outer_attributes = pairlist((reference(1), strsxp("a", "b")), (symbol("class"), strsxp("book")))
    value = unserialize(header() + vector(19, 2, intsxp(1) + inner, outer_attributes))
    assert value.kind == "list" and value.names == ["a", "b"]
    assert list(value.attributes) == ["names", "class"] and value.attributes["class"].values == ["book"]
    first, second = value.values
    assert first == RVector("integer", [1])
    assert second.kind == "list" and second.names == ["c", "d"]
    assert second.values == [RVector("character", ["x"]), None]


def test_references_packed_in_the_flags_word_or_following_it():
    # An index too large for the 24 bits above the type is written as 0 there, then as a full integer.
    value = unserialize(header() + pairlist((symbol("x"), intsxp(1)), (symbol("y"), intsxp(2)),
                                            (ints(255) + ints(1), intsxp(3)), (reference(2), intsxp(4))))
    assert [tag for tag, _ in value.items] == ["x", "y", "x", "y"]
    with pytest.raises(ValueError, match="refers to object #3, but only 1"):
        unserialize(header() + pairlist((symbol("x"), intsxp(1)), (reference(3), intsxp(2))))


def test_pairlists_as_values_and_long_ones_without_recursion():
    value = unserialize(header() + pairlist((symbol("n"), intsxp(3)), (None, strsxp("untagged"))))
    assert isinstance(value, RPairlist)
    assert value.items == [("n", RVector("integer", [3])), (None, RVector("character", ["untagged"]))]
    # A pairlist's own attributes come first in its first cell, before the tag.
    with_attributes = ints(2 | HAS_ATTRIBUTES | HAS_TAG) + pairlist((symbol("class"), strsxp("args")))
    value = unserialize(header() + with_attributes + symbol("n") + intsxp(3) + NILVALUE)
    assert value.items == [("n", RVector("integer", [3]))] and value.attributes["class"].values == ["args"]
    # 20,000 cells: deeper than Python's recursion limit if the reader recursed into each tail.
    long = unserialize(header() + pairlist(*[(None, intsxp(i)) for i in range(20_000)]))
    assert len(long.items) == 20_000 and long.items[-1][1].values == [19_999]


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blob, message", [
    (header() + strsxp("abc")[:-1], "ends early"),
    (b"A\n" + header()[2:] + NILVALUE, "not an XDR R serialization"),
    (b"X\n" + ints(1, 0, 0) + NILVALUE, "unsupported R serialization version 1"),
    (header() + ints(3), r"unsupported R object type 3 \(closure"),
    (header() + ints(4), r"unsupported R object type 4 \(environment\)"),
    (header() + ints(238), "ALTREP"),
    (header() + ints(99), "unknown type"),
    (header() + NILVALUE + b"\0", "1 unread bytes"),
    (header() + charsxp("loose"), "outside a character vector"),
    (header() + ints(16, 1) + ints(13, 0), "expected a string"),
    (header() + ints(13, -5), "negative vector length"),
    (header() + ints(2) + intsxp(1) + intsxp(2), r"dotted pairlist"),
    (header() + vector(13, 1, ints(1), pairlist((None, strsxp("no tag")))), "name on every entry"),
    (header() + ints(2 | HAS_TAG) + intsxp(1) + intsxp(2) + NILVALUE, "tag .* is not a symbol"),
])
def test_malformed_or_unsupported_streams_raise_value_error(blob, message):
    with pytest.raises(ValueError, match=message):
        unserialize(blob)


# ---- compression and lazy-load databases -------------------------------------------------------------------------

def compressed_entry(raw: bytes, method: bytes | None) -> bytes:
    """An .rdb entry: the uncompressed length, then (for R's compress = 2 or 3) a type byte and the payload."""
    payload = {None: zlib.compress, b"Z": zlib.compress, b"2": bz2.compress, b"X": lzma.compress,
               b"0": bytes}[method](raw)
    return struct.pack(">I", len(raw)) + (method or b"") + payload


@pytest.mark.parametrize("compression, method", [(1, None), (2, b"Z"), (2, b"2"), (2, b"0"), (3, b"X")])
def test_every_lazy_load_compression(compression, method):
    raw = header() + strsxp("a")
    assert decompress_entry(compressed_entry(raw, method), compression) == raw
    assert decompress_entry(raw, 0) == raw


def test_damaged_entries_are_reported():
    raw = header() + strsxp("a")
    with pytest.raises(ValueError, match="its header says"):
        decompress_entry(struct.pack(">I", len(raw) + 1) + zlib.compress(raw), 1)
    with pytest.raises(ValueError, match="type byte b'Q'"):
        decompress_entry(struct.pack(">I", len(raw)) + b"Q" + zlib.compress(raw), 3)
    with pytest.raises(ValueError, match="does not decompress"):
        decompress_entry(struct.pack(">I", len(raw)) + b"not zlib", 1)
    with pytest.raises(ValueError, match="too short"):
        decompress_entry(b"\0\0", 1)
    with pytest.raises(ValueError, match="unknown lazy-load compression 7"):
        decompress_entry(compressed_entry(raw, None), 7)


@pytest.mark.parametrize("wrap", [gzip.compress, bz2.compress, lzma.compress, bytes])
def test_rds_files_in_every_container(wrap):
    assert read_rds(wrap(header() + strsxp("saved"))).values == ["saved"]


def write_database(base, variables: dict[str, bytes], compression: int = 1, method: bytes | None = None,
                   index_fields: bytes | None = None) -> None:
    """Writes <base>.rdb and <base>.rdx as R's makeLazyLoadDB does (the index saved with saveRDS, gzip)."""
    data, locations = b"", []
    for raw in variables.values():
        entry = compressed_entry(header() + raw, method) if compression else header() + raw
        locations.append(intsxp(len(data), len(entry)))
        data += entry
    # `compressed` is logical for FALSE/TRUE and a double for 2 and 3, as R's `compress` argument.
    flag = vector(10, 1, ints(compression)) if compression < 2 else vector(14, 1, struct.pack(">d", compression))
    fields = index_fields or (
        vector(19, len(locations), b"".join(locations), pairlist((symbol("names"), strsxp(*variables))))
        + vector(19, 0, b"", pairlist((reference(1), strsxp())))
        + flag)
    names_tag = symbol("names") if index_fields else reference(1)  # the symbol is #1 once `variables` has it
    index = vector(19, 3, fields, pairlist((names_tag, strsxp("variables", "references", "compressed"))))
    base.with_suffix(".rdb").write_bytes(data)
    base.with_suffix(".rdx").write_bytes(gzip.compress(header() + index))


@pytest.mark.parametrize("compression, method", [(1, None), (3, b"X"), (0, None)])
def test_lazy_load_database(tmp_path, compression, method):
    base = tmp_path / "Rdata"
    write_database(base, {"emma": strsxp("EMMA", "", "By Jane Austen"), "counts": intsxp(3, NA_INTEGER)},
                   compression, method)
    db = read_lazyload_db(base)
    assert list(db) == ["emma", "counts"]
    assert db["emma"].values == ["EMMA", "", "By Jane Austen"] and db["counts"].values == [3, None]


def test_lazy_load_database_errors(tmp_path):
    base = tmp_path / "Rdata"
    with pytest.raises(FileNotFoundError, match="without .rdb/.rdx"):
        read_lazyload_db(base)
    write_database(base, {"x": strsxp("a")}, index_fields=intsxp(1) + intsxp(2) + intsxp(3))
    with pytest.raises(ValueError, match="not a lazy-load index"):
        read_lazyload_db(base)
    write_database(base, {"x": strsxp("a")})
    base.with_suffix(".rdb").write_bytes(base.with_suffix(".rdb").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"truncated file\?"):
        read_lazyload_db(base)
