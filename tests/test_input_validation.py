"""Bad input anywhere in the public API gives a typed PymemoryError that says what to do, never a pybind11
TypeError, an out-of-bounds read or a silently accepted value."""
from __future__ import annotations

import subprocess
import sys

import pytest

import pymemory
from pymemory import StreamingLLM
from pymemory._loader import _core


# ---- decide_shared_evictions (pure, no model) ------------------------------------------------------------------

@pytest.mark.parametrize(
    "args, message",
    [
        (("quorum", 1.0, 0, 2, [9, 9, 9, 9], [0.0, 1.0], 9), r"one entry per cached token \(got 4 and 2\)"),
        (("budget", 1.0, 2, 2, [9, 9], [0.0, 1.0, 2.0, 3.0], 9), r"got 2 and 4"),
        (("quorum", 1.0, 0, -1, [9, 9, 9], [0.0, 1.0, 2.0], 9), "n_sink must be >= 0"),
        (("budget", 1.0, 1, -5, [9, 9, 9], [0.0, 1.0, 2.0], 9), "n_sink must be >= 0"),
        (("quorum", 1.0, 0, 1, [1, 1, 1], [0.0, 1.0, 2.0], 0), "n_pairs must be >= 1"),
        (("quorum", 1.5, 0, 1, [1, 1, 1], [0.0, 1.0, 2.0], 3), r"quorum must be in \(0, 1\]"),
        (("budget", 1.0, -1, 1, [1, 1, 1], [0.0, 1.0, 2.0], 3), "max_cells must be >= 0"),
        (("lru", 1.0, 0, 1, [1, 1, 1], [0.0, 1.0, 2.0], 3), "namm_mode must be"),
        (("budget_mix", 1.0, 1, 1, [1, 1, 1], [0.0, 1.0, 2.0], 3, [0.0], 1), "one reserve score per cached token"),
        (("budget_mix", 1.0, 1, 1, [1, 1, 1], [0.0, 1.0, 2.0], 3, [0.0, 1.0, 2.0], -1), "reserve >= 0"),
        (("budget_zmax", 1.0, 1, 1, [1, 1, 1], [0.0, 1.0, 2.0], 3, [], 0, 65), "neighbours must be between 0 and 64"),
        (("budget_zmax", 1.0, 1, 1, [1, 1, 1], [0.0, 1.0, 2.0], 3, [], 0, -1), "neighbours must be between 0 and 64"),
    ],
)
def test_decide_shared_evictions_rejects_inconsistent_input(args, message):
    with pytest.raises(pymemory.InvalidArgumentError, match=message):
        _core.decide_shared_evictions(*args)


def test_decide_shared_evictions_still_decides_valid_input():
    assert _core.decide_shared_evictions("quorum", 1.0, 0, 1, [3, 3, 0, 3], [0.0, -1.0, 2.0, 0.0], 3) == [1]
    assert _core.decide_shared_evictions("budget", 1.0, 2, 0, [0, 3, 1, 0], [0.0, -1.0, 2.0, 0.0], 3) == [1, 2]


# ---- sampling parameters of the raw core ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=2.0), r"top_p must be in \(0, 1\] \(got 2"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-3), r"top_k must be >= 0 \(got -3\); use 0"),
        (dict(frequency_penalty=float("nan")), "must be finite"),
        (dict(dry_multiplier=-0.5), "dry_multiplier must be a finite number >= 0"),
        (dict(dry_multiplier=float("inf")), "dry_multiplier must be a finite number >= 0"),
        (dict(dry_base=0.5), "dry_base must be a finite number >= 1"),
        (dict(dry_allowed_length=0), "dry_allowed_length must be >= 1"),
        (dict(dry_penalty_last_n=-2), "dry_penalty_last_n must be >= -1"),
    ],
)
def test_core_sampling_params_refuse_out_of_range_values(kwargs, message):
    with pytest.raises(pymemory.InvalidArgumentError, match=message):
        _core.SamplingParams(**kwargs)


def test_core_sampling_params_accept_the_documented_off_values():
    p = _core.SamplingParams(top_k=0, top_p=1.0)
    assert p.top_k == 0 and p.top_p == 1.0


# ---- StreamingLLM ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(smollm2_path):
    with StreamingLLM(smollm2_path, window=60, n_threads=1) as llm:
        yield llm


LONE_SURROGATE = "Hello \udc80 world"


@pytest.mark.model
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda llm: llm.generate(LONE_SURROGATE), r"prompt contains .*lone surrogate .* at index 6"),
        (lambda llm: llm.chat(LONE_SURROGATE), "message contains .*lone surrogate"),
        (lambda llm: llm.chat([{"role": "user", "content": "a\ud800"}]), "message content contains"),
        (lambda llm: llm.chat({"role": "us\udfffer", "content": "hi"}), "message role contains"),
        (lambda llm: llm.tokenize(LONE_SURROGATE), "text contains .*lone surrogate"),
        (lambda llm: llm.generate("x", stop=[1, 2]), "stop must be a string or a list of non-empty strings"),
        (lambda llm: llm.generate("x", stop=[""]), "stop must be"),
        (lambda llm: llm.chat("x", stop=[1, 2]), "stop must be"),
        (lambda llm: llm.chat(42), "messages must be the user's text, a .* dict or a list of them .got int"),
        (lambda llm: llm.chat(None), "got NoneType"),
        (lambda llm: llm.chat([42]), "each message must be a dict"),
        (lambda llm: llm.generate("x", top_p=2), r"top_p must be in \(0, 1\] \(got 2\)"),
        (lambda llm: llm.generate("x", top_k=-3), r"top_k must be >= 0 \(got -3\)"),
        (lambda llm: llm.chat("x", top_k=-3), "top_k must be >= 0"),
        (lambda llm: llm.generate("x", dry_multiplier=-1), "dry_multiplier must be a finite number >= 0"),
        (lambda llm: llm.chat("x", dry_allowed_length=1.5), "dry_allowed_length must be an integer"),
        (lambda llm: llm.generate("x", temperature="hot"), "temperature must be a number"),
        (lambda llm: llm.generate("x", top_k=2.5), "top_k must be an integer"),
        (lambda llm: llm.generate("x", seed=True), "seed must be an integer"),
        (lambda llm: llm.generate([1, "a"]), "token ids must be integers"),
        (lambda llm: llm.generate([1, 2**40]), "outside the vocabulary"),
        (lambda llm: llm.generate(3.5), "expected a list of token ids"),
        (lambda llm: llm.detokenize("abc"), "expected a list of token ids"),
        (lambda llm: llm.tokenize(b"bytes"), "text must be a str"),
    ],
)
def test_bad_inputs_raise_typed_errors(llm, call, message):
    with pytest.raises(pymemory.InvalidArgumentError, match=message):
        result = call(llm)
        next(iter(result))  # errors must come at the call, but a generator may not even start wrongly


@pytest.mark.model
def test_a_single_stop_string_is_one_stop_string(llm):
    text = "".join(llm.generate("Count: one, two, three, four, five,", max_tokens=30, temperature=0,
                                ignore_eos=True, stop=", six"))
    assert ", six" not in text


@pytest.mark.model
def test_the_object_is_usable_after_each_bad_input(llm):
    for bad in (LONE_SURROGATE, 42):
        with pytest.raises(pymemory.InvalidArgumentError):
            llm.chat(bad)
    assert "".join(llm.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True))


# ---- python -m pymemory --------------------------------------------------------------------------------------------

def test_python_dash_m_runs_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "pymemory", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: pymemory" in proc.stdout and "generate" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pymemory", "generate", "x", "--window", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "pymemory: error: window must be >= 1" in proc.stderr


@pytest.mark.model
def test_python_dash_m_generates(smollm2_path):
    proc = subprocess.run([sys.executable, "-m", "pymemory", "generate", "The sea", "--model", smollm2_path,
                           "--window", "60", "--max-tokens", "5", "--temperature", "0", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The sea") or proc.stdout.strip()
