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
sys.path.insert(0, os.fspath(ROOT / "tools"))

from namm_oracle_bound import LlamaHarness  # noqa: E402
from pymemory.assets import resolve_model  # noqa: E402
from pymemory.evaluation.report import tool_metadata, write_report_files  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog while the lighthouse keeper counts the waves. " * 12
PREFIX, HOLE, NEW = 100, (4, 48), 8
N_CTX = 256


def text_tokens(model_path: str) -> list[int]:
    return LlamaHarness(model_path, N_CTX, 1).llm.tokenize(TEXT.encode(), add_bos=True, special=False)


def restore_into(source: LlamaHarness, target: LlamaHarness) -> None:
    """target's (empty) context takes source's sequence 0 through llama.cpp's own state save and restore."""
    lc = source.lc
    size = lc.llama_state_seq_get_size(source.ctx, 0)
    data = (ctypes.c_uint8 * size)()
    lc.llama_state_seq_get_data(source.ctx, data, size, 0)
    if lc.llama_state_seq_set_data(target.ctx, data, size, 0) == 0:
        raise SystemExit("llama_state_seq_set_data failed")


def decode_new(harness: LlamaHarness, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(logits [NEW, n_vocab], NLL of each next token [NEW]) of the NEW tokens after the prefix, as one batch."""
    logprobs = harness.decode(tokens[PREFIX:PREFIX + NEW], PREFIX, list(range(NEW)))
    logits = np.array([np.ctypeslib.as_array(harness.lc.llama_get_logits_ith(harness.ctx, i), (harness.n_vocab,))
                       for i in range(NEW)])
    return logits, np.array([-logprobs[i][tokens[PREFIX + i + 1]] for i in range(NEW)])


def compare(model_path: str, tokens: list[int], flash_attn: bool, threads: int = 1) -> dict:
    def harness() -> LlamaHarness:
        return LlamaHarness(model_path, N_CTX, threads, flash_attn)

    def with_hole() -> LlamaHarness:
        h = harness()
        h.decode(tokens[:PREFIX], 0, [])
        h.lc.llama_memory_seq_rm(h.memory, 0, *HOLE)
        return h

    holes, control, compact = with_hole(), with_hole(), harness()
    restore_into(holes, compact)
    (holes_logits, holes_nll), (control_logits, _), (compact_logits, compact_nll) = (
        decode_new(h, tokens) for h in (holes, control, compact))
    return {"flash_attn_type": int(flash_attn),
            "same_order_max_logit_diff": float(np.abs(holes_logits - control_logits).max()),
            "restored_max_logit_diff": float(np.abs(holes_logits - compact_logits).max()),
            "restored_nll_diff_per_token": [round(float(d), 6) for d in holes_nll - compact_nll],
            "restored_max_nll_diff": float(np.abs(holes_nll - compact_nll).max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="report path without extension (.json and .md written)")
    args = p.parse_args()
    model_path = os.fspath(resolve_model(args.model))
    tokens = text_tokens(model_path)
    rows = [compare(model_path, tokens, flash, args.threads) for flash in (False, True)]  # off: pymemory's tap
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
