"""Training and held-out samples for NAMM evolution: long real text and synthetic retrieval, as token ids.

A sample is a prompt (fed without logits) and a target (scored: mean NLL per token). Text samples score the last
`scored_tokens` of a passage; retrieval samples (a passkey hidden in real text, or one line of a key-value list)
score only the answer, asked at the end, so the NAMM must have kept the tokens that hold it.

Split (fixed, never seen by training): a text asset with three or more parts holds out every third part (Austen:
Mansfield Park and Persuasion, so held-out text is other novels); a smaller asset holds out the last 20 % of each
part. Retrieval samples draw their haystack from the same split and their keys from disjoint random streams.
Every draw is a pure function of (seed, split, generation, index), so a resumed run sees the same samples.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ...errors import InvalidArgumentError

HELDOUT_EVERY_PART = 3  # assets with >= 3 parts: parts 2, 5, ... are held out
HELDOUT_TAIL = 0.2  # smaller assets: the last 20 % of each part
# Seed offsets of the trainer's own sample draws, apart from the generations' (seed + generation) and the
# held-out set's: calibration of the feature statistics, and the imitation warm start's training samples.
CALIBRATION_SEED_OFFSET = 1_000_003
WARM_START_SEED_OFFSET = 2_000_003
NAME_SYLLABLES = ("ba", "ko", "ri", "mu", "te", "sa", "lo", "ni", "va", "de", "pu", "zo", "ga", "fi", "ra", "me")


@dataclass(frozen=True)
class Sample:
    id: str
    kind: str  # "text" | "passkey" | "kv"
    prompt: tuple[int, ...]
    target: tuple[int, ...]
    question: int = 0  # retrieval: the prompt's last `question` tokens ask for the answer (0 for text)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + len(self.target)


class Corpus:
    """Tokenised text assets split into train and held-out token arrays (one array per part and split)."""

    def __init__(self, model, sources: Sequence[str], min_tokens: int):
        from ... import assets

        self.model = model
        self.bos = [model.info["bos"]] if model.info.get("add_bos") and model.info.get("bos", -1) >= 0 else []
        self.parts: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "heldout": []}
        for source in sources:
            try:
                paths = assets.text_paths(source)
            except Exception as exc:  # missing or unusable asset: say which and how to get it
                raise InvalidArgumentError(f"text source {source!r} is not available ({exc}); fetch it with "
                                           f"`pymemory fetch {source}`") from exc
            for index, path in enumerate(paths):
                text = path.read_text(encoding="utf-8", errors="replace")
                tokens = np.asarray(model.tokenize(text, False, False), dtype=np.int32)
                name = f"{source}/{path.stem}"
                if len(paths) >= HELDOUT_EVERY_PART:
                    split = "heldout" if index % HELDOUT_EVERY_PART == HELDOUT_EVERY_PART - 1 else "train"
                    self.parts[split].append((name, tokens))
                else:
                    cut = int(len(tokens) * (1 - HELDOUT_TAIL))
                    self.parts["train"].append((name, tokens[:cut]))
                    self.parts["heldout"].append((name, tokens[cut:]))
        for split, parts in self.parts.items():
            parts[:] = [(n, t) for n, t in parts if len(t) >= min_tokens]
            if not parts:
                raise InvalidArgumentError(
                    f"the {split} split of --data {list(sources)} has no text of at least {min_tokens} tokens; add a "
                    "longer text source or lower --sample-tokens")

    def passage(self, split: str, n_tokens: int, rng: random.Random) -> tuple[str, list[int]]:
        """n_tokens consecutive tokens from a random part (weighted by length) at a random offset."""
        parts = self.parts[split]
        weights = [len(t) - n_tokens + 1 for _, t in parts]
        name, tokens = rng.choices(parts, weights=weights)[0]
        start = rng.randrange(0, len(tokens) - n_tokens + 1)
        return f"{name}@{start}", tokens[start:start + n_tokens].tolist()


class SampleFactory:
    """Draws text, passkey and key-value samples of `sample_tokens` tokens from a Corpus."""

    def __init__(self, corpus: Corpus, sample_tokens: int, scored_tokens: int, capacity: int):
        self.corpus = corpus
        self.model = corpus.model
        self.sample_tokens = sample_tokens
        self.scored_tokens = scored_tokens
        self.capacity = capacity

    def _tok(self, text: str) -> list[int]:
        return self.model.tokenize(text, False, False)

    def text(self, split: str, rng: random.Random, tag: str) -> Sample:
        bos = self.corpus.bos
        where, tokens = self.corpus.passage(split, self.sample_tokens - len(bos), rng)
        tokens = bos + tokens
        cut = len(tokens) - self.scored_tokens
        return Sample(f"{tag}:text:{where}", "text", tuple(tokens[:cut]), tuple(tokens[cut:]))

    def _needle_depth(self, rng: random.Random, n_haystack: int) -> int:
        # The needle ends well before the last `capacity` tokens: a recency window alone has evicted it.
        latest = max(1, n_haystack - self.capacity - 32)
        return rng.randrange(min(16, latest), latest + 1)

    def passkey_needle(self, key: int | str) -> list[int]:
        """The tokens of the sentence that hides pass key `key` in a passkey sample."""
        return self._tok(f" The pass key is {key}. Remember it. {key} is the pass key.")

    def passkey(self, split: str, rng: random.Random, tag: str) -> Sample:
        key = rng.randint(10000, 99999)
        needle = self.passkey_needle(key)
        question = self._tok(" What is the pass key? The pass key is")
        target = self._tok(f" {key}")
        n_hay = self.sample_tokens - len(self.corpus.bos) - len(needle) - len(question) - len(target)
        where, hay = self.corpus.passage(split, n_hay, rng)
        depth = self._needle_depth(rng, n_hay)
        prompt = self.corpus.bos + hay[:depth] + needle + hay[depth:] + question
        return Sample(f"{tag}:passkey:{key}@{depth}:{where}", "passkey", tuple(prompt), tuple(target), len(question))

    def kv(self, split: str, rng: random.Random, tag: str) -> Sample:
        """A list of 'The code of NAME is NNNNN.' lines; the question asks for a line that left the recent window."""
        head = self._tok("Here is a list of codes. Remember them.\n")
        lines, names, values = [], [], []
        used = set()
        budget = self.sample_tokens - len(self.corpus.bos) - len(head) - 40  # room for the question and answer
        while True:
            name = "".join(rng.choice(NAME_SYLLABLES) for _ in range(3)).capitalize()
            if name in used:
                continue
            value = rng.randint(10000, 99999)
            line = self._tok(f"The code of {name} is {value}.\n")
            if sum(map(len, lines)) + len(line) > budget:
                break
            used.add(name)
            lines.append(line)
            names.append(name)
            values.append(value)
        # A line whose end lies before the last `capacity` tokens of the prompt.
        ends = np.cumsum([len(x) for x in lines])
        old = [i for i in range(len(lines)) if ends[-1] - ends[i] > self.capacity + 32]
        if not old:
            raise InvalidArgumentError("--sample-tokens is too small for key-value samples beyond the cache; raise it")
        pick = rng.choice(old)
        question = self._tok(f"Question: what is the code of {names[pick]}? Answer: the code of {names[pick]} is")
        prompt = self.corpus.bos + head + [t for line in lines for t in line] + question
        target = self._tok(f" {values[pick]}")
        return Sample(f"{tag}:kv:{names[pick]}={values[pick]}#{pick}/{len(lines)}", "kv", tuple(prompt),
                      tuple(target), len(question))

    def draw(self, kind: str, split: str, rng: random.Random, tag: str) -> Sample:
        return {"text": self.text, "passkey": self.passkey, "kv": self.kv}[kind](split, rng, tag)


def generation_samples(factory: SampleFactory, seed: int, generation: int, n_text: int, n_retrieval: int,
                       retrieval_kinds: Sequence[str]) -> list[Sample]:
    """The samples every member of `generation` is scored on (training split)."""
    rng = random.Random(f"namm-train/{seed}/{generation}")
    out = [factory.draw("text", "train", rng, f"g{generation}t{i}") for i in range(n_text)]
    if retrieval_kinds:
        out += [factory.draw(retrieval_kinds[(generation + i) % len(retrieval_kinds)], "train", rng, f"g{generation}r{i}")
                for i in range(n_retrieval)]
    return out


def heldout_samples(factory: SampleFactory, seed: int, n_text: int, n_retrieval: int,
                    retrieval_kinds: Sequence[str]) -> list[Sample]:
    """The fixed held-out set (held-out split, its own random stream)."""
    rng = random.Random(f"namm-heldout/{seed}")
    out = [factory.draw("text", "heldout", rng, f"h{i}") for i in range(n_text)]
    if retrieval_kinds:
        out += [factory.draw(retrieval_kinds[i % len(retrieval_kinds)], "heldout", rng, f"h{i}")
                for i in range(n_retrieval)]
    return out
