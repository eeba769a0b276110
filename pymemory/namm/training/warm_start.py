"""Imitation warm start: fit the NAMM by gradient descent to predict which cached tokens the *future* queries will
attend to, before CMA-ES takes over (docs/namm-training.md, "Warm start").

Evolution from θ = 0 spends its first generations discovering that attention matters at all. The signal an
eviction policy would like to have is hindsight: how much attention each cached token receives from the queries
that come after the decision (kvpress's "expected attention", H2O's premise). It is available for free while the
cache keeps everything, and the NAMM sees exactly the features that predict it (its spectrogram of the attention
the token got so far, and its age). So:

1. run training-split samples through the engine with the all-zero NAMM and no eviction, capturing at every
   invocation, for every layer, each KV head's features (positions, spectrogram EMA) and the attention rows of the
   window (the engine's capture API, the same numbers the NAMM scores);
2. target[head, token] = log of the mean attention the token receives from the next `horizon` queries, relative
   to a uniform share (`n_tokens ×`), clipped; each (invocation, layer, head) is centred, since only the ranking
   within it matters. The `pooled` target is one per (invocation, token): the attention it receives from every
   layer and head together, compared with the mean of its scores over all of them (what budget mode ranks by);
   the `max` target (budget_max only) is the highest of the pairs' own shares, compared with a smooth maximum of
   the scores over the pairs (what budget_max ranks by). The `past_rate` target is not hindsight: each pair's
   attention per query since the token arrived, relative to a uniform share, the quantity whose per-pair
   standardised maximum keeps both text and pass keys when it is observed exactly (results.md, "A rate, not a
   sum"); a NAMM fitted to it, deployed with budget_zmax, starts evolution from that rule;
3. minimise the mean squared error between the centred NAMM scores (the torch reference, differentiable) and
   the centred targets with Adam;
4. shift the output bias so every score on the fitted data is positive: no (layer, head) then votes to drop a
   token by itself, and budget mode evicts by the mean score over all layers and heads, i.e. by the predicted
   future attention averaged over the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..gguf_format import PARAM_COUNT, PARAM_LAYOUT
from .data import Sample

LOG_FLOOR = 0.01  # relative attention below 1 % of a uniform share counts as 1 % (the log would run off to -inf)
LOG_CEIL = 50.0  # and above 50 shares as 50 (sinks would dominate the squared error)
POSITIVE_MARGIN = 0.5  # the smallest fitted score after the bias shift


TARGETS = ("per_head", "pooled", "max", "past_rate")
MAX_TEMPERATURE = 0.25  # the smooth maximum over pairs that a `max` fit differentiates (scores are free in scale)


@dataclass
class ImitationExample:
    """One invocation's NAMM inputs and hindsight target: for one layer (`per_head`: every KV head its own target)
    or for the whole model (every layer's KV heads stacked, one target for their scores aggregated over the pairs
    as a budget rule ranks: `pooled`, the mean; `max`, the highest)."""

    positions: np.ndarray  # int64 [n] chronological positions of the cached tokens
    ema: np.ndarray  # float32 [P, n, 17] un-normalised spectrogram EMA of P (layer, KV head) pairs
    target: np.ndarray  # float32 [P, n] per pair, or [1, n] over the model: log relative future attention, clipped
    first: int  # tokens before this index (sinks) are not fitted: the policy never evicts them
    aggregate: str = "mean"  # how a [1, n] target's pairs are aggregated: "mean" (budget) or "max" (budget_max)

    @property
    def pooled(self) -> bool:
        return self.target.shape[0] == 1 and self.ema.shape[0] > 1


def capture_invocations(model, samples: Sequence[Sample], namm_delay: int, n_threads: int = 0,
                        ema_coefficient: float | None = None) -> list[list[list[dict]]]:
    """Runs `samples` with the all-zero NAMM (no eviction), capturing every layer: [sample][layer][invocation] dicts
    of positions int64 [n], attention float32 [H, R, n] (the window's rows) and ema float32 [H, n, 17]."""
    from .calibration import zero_namm_captures

    n_layer = int(model.info["n_layer"])
    per_sample: list[list[list[dict]]] = [[[] for _ in range(n_layer)] for _ in samples]
    for index, captures in zero_namm_captures(model, samples, namm_delay, n_threads, ema_coefficient):
        for capture in captures:
            per_sample[index][int(capture["layer"])].append(
                {"positions": np.asarray(capture["positions"], np.int64),
                 "attention": np.asarray(capture["attention"], np.float32),
                 "ema": np.asarray(capture["ema"], np.float32)})
    return per_sample


def examples_from(samples: Sequence[Sample], invocations: list[list[list[dict]]], namm_delay: int, horizon: int,
                  n_sink: int, target: str = "per_head") -> list[ImitationExample]:
    """Text samples: every invocation with at least `horizon` tokens after it, targeted at the attention of those
    tokens. Retrieval samples: every invocation before the question, targeted at the question's attention
    (_question_received). `per_head`: one example per layer, each KV head fitted to its own attention; `pooled`: one
    example per invocation, the mean score over every (layer, KV head) fitted to the attention the token receives
    from the whole model, which is what budget mode ranks by (the mean score) and what the hindsight oracle found
    worth most (results.md, "What any attention-scored eviction could close"); `max`: one example per invocation,
    the highest score over the pairs (what budget_max ranks by) fitted to the highest of the pairs' own log shares,
    so a token one head will read stands out as it does in that head."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS} (got {target!r})")
    ahead = _windows_ahead(namm_delay, horizon)
    if target == "past_rate":
        return _past_rate_examples(invocations, n_sink)
    examples: list[ImitationExample] = []
    for sample, per_layer in zip(samples, invocations):
        if sample.question:
            question_start = len(sample.prompt) - sample.question
            totals = [_question_received(layer, question_start) for layer in per_layer]  # per layer ([H, all], rows)
            if totals[0][1] == 0:
                continue
            picked = [k for k, inv in enumerate(per_layer[0]) if inv["positions"][-1] < question_start]
            hindsight = [[(total[:, inv["positions"]], rows) for inv in layer] for layer, (total, rows)
                         in zip(per_layer, totals)]
            uniform = totals[0][0].shape[1]  # the question's queries spread over every token read
        else:
            picked = list(range(len(per_layer[0]) - ahead))
            hindsight = [[_received_ahead(layer[k], layer[k + 1:k + 1 + ahead]) if k in picked else None
                          for k in range(len(layer))] for layer in per_layer]
            uniform = 0

        def frame(k: int) -> tuple[np.ndarray, int, int]:
            positions = per_layer[0][k]["positions"]
            return positions, uniform or positions.size, min(n_sink, positions.size - 1)

        if target == "per_head":
            for layer, layer_hindsight in zip(per_layer, hindsight):
                for k in picked:
                    positions, n, first = frame(k)
                    received, rows = layer_hindsight[k]
                    example = ImitationExample(positions, layer[k]["ema"], _log_share(received, rows, n), first)
                    # An invocation where no non-sink token stands out to the question teaches nothing.
                    if not sample.question or example.target[:, first:].max() > 0.0:
                        examples.append(example)
            continue
        for k in picked:
            positions, n, first = frame(k)
            ema = np.concatenate([layer[k]["ema"] for layer in per_layer])  # [L*H, n, 17]
            if target == "max":
                best = np.max([_log_share(h[k][0], h[k][1], n).max(axis=0) for h in hindsight], axis=0)[None, :]
                if not sample.question or best[:, first:].max() > 0.0:
                    examples.append(ImitationExample(positions, ema, best, first, "max"))
                continue
            received = sum(h[k][0].sum(axis=0) for h in hindsight)  # [n] over every layer and head
            rows = sum(h[k][1] * h[k][0].shape[0] for h in hindsight)
            pooled = _log_share(received, rows, n)[None, :]  # [1, n]
            if sample.question and pooled[:, first:].max() <= 0.0:
                continue
            examples.append(ImitationExample(positions, ema, pooled, first))
    if not examples:
        raise ValueError(f"no invocation had {horizon} tokens after it: use samples longer than "
                         f"{horizon + namm_delay} tokens or a shorter horizon")
    return examples


def _past_rate_examples(invocations: list[list[list[dict]]], n_sink: int) -> list[ImitationExample]:
    """`past_rate`: one example per (sample, layer, invocation), every KV head fitted to the log of the attention
    per query each cached token has received from it since the token arrived, as a multiple of a uniform share."""
    examples = []
    for per_layer in invocations:
        total = per_layer[0][-1]["positions"].size  # nothing was evicted: positions 0 .. total-1, in order
        for layer in per_layer:
            received = np.zeros((layer[0]["ema"].shape[0], total), np.float64)  # [H, total] so far, by position
            for inv in layer:
                positions, attention = inv["positions"], inv["attention"]  # [n], [H, R, n]
                received[:, positions] += attention.sum(axis=1)
                queries = positions[-1] + 1 - positions  # [n] queries since each token arrived, its own included
                rate = received[:, positions] / queries[None, :] * positions.size  # [H, n] uniform share = 1
                target = np.log(np.clip(rate, LOG_FLOOR, LOG_CEIL)).astype(np.float32)
                examples.append(ImitationExample(positions, inv["ema"], target, min(n_sink, positions.size - 1)))
    if not examples:
        raise ValueError("no NAMM invocation was captured: samples need at least namm_delay tokens")
    return examples


def capture_examples(model, samples: Sequence[Sample], namm_delay: int, horizon: int, n_sink: int,
                     n_threads: int = 0, target: str = "per_head",
                     ema_coefficient: float | None = None) -> list[ImitationExample]:
    """capture_invocations, then examples_from."""
    _windows_ahead(namm_delay, horizon)  # a bad horizon fails before any work
    invocations = capture_invocations(model, samples, namm_delay, n_threads, ema_coefficient)
    return examples_from(samples, invocations, namm_delay, horizon, n_sink, target)


def _windows_ahead(namm_delay: int, horizon: int) -> int:
    """Invocation windows a text example's target counts."""
    if horizon < namm_delay or horizon % namm_delay:
        raise ValueError(f"horizon must be a positive multiple of namm_delay {namm_delay} (got {horizon})")
    return horizon // namm_delay


def _log_share(received: np.ndarray, rows: int, n: int) -> np.ndarray:
    """Attention received from `rows` queries over n tokens -> log of its multiple of a uniform share, clipped."""
    return np.log(np.clip(received / rows * n, LOG_FLOOR, LOG_CEIL)).astype(np.float32)


def _received_ahead(now: dict, future: Sequence[dict]) -> tuple[np.ndarray, int]:
    """Attention [H, n] that the tokens cached at `now` receive from the queries of the `future` windows, and the
    number of those queries."""
    positions = now["positions"]
    received = np.zeros((now["ema"].shape[0], positions.size), np.float64)  # [H, n]
    rows = 0
    for later in future:
        # Nothing was evicted, so every token cached now is still cached later: find its column there.
        columns = np.searchsorted(later["positions"], positions)
        if np.any(later["positions"][columns] != positions):
            raise RuntimeError("a token disappeared between invocations during the warm start's capture")
        received += later["attention"][:, :, columns].sum(axis=1)
        rows += later["attention"].shape[1]
    return received, rows


def _question_received(invocations: Sequence[dict], question_start: int) -> tuple[np.ndarray, int]:
    """A retrieval sample's fitness scores only its answer, so its hindsight is the attention each token receives
    from the question and answer queries (positions >= question_start), not from the haystack read in between:
    [H, total] by position, and the number of those queries."""
    total = invocations[-1]["positions"].size  # nothing was evicted: positions 0 .. total-1, in order
    received = np.zeros((invocations[-1]["ema"].shape[0], total), np.float64)  # [H, total]
    rows = 0
    for inv in invocations:
        attention, positions = inv["attention"], inv["positions"]  # [H, R, n], [n]
        asking = positions[-attention.shape[1]:] >= question_start  # [R] the window's queries that ask
        if asking.any():
            received[:, positions] += attention[:, asking, :].sum(axis=1)
            rows += int(asking.sum())
    return received, rows


def fit_imitation(examples: Sequence[ImitationExample], feat_mean: np.ndarray, feat_var: np.ndarray,
                  steps: int = 600, batch: int = 32, lr: float = 3e-3, seed: int = 0,
                  hparams=None) -> tuple[np.ndarray, dict]:
    """θ [4172] float32 fitted to the examples, and a report (losses, rank correlation, seconds). `hparams` (a
    gguf_format.NammHparams, default the released) say how the NAMM reads its EMA (coefficient, bias correction)."""
    import torch

    from ..checkpoint import NammVector
    from ..reference import NammParams, NammReference

    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(PARAM_COUNT, generator=generator, dtype=torch.float32) * 0.02
    theta[PARAM_LAYOUT["b_out"][0]:PARAM_LAYOUT["b_out"][1]] = 0.0
    theta.requires_grad_(True)
    stats = NammVector(np.zeros(PARAM_COUNT, np.float32), np.asarray(feat_mean, np.float32),
                       np.asarray(feat_var, np.float32))
    reference = NammReference.from_vector(stats, *(() if hparams is None else (hparams,)))
    inputs = []
    with torch.no_grad():
        for ex in examples:
            H = ex.ema.shape[0]
            X = reference.features_from_ema(np.tile(ex.positions, (H, 1)), ex.ema)
            target = torch.from_numpy(ex.target[:, ex.first:])
            inputs.append((X, target - target.mean(dim=-1, keepdim=True), ex.first,
                           ex.aggregate if ex.pooled else None))

    def network() -> None:
        reference.params = NammParams(
            **{name: theta[start:end].reshape(shape) for name, (start, end, shape) in PARAM_LAYOUT.items()},
            feat_mean=reference.params.feat_mean, feat_var=reference.params.feat_var)

    def loss_of(indices) -> torch.Tensor:
        total = 0.0
        for i in indices:
            X, target, first, pooled = inputs[i]
            scores = _predicted(reference.scores_tensor(X), pooled)[:, first:]  # [P or 1, n - first]
            total = total + ((scores - scores.mean(dim=-1, keepdim=True) - target) ** 2).mean()
        return total / len(indices)

    if any(pooled is not None for _, _, _, pooled in inputs):
        batch = max(2, batch // 16)  # a pooled example holds every layer's heads: ~16-30 per-layer examples' work
    optimiser = torch.optim.Adam([theta], lr=lr)
    order = np.random.default_rng(seed)
    history = []
    for step in range(steps):
        network()
        picked = order.choice(len(inputs), size=min(batch, len(inputs)), replace=False)
        loss = loss_of(picked)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
    network()
    with torch.no_grad():
        variance = float(np.mean([float((t ** 2).mean()) for _, t, _, _ in inputs]))  # the loss of predicting 0
        final = float(loss_of(range(len(inputs))))
        lowest = min(float(reference.scores_tensor(X).min()) for X, _, _, _ in inputs)
        # Ranked as the engine ranks: a `max` fit by the hard maximum over the pairs, not the smooth one it fitted.
        correlations = [_rank_correlation(_ranked(reference.scores_tensor(X), pooled)[:, f:].numpy(), t.numpy())
                        for X, t, f, pooled in inputs[::max(1, len(inputs) // 200)]]
    fitted = theta.detach().numpy().astype(np.float32).copy()
    b_out = PARAM_LAYOUT["b_out"][0]
    fitted[b_out] += POSITIVE_MARGIN - lowest  # every fitted score >= POSITIVE_MARGIN: no drop votes by sign
    report = {"examples": len(inputs), "steps": steps, "batch": batch, "lr": lr,
              "loss_first": history[0], "loss_last_50": float(np.mean(history[-50:])), "loss_final": final,
              "target_variance": variance, "explained": 1.0 - final / variance if variance > 0 else None,
              "rank_correlation_median": float(np.median(correlations)), "bias_shift": POSITIVE_MARGIN - lowest,
              "seconds": time.perf_counter() - t0}
    return fitted, report


def _predicted(scores, aggregate: str | None):
    """What a target is compared with: each pair's scores [P, n] (aggregate None), or for a model-wide target
    [1, n] their aggregate over the pairs as the budget rule ranks: the mean (budget) or, smoothly, the highest
    (budget_max)."""
    if aggregate is None:
        return scores
    if aggregate == "max":
        return MAX_TEMPERATURE * (scores / MAX_TEMPERATURE).logsumexp(dim=0, keepdim=True)
    return scores.mean(dim=0, keepdim=True)


def _ranked(scores, aggregate: str | None):
    """What the engine ranks tokens by: _predicted, with the hard maximum for `max`."""
    return scores.max(dim=0, keepdim=True).values if aggregate == "max" else _predicted(scores, aggregate)


def _rank_correlation(scores: np.ndarray, target: np.ndarray) -> float:
    """Mean over heads of Spearman's rank correlation."""
    out = []
    for s, t in zip(scores, target):
        rs, rt = np.argsort(np.argsort(s)), np.argsort(np.argsort(t))
        if rs.std() > 0 and rt.std() > 0:
            out.append(float(np.corrcoef(rs, rt)[0, 1]))
    return float(np.mean(out)) if out else 0.0
