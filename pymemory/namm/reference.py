"""PyTorch reference of one NAMM "BAM" invocation, written from namm-spec.md to be read top to bottom.

It is the specification that the C++ scorer (cpp/namm/) and the engine's streaming features are tested against.
Everything is float32 on the CPU, as in the original policy, except the EMA sum and the recency angles, which are
accumulated in float64 (the original's recency table is computed in float64 too).

Shapes: H = KV heads of one layer, R = attention rows per invocation (the delay, 512), n_old = retained tokens per
head before the invocation, n = n_old + R tokens after it, F = 17 spectrum bins, T = R / 16 STFT frames.

Selection tie rule (spec §4.1 leaves it open; the C++ scorer implements the same): each head ranks its tokens by
score, descending; among equal scores the newer token ranks first, so it is the one kept.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .checkpoint import NammVector, load_checkpoint, load_gguf
from .gguf_format import RELEASED, NammHparams

if TYPE_CHECKING:
    import torch


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError('the NAMM reference needs torch: pip install "pymemory[namm]"') from exc
    return torch


@dataclass
class NammParams:
    """The learned network and statistics as torch float32 tensors, weights in the trainer's x @ W layout."""

    W_qkv: torch.Tensor  # [25, 96]: Q = columns 0-31, K = 32-63, V = 64-95
    b_qkv: torch.Tensor  # [96]
    W_o: torch.Tensor  # [32, 50]: residual = columns 0-24, gate = 25-49
    b_o: torch.Tensor  # [50]
    w_out: torch.Tensor  # [25]
    b_out: torch.Tensor  # []
    feat_mean: torch.Tensor  # [17]  μ
    feat_var: torch.Tensor  # [17]  σ² (population variance)

    @classmethod
    def from_vector(cls, vector: NammVector) -> "NammParams":
        """Slices the trainer's flat θ (spec §5.4) into tensors."""
        torch = _torch()
        tensors = {name: torch.from_numpy(array) for name, array in vector.tensors().items()}
        return cls(**tensors, feat_mean=torch.from_numpy(vector.feat_mean.astype(np.float32)),
                   feat_var=torch.from_numpy(vector.feat_var.astype(np.float32)))


@dataclass
class ReferenceState:
    """One layer's NAMM state: per KV head, its retained tokens in chronological order. Starts empty."""

    positions: np.ndarray  # int64 [H, n] absolute positions
    ema: np.ndarray  # float32 [H, n, 17] un-normalised spectrogram EMA
    history: np.ndarray  # float32 [H, n, 16] last 16 attention values each token received

    @property
    def n_heads(self) -> int:
        return self.positions.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.positions.shape[1]


class NammFeatures(NamedTuple):
    """Everything one invocation computes before scoring, for the n = n_old + R tokens after appending the new
    ones (state not changed)."""

    X: torch.Tensor  # float32 [H, n, 25] = [recency 8 ‖ normalised spectrum 17]
    ema: np.ndarray  # float32 [H, n, 17] new un-normalised EMA
    history: np.ndarray  # float32 [H, n, 16] new attention history
    positions: np.ndarray  # int64 [H, n]


class NammReference:
    """NAMM BAM (spec §2-§4) with the one-invocation API of the C++ ``pymemory.namm.NammModel``::

        model = NammReference.from_checkpoint("ckpt.pt", trust_pickle=True)   # or .from_gguf("namm.gguf")
        state = model.new_state(n_kv_heads)                   # one per layer
        keep, scores = model.step(state, attn, new_pos)       # every `delay` tokens
    """

    def __init__(self, params: NammParams, hparams: NammHparams = RELEASED) -> None:
        torch = _torch()
        self.params = params
        self.hparams = hparams.check_supported()
        self.window = torch.hann_window(hparams.n_fft, periodic=True, dtype=torch.float32)  # [32]
        half = hparams.recency_dim // 2
        self.omega = hparams.recency_max_freq ** (-torch.arange(half, dtype=torch.float64) / half)  # [4]
        # (E − μ) / max(√σ², eps) (spec §2.4)
        self.feat_std = torch.clamp(params.feat_var.sqrt(), min=hparams.norm_eps)  # [17]

    @classmethod
    def from_vector(cls, vector: NammVector, hparams: NammHparams = RELEASED) -> "NammReference":
        return cls(NammParams.from_vector(vector), hparams)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, trust_pickle: bool = False) -> "NammReference":
        """From the trainer's ckpt.pt (a pickle: see ``load_checkpoint`` for ``trust_pickle``)."""
        return cls.from_vector(load_checkpoint(path, trust_pickle=trust_pickle))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "NammReference":
        """From a NAMM GGUF (docs/namm-gguf.md), dequantising f16/q8_0/q4_0 weights; hyper-parameters from its
        metadata."""
        vector, hparams = load_gguf(path)
        return cls.from_vector(vector, hparams)

    def new_state(self, n_kv_heads: int) -> ReferenceState:
        if not isinstance(n_kv_heads, (int, np.integer)) or n_kv_heads < 1:
            raise ValueError(f"n_kv_heads must be a positive integer (got {n_kv_heads!r})")
        hp = self.hparams
        return ReferenceState(np.zeros((n_kv_heads, 0), np.int64), np.zeros((n_kv_heads, 0, hp.n_bins), np.float32),
                              np.zeros((n_kv_heads, 0, hp.history), np.float32))

    # ---- input checks ------------------------------------------------------------------------------------------

    def _checked_inputs(self, state: ReferenceState, attn, new_pos) -> tuple[np.ndarray, np.ndarray]:
        torch = _torch()
        if isinstance(attn, torch.Tensor):
            if attn.dtype != torch.float32:
                raise TypeError(f"attn must be float32 (got torch {attn.dtype}); convert with .float()")
            attn = attn.detach().cpu().numpy()
        elif not isinstance(attn, np.ndarray) or attn.dtype != np.float32:
            got = attn.dtype if isinstance(attn, np.ndarray) else type(attn).__name__
            raise TypeError(f"attn must be a float32 numpy array or torch tensor (got {got}); convert with "
                            ".astype(np.float32)")
        rows = self.hparams.delay
        if attn.ndim != 3 or attn.shape[0] != state.n_heads:
            raise ValueError(f"attn must be [n_kv_heads={state.n_heads}, {rows}, n_old + {rows}], "
                             f"got {list(attn.shape)}")
        if attn.shape[1] != rows:
            raise ValueError(f"attn has {attn.shape[1]} rows; an invocation receives the {rows} queries since the "
                             f"previous one (delay {rows})")
        if attn.shape[2] != state.n_tokens + rows:
            raise ValueError(f"attn has {attn.shape[2]} columns; expected n_old + {rows} = {state.n_tokens + rows} "
                             f"(this state retains {state.n_tokens} tokens per head)")
        if not np.all(np.isfinite(attn)):
            raise ValueError("attn contains NaN or infinite values; pass post-softmax attention probabilities")
        if np.any(attn < 0):
            raise ValueError("attn contains negative values; pass post-softmax attention probabilities")
        if np.any(np.triu(attn[:, :, state.n_tokens:], k=1)):  # [H, R, R] new block above the diagonal
            raise ValueError("attn is not causal: new query t has weight on new key t' > t, which did not exist yet")
        new_pos = np.asarray(new_pos)
        if not np.issubdtype(new_pos.dtype, np.integer) or new_pos.shape != (rows,):
            raise ValueError(f"new_pos must be {rows} integer absolute positions (got {new_pos.dtype} "
                             f"{list(new_pos.shape)})")
        new_pos = new_pos.astype(np.int64)
        newest_retained = int(state.positions[:, -1].max()) if state.n_tokens else -1
        if new_pos[0] <= newest_retained or np.any(np.diff(new_pos) <= 0):
            raise ValueError(f"new_pos must increase strictly and start after the newest retained position "
                             f"{newest_retained} (got {new_pos[0]}..{new_pos[-1]})")
        return attn, new_pos

    # ---- features (spec §2) ------------------------------------------------------------------------------------

    def spectrogram_ema(self, state: ReferenceState, attn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window form of §2.1-2.3 for all n tokens: (new EMA [H, n, 17], new history [H, n, 16]).

        attn float32 [H, R, n]. E = a^T·E_old + Σ_j m[j,k]·(1 − a)·a^(T−1−j)·S[j], with m the new-token frame mask.
        """
        torch = _torch()
        hp = self.hparams
        H, R, n = attn.shape
        n_old = state.n_tokens
        prev = torch.zeros(H, n, hp.history)  # [H, n, 16], zeros for new tokens
        prev[:, :n_old] = torch.from_numpy(state.history)
        series = torch.cat([prev, torch.from_numpy(attn).permute(0, 2, 1)], dim=2)  # [H, n, 16 + R]
        spec = torch.stft(series.reshape(H * n, -1), n_fft=hp.n_fft, hop_length=hp.hop, window=self.window,
                          center=False, onesided=True, return_complex=True).abs()  # [H·n, 17, T]
        spec = spec.reshape(H, n, hp.n_bins, -1).to(torch.float64)  # [H, n, 17, T]
        T = spec.shape[-1]
        a = hp.ema_per_frame
        frame = torch.arange(T)  # [T]
        weight = (1 - a) * a ** (T - 1 - frame).to(torch.float64)  # [T]
        # A new token with window index t skips frames that ended before it existed: frame j counts if t//16 <= j.
        mask = torch.ones(n, T, dtype=torch.float64)  # [n, T]
        mask[n_old:] = ((torch.arange(R)[:, None] // hp.hop) <= frame[None, :]).to(torch.float64)
        ema_old = torch.zeros(H, n, hp.n_bins, dtype=torch.float64)  # [H, n, 17], zeros for new tokens
        ema_old[:, :n_old] = torch.from_numpy(state.ema).to(torch.float64)
        ema = a ** T * ema_old + torch.einsum("hnft,nt,t->hnf", spec, mask, weight)  # [H, n, 17]
        history = series[:, :, -hp.history:]  # [H, n, 16]
        return ema.to(torch.float32).numpy(), history.contiguous().numpy()

    def recency(self, positions: np.ndarray) -> torch.Tensor:
        """positions int [H, n] -> float32 [H, n, 8] = [sin(age·ω) ‖ cos(age·ω)], age = newest − pos + start."""
        torch = _torch()
        pos = torch.from_numpy(np.asarray(positions, np.int64)).to(torch.float64)  # [H, n]
        age = pos[:, -1:] - pos + self.hparams.recency_start  # [H, n], the newest token has age 0
        angles = age[..., None] * self.omega  # [H, n, 4]
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(torch.float32)

    def normalise(self, ema) -> torch.Tensor:
        """ema [H, n, 17] -> float32 (E − μ) / max(√σ², eps) [H, n, 17] (spec §2.4)."""
        torch = _torch()
        return (torch.as_tensor(ema, dtype=torch.float32) - self.params.feat_mean) / self.feat_std

    def features_from_ema(self, positions: np.ndarray, ema) -> torch.Tensor:
        """X = [recency (8) ‖ normalised spectrum (17)] -> float32 [H, n, 25] (spec §2.6); the spectrum is the EMA
        divided by its weight when the NAMM's ema_bias_correction is set (bias_corrected_ema)."""
        torch = _torch()
        if self.hparams.ema_bias_correction:
            ema = bias_corrected_ema(np.asarray(ema, np.float32), positions, self.hparams.ema_coefficient)
        return torch.cat([self.recency(positions), self.normalise(ema)], dim=-1)

    def features(self, state: ReferenceState, attn, new_pos) -> NammFeatures:
        """Features of the n_old + R tokens after appending the new ones; ``state`` is not changed."""
        attn, new_pos = self._checked_inputs(state, attn, new_pos)
        positions = np.concatenate([state.positions, np.broadcast_to(new_pos, (state.n_heads, new_pos.size))], 1)
        ema, history = self.spectrogram_ema(state, attn)
        return NammFeatures(self.features_from_ema(positions, ema), ema, history, positions)

    # ---- BAM (spec §3) and selection (§4.1) ------------------------------------------------------------------

    def scores_from_features(self, X) -> np.ndarray:
        """X [H, n, 25] (numpy or torch) -> float32 scores [H, n]."""
        return self.scores_tensor(X).detach().numpy()

    def scores_tensor(self, X) -> torch.Tensor:
        """X [H, n, 25] -> scores [H, n] as a torch tensor, differentiable in the parameters when they require
        gradients (the imitation warm start fits them by gradient descent, pymemory/namm/training/warm_start.py)."""
        torch = _torch()
        p = self.params
        X = torch.as_tensor(X, dtype=torch.float32)
        if X.ndim != 3 or X.shape[-1] != self.hparams.n_features:
            raise ValueError(f"X must be [H, n, {self.hparams.n_features}] (got {list(X.shape)})")
        d = self.hparams.hidden_dim
        qkv = X @ p.W_qkv + p.b_qkv  # [H, n, 96]
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]  # [H, n, 32] each
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # [H, n, n]: query i, key j
        n = X.shape[1]
        older = torch.ones(n, n, dtype=torch.bool).tril(-1)  # [n, n] j < i: masked, token i sees j >= i
        o = torch.softmax(logits.masked_fill(older, float("-inf")), dim=-1) @ v  # [H, n, 32]
        y = o @ p.W_o + p.b_o  # [H, n, 50]
        f = self.hparams.n_features
        residual, gate = y[..., :f], y[..., f:]  # [H, n, 25] each
        hidden = X * (1 + gate) + residual  # [H, n, 25]
        return hidden @ p.w_out + p.b_out  # [H, n]

    def select(self, scores: np.ndarray) -> np.ndarray:
        """scores [H, n] -> keep int64 [H, K], chronological column indices per head.

        The newest token is forced kept; K = n − min_h #(score < threshold); each head keeps its own top-K; equal
        scores: the newer token ranks first."""
        scores = np.asarray(scores, dtype=np.float64)  # [H, n]
        H, n = scores.shape
        ranked = scores.copy()
        ranked[:, -1] = np.inf
        n_negative = (ranked < self.hparams.threshold).sum(axis=1)  # [H]
        K = n - int(n_negative.min())
        newest_first = -np.arange(n)  # [n] secondary key: later tokens sort first among ties
        keep = np.empty((H, K), np.int64)
        for h in range(H):
            order = np.lexsort((newest_first, -ranked[h]))  # score descending, then newer first
            keep[h] = np.sort(order[:K])
        return keep

    # ---- one invocation ----------------------------------------------------------------------------------------

    def step(self, state: ReferenceState, attn, new_pos) -> tuple[np.ndarray, np.ndarray]:
        """One invocation for one layer.

        attn float32 [H, R, n_old + R] (numpy or torch): GQA-averaged causal attention of the R queries since the
        previous invocation over each head's n_old retained tokens (chronological) then the R new ones, zeros for
        keys that did not exist yet. new_pos int [R] absolute positions.
        Returns keep int64 [H, K] (chronological column indices per head) and scores float32 [H, n_old + R]
        (as computed: the newest token's forced keep is not written into them). ``state`` then holds each head's
        retained tokens (positions, EMA and history gathered by ``keep``).
        """
        features = self.features(state, attn, new_pos)
        scores = self.scores_from_features(features.X)
        keep = self.select(scores)
        state.positions = np.take_along_axis(features.positions, keep, axis=1)
        state.ema = np.take_along_axis(features.ema, keep[..., None], axis=1)
        state.history = np.take_along_axis(features.history, keep[..., None], axis=1)
        return keep, scores


def bias_corrected_ema(ema: np.ndarray, positions: np.ndarray, ema_coefficient: float) -> np.ndarray:
    """ema [..., n, 17] / (1 − c^max(q, hop)) with q = newest position − the token's + 1 the queries that have seen
    it (positions [..., n], chronological): the weight its attention carries in the moving average, at least one
    frame's. A pymemory extension (gguf_format.NammHparams.ema_bias_correction); the engine's spectrum_input."""
    positions = np.asarray(positions, np.float64)
    queries = np.maximum(positions[..., -1:] - positions + 1.0, RELEASED.hop)  # [..., n]
    weight = 1.0 - np.power(float(ema_coefficient), queries)
    return (np.asarray(ema, np.float64) / weight[..., None]).astype(np.float32)


def ema_streaming_update(ema: np.ndarray, hist16: np.ndarray, rows16: np.ndarray,
                         ema_coefficient: float = RELEASED.ema_coefficient) -> tuple[np.ndarray, np.ndarray]:
    """The streaming form of §2.3, one STFT frame: E ← a·E + (1 − a)·|rfft(hann ⊙ [hist16 ‖ rows16])|, a = 0.99^16,
    and hist16 ← rows16. This is what the engine computes every 16 tokens; 32 updates equal one invocation's
    window formula.

    ema [..., 17], hist16 [..., 16], rows16 [..., 16] (the 16 newest attention values each token received);
    returns (ema [..., 17], hist16 [..., 16]) in float64 or float32, the inputs' precision.
    """
    n_fft = RELEASED.n_fft
    a = ema_coefficient ** RELEASED.hop
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # [32] periodic
    segment = np.concatenate([hist16, rows16], axis=-1) * hann  # [..., 32]
    spectrum = np.abs(np.fft.rfft(segment, axis=-1))  # [..., 17]
    dtype = np.result_type(ema, hist16, rows16, np.float32)
    return (a * ema + (1 - a) * spectrum).astype(dtype), np.array(rows16, dtype=dtype)
