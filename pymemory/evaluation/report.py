"""Reports: run metadata, JSON and markdown writers, the token-id cache, progress lines."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def machine_info() -> dict:
    cpu = cpu_model()
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except Exception:  # pragma: no cover
        llama_version = "?"
    from .._loader import _core

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "backends": _core.backend_summary(),
        "llama_cpp_python": llama_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# The paths whose uncommitted changes alter what a report measures (reports and docs do not).
CODE_PATHS = ("cpp", "bindings", "pymemory", "tools", "CMakeLists.txt", "pyproject.toml")


def git_commit(root: Path | None = None) -> str:
    """The short commit of this checkout (or of `root`), with "+changes" when its code differs from that commit: a
    report must not claim a commit whose code it did not run."""
    try:
        root = root or Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        commit = out.stdout.strip()
        if not commit:
            return "?"
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                  *CODE_PATHS], capture_output=True, text=True)
        return commit + "+changes" if changed.stdout.strip() else commit
    except OSError:
        return "?"


def run_metadata(argv: Sequence[str] | None = None) -> dict:
    return {
        "command": "pymemory " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine_info(),
    }


def tool_metadata(script: str, argv: Sequence[str]) -> dict:
    """The header of a tools/ script's report: its command line, date, commit and machine."""
    import shlex

    root = Path(__file__).resolve().parents[2]
    return {"command": shlex.join([os.path.relpath(script, root)] + list(argv)),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "machine": machine_summary()}


def machine_summary() -> str:
    """One line naming the CPU model: llama.cpp is built for the machine it runs on (GGML_NATIVE), so the same
    commit gives slightly different logits on another CPU family, and a report must say which one it ran on."""
    return f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report_files(out: str | os.PathLike, data: dict, markdown: str) -> None:
    """OUT.json and OUT.md of a tools/ script (OUT without extension); the markdown also goes to stdout."""
    out = Path(out)
    write_json(out.with_suffix(".json"), data)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: str | os.PathLike, title: str, meta: dict, body: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = meta["machine"]
    header = (f"# {title}\n\n`{meta['command']}`\n\n{meta['date']}, commit {meta['commit']}, {m['cpu']} "
              f"({m['cores']} cores, load {m['load_average'][0]}), llama-cpp-python {m['llama_cpp_python']}\n\n")
    path.write_text(header + body + "\n")
    return path


def cached_token_ids(model, model_path: str, text: str, add_special: bool = True) -> np.ndarray:
    """Tokenizes once per (model file, text) and keeps the ids under <asset cache>/tokens (SentencePiece models
    tokenize megabyte strings slowly)."""
    from ..assets import cache_dir

    stat = os.stat(model_path)
    key = hashlib.sha256(f"{os.path.abspath(model_path)}|{stat.st_size}|{stat.st_mtime_ns}|{add_special}|".encode()
                         + text.encode("utf-8")).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.exists():
        return np.load(path)
    ids = np.asarray(model.tokenize(text, add_special, False), dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ids)
    return ids


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal or PYMEMORY_PROGRESS=1)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.start = max(total, 1), label, time.perf_counter()
        self.enabled = sys.stderr.isatty() or os.environ.get("PYMEMORY_PROGRESS") == "1"
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.5 and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0
        width = 30
        filled = int(width * done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                         f"{rate:.0f} tok/s eta {eta:.0f}s ")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
