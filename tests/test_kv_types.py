"""Every KV cache type the API accepts (f32, f16, bf16, q8_0, q4_0 for K and V) x flash attention (on, off, auto) x
policy either runs through evictions and K-shifts or is refused up front with an InvalidArgumentError that says
what to use instead (README, "KV cache types"). Before, type_k="bf16" aborted the process on the first K-shift.

The combinations run in worker subprocesses (tests/helpers/kv_matrix_worker.py): a combination that crashes the
process fails its own test and the worker restarts with the next one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QUANTIZED = ("q8_0", "q4_0")
FLASH = ("on", "off", "auto")
SHIFTING = {"sink", "window", "context_shift", "h2o+reindex", "tova+reindex", "namm+reindex"}  # K-shifts
ATTENTION_SCORED = {"h2o", "h2o+reindex", "tova+reindex", "namm", "namm+reindex"}  # flash attention off


def combinations() -> list[tuple[str, str, str, str]]:
    """The full type_k x type_v x flash matrix for sink (shifts, flash attention as asked); for the other policies
    each K type and each V type with the other at f16, and the flash settings that behave differently."""
    combos = [(k, v, fa, "sink") for k in TYPES for v in TYPES for fa in FLASH]
    for policy in ("window", "context_shift", "recompute", "none", "h2o", "h2o+reindex", "tova+reindex", "namm",
                   "namm+reindex"):
        combos += [(k, "f16", "auto", policy) for k in TYPES]
        combos += [("f16", v, "auto", policy) for v in TYPES if v != "f16"]
        if policy in ATTENTION_SCORED:  # flash attention on: refused (they read attention probabilities)
            combos.append(("f16", "f16", "on", policy))
        else:  # flash attention off: quantized V refused, the others run
            combos += [("f16", v, "off", policy) for v in ("f32", "bf16", "q8_0")]
    return combos


COMBOS = combinations()


def expected_refusal(type_k: str, type_v: str, flash: str, policy: str) -> str | None:
    """The message (regex) of the up-front refusal this combination must get, or None if it must run."""
    if type_k == "bf16" and policy in SHIFTING:
        return r"type_k='bf16' cannot be used with policy .*RoPE has no bf16 kernel; use type_k='f16'"
    if policy in ATTENTION_SCORED and flash == "on":
        return r"reads attention probabilities.*use flash_attention='auto'"
    if type_v in QUANTIZED and (flash == "off" or policy in ATTENTION_SCORED):
        return rf"type_v='{type_v}' needs flash attention.*type_v='f16'"
    return None


@pytest.fixture(scope="module")
def namm_file(tmp_path_factory) -> str | None:
    try:
        from pymemory.namm.checkpoint import NammVector
        from pymemory.namm.convert import write_gguf
        from pymemory.namm.testing import random_params

        path = tmp_path_factory.mktemp("kv_types") / "namm.gguf"
        return write_gguf(NammVector(*random_params(5), source="test"), path, "f32")["output"]
    except ImportError:  # the gguf writer is an optional extra
        return None


@pytest.fixture(scope="module")
def results(request, smollm2_path, namm_file) -> dict[tuple, dict]:
    worker = Path(__file__).parent / "helpers" / "kv_matrix_worker.py"
    selected = {item.callspec.params["combo"] for item in request.session.items
                if getattr(item, "callspec", None) and "combo" in item.callspec.params}  # honours -k
    todo = [c for c in COMBOS if c in selected and (namm_file or "namm" not in c[3])]
    out: dict[tuple, dict] = {}
    while todo:
        job = json.dumps({"model": smollm2_path, "namm": namm_file, "combos": todo})
        proc = subprocess.run([sys.executable, str(worker)], input=job, capture_output=True, text=True, timeout=900)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("start "):
                started = int(line.split()[1])
            elif line.startswith("{"):
                r = json.loads(line)
                out[tuple(todo[r["i"]])] = r
        if proc.returncode == 0:
            break
        if started is None or tuple(todo[started]) in out:  # died outside a combination: report on all left
            for c in todo:
                out.setdefault(tuple(c), {"status": "crash", "message": proc.stderr[-2000:]})
            break
        out[tuple(todo[started])] = {"status": "crash", "message": f"exit code {proc.returncode} (negative: "
                                                                   f"killed by that signal)\n{proc.stderr[-2000:]}"}
        todo = todo[started + 1:]
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_kv_type_combination_runs_or_is_refused_up_front(results, namm_file, combo):
    if "namm" in combo[3] and not namm_file:
        pytest.skip("writing a NAMM GGUF needs the gguf package (pip install '.[namm]')")
    result = results[combo]
    refusal = expected_refusal(*combo)
    if refusal is None:
        assert result["status"] == "ok", result
    else:
        assert result["status"] == "error" and result["error"] == "InvalidArgumentError", result
        assert __import__("re").search(refusal, result["message"]), result["message"]


def test_the_matrix_covers_every_accepted_type_and_flash_setting():
    assert {c[0] for c in COMBOS} == set(TYPES) and {c[1] for c in COMBOS} == set(TYPES)
    assert {c[2] for c in COMBOS} == set(FLASH)
    assert sum(expected_refusal(*c) is None for c in COMBOS) > len(COMBOS) // 2  # most combinations must run
