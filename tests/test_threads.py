"""Threads: one StreamingLLM or one raw Engine used from several threads never crashes (calls take turns, and a
newer generation supersedes an older one with a typed error), and several engines on one shared Model decode in
parallel with the same results as one after another.

The concurrent cases run in a subprocess, so a crash is a test failure rather than a lost test run."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import pymemory
from pymemory import StreamingLLM
from pymemory._loader import _core

pytestmark = pytest.mark.model


def run_script(code: str, *args: str, timeout: float = 240) -> dict:
    """Runs `code` in a fresh interpreter; it prints one JSON line last. A crash (signal) fails the test."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode} (negative: killed by that signal)\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_four_threads_generating_on_one_streaming_llm_never_crash(smollm2_path):
    """The issue's crash: 4 threads calling generate() on one object. Now each step runs under the object's lock;
    a thread whose generation was superseded by another thread's newer one gets SupersededError."""
    out = run_script(
        """
        import json, sys, threading
        import pymemory
        from pymemory import StreamingLLM

        llm = StreamingLLM(sys.argv[1], window=60, n_threads=1)
        results = {}

        def worker(i):
            try:
                for _ in range(3):
                    text = "".join(llm.generate(f"Story number {i}:", max_tokens=25, ignore_eos=True, temperature=0))
                    results.setdefault(i, []).append(("ok", len(text)))
                    llm.stats  # reads interleave with the other threads' steps
            except pymemory.SupersededError as exc:
                results.setdefault(i, []).append(("superseded", str(exc)[:60]))
            except Exception as exc:  # anything else is a bug: report it
                results.setdefault(i, []).append(("other", f"{type(exc).__name__}: {exc}"))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps({"results": results, "cells": llm.stats.cells_used}))
        """,
        smollm2_path,
    )
    outcomes = [o for r in out["results"].values() for o in r]
    assert not [o for o in outcomes if o[0] == "other"], outcomes
    assert any(o[0] == "ok" and o[1] > 0 for o in outcomes), outcomes  # the newest generation always finishes
    assert all("superseded" in o[1] for o in outcomes if o[0] == "superseded")
    assert 0 < out["cells"] <= 64


def test_two_threads_on_one_raw_engine_take_turns(smollm2_path):
    """Two threads feeding and sampling one raw _core.Engine: the bindings serialise the calls (Engine.call_mutex),
    so the stream ends up with every token of both threads and a consistent cache."""
    out = run_script(
        """
        import json, sys, threading
        from pymemory._loader import _core

        _core.set_log_verbosity(0)
        model = _core.Model.load(sys.argv[1])
        engine = _core.Engine(model, policy="sink", n_sink=4, window=28, evict_chunk=4, n_threads=1)
        sampler = _core.Sampler(model, _core.SamplingParams(temperature=0.7, seed=3))
        engine.feed([1, 2, 3])
        errors = []

        def worker(offset):
            try:
                for i in range(40):
                    engine.feed([offset + i])
                    engine.sample(sampler)
                    sampler.accept(offset + i)
                    engine.stats(); engine.cached_positions()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=worker, args=(o,)) for o in (100, 500)]
        for t in threads: t.start()
        for t in threads: t.join()
        s = engine.stats()
        print(json.dumps({"errors": errors, "seen": s["tokens_seen"], "cells": s["cells_used"],
                          "positions": engine.cached_positions()}))
        """,
        smollm2_path,
    )
    assert out["errors"] == []
    assert out["seen"] == 3 + 80 and out["cells"] <= 32
    assert out["positions"] == sorted(out["positions"]) and out["positions"][-1] < 32


def test_engines_sharing_one_model_decode_in_parallel_like_one_after_another(smollm2_path):
    """The server's layout: one Engine per slot, all on one loaded Model, each in its own thread. Greedy outputs
    (through evictions and K-shifts) equal those of the same engines run one after another."""
    out = run_script(
        """
        import json, sys, threading
        from pymemory._loader import _core

        _core.set_log_verbosity(0)
        model = _core.Model.load(sys.argv[1])
        prompts = ["The lighthouse keeper", "In the year 1850", "Dear diary, today", "The recipe calls for"]
        configs = [dict(policy="sink"), dict(policy="h2o"), dict(policy="sink", type_k="q8_0"), dict(policy="window")]

        def run(i):
            engine = _core.Engine(model, n_sink=4, window=28, evict_chunk=4, n_threads=1, **configs[i])
            sampler = _core.Sampler(model, _core.SamplingParams(temperature=0.0))
            engine.feed(model.tokenize(prompts[i], True, False))
            out = []
            for _ in range(40):
                token = engine.sample(sampler)
                out.append(token)
                engine.feed([token])
            return out, engine.stats()["evictions"]

        sequential = [run(i) for i in range(4)]
        parallel = [None] * 4
        def worker(i):
            parallel[i] = run(i)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps({"sequential": sequential, "parallel": parallel}))
        """,
        smollm2_path,
    )
    assert out["parallel"] == out["sequential"]
    assert all(evictions > 0 for _, evictions in out["sequential"])  # every run went through evictions


def test_a_newer_generator_supersedes_an_older_one_instead_of_mixing(smollm2_path):
    with StreamingLLM(smollm2_path, window=60, n_threads=1) as llm:
        first = llm.generate("The sea is", max_tokens=20, ignore_eos=True, temperature=0)
        piece = next(first)
        second = llm.generate("The sky is", max_tokens=10, ignore_eos=True, temperature=0)
        with pytest.raises(pymemory.SupersededError, match="superseded by a newer generate"):
            next(first)
        text = "".join(second)
        # The newer stream is exactly what it would have been alone.
        llm.reset()
        assert text == "".join(llm.generate("The sky is", max_tokens=10, ignore_eos=True, temperature=0))
        assert piece
        # A generator that was created but never started is superseded too, and reset() supersedes.
        pending = llm.generate("x", max_tokens=3)
        llm.reset()
        with pytest.raises(pymemory.SupersededError):
            next(pending)
        # close() ends running generators with ClosedError.
        running = llm.generate("The sea is", max_tokens=20, ignore_eos=True, temperature=0)
        next(running)
        llm.close()
        with pytest.raises(pymemory.ClosedError):
            next(running)


def test_a_new_chat_turn_keeps_the_unfinished_reply_of_the_superseded_one(smollm2_path):
    with StreamingLLM(smollm2_path, window=252, n_threads=1) as llm:
        old = llm.chat("Tell me about ships.", max_tokens=30, temperature=0)
        partial = next(old) + next(old)
        new = llm.chat("Thanks. And planes?", max_tokens=5, temperature=0)
        with pytest.raises(pymemory.SupersededError):
            next(old)
        "".join(new)
        roles = [m["role"] for m in llm.messages]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert llm.messages[1]["content"].startswith(partial)  # what the cache holds of the interrupted reply
        old.close()  # closing the superseded generator changes nothing
        assert [m["role"] for m in llm.messages] == roles
        # What the cache holds is the conversation as recorded: the new turn was rendered after the partial reply.
        assert llm._chat_fed_text == llm._render(llm.messages[:3], add_assistant=True) + llm.messages[3]["content"]


def test_a_shared_sampler_is_safe_across_engines(smollm2_model):
    """Samplers hold random state; calls on one are serialised (no crash), though each thread should own one."""
    import threading

    sampler = _core.Sampler(smollm2_model, _core.SamplingParams(temperature=0.9, seed=1))
    engines = [_core.Engine(smollm2_model, window=60, n_threads=1) for _ in range(2)]
    for e in engines:
        e.feed([1, 2, 3, 4])
    errors: list[str] = []

    def worker(engine):
        try:
            for _ in range(30):
                token = engine.sample(sampler)
                engine.feed([token])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(e.stats()["tokens_seen"] == 34 for e in engines)
