"""Every token's value vectors as llama.cpp computes them, and what evicting a token does to attention outputs.

The NAMM, h2o and tova read attention only. kvpress's expected attention and value-aware rules (VATP, CAOTE) also
read the values: a token whose value sits where the head's output already is can go at little cost however much
attention it draws. This module gives the probes (tools/namm_aggregation_probe.py) those values, captured once
with the full cache through llama.cpp's scheduler eval callback on the nodes llama.cpp names "Vcur-<layer>"
([head_dim, n_kv_head, n_tokens] after the value projection; the name is upstream-fragile and a missing layer is an
error), and the per-query output displacement that evicting each token causes.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

_VALUE_PREFIX = "Vcur-"


class _TensorHead(ctypes.Structure):
    """The leading fields of ggml's struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4)]


def _ggml():
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_get_data.restype, lib.ggml_get_data.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    return lib


class ValueCapture:
    """One model loaded once; values(tokens) decodes a sample in a context of its own, on the CPU."""

    def __init__(self, model_path: str, n_threads: int = 2):
        import llama_cpp

        self.lc, self.ggml, self.n_threads = llama_cpp, _ggml(), n_threads
        self.model = llama_cpp.llama_model_load_from_file(os.fsencode(model_path),
                                                          llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)

    def close(self) -> None:
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "ValueCapture":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def values(self, tokens: list[int]) -> np.ndarray:
        """[layer·KV head, token, head_dim] (layer-major pairs, as attention_received orders them): the value vector
        of every token in every layer, from one full-cache decode of `tokens`."""
        return self.projections(tokens, _VALUE_PREFIX)[-1]

    def projections(self, tokens: list[int], prefix: str) -> list[np.ndarray]:
        """Every 3-D f32 node named `prefix`<layer> ([head_dim, heads, n_tokens], contiguous) from one full-cache
        decode of `tokens`, in the order llama.cpp computed them, each [layer·head, token, head_dim]: for "Qcur-"
        and "Kcur-" the projection before RoPE and then after it, for "Vcur-" the values. RuntimeError when a layer
        lacks one."""
        lc, ggml = self.lc, self.ggml
        found: dict[int, list[np.ndarray]] = {}

        def observe(tensor, ask, _user):
            name = ggml.ggml_get_name(tensor).decode()
            if not name.startswith(prefix) or not name[len(prefix):].isdigit():
                return not ask  # ask: not wanted; otherwise keep computing
            if ask:
                return True
            head = _TensorHead.from_address(tensor)
            dim, n_head, n_tok = head.ne[0], head.ne[1], head.ne[2]
            # the 3-D view [head_dim, heads, n_tokens], contiguous, f32 (the 2-D projection has the same name)
            if head.type == 0 and n_tok == len(tokens) and head.nb[1] == 4 * dim and head.nb[2] == 4 * dim * n_head:
                data = ctypes.cast(ggml.ggml_get_data(tensor), ctypes.POINTER(ctypes.c_float))
                flat = np.ctypeslib.as_array(data, shape=(n_tok * n_head * dim,))
                found.setdefault(int(name[len(prefix):]), []).append(
                    flat.reshape(n_tok, n_head, dim).transpose(1, 0, 2).copy())
            return True

        callback = lc.ggml_backend_sched_eval_callback(observe)  # kept alive until the decode returns
        params = lc.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = len(tokens) + 16
        params.n_threads = params.n_threads_batch = self.n_threads
        params.cb_eval = callback
        ctx = lc.llama_init_from_model(self.model, params)
        batch = lc.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, i == len(tokens) - 1
                batch.seq_id[i][0] = 0
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed while capturing values")
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        counts = {len(v) for v in found.values()}
        if sorted(found) != list(range(self.n_layer)) or len(counts) != 1:
            raise RuntimeError(f"'{prefix}<layer>' nodes of layers {sorted(found)} captured ({counts} per layer), "
                               f"expected 0..{self.n_layer - 1} alike: llama.cpp's node is missing or has another "
                               "layout")
        return [np.concatenate([found[layer][k] for layer in range(self.n_layer)], axis=0)
                for k in range(counts.pop())]


def rope_settings(capture: ValueCapture) -> tuple[float, int]:
    """(frequency base, llama.cpp rope type: 0 = adjacent pairs, 2 = NeoX halves) of the captured model."""
    lc = capture.lc
    arch = ctypes.create_string_buffer(128)
    lc.llama_model_meta_val_str(capture.model, b"general.architecture", arch, 128)
    base = ctypes.create_string_buffer(64)
    if lc.llama_model_meta_val_str(capture.model, arch.value + b".rope.freq_base", base, 64) < 0:
        raise RuntimeError(f"{arch.value.decode()} has no rope.freq_base")
    return float(base.value), int(lc.llama_model_rope_type(capture.model))


def rotate(x: np.ndarray, positions: np.ndarray, base: float, rope_type: int) -> np.ndarray:
    """RoPE of x [..., n, head_dim] at `positions` [n] as llama.cpp applies it (type 0: dimensions 2i, 2i+1 rotate
    together; type 2, NeoX: i and i + head_dim / 2), by angle position · base^(-2i / head_dim)."""
    if rope_type not in (0, 2):
        raise ValueError(f"rope type {rope_type} is not supported here (0 and 2 are)")
    d = x.shape[-1]
    angle = np.asarray(positions, np.float64)[:, None] * base ** (-np.arange(0, d, 2) / d)  # [n, d/2]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    first, second = (slice(0, None, 2), slice(1, None, 2)) if rope_type == 0 else (slice(0, d // 2), slice(d // 2, d))
    out = np.empty_like(x)
    out[..., first] = x[..., first] * cos - x[..., second] * sin
    out[..., second] = x[..., first] * sin + x[..., second] * cos
    return out


def output_displacement(received: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[pairs, query, key]: a_qk · ||v_k − o_q||, o_q = Σ_k a_qk v_k: how far evicting key k alone moves query q's
    attention output (the exact move is this divided by 1 − a_qk). received: [pairs, query, key] attention (rows of
    queries that attend nothing are zero); values: [pairs, key, head_dim]."""
    outputs = np.einsum("pqk,pkd->pqd", received, values)  # [pairs, query, head_dim]
    squared = ((values ** 2).sum(-1)[:, None, :] + (outputs ** 2).sum(-1)[:, :, None]
               - 2 * np.einsum("pqd,pkd->pqk", outputs, values))
    return received * np.sqrt(np.maximum(squared, 0))
