"""Asset cache: verification, re-fetching corrupted files, name resolution, and the real assets."""
from __future__ import annotations

import hashlib
import os
import struct
import zlib

import pytest

from pymemory import ModelNotFoundError, assets
from pymemory.rdata import RObject, decompress, read_rds, unserialize


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMEMORY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_verify_file_catches_size_and_hash(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    assets.verify_file(f, 5, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(assets.AssetError, match="has 5 bytes, expected 6"):
        assets.verify_file(f, 6, None)
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.verify_file(f, 5, "0" * 64)
    with pytest.raises(assets.AssetError, match="missing"):
        assets.verify_file(tmp_path / "nope", None, None)


def test_corrupted_cached_model_is_fetched_again(private_cache, monkeypatch):
    payload = b"GGUF" + os.urandom(100)
    fake = assets.Asset("tiny", "model", "test", ("models/tiny.gguf",),
                        lambda a, d: (d / a.files[0]).parent.mkdir(parents=True, exist_ok=True) or
                        (d / a.files[0]).write_bytes(payload),
                        len(payload), hashlib.sha256(payload).hexdigest())
    calls = []
    original = fake.fetch
    monkeypatch.setitem(assets.ASSETS, "tiny", assets.Asset(*[getattr(fake, f) for f in ("name", "kind", "description",
                        "files")], lambda a, d: (calls.append(1), original(a, d)), fake.size, fake.sha256))
    path = assets.model_path("tiny")
    assert path.read_bytes() == payload and len(calls) == 1
    assert assets.model_path("tiny") == path and len(calls) == 1  # cached: no second fetch
    path.write_bytes(payload[:-1] + b"x")  # same size, different content, new mtime
    assert assets.model_path("tiny").read_bytes() == payload and len(calls) == 2
    path.write_bytes(payload[:50])  # truncated
    with pytest.raises(assets.AssetError, match="not in the cache"):
        assets.model_path("tiny", download=False)


def test_resolve_model(private_cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match="give a .gguf path"):
        assets.resolve_model(tmp_path / "missing.gguf")
    existing = tmp_path / "m.gguf"
    existing.write_bytes(b"GGUF")
    assert assets.resolve_model(existing) == existing
    with pytest.raises(assets.AssetError, match="unknown asset"):
        assets.model_path("gpt-17")
    with pytest.raises(assets.AssetError, match="is a text"):
        assets.model_path("austen")


# ---- R serialization ---------------------------------------------------------------------------------------

def xdr(*ints: int) -> bytes:
    return b"".join(struct.pack(">i", i) for i in ints)


def charsxp(text: str | None, utf8: bool = True) -> bytes:
    if text is None:
        return xdr(9, -1)
    raw = text.encode("utf-8")
    return xdr(9 | ((1 << 3) << 12 if utf8 else 0), len(raw)) + raw


def strsxp(*items: str | None, attrs: bytes = b"") -> bytes:
    flags = 16 | ((1 << 9) if attrs else 0)
    return xdr(flags, len(items)) + b"".join(charsxp(i) for i in items) + attrs


def names_attr(*names: str) -> bytes:
    # pairlist node with tag: flags LISTSXP | has_tag; tag = SYMSXP(CHARSXP "names"); car = STRSXP; cdr = NILVALUE
    return xdr(2 | (1 << 10)) + xdr(1) + charsxp("names") + strsxp(*names) + xdr(254)


def stream(body: bytes, version: int = 3) -> bytes:
    header = b"X\n" + xdr(version, 0x40100, 0x30500)
    if version == 3:
        header += xdr(5) + b"UTF-8"
    return header + body


def test_r_strings_na_utf8_and_names():
    obj = unserialize(stream(strsxp("Emma", None, "naïve — café", attrs=names_attr("a", "b", "c"))))
    assert isinstance(obj, RObject) and obj.value == ["Emma", None, "naïve — café"]
    assert obj.names == ["a", "b", "c"]


def test_r_nested_lists_integers_and_references():
    body = xdr(19 | (1 << 9), 2)                      # VECSXP of 2 with attributes
    body += xdr(13, 3) + xdr(1, -(2**31), 7)          # INTSXP with NA
    body += xdr(14, 1) + struct.pack(">d", 2.5)       # REALSXP
    # attributes: class = "x", then a tag written as a back-reference (REFSXP 2) to the second symbol seen
    body += xdr(2 | (1 << 10)) + xdr(1) + charsxp("class") + strsxp("x")
    body += xdr(2 | (1 << 10)) + xdr(1) + charsxp("names") + strsxp("a", "b")
    body += xdr(2 | (1 << 10)) + xdr(255 | (2 << 8)) + strsxp("y", "z") + xdr(254)
    obj = unserialize(stream(body, version=2))
    assert obj.value[0].value == [1, None, 7] and obj.value[1].value == [2.5]
    assert obj.attributes["class"].value == ["x"]
    assert obj.names == ["y", "z"]  # the reference resolved to the symbol "names" (and the later value wins)


def test_r_compression_and_errors():
    raw = stream(strsxp("a"))
    assert decompress(struct.pack(">I", len(raw)) + zlib.compress(raw)) == raw
    assert decompress(struct.pack(">I", len(raw)) + b"Z" + zlib.compress(raw)) == raw
    gz = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    assert read_rds(gz.compress(raw) + gz.flush()).value == ["a"]
    with pytest.raises(ValueError, match="truncated"):
        unserialize(raw[:-2])
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"A\n" + raw[2:])
    with pytest.raises(ValueError, match="unsupported R object type 21"):
        unserialize(stream(xdr(21)))


# ---- the real assets (fetched by the setup) ---------------------------------------------------------------

@pytest.mark.assets
def test_real_austen_texts():
    text = assets.read_text("austen", part="prideprejudice")
    assert text.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession" in text
    assert text.count("\nChapter ") == 61
    assert len(text.splitlines()) == 13030
    assert sorted(p.stem for p in assets.text_paths("austen")) == sorted(assets.AUSTEN_NOVELS)
    with pytest.raises(assets.AssetError, match="no part 'ulysses'"):
        assets.read_text("austen", part="ulysses")


@pytest.mark.assets
def test_real_models_are_verified():
    for name in ("smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"):
        asset = assets.ASSETS[name]
        path = assets.model_path(name)
        assert path.stat().st_size == asset.size
        assert any(info.name == name and info.present for info in assets.list_assets())
