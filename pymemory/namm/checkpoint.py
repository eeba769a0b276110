"""Reading NAMM parameters: the original trainer's `ckpt.pt`, or a plain parameter vector plus statistics.

The trainer (SakanaAI/evo-memory) saves `torch.save({'evolution_state': CMA_ES.state_dict(), 'iter_num': int,
'best_val_loss': numpy.float64})` (namm-spec.md §5). Evaluation uses the CMA-ES **mean** (not `best_member`) and the
normalisation buffers `stored_buffers_to_save.token_embedding_0_output_{mean,var}`. Everything is validated before
anything is written, with errors that say what is wrong and what to do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PymemoryError
from . import gguf_format as fmt

MEAN_KEY = "stored_buffers_to_save.token_embedding_0_output_mean"
VAR_KEY = "stored_buffers_to_save.token_embedding_0_output_var"


class NammCheckpointError(PymemoryError, ValueError):
    """A NAMM checkpoint or parameter file is unusable; the message says why and what to do."""


@dataclass
class NammParams:
    """The learned state of a NAMM: the flat parameter vector and the 17 feature statistics."""

    theta: np.ndarray  # float32 [4172]
    feat_mean: np.ndarray  # float32 [17]
    feat_var: np.ndarray  # float32 [17] population variances
    source: str = ""
    extra: dict = field(default_factory=dict)  # provenance (iteration, best_val_loss, ...)

    def tensors(self) -> dict[str, np.ndarray]:
        """θ sliced into the network's tensors, in the trainer's x @ W layout (spec §5.4)."""
        return {
            name: self.theta[start:end].reshape(shape).astype(np.float32)
            for name, (start, end, shape) in fmt.PARAM_LAYOUT.items()
        }


def _require_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'reading a PyTorch checkpoint needs torch: pip install "pymemory[namm]"'
        ) from exc
    return torch


def _implied_architecture(n: int) -> str:
    for hidden in (8, 16, 24, 32, 48, 64):
        for bias in (False, True):
            if fmt.param_count(hidden, bias) == n:
                return f" (that length fits hidden={hidden}, bias={bias}, which this scorer does not support)"
    return ""


def validate(theta: np.ndarray, feat_mean: np.ndarray, feat_var: np.ndarray, source: str) -> NammParams:
    """Checks lengths, finiteness and variances; returns float32 NammParams."""
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    feat_mean = np.asarray(feat_mean, dtype=np.float64).reshape(-1)
    feat_var = np.asarray(feat_var, dtype=np.float64).reshape(-1)
    if theta.size != fmt.PARAM_COUNT:
        raise NammCheckpointError(
            f"{source}: the parameter vector has {theta.size} values, expected {fmt.PARAM_COUNT} for the released "
            f"NAMM BAM configuration (hidden 32, attention bias, 1 head){_implied_architecture(theta.size)}"
        )
    if not np.all(np.isfinite(theta)):
        bad = int(np.count_nonzero(~np.isfinite(theta)))
        raise NammCheckpointError(f"{source}: the parameter vector has {bad} NaN or infinite values")
    for name, values in (("mean", feat_mean), ("variance", feat_var)):
        if values.size != fmt.N_BINS:
            raise NammCheckpointError(
                f"{source}: the feature {name} has {values.size} values, expected {fmt.N_BINS} (one per bin)"
            )
        if not np.all(np.isfinite(values)):
            raise NammCheckpointError(f"{source}: the feature {name} contains NaN or infinite values")
    if np.any(feat_var < 0):
        raise NammCheckpointError(f"{source}: the feature variances must be >= 0 (found {feat_var.min():.3g})")
    if np.all(feat_var == 0):
        raise NammCheckpointError(
            f"{source}: all feature variances are zero: the normalisation statistics were never estimated "
            "(the original would silently skip normalisation); use a checkpoint saved after the first evaluation"
        )
    return NammParams(theta.astype(np.float32), feat_mean.astype(np.float32), feat_var.astype(np.float32), source)


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> NammParams:
    """Reads the trainer's ckpt.pt. A ckpt.pt is a Python pickle, and unpickling can run arbitrary code, so it is
    loaded only with ``trust_pickle=True`` (``--trust-pickle``): pass it only for files you trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    if not trust_pickle:
        raise NammCheckpointError(
            f"{path} is a PyTorch pickle, and loading a pickle can execute arbitrary code. If you trust this file, "
            "pass trust_pickle=True (CLI: --trust-pickle); otherwise export the parameter vector and statistics "
            "and use --params/--mean/--var"
        )
    torch = _require_torch()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise NammCheckpointError(
            f"{path} cannot be read as a torch.save checkpoint (truncated, corrupted, or another format): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(checkpoint, dict) or "evolution_state" not in checkpoint:
        found = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise NammCheckpointError(
            f"{path} is not an evo-memory trainer checkpoint: no 'evolution_state' (found {found})"
        )
    state = {str(k).replace("_orig_mod.", ""): v for k, v in checkpoint["evolution_state"].items()}
    missing = [key for key in ("mean", MEAN_KEY, VAR_KEY) if key not in state]
    if missing:
        raise NammCheckpointError(
            f"{path}: evolution_state lacks {missing}; it has {sorted(state)[:25]}"
        )

    def as_numpy(value):
        return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)

    params = validate(as_numpy(state["mean"]), as_numpy(state[MEAN_KEY]), as_numpy(state[VAR_KEY]),
                      f"{path} (CMA-ES mean)")
    params.extra = {"iter_num": int(checkpoint.get("iter_num", -1)),
                    "best_val_loss": float(checkpoint.get("best_val_loss", float("nan")))}
    return params


def _read_array(path: str | os.PathLike, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".pt", ".pth"):
            torch = _require_torch()
            value = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
            return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        return np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (ValueError, OSError, RuntimeError) as exc:
        raise NammCheckpointError(f"{path}: cannot read the {what} ({exc}); use .npy, .pt or whitespace text") from exc


def load_vectors(params: str | os.PathLike, mean: str | os.PathLike, var: str | os.PathLike) -> NammParams:
    """Parameters from other trainers: θ [4172] and the 17 means and variances as .npy, .pt (tensor) or text."""
    result = validate(_read_array(params, "parameter vector"), _read_array(mean, "feature mean"),
                      _read_array(var, "feature variance"), f"{params}")
    result.source = f"vectors: {Path(params).name}, {Path(mean).name}, {Path(var).name}"
    return result
