"""Shared fixtures: real models from the asset cache (fetched by the setup, see tools/setup.sh)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers

# Tokens generated per model by the long streaming test. CI keeps it short; the acceptance run uses 50000:
#   PYMEMORY_STREAM_TOKENS=50000 pytest tests/test_long_stream.py
STREAM_TOKENS = int(os.environ.get("PYMEMORY_STREAM_TOKENS", "2000"))


def _model(name: str) -> str:
    from pymemory import assets

    return os.fspath(assets.model_path(name))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return _model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_path() -> str:
    return _model("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen_path() -> str:
    return _model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """The raw model, loaded once per test session (engines are cheap to create on it)."""
    from pymemory._loader import _core

    _core.set_log_verbosity(0)
    return _core.Model.load(smollm2_path)


@pytest.fixture(scope="session")
def english_text() -> str:
    """A few thousand tokens of real English prose (Pride and Prejudice, from the asset cache)."""
    from pymemory import assets

    return assets.read_text("austen", part="prideprejudice")[:60_000]


@pytest.fixture(scope="session")
def mrope_model_path(tmp_path_factory, smollm2_path) -> str:
    """A real model rewritten with multi-axis M-RoPE positions: llama.cpp cannot shift its cache."""
    from helpers.gguf_surgery import to_mrope_model

    target = tmp_path_factory.mktemp("mrope") / "smollm2-as-qwen2vl.gguf"
    return os.fspath(to_mrope_model(Path(smollm2_path), target))


def pytest_sessionfinish(session, exitstatus):
    """PYMEMORY_MEASUREMENTS=path.json: write what the tests measured (helpers/measurements.py)."""
    from helpers.measurements import write_report

    write_report()

