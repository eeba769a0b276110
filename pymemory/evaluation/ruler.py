"""`pymemory eval ruler`: RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", §3) generated locally, streamed through bounded caches at kvpress's compression
ratios, answered greedily and scored as RULER scores them.

How data flows: `generate_sample` builds one prompt of a chosen token length for one task (a haystack with the
answer hidden at recorded depths, a question, the start of the answer) and the strings the answer must contain.
`run_ruler` generates every sample first (bad settings fail here, before any decoding), then, per sample and
policy, streams the prompt through an engine whose cache holds `ratio x context` cells (sinks and pinned tokens
included), generates the answer greedily and scores it: the fraction of expected strings found in the output,
case-insensitively (RULER's `string_match_all`). `full` is the uncompressed reference (policy none, the whole
prompt cached).

The task families, in RULER's words and ours:
  niah_single      one needle "One of the special magic numbers for KEY is: VALUE." in a noise haystack
                   (RULER's repeated "The grass is green..." sentences); asked for VALUE.
  niah_multikey    four needles with different keys in Austen prose; asked for one key's value.
  niah_multivalue  four needles with one key and four values in Austen prose; asked for all four.
  niah_multiquery  four needles with different keys in Austen prose; asked for all four values.
  vt               variable tracking: "VAR A = 12345." then "VAR B = VAR A." ... (one chain of four hops) hidden
                   in noise; asked for every variable that holds the value.
  cwe              common words extraction: a numbered list where ten words appear often and the rest rarely;
                   asked for the ten common ones.
  fwe              frequent words extraction: coded words drawn from a Zipf distribution (alpha 2); asked for the
                   three most frequent.
Deviations from RULER: needles and prompts are worded by us (same structure); keys are adjective-noun pairs from a
fixed list instead of random English words; common words come from Austen's vocabulary; the prompt is raw text
(BOS, no chat template), so the model continues the answer's first words; at short contexts the common words of
`cwe` repeat less often than RULER's 30 times (they fill a third of the list).
"""
from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from ..errors import InvalidArgumentError

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
KVPRESS_RATIOS = (0.75, 0.5, 0.25, 0.125)  # cache = this fraction of the context (kvpress's compression 25..87.5 %)
DEFAULT_POLICIES = ("full", "sink", "h2o", "tova", "namm,namm_path=smollm2")
MIN_HAYSTACK_TOKENS = 32  # below this a "haystack" hides nothing: the context is too short for the task

# RULER's noise haystack (also the passkey filler of Mohtashami & Jaggi 2023).
NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "kind",
               "lively", "misty", "noble", "odd", "pale", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid",
               "wild", "young", "zesty", "bitter", "clever", "dark", "early", "fancy", "grand", "happy", "ideal",
               "lucky", "mellow", "narrow", "orange", "proud", "rough", "sharp")
_NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river", "saddle", "tunnel",
          "umbrella", "valley", "walnut", "yogurt", "zebra", "basket", "castle", "desert", "feather", "glacier",
          "hammer", "insect", "jungle", "ladder", "magnet", "nugget", "oyster", "pillow", "rocket", "spider")


@dataclass
class Needle:
    text: str
    depth: float        # where it was asked to go: fraction of the haystack before it
    char_offset: int    # where it is in the prompt (characters)


@dataclass
class RulerSample:
    task: str
    prompt: str                    # everything the model reads: instruction, context, question, answer start
    expected: list[str]            # strings the answer must contain (score: the fraction found)
    max_new_tokens: int
    stop_at_newline: bool          # the answer is one line
    needles: list[Needle] = field(default_factory=list)
    haystack: tuple[int, int] = (0, 0)  # [start, end) characters of the haystack (or list) in the prompt
    n_tokens: int = 0              # prompt tokens as counted (with BOS)

    def as_dict(self) -> dict:
        return asdict(self)


def _key(rng: random.Random, used: set) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in used:
            used.add(key)
            return key


def _number(rng: random.Random, used: set) -> str:
    while True:
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in used:
            used.add(value)
            return value


def _sentences(text: str) -> list[str]:
    """Prose split into sentences, each with one leading space and its whitespace folded."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [" " + s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", flat) if s]


class _Filler:
    """An endless source of haystack units (sentences) and their token counts."""

    def __init__(self, units: Sequence[str], count: Callable[[str], int], start: int = 0):
        if not units:
            raise InvalidArgumentError("the haystack text has no sentences")
        self.units, self.count, self.i = list(units), count, start
        self.cache: dict[str, int] = {}

    def tokens(self, unit: str) -> int:
        return self.cache.setdefault(unit, self.count(unit))

    def take(self, budget: int) -> list[str]:
        """Units worth about `budget` tokens (never more), skipping sentences longer than a third of it so that
        depths stay fine-grained in short haystacks."""
        out, used, skipped = [], 0, 0
        while used < budget and skipped < 10 * len(self.units):
            unit = self.units[self.i % len(self.units)]
            self.i += 1
            n = self.tokens(unit)
            if n > max(budget // 3, 8) and len(self.units) > 1:
                skipped += 1
                continue
            if used + n > budget and out:
                break
            out.append(unit)
            used += n
        return out


def _assemble(head: str, units: list[str], sizes: list[int], inserts: list[tuple[float, str]], tail: str
              ) -> tuple[str, list[Needle], tuple[int, int]]:
    """head + haystack units with each insert placed where `depth` of the haystack's tokens lie before it + tail.
    A needle's recorded depth is where it actually went (the unit boundary nearest the asked depth)."""
    total = max(1, sum(sizes))
    cumulative = [0]
    for n in sizes:
        cumulative.append(cumulative[-1] + n)
    slots: dict[int, list[str]] = {}
    placed = []
    for depth, text in sorted(inserts, key=lambda x: x[0]):
        i = min(range(len(cumulative)), key=lambda k: abs(cumulative[k] - depth * total))
        slots.setdefault(i, []).append(text)
        placed.append((i, text, cumulative[i] / total))
    pieces, offsets = [], {}
    length = 0
    for i in range(len(units) + 1):
        for text in slots.get(i, []):
            offsets[text] = length + (len(text) - len(text.lstrip()))
            pieces.append(text)
            length += len(text)
        if i < len(units):
            pieces.append(units[i])
            length += len(units[i])
    body = "".join(pieces)
    needles = [Needle(text.strip(), round(depth, 4), len(head) + offsets[text]) for _, text, depth in placed]
    return head + body + tail, needles, (len(head), len(head) + len(body))


def _haystack_prompt(count, target: int, head: str, inserts: list[tuple[float, str]], tail: str,
                     filler: _Filler, task: str) -> tuple[str, list[Needle], tuple[int, int]]:
    fixed = count(head) + sum(count(t) for _, t in inserts) + count(tail) + 1  # + BOS
    budget = target - fixed
    if budget < MIN_HAYSTACK_TOKENS:
        raise InvalidArgumentError(f"a {target}-token context is too short for task {task!r}: its instruction, "
                                   f"needles and question take {fixed} tokens and the haystack needs at least "
                                   f"{MIN_HAYSTACK_TOKENS}; use --context {fixed + MIN_HAYSTACK_TOKENS} or more")
    start = filler.i
    units = filler.take(budget)
    prompt, needles, span = _assemble(head, units, [filler.tokens(u) for u in units], inserts, tail)
    # Token counts of pieces do not add up exactly (merges across boundaries): correct once.
    excess = count(prompt) + 1 - target
    if abs(excess) > max(2, target // 100) and len(units) > 1:
        filler.i = start
        units = filler.take(max(MIN_HAYSTACK_TOKENS, budget - excess))
        prompt, needles, span = _assemble(head, units, [filler.tokens(u) for u in units], inserts, tail)
    return prompt, needles, span


def _fit(build: Callable[[int], str], count: Callable[[str], int], guess: int, budget: int) -> tuple[str, int]:
    """The body of `n` list entries (build(n)) whose token count comes closest to `budget` from below, starting from
    a guess and rescaling by the measured tokens per entry."""
    if count(build(1)) > budget:
        return build(1), 0  # the caller says what the task needs
    n = max(1, guess)
    for _ in range(3):
        used = count(build(n))
        if abs(used - budget) <= max(2, budget // 100):
            break
        n = max(1, int(n * budget / max(used, 1)))
    while n > 1 and count(build(n)) > budget:
        n -= max(1, n // 100)
    return build(n), n


def _spread(rng: random.Random, n: int, low: float = 0.05, high: float = 0.95) -> list[float]:
    """n depths, one in each of n equal slices of [low, high] (RULER spreads needles through the document)."""
    width = (high - low) / n
    return [round(low + width * (i + rng.random()), 3) for i in range(n)]


def generate_sample(task: str, count: Callable[[str], int], target_tokens: int, rng: random.Random,
                    prose: str | None = None) -> RulerSample:
    """One RULER-style sample of about `target_tokens` tokens (BOS included). `count(text)` is the number of tokens
    of `text` without special tokens (the model's tokenizer); `prose` is the haystack text for the tasks that hide
    needles in prose, and the vocabulary of `cwe`. Deterministic for a given rng state."""
    if task not in TASKS:
        raise InvalidArgumentError(f"unknown RULER task {task!r}; choose among {', '.join(TASKS)}")
    if task in ("niah_multikey", "niah_multivalue", "niah_multiquery", "cwe") and not prose:
        raise InvalidArgumentError(f"task {task!r} needs prose (the haystack / vocabulary text)")
    keys, values = set(), set()
    noise = _Filler([NOISE], count)
    if prose:
        sentences = _sentences(prose)
        book = _Filler(sentences, count, start=rng.randrange(len(sentences)))
    intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.\n")

    def needle(key, value):
        return f" One of the special magic numbers for {key} is: {value}."

    if task == "niah_single":
        key, value = _key(rng, keys), _number(rng, values)
        tail = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                f"The special magic number for {key} mentioned in the provided text is")
        inserts = [(_spread(rng, 1)[0], needle(key, value))]
        prompt, needles, span = _haystack_prompt(count, target_tokens, intro, inserts, tail, noise, task)
        return RulerSample(task, prompt, [value], 16, True, needles, span)

    if task in ("niah_multikey", "niah_multivalue", "niah_multiquery"):
        depths = _spread(rng, 4)
        if task == "niah_multivalue":
            key = _key(rng, keys)
            pairs = [(key, _number(rng, values)) for _ in range(4)]
            asked = [key]
        else:
            pairs = [(_key(rng, keys), _number(rng, values)) for _ in range(4)]
            asked = [rng.choice(pairs)[0]] if task == "niah_multikey" else [k for k, _ in pairs]
        inserts = [(d, needle(k, v)) for d, (k, v) in zip(depths, pairs)]
        if task == "niah_multikey":
            value = dict(pairs)[asked[0]]
            tail = (f"\nWhat is the special magic number for {asked[0]} mentioned in the provided text? "
                    f"The special magic number for {asked[0]} mentioned in the provided text is")
            expected, n_new, one_line = [value], 16, True
        elif task == "niah_multivalue":
            tail = (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                    f"The special magic numbers for {key} mentioned in the provided text are")
            expected, n_new, one_line = [v for _, v in pairs], 48, False
        else:
            names = ", ".join(asked[:-1]) + " and " + asked[-1]
            tail = (f"\nWhat are all the special magic numbers for {names} mentioned in the provided text? "
                    f"The special magic numbers for {names} mentioned in the provided text are")
            expected, n_new, one_line = [v for _, v in pairs], 48, False
        prompt, needles, span = _haystack_prompt(count, target_tokens, intro, inserts, tail, book, task)
        return RulerSample(task, prompt, expected, n_new, one_line, needles, span)

    if task == "vt":
        names = []
        while len(names) < 5:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10_000, 99_999))
        chain = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        head = "Memorize and track the chain of variable assignments hidden in the following text.\n"
        tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain of variable assignments in the text above, 5 variables are assigned the "
                f"value {value}, they are:")
        # In order (each assignment reads the one before it), spread through the haystack.
        prompt, needles, span = _haystack_prompt(count, target_tokens, head, list(zip(_spread(rng, 5), chain)), tail,
                                                 noise, task)
        return RulerSample(task, prompt, names, 32, True, needles, span)

    if task == "cwe":
        vocabulary = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,9}", prose)})
        head = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n")
        tail = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that "
                "appear most often in the list are:")
        budget = target_tokens - count(head) - count(tail) - 1
        if budget < 60:
            raise InvalidArgumentError(f"a {target_tokens}-token context is too short for task 'cwe' (it needs room "
                                       f"for 10 common words x 4 and 10 rare words x 2); use --context 512 or more")
        if len(vocabulary) < 100:
            raise InvalidArgumentError(f"the prose has {len(vocabulary)} distinct words of 4-9 letters; task 'cwe' "
                                       "draws its words from at least 100 (use a longer text, e.g. austen:emma)")
        words = rng.sample(vocabulary, min(len(vocabulary), 2000))
        order_seed = rng.random()

        def build(n_entries: int) -> str:
            common_freq = max(4, n_entries // 30)  # the ten common words fill about a third of the list
            n_rare = min(len(words) - 10, max(10, (n_entries - 10 * common_freq) // 2))  # twice each
            entries = [w for w in words[:10] for _ in range(common_freq)] + \
                      [w for w in words[10:10 + n_rare] for _ in range(2)]
            random.Random(order_seed).shuffle(entries)
            return "".join(f" {i + 1}. {w}" for i, w in enumerate(entries))

        body, n = _fit(build, count, budget // 5, budget)
        if n == 0:
            need = count(head) + count(tail) + count(build(1)) + 1
            raise InvalidArgumentError(f"a {target_tokens}-token context is too short for task 'cwe' (10 common "
                                       f"words x 4 and 10 rare words x 2 take {need} tokens); use --context {need} "
                                       "or more")
        prompt = head + body + tail
        return RulerSample(task, prompt, words[:10], 96, False, [], (len(head), len(head) + len(body)))

    # fwe
    head = ("Read the following coded text and track how often each coded word appears. Find the three coded words "
            "that appear most often.\n")
    tail = ("\nQuestion: Ignore the dots '....'. What are the three most frequently appeared words in the above coded "
            "text? Answer: According to the coded text above, the three most frequently appeared words are:")
    vocabulary = []
    while len(vocabulary) < 200:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word not in vocabulary:
            vocabulary.append(word)
    budget = target_tokens - count(head) - count(tail) - 1
    if budget < 60:
        raise InvalidArgumentError(f"a {target_tokens}-token context is too short for task 'fwe'; use --context 256 "
                                   "or more")
    weights = [1.0 / (rank + 1) ** 2 for rank in range(len(vocabulary))]  # Zipf, alpha = 2 (RULER's default)
    stream = rng.choices(vocabulary, weights=weights, k=4 * budget)  # more than will fit

    def build(n_words: int) -> str:
        return " " + " .... ".join(stream[:n_words])

    body, n_words = _fit(build, count, budget // 4, budget)
    if n_words < 20:
        raise InvalidArgumentError(f"a {target_tokens}-token context is too short for task 'fwe' (it needs at least "
                                   "20 coded words); use --context 256 or more")
    drawn = stream[:n_words]
    counts = Counter(drawn).most_common()
    if len(counts) > 3 and counts[2][1] == counts[3][1]:  # make the top three unambiguous
        drawn[drawn.index(counts[3][0])] = counts[2][0]
        counts = Counter(drawn).most_common()
        body = " " + " .... ".join(drawn)
    prompt = head + body + tail
    return RulerSample(task, prompt, [w for w, _ in counts[:3]], 48, True, [], (len(head), len(head) + len(body)))


def string_match_all(output: str, expected: Sequence[str]) -> float:
    """RULER's metric: the fraction of expected strings that occur in the output (case-insensitive)."""
    text = output.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


# ---- running --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RulerConfig:
    tasks: tuple[str, ...]
    context_tokens: int
    ratios: tuple[float, ...]
    policies: tuple[str, ...]
    samples: int
    seed: int = 0
    n_sink: int = 4


def check_config(config: RulerConfig) -> None:
    """Raises InvalidArgumentError for settings that cannot run, before anything is generated or decoded."""
    unknown = [t for t in config.tasks if t not in TASKS]
    if unknown or not config.tasks:
        raise InvalidArgumentError(f"unknown RULER task(s) {', '.join(unknown) or '(none given)'}; choose among "
                                   f"{', '.join(TASKS)}")
    bad = [r for r in config.ratios if not (0.0 < r <= 1.0)]
    if bad or not config.ratios:
        raise InvalidArgumentError(f"cache ratios must be in (0, 1] (the cache's share of the context); got "
                                   f"{', '.join(map(str, bad)) or 'none'}; kvpress uses 0.75,0.5,0.25,0.125")
    if config.samples < 1:
        raise InvalidArgumentError("--samples must be at least 1")
    if config.context_tokens < 64:
        raise InvalidArgumentError(f"--context {config.context_tokens} is too short; RULER tasks need at least a "
                                   "few hundred tokens (try 512, 1024, 4096)")
    for ratio in config.ratios:
        cells = cache_cells(config.context_tokens, ratio)
        if cells <= config.n_sink:
            raise InvalidArgumentError(f"ratio {ratio} of a {config.context_tokens}-token context is {cells} cells, "
                                       f"no more than the {config.n_sink} sinks; raise the ratio or the context")


def cache_cells(context_tokens: int, ratio: float) -> int:
    """Cells of the bounded cache: the ratio of the context, sinks and pinned tokens included."""
    return max(1, round(context_tokens * ratio))


def policy_specs(config: RulerConfig):
    """[(policy text, ratio or None for full, PolicySpec or None for full)] in the order they run."""
    from .policies import parse_policy

    out = []
    for text in config.policies:
        if text.strip() == "full":
            out.append((text, None, None))
            continue
        for ratio in config.ratios:
            cells = cache_cells(config.context_tokens, ratio)
            out.append((text, ratio, parse_policy(text, config.n_sink, cells - config.n_sink)))
    return out


def greedy_answer(model, engine, max_new_tokens: int, stop_at_newline: bool) -> str:
    from .._loader import _core

    sampler = _core.Sampler(model, _core.SamplingParams(temperature=0.0))
    tokens: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        token = engine.sample(sampler)
        if model.is_end_of_generation(token):
            break
        tokens.append(token)
        text = model.detokenize(tokens).decode("utf-8", errors="replace")
        if stop_at_newline and "\n" in text.lstrip():
            break
        engine.feed([token])
    return text.lstrip().split("\n")[0] if stop_at_newline else text


def generate_samples(model, config: RulerConfig, prose: str) -> dict[str, list[RulerSample]]:
    def count(text: str) -> int:
        return len(model.tokenize(text, False, False))

    out = {}
    for task in config.tasks:
        out[task] = []
        for i in range(config.samples):
            sample = generate_sample(task, count, config.context_tokens, random.Random(f"{config.seed}/{task}/{i}"),
                                     prose)
            sample.n_tokens = len(model.tokenize(sample.prompt, True, False))
            out[task].append(sample)
    return out


def run_ruler(model, config: RulerConfig, prose: str, n_threads: int = 0, progress=None) -> dict:
    """Every (task, policy, ratio) cell: mean score over the samples, and each sample's answer."""
    from .._loader import _core
    from .policies import PolicySpec

    check_config(config)
    specs = policy_specs(config)
    samples = generate_samples(model, config, prose)  # fails here, before any decoding, if a task cannot fit
    longest = max(s.n_tokens + s.max_new_tokens for ss in samples.values() for s in ss)
    for text, ratio, spec in specs:  # settings the engine refuses (a NAMM that needs more cells) fail up front too
        if spec is not None:
            _core.Engine(model, n_threads=1, **spec.engine_kwargs())
    cells = []
    done, total = 0, len(specs) * sum(len(v) for v in samples.values())
    for task, task_samples in samples.items():
        for text, ratio, spec in specs:
            runs = []
            for sample in task_samples:
                run_spec = spec or PolicySpec("none", 0, sample.n_tokens + sample.max_new_tokens)
                engine = _core.Engine(model, n_threads=n_threads, **run_spec.engine_kwargs())
                engine.feed(model.tokenize(sample.prompt, True, False))
                answer = greedy_answer(model, engine, sample.max_new_tokens, sample.stop_at_newline)
                stats = engine.stats()
                runs.append({"expected": sample.expected, "answer": answer,
                             "score": string_match_all(answer, sample.expected), "prompt_tokens": sample.n_tokens,
                             "peak_cells": stats["peak_cells"], "tokens_evicted": stats["tokens_evicted"],
                             "forced_evictions": engine.policy_stats().get("forced_evictions", 0)})
                done += 1
                if progress:
                    progress(done, total)
            name = "full" if spec is None else spec.name
            cells.append({"task": task, "policy": name, "spec": text, "label": "full cache" if spec is None else
                          spec.label, "ratio": 1.0 if spec is None else ratio,
                          "cache_cells": cache_cells(config.context_tokens, ratio) if spec else None,
                          "score": sum(r["score"] for r in runs) / len(runs), "runs": runs})
    return {"settings": {**asdict(config), "kvpress_ratios": list(KVPRESS_RATIOS), "longest_prompt": longest,
                         "prompt_tokens": {t: [s.n_tokens for s in v] for t, v in samples.items()},
                         "max_new_tokens": {t: v[0].max_new_tokens for t, v in samples.items()}},
            "cells": cells, "summary": summarize(cells)}


def summarize(cells: list[dict]) -> list[dict]:
    """Mean score over tasks for every (policy spec, ratio)."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["spec"], c["ratio"]), []).append(c)
    return [{"spec": spec, "policy": g[0]["policy"], "label": g[0]["label"], "ratio": ratio,
             "cache_cells": g[0]["cache_cells"], "mean_score": sum(c["score"] for c in g) / len(g),
             "tasks": {c["task"]: c["score"] for c in g}} for (spec, ratio), g in groups.items()]


def markdown(result: dict) -> str:
    from .report import markdown_table

    s = result["settings"]
    tasks = list(s["tasks"])
    rows = []
    for r in result["summary"]:
        cache = "100 % (full)" if r["cache_cells"] is None else f"{r['ratio']:.1%} ({r['cache_cells']} cells)"
        rows.append([r["spec"], cache] + [f"{r['tasks'][t]:.2f}" for t in tasks] + [f"{r['mean_score']:.3f}"])
    table = markdown_table(["policy", "cache"] + tasks + ["mean"], rows)
    lengths = ", ".join(f"{t} {min(v)}-{max(v)}" for t, v in s["prompt_tokens"].items())
    return (f"Context {s['context_tokens']} tokens (prompt tokens per task: {lengths}); {s['samples']} sample(s) per "
            f"task, seed {s['seed']}; {s['n_sink']} sink tokens counted in every bounded cache. Score: fraction of the "
            "expected strings in the greedy answer (RULER's string_match_all), mean over samples; 'full' keeps the "
            f"whole prompt.\n\n{table}")
