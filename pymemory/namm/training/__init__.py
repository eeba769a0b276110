"""Training NAMMs for GGUF models with CMA-ES, scoring every candidate through pymemory's own engine
(`pymemory train-namm`; docs/namm-training.md).

- ``TrainConfig``: every setting of a run, validated before any work is spent.
- ``train_namm(config)``: runs or resumes a run; writes ckpt.pt (evo-memory format), namm.gguf, log.json and
  curve.png into ``config.out_dir``.
- ``pymemory.namm.training.data``: the samples (text, passkey, key-value) and the fixed held-out split.

Needs the extras ``pymemory[train]`` (cma, torch, gguf, matplotlib, tqdm); ``pymemory[distributed]`` for Dask.
"""
from __future__ import annotations

from .config import TrainConfig

__all__ = ["TrainConfig", "train_namm"]


def train_namm(config: TrainConfig, progress: bool = True) -> dict:
    from .trainer import train_namm as run

    return run(config, progress)
