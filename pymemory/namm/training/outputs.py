"""What a training run leaves in its directory: the evo-memory-format `ckpt.pt`, the NAMM GGUF, the JSON log and
the training-curve plot. Every file is written to a temporary name and renamed, so a killed run never leaves a
half-written one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

BUFFER_PREFIX = "stored_buffers_to_save.token_embedding_0_"


def _atomic(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def covariance_diagonal_or_matrix(es) -> np.ndarray:
    """C of the CMA-ES state as the original stores it (sampling covariance / σ²): [N] for the diagonal variant,
    [N, N] for full covariance."""
    c = np.asarray(es.sm.covariance_matrix if es.sm.covariance_matrix is not None else es.sm.variances, np.float64)
    scale = np.asarray(es.sigma_vec.scaling, np.float64) if np.ndim(es.sigma_vec.scaling) else float(es.sigma_vec.scaling)
    if c.ndim == 1:
        return c * scale ** 2
    return c * np.outer(scale, scale) if np.ndim(scale) else c * scale ** 2


def write_checkpoint(path: Path, es, feat_mean: np.ndarray, feat_var: np.ndarray, iteration: int,
                     best_val_loss: float, calibration_tokens: int, mean: np.ndarray | None = None,
                     settings: dict | None = None) -> None:
    """`torch.save({'evolution_state': ..., 'iter_num': int, 'best_val_loss': numpy.float64})` with the keys the
    evo-memory trainer writes (namm-spec.md §5.1-5.2) that describe the search distribution and the buffers; so
    `pymemory convert-namm ckpt.pt --trust-pickle` converts it. C is written as a full [N, N] matrix (diagonal for
    the diagonal variant), as the original's loader expects. `settings` (namm_delay, ema_coefficient,
    ema_bias_correction, mode, quorum, deploy_key_weight: how the NAMM was trained to run) go under a key of their
    own, which convert-namm writes into the GGUF."""
    import torch

    mean = np.asarray(es.mean if mean is None else mean, np.float32)  # the deployed θ: the CMA mean by default
    n = mean.size
    c = covariance_diagonal_or_matrix(es)
    c_full = torch.diag(torch.from_numpy(c.astype(np.float32))) if c.ndim == 1 else torch.from_numpy(c.astype(np.float32))
    best_x = es.best.x if es.best.x is not None else mean
    stats_shape = (1, 1, 1, 17)
    state = {
        "mean": torch.from_numpy(mean),
        "sigma": torch.tensor(float(es.sigma), dtype=torch.float32),
        "C": c_full,
        "g": torch.tensor(iteration),
        "best_member": torch.from_numpy(np.asarray(best_x, np.float32)),
        "best_fitness": torch.tensor(float(es.best.f) if es.best.f is not None else float("nan")),
        "evo_path_c": torch.from_numpy(np.asarray(es.pc, np.float32)) if np.size(es.pc) == n else torch.zeros(n),
        "evo_path_sigma": torch.from_numpy(np.asarray(es.adapt_sigma.ps, np.float32))
        if np.size(getattr(es.adapt_sigma, "ps", [])) == n else torch.zeros(n),
        "mu_eff": torch.tensor(float(es.sp.weights.mueff)),
        "weights": torch.from_numpy(np.asarray(es.sp.weights, np.float32)),
    }
    for name, values in (("output_mean", feat_mean), ("output_var", feat_var)):
        state[BUFFER_PREFIX + name] = torch.from_numpy(np.asarray(values, np.float32).reshape(stats_shape))
    state[BUFFER_PREFIX + "output_num"] = torch.tensor(calibration_tokens)
    for name in ("online_new_output_mean", "online_new_output_var"):
        state[BUFFER_PREFIX + name] = torch.zeros(stats_shape)
    state[BUFFER_PREFIX + "online_new_output_num"] = torch.tensor(0)
    payload = {"evolution_state": state, "iter_num": int(iteration), "best_val_loss": np.float64(best_val_loss)}
    if settings:
        from ..checkpoint import SETTINGS_KEY

        payload[SETTINGS_KEY] = dict(settings)
    _atomic(path, lambda p: torch.save(payload, p))


def write_json(path: Path, data: dict) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(data, indent=1)))


def plot_curve(path: Path, records: list[dict], heldout: list[dict], baselines: dict, title: str) -> None:
    """Per generation: best member, population mean and CMA mean (training samples, loss = NLL gap to the full
    cache as a fraction of sink's, mean over text and retrieval);
    held-out CMA mean at each evaluation; held-out sink and h2o as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if records:
        g = [r["generation"] for r in records]
        ax.plot(g, [r["best_loss"] for r in records], lw=1, label="best member (train)")
        ax.plot(g, [r["mean_loss"] for r in records], lw=1, label="population mean (train)")
        ax.plot(g, [r["cma_mean_loss"] for r in records], lw=1.5, label="CMA mean (train)")
    if heldout:
        ax.plot([h["generation"] for h in heldout], [h["loss"] for h in heldout], "ko-", ms=4,
                label="CMA mean (held-out)")
    for (name, gap), style in zip(sorted(baselines.items()), ("--", ":", "-.", (0, (5, 1)))):
        ax.axhline(gap, color="gray", ls=style, lw=1, label=f"{name} (held-out)")
    ax.set_xlabel("generation")
    ax.set_ylabel("loss: NLL gap to full cache / sink's gap")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
