"""The CLI's cache status lines, from stats alone (no model)."""
from types import SimpleNamespace

from pymemory.commands import format_cache_line, format_layer_lines


def fake_llm(invocations, forced=0):
    stats = SimpleNamespace(cells_used=700, capacity=1024, peak_cells=1024, tokens_seen=5000, tokens_evicted=4300,
                            evictions=9, max_pos=4999)
    return SimpleNamespace(stats=stats, policy="namm",
                           policy_stats={"invocations": invocations, "forced_evictions": forced})


def test_status_line_reports_per_layer_cache_sizes_of_the_last_invocation():
    records = [{"cells_before": 1024, "cells_after": 800, "layer_kept": [900, 850, 800]},
               {"cells_before": 1024, "cells_after": 700, "layer_kept": [640, 700, 610]}]
    line = format_cache_line(fake_llm(records, forced=12), 10, 2.0)
    assert "[cache 700/1024 cells (peak 1024)" in line
    assert "namm: 2 invocations, last 1024->700 cells, per layer kept 610-700 (mean 650)" in line
    assert "forced evictions 12" in line and line.endswith("]")
    assert format_layer_lines(fake_llm(records)) == ["[namm invocation 2: cells kept per layer L0:640 L1:700 L2:610]"]


def test_status_line_without_invocations_has_no_policy_part():
    llm = fake_llm([])
    assert "invocations" not in format_cache_line(llm, 0, 0)
    assert format_layer_lines(llm) == []
