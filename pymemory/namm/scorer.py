"""The C++ NAMM scorer (cpp/namm/, ggml graphs) with the one-invocation API of the PyTorch reference.

One invocation, as ``NammReference.step``::

    model = NammModel("namm.gguf")
    state = model.new_state(n_kv_heads)              # one per layer
    keep, scores = model.step(state, attn, new_pos)   # every `delay` (512) tokens

The same invocation in the streaming form the engine uses (spec §2.3), step by step::

    state.append(new_pos)                             # new tokens: EMA 0, history 0
    for j in range(delay // 16):
        model.fold_frame(state, attn[:, 16 * j:16 * (j + 1)])   # features: one STFT frame (graph)
    scores = model.scores(state)                      # normalisation, recency, BAM (graph)
    keep = model.select(scores)                       # selection (host)
    state.gather(keep)

Shapes: H = KV heads of the layer, R = delay (512), n = n_old + R tokens per head. ``attn`` float32 [H, R, n],
``new_pos`` [R] integer absolute positions, ``scores`` float32 [H, n], ``keep`` int64 [H, K] chronological.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from .._loader import _core

NammLayerState = _core.NammLayerState


class NammFeatures(NamedTuple):
    """One invocation's intermediates, for the n = n_old + R tokens after appending the new ones (the fields of the
    reference's ``NammReference.features``, as numpy)."""

    X: np.ndarray  # float32 [H, n, 25] = [recency 8 ‖ normalised spectrum 17]
    ema: np.ndarray  # float32 [H, n, 17] new un-normalised EMA
    history: np.ndarray  # float32 [H, n, 16] new attention history
    positions: np.ndarray  # int64 [H, n]


def _float32(name: str, value) -> np.ndarray:
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else value  # torch tensors too
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise TypeError(f"{name} must be a float32 numpy array or torch tensor (got {got}); convert with "
                        ".astype(np.float32)")
    return array


def _integers(name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer positions (got {array.dtype})")
    return array.astype(np.int64, copy=False)


class NammModel:
    """A NAMM GGUF (docs/namm-gguf.md) on a ggml backend.

    ``device`` is "cpu", "gpu" or "auto"; ``n_threads`` <= 0 uses every hardware thread (CPU backend only).
    Raises ``ModelNotFoundError`` for a missing file and ``ModelLoadError`` for an invalid one.
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", n_threads: int = 0) -> None:
        self.path = os.fspath(path)
        self._model = _core.NammModel.load(self.path, device, n_threads)

    @property
    def hparams(self) -> dict:
        """The file's tunable constants: delay, ema_coefficient, recency_max_freq, recency_start, threshold,
        norm_eps, weight_type, source, format_version."""
        hparams = self._model.hparams
        for key in ("ema_coefficient", "recency_max_freq", "threshold", "norm_eps"):
            hparams[key] = float(str(np.float32(hparams[key])))  # the shortest decimal, as the Python readers do
        return hparams

    @property
    def bam_attention(self) -> str:
        """How BAM computes attention: "flash" (ggml's fused kernel, chosen where the backend has it) or "matmul"
        (matmul + softmax, the reference form). Set "automatic", "flash" or "matmul" to choose."""
        return "flash" if self._model.bam_uses_flash_attention else "matmul"

    @bam_attention.setter
    def bam_attention(self, kind: str) -> None:
        self._model.set_bam_attention(kind)

    @property
    def device(self) -> str:
        return self._model.device

    def new_state(self, n_kv_heads: int) -> NammLayerState:
        """An empty state for one layer with ``n_kv_heads`` KV heads."""
        if not isinstance(n_kv_heads, (int, np.integer)) or n_kv_heads < 1:
            raise ValueError(f"n_kv_heads must be a positive integer (got {n_kv_heads!r})")
        return NammLayerState(int(n_kv_heads))

    @staticmethod
    def state_from_arrays(positions, ema, history) -> NammLayerState:
        """A state holding given tokens: positions int [H, n] (increasing per head), ema float32 [H, n, 17],
        history float32 [H, n, 16]."""
        return NammLayerState(_integers("positions", positions), _float32("ema", ema), _float32("history", history))

    # ---- one invocation -----------------------------------------------------------------------------------------

    def step(self, state: NammLayerState, attn, new_pos, *, return_timings: bool = False):
        """One invocation: returns ``(keep, scores)``, plus a dict of milliseconds (features, BAM, selection) with
        ``return_timings``. ``state`` then holds each head's retained tokens; a rejected call changes nothing."""
        keep, scores, timings = self._model.step(state, _float32("attn", attn), _integers("new_pos", new_pos))
        return (keep, scores, timings) if return_timings else (keep, scores)

    def features(self, state: NammLayerState, attn, new_pos) -> NammFeatures:
        """What ``step`` computes before scoring (``state`` is not changed)."""
        folded = self._model.folded(state, _float32("attn", attn), _integers("new_pos", new_pos))
        return NammFeatures(self._model.features(folded), folded.ema, folded.history, folded.positions)

    def scores_from_features(self, X) -> np.ndarray:
        """BAM alone: features X float32 [H, n, 25] -> scores float32 [H, n]."""
        return self._model.scores_from_features(_float32("X", X))

    def select(self, scores) -> np.ndarray:
        """The selection rule (spec §4.1) on scores [H, n]: keep int64 [H, K], chronological per head."""
        return _core.namm_select(_float32("scores", scores), self.hparams["threshold"])

    # ---- streaming steps ----------------------------------------------------------------------------------------

    def fold_frame(self, state: NammLayerState, rows16) -> None:
        """Folds one STFT frame into the state: rows16 float32 [H, 16, n_tokens], the attention of the 16 newest
        queries on every token of the state (0 for tokens that did not exist yet)."""
        self._model.fold_frame(state, _float32("rows16", rows16))

    def scores(self, state: NammLayerState, *, return_timings: bool = False):
        """Scores float32 [H, n] of the state's tokens (features and BAM; no selection)."""
        scores, timings = self._model.scores(state)
        return (scores, timings) if return_timings else scores
