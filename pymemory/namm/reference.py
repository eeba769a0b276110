"""PyTorch reference of one NAMM invocation, written from namm-spec.md to be read top to bottom.

It is the specification the C++ scorer (cpp/namm/) and the engine's streaming features are tested against.
Everything is float32 on the CPU except the recency table, which the original computes in float64.
Shapes: H = KV heads of one layer, n = n_old + R tokens (R = 512 new rows per invocation), F = 17 bins.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from . import gguf_format as fmt
from .checkpoint import NammParams, load_checkpoint


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise ImportError('the NAMM reference needs torch: pip install "pymemory[namm]"') from exc
    return torch


@dataclass
class ReferenceState:
    """One layer's state: per head, the retained tokens in chronological order."""

    positions: np.ndarray  # int64 [H, n]
    ema: np.ndarray  # float32 [H, n, 17]  un-normalised spectrogram EMA
    history: np.ndarray  # float32 [H, n, 16] last 16 attention values received

    @property
    def n_heads(self) -> int:
        return self.positions.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.positions.shape[1]


class NammReference:
    """NAMM BAM (spec §2-§4) with the same one-invocation API as the C++ ``pymemory.namm.NammModel``."""

    def __init__(self, params: NammParams, delay: int = 512, ema_coefficient: float = 0.99,
                 recency_max_freq: float = 50000.0, threshold: float = 0.0, eps: float = 1e-7) -> None:
        torch = _torch()
        t = params.tensors()
        self.W_qkv = torch.from_numpy(t["W_qkv"])  # [25, 96]
        self.b_qkv = torch.from_numpy(t["b_qkv"])  # [96]
        self.W_o = torch.from_numpy(t["W_o"])  # [32, 50]
        self.b_o = torch.from_numpy(t["b_o"])  # [50]
        self.w_out = torch.from_numpy(t["w_out"])  # [25]
        self.b_out = torch.from_numpy(t["b_out"])  # [1]
        self.feat_mean = torch.from_numpy(params.feat_mean)  # [17]
        self.feat_std = torch.clamp(torch.from_numpy(params.feat_var).sqrt(), min=eps)  # [17]
        self.delay = delay
        self.a = ema_coefficient ** fmt.HOP  # per frame (spec §2.3)
        self.threshold = threshold
        self.window = torch.hann_window(fmt.N_FFT, periodic=True, dtype=torch.float32)  # [32]
        self.omega = [recency_max_freq ** (-i / (fmt.RECENCY_DIM // 2)) for i in range(fmt.RECENCY_DIM // 2)]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, trust_pickle: bool = False) -> "NammReference":
        return cls(load_checkpoint(path, trust_pickle=trust_pickle))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "NammReference":
        """Reads our NAMM GGUF back (dequantising f16/q8_0/q4_0) into the trainer's layout."""
        import gguf

        reader = gguf.GGUFReader(os.fspath(path))
        arrays = {}
        for tensor in reader.tensors:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            arrays[tensor.name] = np.array(data, dtype=np.float32).reshape(fmt.TENSORS[tensor.name][0])  # a copy
        theta = np.concatenate([
            arrays["namm.attn_qkv.weight"][:, : fmt.N_FEATURES].T.reshape(-1),  # undo padding + transpose
            arrays["namm.attn_qkv.bias"],
            arrays["namm.attn_out.weight"].T.reshape(-1),
            arrays["namm.attn_out.bias"],
            arrays["namm.out.weight"],
            arrays["namm.out.bias"],
        ])
        field = reader.fields["namm.delay"]
        delay = int(field.parts[field.data[0]][0])
        return cls(NammParams(theta, arrays["namm.feat_mean"], arrays["namm.feat_var"], os.fspath(path)), delay)

    # ---- state -------------------------------------------------------------------------------------------------

    def new_state(self, n_kv_heads: int) -> ReferenceState:
        if n_kv_heads < 1:
            raise ValueError("n_kv_heads must be >= 1")
        return ReferenceState(np.zeros((n_kv_heads, 0), np.int64), np.zeros((n_kv_heads, 0, fmt.N_BINS), np.float32),
                              np.zeros((n_kv_heads, 0, fmt.HOP), np.float32))

    # ---- features (spec §2) ------------------------------------------------------------------------------------

    def spectrogram_ema(self, state: ReferenceState, attn) -> tuple:
        """Window form of §2.1-2.3: returns (new EMA [H, n, 17], new history [H, n, 16]) for all n tokens."""
        torch = _torch()
        H, R, n = attn.shape
        n_old = state.n_tokens
        prev16 = torch.zeros(H, n, fmt.HOP)
        prev16[:, :n_old] = torch.from_numpy(state.history)
        series = torch.cat([prev16, attn.permute(0, 2, 1)], dim=2)  # [H, n, 16 + R]
        spec = torch.stft(series.reshape(H * n, -1), n_fft=fmt.N_FFT, hop_length=fmt.HOP, window=self.window,
                          center=False, onesided=True, return_complex=True).abs()  # [H*n, 17, T]
        spec = spec.reshape(H, n, fmt.N_BINS, -1)
        T = spec.shape[-1]  # R / 16 frames
        j = torch.arange(T)
        weights = (1 - self.a) * self.a ** (T - 1 - j).to(torch.float64)  # [T]
        # New tokens skip frames that ended before they existed: window index t, frame j counts if t//16 <= j.
        mask = torch.ones(n, T, dtype=torch.float64)
        t_new = torch.arange(R)
        mask[n_old:] = ((t_new[:, None] // fmt.HOP) <= j[None, :]).to(torch.float64)
        ema_old = torch.zeros(H, n, fmt.N_BINS, dtype=torch.float64)
        ema_old[:, :n_old] = torch.from_numpy(state.ema).to(torch.float64)
        ema = self.a ** T * ema_old + torch.einsum("hnft,nt,t->hnf", spec.to(torch.float64), mask, weights)
        return ema.to(torch.float32), series[:, :, -fmt.HOP:].contiguous()

    def recency(self, positions: np.ndarray) -> "object":
        """[H, n, 8] sin || cos of (newest position - position) * ω_i, computed in float64 (spec §2.5)."""
        torch = _torch()
        pos = torch.from_numpy(np.asarray(positions, np.int64)).to(torch.float64)
        age = pos[:, -1:] - pos  # newest token: age 0
        angles = age[..., None] * torch.tensor(self.omega, dtype=torch.float64)  # [H, n, 4]
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(torch.float32)

    def features_from_ema(self, positions: np.ndarray, ema) -> "object":
        """X = [recency (8) || (E - μ) / max(σ, eps) (17)] -> [H, n, 25] (spec §2.4-2.6)."""
        torch = _torch()
        ema = torch.as_tensor(ema, dtype=torch.float32)
        return torch.cat([self.recency(positions), (ema - self.feat_mean) / self.feat_std], dim=-1)

    # ---- BAM (spec §3) and selection (§4.1) ------------------------------------------------------------------

    def scores_from_features(self, X) -> np.ndarray:
        """[H, n, 25] -> [H, n] scores."""
        torch = _torch()
        X = torch.as_tensor(X, dtype=torch.float32)
        qkv = X @ self.W_qkv + self.b_qkv  # [H, n, 96]
        q, k, v = qkv[..., :32], qkv[..., 32:64], qkv[..., 64:96]  # [H, n, 32] each
        s = q @ k.transpose(-1, -2) / math.sqrt(32.0)  # [H, n, n]: query i, key j
        n = X.shape[1]
        backward = torch.ones(n, n, dtype=torch.bool).tril(-1)  # j < i: masked (token i sees j >= i)
        s = s.masked_fill(backward, float("-inf"))
        o = torch.softmax(s, dim=-1) @ v  # [H, n, 32]
        y = o @ self.W_o + self.b_o  # [H, n, 50]
        residual, gate = y[..., :25], y[..., 25:]
        hidden = X * (1 + gate) + residual  # [H, n, 25]
        return (hidden @ self.w_out + self.b_out).numpy()  # [H, n]

    def select(self, scores: np.ndarray) -> np.ndarray:
        """keep [H, K] chronological indices: newest forced kept, K = n - min_h #negatives, each head its top-K
        (ties: the newer token wins)."""
        H, n = scores.shape
        forced = scores.astype(np.float64).copy()
        forced[:, -1] = np.inf
        negatives = (forced[:, :-1] < self.threshold).sum(axis=1)
        K = n - int(negatives.min())
        index = np.arange(n)
        keep = np.empty((H, K), np.int64)
        for h in range(H):
            order = np.lexsort((-index, -forced[h]))  # score descending, then newer first
            keep[h] = np.sort(order[:K])
        return keep

    # ---- one invocation ----------------------------------------------------------------------------------------

    def _check(self, state: ReferenceState, attn, new_pos) -> tuple:
        torch = _torch()
        attn = torch.as_tensor(np.asarray(attn, dtype=np.float32))
        new_pos = np.asarray(new_pos, dtype=np.int64).reshape(-1)
        if attn.ndim != 3 or attn.shape[0] != state.n_heads:
            raise ValueError(f"attn must be [n_kv_heads={state.n_heads}, rows, columns], got {tuple(attn.shape)}")
        H, R, n = attn.shape
        if R % fmt.HOP or R == 0:
            raise ValueError(f"an invocation needs a positive multiple of 16 rows (got {R})")
        if n != state.n_tokens + R:
            raise ValueError(f"attn has {n} columns; expected n_old + rows = {state.n_tokens + R}")
        if new_pos.shape != (R,):
            raise ValueError("new_pos must hold one position per row")
        last = state.positions[0, -1] if state.n_tokens else -1
        if np.any(np.diff(np.concatenate([[last], new_pos])) <= 0):
            raise ValueError("new positions must increase and follow the retained ones")
        if not torch.isfinite(attn).all():
            raise ValueError("attention contains NaN or infinity")
        return attn, new_pos

    def features(self, state: ReferenceState, attn, new_pos) -> tuple:
        """(X [H, n, 25], new EMA [H, n, 17], new history [H, n, 16], positions [H, n]) for the tokens after
        appending the new ones; does not change `state`."""
        attn, new_pos = self._check(state, attn, new_pos)
        positions = np.concatenate([state.positions, np.broadcast_to(new_pos, (state.n_heads, len(new_pos)))], 1)
        ema, history = self.spectrogram_ema(state, attn)
        return self.features_from_ema(positions, ema), ema.numpy(), history.numpy(), positions

    def step(self, state: ReferenceState, attn, new_pos) -> tuple[np.ndarray, np.ndarray]:
        """One invocation: returns (keep [H, K] int64, scores [H, n] float32) and keeps each head's retained tokens
        in `state`."""
        X, ema, history, positions = self.features(state, attn, new_pos)
        scores = self.scores_from_features(X)
        keep = self.select(scores)
        take = np.take_along_axis
        state.positions = take(positions, keep, 1)
        state.ema = take(ema, keep[..., None], 1)
        state.history = take(history, keep[..., None], 1)
        return keep, scores.astype(np.float32)


def ema_streaming_update(ema: np.ndarray, history: np.ndarray, rows: np.ndarray, ema_coefficient: float = 0.99):
    """The streaming form of §2.3 for one frame: E <- a E + (1 - a) |rfft(hann * [history || rows])|, history <- rows.
    ema [..., 17], history [..., 16], rows [..., 16]; returns the new (ema, history)."""
    a = ema_coefficient ** fmt.HOP
    n = np.arange(fmt.N_FFT)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / fmt.N_FFT)
    segment = np.concatenate([history, rows], axis=-1) * hann
    spectrum = np.abs(np.fft.rfft(segment, axis=-1))
    return (a * ema + (1 - a) * spectrum).astype(np.float32), np.array(rows, np.float32)
