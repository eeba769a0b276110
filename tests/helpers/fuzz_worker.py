"""Fuzzes the public API for tests/test_fuzz.py: random parameter combinations (fixed seed) for StreamingLLM and its
calls, and corrupted model and NAMM GGUF files. Every case must succeed or raise a PymemoryError; anything else is
recorded, and a crash kills this process (the parent reports the case printed last).

Usage: fuzz_worker.py JOB_JSON  with {"model", "namm", "workdir", "seed", "params", "models", "namms"}.
Prints "case <description>" before each case and one JSON summary line at the end.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import traceback

MISSING = object()


def parameter_pools(namm_path: str) -> dict[str, list]:
    from pymemory import POLICIES

    types = ["f32", "f16", "bf16", "q8_0", "q4_0"]
    return {
        "n_sink": [0, 1, 4, -1, 2.5, "4", True, 2**31, 300],
        "window": [1, 8, 20, 60, 0, -5, 3.0, None, 2**40],
        "n_ctx": [None, 16, 64, 1, 0, -1],
        "policy": [*POLICIES, "lru", "", None, 3],
        "evict_chunk": [None, 1, 4, 0, -1, 10**6, 1.5],
        "prefill_chunk": [None, 1, 7, 0, -3],
        "flash_attention": ["auto", "on", "off", "maybe", None, 1],
        "type_k": [*types, "q3", None, 16],
        "type_v": [*types, "q3", None],
        "reindex": [None, True, False, "yes"],
        "h2o_recent": [None, 0, 3, 59, -2, 10**6],
        "namm_path": [None, namm_path, "/nonexistent/namm.gguf", 7],
        "namm_mode": [None, "quorum", "budget", "budget_max", "budget_zmax", "budget_mix", "x", 2],
        "quorum": [None, 0.5, 1.0, 0.0, 1.5, math.nan, "half"],
        "max_cells": [None, 1, 20, 0, -1],
        "namm_delay": [None, 16, 17, 15, 0, 10**6],
        "pin_system_prompt": [False, True],
        "chat_template": [None, "chatml", "{{ nonsense", "", 3],
        "seed": [0, 1, -1, 2**32, "x"],
        "use_extra_bufts": [True, False, "no"],
    }


def call_pools() -> dict[str, list]:
    return {
        "max_tokens": [0, 1, 3, -1, None, 2.0, "5"],
        "temperature": [0, 0.7, -1.0, math.nan, math.inf, "hot"],
        "top_k": [0, 1, 40, -3, 2.5],
        "top_p": [1.0, 0.5, 0.0, 2.0, math.nan],
        "min_p": [0.0, 0.05, 1.5, -0.1],
        "repeat_penalty": [1.0, 1.1, 0.0, -1.0, math.nan],
        "repeat_last_n": [64, 0, -1, -2, 10**6],
        "frequency_penalty": [0.0, 0.5, math.inf],
        "presence_penalty": [0.0, -0.5, math.nan],
        "seed": [None, 0, 7, -1, 2**33],
        "stop": [None, ["."], ".", [1, 2], [""], [], ("a", "b")],
        "ignore_eos": [False, True],
    }


def prompts() -> list:
    return ["Hello", "", "Once upon a time " * 30, "\udc80 lone", "emoji \U0001F600 ok", [1, 2, 3], [], [-1],
            [10**9], [1, "x"], None, 42, b"bytes", "<|im_start|>user\nhi<|im_end|>"]


def messages() -> list:
    return ["Hi", "", {"role": "user", "content": "Hi"}, [{"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"}], [], 42, None, [{"role": "user"}], [{"role": 1, "content": "x"}],
            {"role": "user", "content": "\ud800"}, [{"role": "user", "content": "x" * 2000}]]


def pick(rng: random.Random, pools: dict[str, list], p: float) -> dict:
    return {k: rng.choice(v) for k, v in pools.items() if rng.random() < p}


def run_parameter_cases(rng: random.Random, job: dict, report) -> None:
    from pymemory import StreamingLLM

    pools, calls = parameter_pools(job["namm"]), call_pools()
    for case in range(job["params"]):
        kwargs = pick(rng, pools, 0.2)  # mostly defaults, so that many constructions succeed and calls run
        kwargs["n_threads"] = 1
        if kwargs.get("policy") in ("namm",) and "namm_path" not in kwargs:
            kwargs["namm_path"] = job["namm"]
        ops = [(rng.choice(["generate", "chat", "generate", "stats", "reset", "tokenize", "detokenize"]),
                pick(rng, calls, 0.3)) for _ in range(rng.randint(1, 3))]
        args = [rng.choice(prompts()) if op in ("generate", "tokenize") else rng.choice(messages()) if op == "chat"
                else rng.choice([[1, 2, 3], [], [-5], "abc", [2**40]]) if op == "detokenize" else None
                for op, _ in ops]
        report.case(f"params {case}: StreamingLLM({kwargs!r}) then {[(o, a, k) for (o, k), a in zip(ops, args)]!r}")
        llm = None
        try:
            llm = report.guard(lambda: StreamingLLM(job["model"], **kwargs))
            if llm is None:
                continue
            for (op, call_kwargs), arg in zip(ops, args):
                if op == "generate":
                    call_kwargs.setdefault("max_tokens", 3)
                    report.guard(lambda: "".join(llm.generate(arg, **call_kwargs)))
                elif op == "chat":
                    call_kwargs.setdefault("max_tokens", 3)
                    report.guard(lambda: "".join(llm.chat(arg, **call_kwargs)))
                elif op == "stats":
                    report.guard(lambda: (llm.stats, llm.policy_stats, repr(llm)))
                elif op == "reset":
                    report.guard(llm.reset)
                elif op == "tokenize":
                    report.guard(lambda: llm.tokenize(arg))
                else:
                    report.guard(lambda: llm.detokenize(arg))
        finally:
            if llm is not None:
                llm.close()


def corrupt(rng: random.Random, data: bytearray, header_bytes: int) -> str:
    """One random corruption of a GGUF file's bytes (in place); returns what was done."""
    kind = rng.choice(["truncate", "flip", "flip", "zero", "huge", "magic"])
    if kind == "truncate":
        n = rng.randrange(0, len(data))
        del data[n:]
        return f"truncated to {n} bytes"
    if kind == "magic":
        data[rng.randrange(0, 8)] ^= 0xFF
        return "damaged magic/version"
    at = rng.randrange(0, min(header_bytes, len(data)))
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            i = min(len(data) - 1, at + rng.randrange(0, 64))
            data[i] ^= 1 << rng.randrange(8)
        return f"bit flips near byte {at}"
    if kind == "zero":
        n = rng.randint(1, 32)
        data[at:at + n] = bytes(len(data[at:at + n]))
        return f"{n} zero bytes at {at}"
    data[at:at + 8] = (rng.choice([2**63 - 1, 2**32, 2**31, 10**12])).to_bytes(8, "little")  # a huge count/offset
    return f"huge 64-bit value at {at}"


def gguf_header_bytes(path: str) -> int:
    """Bytes before the tensor data: metadata and tensor infos, where a corruption is most interesting."""
    import gguf

    return int(gguf.GGUFReader(path).data_offset)


def run_namm_file_cases(rng: random.Random, job: dict, report) -> None:
    from pymemory._loader import _core

    original = open(job["namm"], "rb").read()
    header = gguf_header_bytes(job["namm"])
    path = os.path.join(job["workdir"], "corrupt-namm.gguf")
    for case in range(job["namms"]):
        data = bytearray(original)
        what = corrupt(rng, data, header)
        with open(path, "wb") as f:
            f.write(data)
        report.case(f"namm file {case}: {what}")
        report.guard(lambda: _core.NammModel.load(path, "cpu", 1))


def run_model_file_cases(rng: random.Random, job: dict, report) -> None:
    from pymemory._loader import _core

    header = gguf_header_bytes(job["model"])
    path = os.path.join(job["workdir"], "corrupt-model.gguf")
    shutil.copyfile(job["model"], path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = bytearray(f.read(header))
    for case in range(job["models"]):
        data = bytearray(head)
        what = corrupt(rng, data, header)
        with open(path, "r+b") as f:  # only the header changes; a truncation cuts the file
            f.write(data)
            if what.startswith("truncated"):
                f.truncate(len(data))
        report.case(f"model file {case}: {what}")
        model = report.guard(lambda: _core.Model.load(path))
        if model is not None:  # loaded: it must also run, or fail with a typed error
            report.guard(lambda: _core.Engine(model, window=28, n_threads=1).feed([1, 2, 3]))
        with open(path, "r+b") as f:  # restore
            f.write(head)
            if os.path.getsize(path) != size:
                with open(job["model"], "rb") as src:
                    src.seek(len(head))
                    f.seek(len(head))
                    shutil.copyfileobj(src, f)


class Report:
    def __init__(self) -> None:
        self.current = ""
        self.counts = {"ok": 0, "typed": 0}
        self.untyped: list[str] = []

    def case(self, description: str) -> None:
        self.current = description
        print("case " + description.replace("\n", " ")[:2000], flush=True)

    def guard(self, fn):
        import pymemory

        try:
            out = fn()
            self.counts["ok"] += 1
            return out
        except pymemory.PymemoryError:
            self.counts["typed"] += 1
        except Exception:  # an untyped error is a finding
            self.untyped.append(f"{self.current[:600]}\n{traceback.format_exc(limit=3)[-1200:]}")
        return None


def main() -> None:
    job = json.loads(sys.argv[1])
    from pymemory._loader import _core

    _core.set_log_verbosity(0)
    rng = random.Random(job["seed"])
    report = Report()
    run_parameter_cases(rng, job, report)
    run_namm_file_cases(rng, job, report)
    run_model_file_cases(rng, job, report)
    print(json.dumps({"counts": report.counts, "untyped": report.untyped}), flush=True)


if __name__ == "__main__":
    main()
