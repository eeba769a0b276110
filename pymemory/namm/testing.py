"""Synthetic NAMM inputs for tests and tools: checkpoints in the evo-memory trainer's format and causal attention.

No downloads: the trainer's released weights do not exist publicly (namm-spec.md §5.6), so tests build a ckpt.pt
with random parameters and statistics, in exactly the layout the trainer writes.
"""
from __future__ import annotations

import os

import numpy as np

from . import gguf_format as fmt
from .checkpoint import MEAN_KEY, VAR_KEY


def random_params(seed: int, hidden: int = fmt.HIDDEN, bias: bool = True, scale: float = 0.05):
    """(θ, μ, σ²): θ ~ N(0, scale²); μ and σ² on the scale of real attention-spectrogram EMAs (probabilities of
    about 1/n summed over 32-sample frames), so normalised features are O(1)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, scale, fmt.param_count(hidden, bias)).astype(np.float32)
    mean = rng.uniform(0.008, 0.02, fmt.N_BINS).astype(np.float32)  # measured on random_causal_attention:
    var = rng.uniform(1.5e-4, 6e-4, fmt.N_BINS).astype(np.float32)  # E mean ~0.013, std ~0.02 per bin
    return theta, mean, var


def write_random_checkpoint(path: str | os.PathLike, *, seed: int = 0, hidden: int = fmt.HIDDEN, bias: bool = True,
                            scale: float = 0.05, orig_mod_prefix: bool = False, mean=None, var=None) -> dict:
    """Writes a ckpt.pt shaped like SakanaAI/evo-memory's (spec §5.1-5.2); returns the arrays it wrote."""
    import torch

    theta, mu, sigma2 = random_params(seed, hidden, bias, scale)
    mu = mu if mean is None else np.asarray(mean, np.float32)
    sigma2 = sigma2 if var is None else np.asarray(var, np.float32)
    rng = np.random.default_rng(seed + 1)
    n = theta.size
    prefix = "_orig_mod." if orig_mod_prefix else ""
    state = {
        "mu_eff": torch.tensor(8.0),
        "weights": torch.rand(32),
        "weights_truncated": torch.rand(32),
        "g": torch.tensor(123),
        "best_member": torch.from_numpy(theta + rng.normal(0, 1.0, n).astype(np.float32)),  # must NOT be used
        "best_fitness": torch.tensor(0.9),
        "evo_path_c": torch.zeros(n),
        "evo_path_sigma": torch.zeros(n),
        "mean": torch.from_numpy(theta),
        "sigma": torch.tensor(0.065),
        "C": torch.eye(min(n, 64)),  # the real one is [n, n] (~70 MB); its size does not matter here
        "sample_D": torch.ones(n),
        "x": torch.zeros(32, 8),
        "y": torch.zeros(32, 8),
    }
    for kind, value in (("mean", mu), ("var", sigma2)):
        state[f"stored_buffers_to_save.token_embedding_0_output_{kind}"] = torch.from_numpy(value.reshape(1, 1, 1, -1))
        state[f"stored_buffers_to_save.token_embedding_0_online_new_output_{kind}"] = torch.zeros(1, 1, 1, fmt.N_BINS)
    state["stored_buffers_to_save.token_embedding_0_output_num"] = torch.tensor(1000, dtype=torch.int64)
    state = {prefix + k: v for k, v in state.items()}
    torch.save({"evolution_state": state, "iter_num": 42, "best_val_loss": np.float64(0.5)}, path)
    assert MEAN_KEY in {k.replace("_orig_mod.", "") for k in state} and VAR_KEY
    return {"theta": theta, "mean": mu, "var": sigma2, "best_member": state[prefix + "best_member"].numpy()}


def random_causal_attention(rng: np.random.Generator, n_heads: int, n_old: int, n_new: int = 512,
                            first_new_position: int | None = None, sharpness: float = 3.0) -> np.ndarray:
    """float32 [H, n_new, n_old + n_new]: row t is the softmax of random logits over the n_old old tokens and the
    new tokens 0..t (causal), zeros for keys that do not exist yet — what one NAMM invocation receives."""
    n = n_old + n_new
    logits = rng.normal(0.0, sharpness, (n_heads, n_new, n)).astype(np.float64)
    logits[:, :, 0] += 4.0  # a sink, as real models have
    visible = np.arange(n)[None, :] <= (n_old + np.arange(n_new))[:, None]
    logits = np.where(visible[None], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs.astype(np.float32)
