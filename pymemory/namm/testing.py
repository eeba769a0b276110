"""Synthetic NAMM inputs for tests and tools: checkpoints in the evo-memory trainer's format, causal attention, and a
driver for consecutive invocations.

No downloads: no trained NAMM weights are public (namm-spec.md §5.6), so tests build a ckpt.pt with random
parameters and statistics, in exactly the layout the trainer writes. The scales are chosen so that a random policy
evicts a realistic share of the tokens: over five invocations with 4 KV heads, 14-64 % depending on the seed
(measured for seeds 1, 2, 3, 7, 11).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

from . import gguf_format as fmt
from .checkpoint import MEAN_KEY, STATS_PREFIX, VAR_KEY


def random_params(seed: int, hidden: int = fmt.HIDDEN, bias: bool = True,
                  mean_scale: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(θ [param_count(hidden, bias)], μ [17], σ² [17]) float32.

    θ ~ N(0, mean_scale²), near CMA-ES's initial σ of 0.065. μ and σ² are on the scale of the spectrogram EMAs
    of ``random_causal_attention`` (measured: per-bin mean about 0.013, standard deviation about 0.02), so the
    normalised features are O(1) as with the trainer's estimated statistics.
    """
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, mean_scale, fmt.param_count(hidden, bias)).astype(np.float32)
    mean = rng.uniform(0.008, 0.02, fmt.N_BINS).astype(np.float32)
    var = rng.uniform(1.5e-4, 6e-4, fmt.N_BINS).astype(np.float32)
    return theta, mean, var


def write_random_checkpoint(path: str | os.PathLike, *, seed: int, hidden: int = fmt.HIDDEN, bias: bool = True,
                            mean_scale: float = 0.05, extra_junk: bool = True, orig_mod_prefix: bool = False,
                            feat_mean=None, feat_var=None) -> dict[str, np.ndarray]:
    """Writes a ckpt.pt shaped like the evo-memory trainer's (spec §5.1-5.2) with random θ and statistics.

    Always present: ``mean`` (θ), ``best_member`` (deliberately different: a converter must not use it), ``C``,
    ``sigma``, the two ``stored_buffers_to_save...output_{mean,var}`` buffers [1, 1, 1, 17], a numpy float64
    ``best_val_loss`` (why ``weights_only=True`` fails) and ``iter_num``. ``extra_junk`` adds the rest of the
    CMA-ES state and buffers, some with misleading values (``best_stored_buffers_to_save.*``), as the real file
    has. ``orig_mod_prefix`` prefixes every key with ``_orig_mod.`` as ``torch.compile`` does. ``feat_mean`` /
    ``feat_var`` override the statistics (any shape, to write bad files). Returns the arrays written: theta,
    best_member, mean, var.
    """
    import torch

    theta, mu, sigma2 = random_params(seed, hidden, bias, mean_scale)
    mu = mu if feat_mean is None else np.asarray(feat_mean, np.float32)
    sigma2 = sigma2 if feat_var is None else np.asarray(feat_var, np.float32)
    rng = np.random.default_rng(seed + 1)
    n = theta.size
    best_member = theta + rng.normal(0.0, 1.0, n).astype(np.float32)

    def buffer(values: np.ndarray):
        return torch.from_numpy(np.asarray(values, np.float32).reshape(1, 1, 1, -1).copy())  # [1, 1, 1, 17]

    state = {
        "mean": torch.from_numpy(theta.copy()),
        "best_member": torch.from_numpy(best_member),
        "sigma": torch.tensor(0.065),
        "C": torch.eye(min(n, 64)),  # the real one is [n, n] (~70 MB); its size does not matter here
        MEAN_KEY: buffer(mu),
        VAR_KEY: buffer(sigma2),
    }
    if extra_junk:
        state.update({
            "mu_eff": torch.tensor(8.0), "weights": torch.rand(32), "weights_truncated": torch.rand(32),
            "g": torch.tensor(123), "best_fitness": torch.tensor(0.9), "evo_path_c": torch.zeros(n),
            "evo_path_sigma": torch.zeros(n), "sample_C": torch.eye(8), "sample_B": torch.eye(8),
            "sample_D": torch.ones(n), "x": torch.zeros(32, 8), "y": torch.zeros(32, 8),
            STATS_PREFIX + "online_new_output_mean": buffer(np.zeros(fmt.N_BINS)),
            STATS_PREFIX + "online_new_output_var": buffer(np.zeros(fmt.N_BINS)),
            STATS_PREFIX + "online_new_output_num": torch.tensor(0, dtype=torch.int64),
            STATS_PREFIX + "output_num": torch.tensor(1000, dtype=torch.int64),
            "best_" + MEAN_KEY: buffer(rng.uniform(5, 10, fmt.N_BINS)),
            "best_" + VAR_KEY: buffer(rng.uniform(5, 10, fmt.N_BINS)),
        })
    prefix = "_orig_mod." if orig_mod_prefix else ""
    torch.save({"evolution_state": {prefix + key: value for key, value in state.items()}, "iter_num": 42,
                "best_val_loss": np.float64(0.5)}, path)
    return {"theta": theta, "best_member": best_member, "mean": mu, "var": sigma2}


def random_causal_attention(rng: np.random.Generator, n_kv_heads: int, n_old: int, n_new: int = 512,
                            sharpness: float = 3.0, sink_boost: float = 4.0) -> np.ndarray:
    """float32 [H, n_new, n_old + n_new]: row t is the softmax of N(0, sharpness²) logits over the n_old old
    tokens and the new tokens 0..t, zeros for keys that do not exist yet: what one NAMM invocation receives.
    Column 0 gets ``sink_boost`` extra logit, like the attention sink of real models."""
    n = n_old + n_new
    logits = rng.normal(0.0, sharpness, (n_kv_heads, n_new, n))  # [H, R, n]
    logits[:, :, 0] += sink_boost
    visible = np.arange(n)[None, :] <= (n_old + np.arange(n_new))[:, None]  # [R, n]
    logits = np.where(visible[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


class InvocationModel(Protocol):
    """What ``run_invocations`` drives: the NammReference and the C++ NammModel both fit."""

    def step(self, state, attn, new_pos) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class Invocation:
    attn: np.ndarray  # float32 [H, R, n_old + R]
    new_pos: np.ndarray  # int64 [R]
    keep: np.ndarray  # int64 [H, K]
    scores: np.ndarray  # float32 [H, n_old + R]

    @property
    def evicted(self) -> int:
        """Tokens evicted per head."""
        return self.attn.shape[2] - self.keep.shape[1]


def run_invocations(model: InvocationModel, state, n_invocations: int, rng: np.random.Generator, *,
                    delay: int = 512, first_position: int = 0, gap: int = 0) -> Iterator[Invocation]:
    """Drives consecutive invocations of one layer (``state`` from ``model.new_state``, updated in place) on random
    causal attention over the tokens the model kept. Invocation i gets positions
    first_position + i·(delay + gap) + [0, delay); a gap leaves positions unused, as tokens removed by another
    policy would. Two models that make identical decisions, driven with equally seeded generators, receive
    identical inputs."""
    n_kv_heads = state.positions.shape[0]
    for i in range(n_invocations):
        attn = random_causal_attention(rng, n_kv_heads, state.positions.shape[1], delay)  # [H, R, n_old + R]
        start = first_position + i * (delay + gap)
        new_pos = np.arange(start, start + delay, dtype=np.int64)
        keep, scores = model.step(state, attn, new_pos)
        yield Invocation(attn, new_pos, keep, scores)
