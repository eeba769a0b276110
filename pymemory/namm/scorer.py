"""The C++ NAMM scorer (cpp/namm/) with the same one-invocation API as the PyTorch reference."""
from __future__ import annotations

import os

import numpy as np

from .._loader import _core


class NammModel:
    """A NAMM GGUF on a ggml backend: ``new_state(n_kv_heads)`` and ``keep, scores = step(state, attn, new_pos)``.

    ``attn`` is float32 ``[n_kv_heads, rows, n_old + rows]`` (rows = the file's delay, 512), ``new_pos`` the rows'
    absolute positions; ``scores`` is ``[n_kv_heads, n_old + rows]`` and ``keep`` ``[n_kv_heads, K]`` (int64,
    chronological). ``device`` is "cpu", "gpu" or "auto".
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", n_threads: int = 0) -> None:
        self._model = _core.NammModel.load(os.fspath(path), device, n_threads)
        self.path = os.fspath(path)

    @property
    def hparams(self) -> dict:
        return self._model.hparams

    @property
    def device(self) -> str:
        return self._model.device

    def new_state(self, n_kv_heads: int) -> "_core.NammLayerState":
        if n_kv_heads < 1:
            raise ValueError("n_kv_heads must be >= 1")
        return _core.NammLayerState(n_kv_heads)

    def step(self, state, attn, new_pos) -> tuple[np.ndarray, np.ndarray]:
        attn = np.asarray(attn)
        if attn.dtype != np.float32:
            raise TypeError(f"attn must be float32 (got {attn.dtype})")
        new_pos = np.asarray(new_pos)
        if not np.issubdtype(new_pos.dtype, np.integer):
            raise TypeError(f"new_pos must be integers (got {new_pos.dtype})")
        keep, scores = self._model.step(state, attn, new_pos.astype(np.int32))
        return keep.astype(np.int64), scores

    def score(self, positions, ema) -> tuple[np.ndarray, np.ndarray, int, dict]:
        """Scores chronological tokens directly: positions [H, n] int, ema [H, n, 17] -> (scores, keep mask, K,
        timings in ms)."""
        return self._model.score_layer(np.asarray(positions, np.int32), np.asarray(ema, np.float32))

    def features(self, positions, ema) -> np.ndarray:
        return self._model.features(np.asarray(positions, np.int32), np.asarray(ema, np.float32))
