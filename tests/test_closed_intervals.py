"""tools/namm_closed_intervals.py: the share of sink's text gap a policy closes, with its bootstrap interval."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import load_tool

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    return load_tool("namm_closed_intervals")


def _entry(text: list[float], answer: float = 1.0) -> dict:
    per = {f"h{i}:text:book@{i}": v for i, v in enumerate(text)}
    per["r0:passkey:1@2:book@3"] = answer  # retrieval samples do not enter the text share
    return {"nll_per_sample": per}


def test_closed_share_and_interval_from_per_sample_nlls():
    tool = _tool()
    full = _entry([3.0, 3.2, 2.8, 3.1])
    sink = _entry([3.4, 3.6, 3.2, 3.5], answer=9.0)  # a gap of exactly 0.4 on every text
    half = _entry([3.2, 3.4, 3.0, 3.3], answer=0.0)  # closes exactly half of it on every text
    noisy = _entry([3.0, 3.6, 3.2, 3.5])  # closes all of one text's gap, none of the others'
    report = {"tables": {"t": {"full cache": full, "sink": sink, "half": half, "noisy": noisy, "full": full}}}
    rows = tool.intervals(report)["t"]
    assert rows["half"]["closed"] == pytest.approx(0.5)
    assert rows["half"]["low"] == pytest.approx(0.5) and rows["half"]["high"] == pytest.approx(0.5)
    assert rows["full"]["closed"] == pytest.approx(1.0) and rows["full"]["p_half"] == 1.0
    assert rows["noisy"]["closed"] == pytest.approx(0.25) and rows["noisy"]["n_text"] == 4
    # Resampling the texts moves the share between 0 (the one text not drawn) and 1 (only that text drawn).
    assert rows["noisy"]["low"] == pytest.approx(0.0) and 0.5 <= rows["noisy"]["high"] <= 1.0
    assert 0.0 < rows["noisy"]["p_half"] < 0.5
    assert "sink" not in rows and "full cache" not in rows


@pytest.mark.parametrize("extra, message", [
    ([], "add --no-reproduce --quants ''"),  # held-out score and weight types belong to the run's length
    (["--no-reproduce", "--quants", "", "--sample-tokens", "200"], "--sample-tokens must be at least 256"),
])
def test_eval_sample_tokens_errors_before_any_work(tmp_path, extra, message):
    from pymemory.namm.training.config import TrainConfig

    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(sample_tokens=512, scored_tokens=256).to_dict()))
    args = ["--sample-tokens", "1024"] + extra
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_trained_namm.py"), "--run", str(tmp_path),
                           "--out", str(tmp_path / "report")] + args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not list(tmp_path.glob("report*"))
