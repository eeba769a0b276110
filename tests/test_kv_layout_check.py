"""tools/kv_layout_check.py: one llama.cpp cache in two physical cell orders."""
from __future__ import annotations

import math

from tool_modules import load_tool


def test_same_order_is_deterministic_and_the_restore_is_compared_token_by_token(smollm2_path):
    tool = load_tool("kv_layout_check")
    row = tool.compare(smollm2_path, tool.text_tokens(smollm2_path), False)
    # the same steps in the same order give the same logits bit for bit: any restored-order difference is the order's
    assert row["same_order_max_logit_diff"] == 0.0
    diffs = row["restored_nll_diff_per_token"]
    assert len(diffs) == tool.NEW and all(math.isfinite(d) for d in diffs)
    assert math.isclose(row["restored_max_nll_diff"], max(abs(d) for d in diffs), abs_tol=1e-5)
