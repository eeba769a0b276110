"""Retrieval through a streaming cache: passkey (Landmark-attention style) and StreamEval (StreamingLLM §4.4).

Both measure the hard limit of a bounded cache (the paper's Table 7): accurate while the answer is still cached,
zero once it has been evicted — unless a policy keeps the right old tokens (h2o, namm).
"""
from __future__ import annotations

import random
import re

from .._loader import _core
from .policies import PolicySpec

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def greedy_continuation(model, engine, n_tokens: int) -> str:
    sampler = _core.Sampler(model, _core.SamplingParams(temperature=0.0))
    out = []
    for _ in range(n_tokens):
        token = engine.sample(sampler)
        if model.is_end_of_generation(token):
            break
        engine.feed([token])
        out.append(token)
    return model.detokenize(out).decode("utf-8", errors="replace")


def passkey_prompt(model, key: int, distance: int, lead_fillers: int = 2) -> tuple[list[int], int, range]:
    """Prompt tokens with the needle about `distance` tokens before the end; returns (tokens, exact distance, the
    stream positions of the key's own tokens in its first mention)."""
    filler_tokens = len(model.tokenize(PASSKEY_FILLER, False, False))
    n_after = max(0, round(distance / filler_tokens))
    lead = PASSKEY_INTRO + PASSKEY_FILLER * lead_fillers
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    head = model.tokenize(lead + needle, True, False)
    tail = model.tokenize(PASSKEY_FILLER * n_after + PASSKEY_QUESTION, False, False)
    key_span = range(len(model.tokenize(lead + " The pass key is", True, False)),
                     len(model.tokenize(lead + f" The pass key is {key}", True, False)))
    return head + tail, len(tail), key_span


def passkey_trial(model, spec: PolicySpec, key: int, distance: int, n_threads: int = 0) -> dict:
    tokens, exact, key_span = passkey_prompt(model, key, distance)
    engine = _core.Engine(model, n_threads=n_threads, **spec.engine_kwargs())
    engine.feed(tokens)
    # Which of the key's tokens the policy kept (readable from positions only where it keeps them absolute).
    positions = set(engine.cached_positions())
    absolute = engine.stats()["next_pos"] == len(tokens)
    key_kept = sum(p in positions for p in key_span) / len(key_span) if absolute else None
    answer = greedy_continuation(model, engine, 10)
    return {"key": key, "distance": exact, "prompt_tokens": len(tokens), "answer": answer.strip(),
            "correct": str(key) in re.sub(r"\s+", "", answer), "key_tokens_kept": key_kept}


def passkey_grid(model, specs: list[PolicySpec], distances: list[int], samples: int, seed: int = 0,
                 n_threads: int = 0) -> list[dict]:
    rng = random.Random(seed)
    keys = [rng.randint(10000, 99999) for _ in range(samples)]
    cells = []
    for spec in specs:
        for distance in distances:
            trials = [passkey_trial(model, spec, key, distance, n_threads) for key in keys]
            kept = [t["key_tokens_kept"] for t in trials if t["key_tokens_kept"] is not None]
            cells.append({"policy": spec.name, "label": spec.label, "capacity": spec.capacity,
                          "distance": round(sum(t["distance"] for t in trials) / len(trials)),
                          "accuracy": sum(t["correct"] for t in trials) / len(trials),
                          "key_tokens_kept": sum(kept) / len(kept) if kept else None, "trials": trials})
    return cells


def streameval_run(model, spec: PolicySpec, *, n_lines: int, distance_lines: int, query_every: int = 10,
                   seed: int = 0, n_threads: int = 0) -> dict:
    """Lines `REGISTER_CONTENT in line <id> is <n>.` streamed through one engine; every `query_every` lines the
    model is asked for the value `distance_lines` back and answers greedily (the answer stays in the stream).

    Deviation from the paper's StreamEval: line ids are distinct random 3-4 digit numbers, not 0, 1, 2, ...
    Sub-1B models confuse consecutive line numbers even with the answer in the cache (measured with a 2048-cell
    cache, 5 lines back: Qwen2.5-0.5B 2 of 6 answers right with consecutive ids, 8 of 8 with random ids), which
    would hide the effect of the cache behind the model's weakness."""
    rng = random.Random(seed)
    values = [rng.randint(10000, 99999) for _ in range(n_lines)]
    line_ids = rng.sample(range(100, 100 + max(900, 10 * n_lines)), n_lines)
    engine = _core.Engine(model, n_threads=n_threads, **spec.engine_kwargs())
    engine.feed(model.tokenize("Below is a record of lines. Remember them.\n", True, False))
    line_start = []  # stream index where each line begins
    correct = total = 0
    answers = []
    for i in range(n_lines):
        line_start.append(engine.stats()["tokens_seen"])
        engine.feed(model.tokenize(f"REGISTER_CONTENT in line {line_ids[i]} is <{values[i]}>.\n", False, False))
        target = i - distance_lines
        if (i + 1) % query_every == 0 and target >= 0:
            engine.feed(model.tokenize(f"Question: what is the REGISTER_CONTENT in line {line_ids[target]}? "
                                       f"Answer: the REGISTER_CONTENT in line {line_ids[target]} is <", False, False))
            distance = engine.stats()["tokens_seen"] - line_start[target]  # answer to question, in tokens
            answer = greedy_continuation(model, engine, 7)
            engine.feed(model.tokenize("\n", False, False))
            ok = str(values[target]) in answer
            correct += ok
            total += 1
            answers.append({"line": line_ids[target], "distance_tokens": distance, "expected": values[target],
                            "answer": answer, "correct": ok})
    mean_distance = sum(a["distance_tokens"] for a in answers) / max(len(answers), 1)
    return {"policy": spec.name, "label": spec.label, "capacity": spec.capacity, "distance_lines": distance_lines,
            "distance_tokens": round(mean_distance), "queries": total,
            "accuracy": correct / total if total else float("nan"), "answers": answers}
