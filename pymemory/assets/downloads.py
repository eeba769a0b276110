"""Downloading one package with the registries' own clients: `pip download --no-deps` or `apt-get download`.

The packages are downloaded, never installed or imported. pip's and apt's download lines (and pip's progress
every 10 %) are echoed to stderr; a failure whose output shows that the index or mirror cannot be reached raises
RegistryUnreachableError, any other failure AssetError with the last lines of output and what to do.
"""
from __future__ import annotations

import collections
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .cache import sha256_of
from .errors import AssetError, RegistryUnreachableError
from .registry import Package


def progress(message: str) -> None:
    print(f"[pymemory] {message}", file=sys.stderr, flush=True)


_RAW_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")  # pip --progress-bar raw
_ECHOED = re.compile(r"\s*(Downloading|Get:)")  # the lines worth showing: what is downloaded, and its size
_UNREACHABLE = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|"
    r"Network is unreachable|No route to host|Connection refused|Max retries exceeded|timed out|"
    r"Could not resolve|Temporary failure resolving|Could not connect to|ProxyError", re.IGNORECASE)


def run_download(command: list[str], cwd: Path, label: str) -> tuple[int, str]:
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
            raw = _RAW_PROGRESS.fullmatch(line.strip())
            if raw:
                done, total = int(raw[1]), int(raw[2])
                if total and done * 100 >= next_percent * total:
                    progress(f"{label}: {done / 1e6:.0f} of {total / 1e6:.0f} MB")
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
    status, output = run_download(command, directory, package.spec)
    if status != 0:
        error = RegistryUnreachableError if _UNREACHABLE.search(output) else AssetError
        raise error(f"`pip download {package.spec}` failed:\n{output}\nCheck the network connection and pip's index "
                    "settings (pip config list), then run the fetch again.")


def _apt_download(package: Package, directory: Path) -> None:
    if shutil.which("apt-get") is None:
        raise AssetError(f"this asset comes from the Debian package {package.spec}, and apt-get is not available "
                         "here; fetch it on a Debian or Ubuntu machine (pymemory fetch) and copy the cache over, "
                         "or set PYMEMORY_CACHE to a cache that has it")
    status, output = run_download(["apt-get", "download", package.spec], directory, package.spec)
    if status == 0:
        return
    if _UNREACHABLE.search(output):
        raise RegistryUnreachableError(f"`apt-get download {package.spec}` cannot reach the Debian mirror:\n{output}")
    if "Unable to locate package" in output or "no installation candidate" in output:
        raise AssetError(f"apt does not know the package {package.spec}: the package lists are missing or stale. "
                         "Run `apt-get update` (as root) and fetch again.")
    raise AssetError(f"`apt-get download {package.spec}` failed:\n{output}")


def download_package(package: Package, directory: Path) -> Path:
    """Downloads one package into the empty `directory`; returns the file (wheel or .deb)."""
    (_apt_download if package.registry == "debian" else _pip_download)(package, directory)
    files = [p for p in directory.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"expected one downloaded file for {package.spec} in {directory}, found {len(files)}")
    return files[0]


def verified_download(package: Package, scratch: Path) -> Path:
    """Downloads a package into a fresh directory under `scratch` and checks its sha256 where that is known."""
    directory = Path(tempfile.mkdtemp(dir=scratch))
    path = download_package(package, directory)
    if package.registry == "debian" and not path.name.startswith(f"{package.spec}_{package.debian_version}_"):
        # Another Debian release builds another .deb of the same data: its hash cannot be known here.
        progress(f"{path.name} is not version {package.debian_version}, whose sha256 is recorded; not checked")
        return path
    digest = sha256_of(path)
    if digest != package.sha256:
        raise AssetError(f"{path.name} has sha256 {digest}, expected {package.sha256}: the registry served a "
                         "different file. Retry; if it persists, the pinned package was replaced upstream.")
    return path
