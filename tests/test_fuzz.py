"""Fuzz test: random parameter combinations for StreamingLLM and its calls (fixed seed), and randomly corrupted
model and NAMM GGUF files. Every case must work or raise a PymemoryError; the cases run in a subprocess
(tests/helpers/fuzz_worker.py), so a crash fails this test and names the case instead of killing the run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model
pytest.importorskip("gguf")  # writes the NAMM file and reads the GGUF headers


@pytest.fixture(scope="module")
def namm_file(tmp_path_factory) -> str:
    from pymemory.namm.checkpoint import NammVector
    from pymemory.namm.convert import write_gguf
    from pymemory.namm.testing import random_params

    path = tmp_path_factory.mktemp("fuzz") / "namm.gguf"
    return write_gguf(NammVector(*random_params(9), source="fuzz"), path, "f32", delay=16)["output"]


@pytest.mark.parametrize("seed", [1])  # this seed once found an abort in llama.cpp's vocabulary loader
def test_random_parameters_and_corrupted_files_give_typed_errors_and_never_crash(tmp_path, smollm2_path, namm_file,
                                                                                   seed):
    job = {"model": smollm2_path, "namm": namm_file, "workdir": str(tmp_path), "seed": seed,
           "params": 200, "namms": 80, "models": 30}
    worker = Path(__file__).parent / "helpers" / "fuzz_worker.py"
    proc = subprocess.run([sys.executable, str(worker), json.dumps(job)], capture_output=True, text=True,
                          timeout=600)
    cases = [line[5:] for line in proc.stdout.splitlines() if line.startswith("case ")]
    assert proc.returncode == 0, (f"the worker died (exit code {proc.returncode}; negative: that signal) in case:\n"
                                  f"{cases[-1] if cases else '(none)'}\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{len(cases)} cases: {summary['counts']}")
    assert summary["untyped"] == [], "\n\n".join(summary["untyped"])
    assert len(cases) == job["params"] + job["namms"] + job["models"]
    assert summary["counts"]["ok"] > 20 and summary["counts"]["typed"] > 50  # both outcomes really occur


def test_a_model_with_a_repeated_vocabulary_entry_is_refused_not_aborted(tmp_path, smollm2_path):
    """What the fuzz found: llama.cpp asserts (SIGABRT) when two vocabulary entries have the same text. The loader
    refuses such a file first."""
    import shutil

    import gguf

    target = tmp_path / "repeated-token.gguf"
    shutil.copyfile(smollm2_path, target)
    reader = gguf.GGUFReader(smollm2_path)
    field = reader.fields["tokenizer.ggml.tokens"]
    texts = [field.parts[i] for i in field.data]
    first = {}
    for i, text in enumerate(texts):  # two different tokens of the same length: copy one's text over the other's
        if len(text) in first and bytes(texts[first[len(text)]]) != bytes(text):
            source, dest = texts[first[len(text)]], text
            break
        first.setdefault(len(text), i)
    offset = dest.ctypes.data - reader.data.ctypes.data
    with open(target, "r+b") as f:
        f.seek(offset)
        f.write(bytes(source))
    code = ("import sys, pymemory\nfrom pymemory._loader import _core\n"
            "try:\n    _core.Model.load(sys.argv[1])\nexcept pymemory.ModelLoadError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-2000:]}"
    assert "of its vocabulary have the same text; download it again" in proc.stdout
