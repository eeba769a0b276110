"""tools/namm_gap_anatomy.py: which kind each scored token is, and the per-kind sums the shares are made of."""
from __future__ import annotations

import numpy as np
from tool_modules import load_tool


def _tool():
    return load_tool("namm_gap_anatomy")


def test_token_kinds_tell_far_and_near_repeats_far_words_and_new_tokens():
    # Scored from index 10 with a horizon of 5: tokens 1 and 2 (10, 11) were last seen 10 back, in no repeated run:
    # far words; (1, 2, 3) and (2, 3, 7) end at 12 and 13 as they did 10 back: far repeats; 5, 6, 9 are new, and again
    # at 17-19 only (5, 6, 9) repeats a run, 3 back: a near repeat (5 and 6 alone were seen 3 back: new).
    tokens = [1, 2, 3, 7, 7, 20, 21, 22, 23, 24, 1, 2, 3, 7, 5, 6, 9, 5, 6, 9]
    kinds = _tool().token_kinds(tokens, 10, horizon=5)
    assert kinds == ["far word", "far word", "far repeat", "far repeat", "new", "new", "new", "new", "new",
                     "near repeat"]
    assert len(kinds) == len(tokens) - 10
    wide = _tool().token_kinds(tokens, 10, horizon=20)  # nothing is far with a longer horizon
    assert "far repeat" not in wide and "far word" not in wide and wide[2] == "near repeat"


def test_kind_sums_add_each_kinds_nll_and_nothing_else():
    sums = _tool().kind_sums(np.array([1.0, 2.0, 4.0, 8.0]), ["new", "far repeat", "new", "far word"])
    assert sums == {"far repeat": 2.0, "near repeat": 0.0, "far word": 8.0, "new": 5.0}
