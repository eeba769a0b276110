#!/usr/bin/env python3
"""What a token is, beside the attention it draws: the signals tools/namm_aggregation_probe.py adds to an attention
rule (docs/results.md, "Keys" and "Surprisal, separators, values").

  - key_distinctiveness: KeyDiff's score per (layer, KV head) pair, on keys (before or after RoPE) or values;
  - duplicate_of_better: how closely a better-ranked token says the same (key and value);
  - token_surprisal: each token's NLL in context (Selective Context's, LLMLingua's pruning signal);
  - separator_mask: punctuation and line breaks (SepLLM's separators);
  - copies_among: how many of the candidates hold the same token (a word's last copy in the cache is the one a
    later mention can read; tools/namm_gap_anatomy.py finds words last seen out of sink's window carry half its gap).

Rules combine them standardised over the eviction candidates (`standardised`, `row_standardised`).
"""
from __future__ import annotations

import numpy as np

SEPARATORS = set(".,;:!?")  # SepLLM's separators: punctuation, and any piece holding a line break
QUOTES = set("\"'()[]")  # may stand beside a separator in one piece ('."')


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(float(x.std()), 1e-9)


def row_standardised(x: np.ndarray) -> np.ndarray:
    """[pairs, cand]: each pair's values standardised over the candidates."""
    return (x - x.mean(axis=1, keepdims=True)) / np.maximum(x.std(axis=1, keepdims=True), 1e-9)


def key_distinctiveness(keys: np.ndarray) -> np.ndarray:
    """KeyDiff's score (Park et al., 2025): keys [pairs, cand, head_dim] (as cached, after RoPE; before it; or values)
    -> [pairs, cand], minus each key's cosine to the mean direction of the candidates' keys: a key unlike the rest
    is kept."""
    unit = unit_rows(keys)
    anchor = unit_rows(unit.mean(axis=1, keepdims=True))  # [pairs, 1, head_dim]
    return -(unit * anchor).sum(axis=-1)


def duplicate_of_better(keys: np.ndarray, values: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """[cand]: how closely a candidate is duplicated by one the base rule ranks higher (`ranked` [cand]), averaged
    over the pairs: the highest mean of key cosine (after RoPE, so the two answer later queries alike) and value
    cosine (so their outputs agree) to any better-ranked candidate. Evicting such a token moves its attention to its
    duplicate, which says the same; only the better one of a pair counts as the duplicate, so the two are never
    both evicted for each other. keys, values [pairs, cand, head_dim]."""
    k, v = unit_rows(keys), unit_rows(values)
    similar = (np.einsum("pid,pjd->pij", k, k) + np.einsum("pid,pjd->pij", v, v)) / 2  # [pairs, cand, cand]
    better = ranked[None, :] > ranked[:, None]  # [i, j]: j ranks above i
    similar = np.where(better[None], similar, -1.0)
    return similar.max(axis=2).mean(axis=0)


def token_surprisal(harness, tokens: list[int]) -> np.ndarray:
    """[tokens]: with `harness` a tools/namm_oracle_bound.py LlamaHarness, each token's NLL given every token before it, from one full-cache pass (the first token, which
    nothing predicts, gets the median of the rest). A deployed engine knows this for every token it decoded with
    logits: the information a token added, what Selective Context and LLMLingua prune by."""
    harness.clear()
    nll = np.zeros(len(tokens))
    for begin in range(0, len(tokens), 512):
        chunk = tokens[begin:begin + 512]
        scored = [i for i in range(len(chunk)) if begin + i + 1 < len(tokens)]
        logprobs = harness.decode(chunk, begin, scored)
        for i in scored:
            nll[begin + i + 1] = -logprobs[i][tokens[begin + i + 1]]
    nll[0] = np.median(nll[1:])
    return nll


def separator_mask(harness, tokens: list[int]) -> np.ndarray:
    """[tokens] bool: the tokens whose text is a separator (SEPARATORS, with quotes or brackets beside it; spaces
    aside) or holds a line break.
    SepLLM finds that a model packs a segment into its separators, which keep it when the segment is gone."""
    def is_separator(token: int) -> bool:
        piece = harness.llm.detokenize([token]).decode("utf-8", errors="replace")
        chars = set(piece.strip())
        return "\n" in piece or (bool(chars & SEPARATORS) and chars <= SEPARATORS | QUOTES)
    return np.array([is_separator(t) for t in tokens])


def copies_among(tokens: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """[cand]: for each candidate position, how many candidates (itself included) hold the same token id."""
    ids = np.asarray(tokens)[cand]
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return counts[inverse]
