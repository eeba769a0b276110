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
        lc, ggml = self.lc, self.ggml
        found: dict[int, np.ndarray] = {}

        def observe(tensor, ask, _user):
            name = ggml.ggml_get_name(tensor).decode()
            if not name.startswith(_VALUE_PREFIX) or not name[len(_VALUE_PREFIX):].isdigit():
                return not ask  # ask: not wanted; otherwise keep computing
            if ask:
                return True
            head = _TensorHead.from_address(tensor)
            dim, n_head, n_tok = head.ne[0], head.ne[1], head.ne[2]
            # the 3-D view [head_dim, n_kv_head, n_tokens], contiguous, f32 (the 2-D projection has the same name)
            if head.type == 0 and n_tok == len(tokens) and head.nb[1] == 4 * dim and head.nb[2] == 4 * dim * n_head:
                data = ctypes.cast(ggml.ggml_get_data(tensor), ctypes.POINTER(ctypes.c_float))
                flat = np.ctypeslib.as_array(data, shape=(n_tok * n_head * dim,))
                found[int(name[len(_VALUE_PREFIX):])] = flat.reshape(n_tok, n_head, dim).transpose(1, 0, 2).copy()
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
        if sorted(found) != list(range(self.n_layer)):
            raise RuntimeError(f"values of layers {sorted(found)} captured, expected 0..{self.n_layer - 1}: llama.cpp's "
                               f"'{_VALUE_PREFIX}<layer>' node is missing or has another layout")
        return np.concatenate([found[layer] for layer in range(self.n_layer)], axis=0)


def output_displacement(received: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[pairs, query, key]: a_qk · ||v_k − o_q||, o_q = Σ_k a_qk v_k: how far evicting key k alone moves query q's
    attention output (the exact move is this divided by 1 − a_qk). received: [pairs, query, key] attention (rows of
    queries that attend nothing are zero); values: [pairs, key, head_dim]."""
    outputs = np.einsum("pqk,pkd->pqd", received, values)  # [pairs, query, head_dim]
    squared = ((values ** 2).sum(-1)[:, None, :] + (outputs ** 2).sum(-1)[:, :, None]
               - 2 * np.einsum("pqd,pkd->pqk", outputs, values))
    return received * np.sqrt(np.maximum(squared, 0))
