#!/usr/bin/env python3
"""Does llama.cpp's output depend on where a cache's tokens sit in its cells? One cache, two physical orders.

    .venv/bin/python tools/kv_layout_check.py --out docs/results/kv_layout_check

Plain llama.cpp through llama-cpp-python (no pymemory code in the path): decode a text's first 100 tokens, remove
positions 4-47 (the holes any eviction leaves; the next tokens fill them, so they sit in cells before older
tokens), save the sequence's state and restore it into a fresh context (llama.cpp writes it back contiguously).
Both contexts now hold the same tokens, positions and K/V bytes; decode the same next 8 tokens in each and compare
the logits. A control decodes twice with the same order (expected identical). Every eviction policy and every
restored session meets this: where the orders disagree, the difference is llama.cpp's arithmetic, which tests that
compare a restored engine (or another harness) with the original must allow for.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))

from pymemory._loader import _core  # noqa: E402
from pymemory.assets import resolve_model  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog while the lighthouse keeper counts the waves. " * 12
PREFIX, HOLE, NEW = 100, (4, 48), 8


class Llama:
    """The few llama.cpp calls this check needs, on one model."""

    def __init__(self, path: str, threads: int):
        import llama_cpp

        self.lib, self.threads = llama_cpp, threads
        # Quiet through pymemory's own log hook (the same libllama): a Python callback handed to llama.cpp here would
        # outlive this object and crash the next caller that logs.
        _core.set_log_verbosity(0)
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"cannot load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.lib.llama_token * (len(raw) + 16))()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, False)
        return list(buf[:n])

    def context(self, flash_attn: int):
        params = self.lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 256
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = flash_attn
        return self.lib.llama_init_from_model(self.model, params)

    def decode(self, ctx, tokens: list[int], positions: list[int]) -> np.ndarray:
        """Logits [len(tokens), n_vocab] of one batch."""
        batch = self.lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, (token, pos) in enumerate(zip(tokens, positions)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            if self.lib.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            return np.array([np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, i), (self.n_vocab,)).copy()
                             for i in range(len(tokens))])
        finally:
            self.lib.llama_batch_free(batch)

    def restored_copy(self, ctx, flash_attn: int):
        """A fresh context holding ctx's sequence 0, written back by llama.cpp's own state restore."""
        size = self.lib.llama_state_seq_get_size(ctx, 0)
        data = (ctypes.c_uint8 * size)()
        self.lib.llama_state_seq_get_data(ctx, data, size, 0)
        copy = self.context(flash_attn)
        if self.lib.llama_state_seq_set_data(copy, data, size, 0) == 0:
            raise SystemExit("llama_state_seq_set_data failed")
        return copy


def next_token_nll(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(targets)), targets]


def compare(llama: Llama, tokens: list[int], flash_attn: int) -> dict:
    new_tokens, new_positions = tokens[PREFIX:PREFIX + NEW], list(range(PREFIX, PREFIX + NEW))
    targets = tokens[PREFIX + 1:PREFIX + NEW + 1]

    def with_hole():
        ctx = llama.context(flash_attn)
        llama.decode(ctx, tokens[:PREFIX], list(range(PREFIX)))
        llama.lib.llama_memory_seq_rm(llama.lib.llama_get_memory(ctx), 0, *HOLE)
        return ctx

    holes, control = with_hole(), with_hole()
    compact = llama.restored_copy(holes, flash_attn)
    logits = {name: llama.decode(ctx, new_tokens, new_positions)
              for name, ctx in (("holes", holes), ("control", control), ("compact", compact))}
    for ctx in (holes, control, compact):
        llama.lib.llama_free(ctx)
    nll = {name: next_token_nll(value, targets) for name, value in logits.items()}
    return {"flash_attn_type": flash_attn,
            "same_order_max_logit_diff": float(np.abs(logits["holes"] - logits["control"]).max()),
            "restored_max_logit_diff": float(np.abs(logits["holes"] - logits["compact"]).max()),
            "restored_nll_diff_per_token": [round(float(d), 6) for d in nll["holes"] - nll["compact"]],
            "restored_max_nll_diff": float(np.abs(nll["holes"] - nll["compact"]).max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    args = p.parse_args()
    llama = Llama(os.fspath(resolve_model(args.model)), args.threads)
    tokens = llama.tokenize(TEXT)
    rows = [compare(llama, tokens, flash) for flash in (0, 1)]  # flash attention off (pymemory's tap), on
    data = {**tool_metadata(sys.argv[0], sys.argv[1:]), "model": args.model, "threads": args.threads, "rows": rows}
    lines = ["# One cache, two physical cell orders: does llama.cpp's output change?", "",
             f"`{data['command']}` — commit {data['commit']}, {data['date']}, {data['machine']}", "",
             f"{args.model}, plain llama.cpp (llama-cpp-python): {PREFIX} tokens decoded, positions {HOLE[0]}–"
             f"{HOLE[1] - 1} removed, the state restored into a fresh context (contiguous cells); then the same "
             f"{NEW} tokens decoded in each. Control: the same steps twice in one order.", "",
             "| flash attention | same order: max logit diff | restored order: max logit diff | "
             "max NLL diff (nats) | NLL diff per token |", "|---|---|---|---|---|"]
    lines += [f"| {'on' if r['flash_attn_type'] else 'off'} | {r['same_order_max_logit_diff']:.3g} | "
              f"{r['restored_max_logit_diff']:.3g} | {r['restored_max_nll_diff']:.4f} | "
              f"{', '.join(f'{d:+.4f}' for d in r['restored_nll_diff_per_token'])} |" for r in rows]
    write_report_files(args.out, data, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
