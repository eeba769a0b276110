"""Merging evicted tokens' values into kept ones, for the probes' llama.cpp harness (tools/namm_oracle_bound.py).

An eviction policy that ranks tokens throws each evicted token away whole. Merging methods (CaM, D2O) keep part of
it: each evicted token's value is averaged into a kept token whose key it resembles, per (layer, KV head), so the
information of many tokens survives in fewer cells. llama.cpp has no API that writes single cache rows; its
sequence state (llama_state_seq_get_data / set_data) carries every cell's keys and values, so the harness reads
that state, edits the values and writes it back before it removes the evicted cells.

The state layout read here (llama.cpp's KV cache serialisation, one stream, text models): u64 (a header kept as
it is) | u32 streams | u32 cells |
per cell: i32 position, u32 sequence count (1), i32 sequence | u32 V transposed, u32 layers | per layer: i32 K type,
u64 K row bytes, the cells' K rows | per layer (V transposed): i32 V type, u32 element bytes, u32 V width, then per
V component the cells' elements. `CacheState.parse` checks every size against the buffer and refuses anything else.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

GGML_TYPE_F16 = 1


@dataclass
class CacheState:
    """One sequence's cells as numpy views into a llama.cpp state buffer (edits write through)."""

    buffer: np.ndarray  # [bytes] uint8
    positions: np.ndarray  # [cells] int32, in cell order
    keys: list[np.ndarray]  # per layer [cells, K width] float16
    values: list[np.ndarray]  # per layer [V width, cells] float16 (transposed, as llama.cpp stores it)

    @classmethod
    def parse(cls, buffer: np.ndarray) -> "CacheState":
        at = 0

        def take(dtype, count: int = 1) -> np.ndarray:
            nonlocal at
            size = np.dtype(dtype).itemsize * count
            if at + size > len(buffer):
                raise ValueError("llama.cpp state shorter than its header says")
            view = buffer[at:at + size].view(dtype)
            at += size
            return view

        take(np.uint64)  # the context's own header, written back unchanged
        streams, cells = int(take(np.uint32)[0]), int(take(np.uint32)[0])
        if streams != 1:
            raise ValueError(f"expected one KV stream, got {streams}")
        meta = take(np.int32, 3 * cells).reshape(cells, 3)
        if not (meta[:, 1] == 1).all():
            raise ValueError("expected one sequence per cell")
        v_trans, layers = int(take(np.uint32)[0]), int(take(np.uint32)[0])
        if v_trans != 1:
            raise ValueError("expected transposed values (flash attention off)")
        keys = []
        for _ in range(layers):
            k_type, row = int(take(np.int32)[0]), int(take(np.uint64)[0])
            if k_type != GGML_TYPE_F16:
                raise ValueError(f"expected f16 keys, got ggml type {k_type}")
            keys.append(take(np.float16, cells * row // 2).reshape(cells, row // 2))
        values = []
        for _ in range(layers):
            v_type, element, width = int(take(np.int32)[0]), int(take(np.uint32)[0]), int(take(np.uint32)[0])
            if v_type != GGML_TYPE_F16 or element != 2:
                raise ValueError(f"expected f16 values, got ggml type {v_type}")
            values.append(take(np.float16, width * cells).reshape(width, cells))
        if at != len(buffer):
            raise ValueError(f"llama.cpp state has {len(buffer) - at} bytes this parser does not know")
        return cls(buffer, meta[:, 0].copy(), keys, values)


def read_state(harness) -> CacheState:
    lc = harness.lc
    size = lc.llama_state_seq_get_size(harness.ctx, 0)
    raw = (ctypes.c_uint8 * size)()
    if lc.llama_state_seq_get_data(harness.ctx, raw, size, 0) != size:
        raise RuntimeError("llama_state_seq_get_data wrote another size than it announced")
    return CacheState.parse(np.frombuffer(raw, np.uint8).copy())


def write_state(harness, state: CacheState) -> None:
    lc = harness.lc
    raw = (ctypes.c_uint8 * len(state.buffer)).from_buffer(state.buffer)
    if lc.llama_state_seq_set_data(harness.ctx, raw, len(state.buffer), 0) != len(state.buffer):
        raise RuntimeError("llama_state_seq_set_data did not read the whole state back")


class ValueMerger:
    """Before each eviction: per (layer, KV head), each evicted token's value joins the running mean of the kept
    token whose key is most similar, when that similarity reaches `threshold`: the cosine of the cached (rotated)
    keys after the mean key of the cached tokens is taken away (raw cosines are 0.8-0.95 for most pairs of tokens,
    one shared direction dominating; centred, the most similar kept key of an evicted token is at 0.5-0.9).
    threshold None: the state is read and written back unchanged (the control: the round trip moves cells)."""

    def __init__(self, head_dim: int, n_sink: int, threshold: float | None):
        self.head_dim, self.n_sink, self.threshold = head_dim, n_sink, threshold
        self.weight: dict[tuple[int, int], np.ndarray] = {}  # (layer, head) -> [positions] tokens each value holds
        self.merged = self.offered = 0

    def __call__(self, harness, evict: np.ndarray) -> None:
        state = read_state(harness)
        if self.threshold is not None:
            self._merge(state, set(int(p) for p in evict))
        write_state(harness, state)

    def _weights(self, layer: int, head: int, size: int) -> np.ndarray:
        """[positions] of one (layer, KV head), at least `size` long (new positions hold one token each)."""
        weight = self.weight.get((layer, head), np.ones(0, np.float32))
        if len(weight) < size:
            weight = self.weight[(layer, head)] = np.concatenate([weight, np.ones(size - len(weight), np.float32)])
        return weight

    def _merge(self, state: CacheState, evict: set[int]) -> None:
        gone = np.array([p in evict for p in state.positions])
        kept = ~gone & (state.positions >= self.n_sink)
        if not gone.any() or not kept.any():
            return
        kept_pos = state.positions[kept]
        for layer, (k_rows, v_cols) in enumerate(zip(state.keys, state.values)):
            heads = k_rows.shape[1] // self.head_dim
            keys = k_rows.astype(np.float32).reshape(-1, heads, self.head_dim)  # [cells, H, D]
            keys -= keys[state.positions >= self.n_sink].mean(axis=0, keepdims=True)
            keys /= np.maximum(np.linalg.norm(keys, axis=2, keepdims=True), 1e-6)
            values = v_cols.T.astype(np.float32).reshape(-1, heads, self.head_dim)  # [cells, H, D]
            for h in range(heads):
                similarity = keys[gone, h] @ keys[kept, h].T  # [evicted, kept]
                target = similarity.argmax(axis=1)  # [evicted]
                close = similarity[np.arange(len(target)), target] >= self.threshold
                self.offered += len(target)
                if not close.any():
                    continue
                weight = self._weights(layer, h, int(kept_pos.max()) + 1)
                kept_values, gone_values = values[kept, h], values[gone, h]  # [kept, D], [evicted, D] copies
                for e, t in zip(np.flatnonzero(close), target[close]):
                    w = weight[kept_pos[t]]
                    kept_values[t] = (kept_values[t] * w + gone_values[e]) / (w + 1)
                    weight[kept_pos[t]] = w + 1
                    self.merged += 1
                values[kept, h] = kept_values
            v_cols[...] = values.reshape(values.shape[0], -1).T.astype(np.float16)
