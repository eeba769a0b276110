"""The NAMM's feature normalisation statistics (namm-spec.md §2.4), estimated as the original trainer does: once,
before evolution, with the all-zero policy (which scores every token 0 and so evicts nothing), over every layer,
KV head and cached token at every invocation; then frozen for the whole run and shipped in the checkpoint."""
from __future__ import annotations

import os
import tempfile
from typing import Sequence

import numpy as np

from .data import Sample


def zero_namm_captures(model, samples: Sequence[Sample], namm_delay: int, n_threads: int = 0,
                       ema_coefficient: float | None = None):
    """Runs each sample through the all-zero NAMM (scores 0, nothing evicted) capturing every layer; yields
    (sample index, the captures of one invocation: dicts from Engine.namm_captures) in stream order. The EMAs are
    the ones a NAMM with `ema_coefficient` (default the released 0.99) computes."""
    from ..._loader import _core
    from ..checkpoint import NammVector
    from ..convert import write_gguf

    n_layer = int(model.info["n_layer"])
    longest = max(s.n_tokens for s in samples)
    with tempfile.TemporaryDirectory(prefix="namm-zero-") as tmp:
        # Statistics do not enter the EMA, so any valid ones serve while measuring.
        zero = NammVector(np.zeros(4172, np.float32), np.zeros(17, np.float32), np.ones(17, np.float32), "calibration")
        path = write_gguf(zero, os.path.join(tmp, "zero.gguf"), delay=namm_delay,
                          ema_coefficient=ema_coefficient)["output"]
        engine = _core.Engine(model, policy="namm", n_sink=0, window=longest + namm_delay, namm_path=path,
                              namm_mode="quorum", quorum=1.0, n_threads=n_threads)
        for index, sample in enumerate(samples):
            engine.reset()
            engine.capture_namm_layers(list(range(n_layer)))
            tokens = list(sample.prompt) + list(sample.target)
            for begin in range(0, len(tokens), namm_delay):  # one invocation's worth at a time, captures read out
                engine.feed(tokens[begin:begin + namm_delay])
                yield index, engine.namm_captures()
                engine.clear_namm_captures()
            if engine.stats()["tokens_evicted"]:
                raise RuntimeError("the all-zero NAMM evicted tokens; it must keep everything")


def feature_statistics(model, samples: Sequence[Sample], namm_delay: int, n_threads: int = 0,
                       ema_coefficient: float | None = None,
                       ema_bias_correction: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(μ [17], σ² [17]) of the un-normalised spectrogram EMAs the engine computes on `samples` with no eviction
    (bias-corrected, as the NAMM will read them, with `ema_bias_correction`)."""
    from ..gguf_format import RELEASED
    from ..reference import bias_corrected_ema

    coefficient = RELEASED.ema_coefficient if ema_coefficient is None else ema_coefficient
    total = np.zeros(17)
    total_sq = np.zeros(17)
    count = 0
    for _, captures in zero_namm_captures(model, samples, namm_delay, n_threads, ema_coefficient):
        for capture in captures:
            positions = np.asarray(capture["positions"], np.int64)  # [tokens]
            ema = np.asarray(capture["ema"], np.float32).reshape(-1, len(positions), 17)  # [heads, tokens, 17]
            if ema_bias_correction:
                ema = bias_corrected_ema(ema, positions, coefficient)
            ema = ema.astype(np.float64).reshape(-1, 17)  # [heads * tokens, 17]
            total += ema.sum(axis=0)
            total_sq += (ema * ema).sum(axis=0)
            count += ema.shape[0]
    if count == 0:
        raise RuntimeError(f"no NAMM invocation happened: calibration samples need at least {namm_delay} tokens")
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)  # population variance, as the original
    return mean.astype(np.float32), var.astype(np.float32)
