"""Numbers the tests measure, as a report file: docs/results.md quotes fidelity figures (re-indexing noise, scorer
agreement) that only the tests compute. `tools/run_results.sh fidelity` runs those tests with
PYMEMORY_MEASUREMENTS=<path.json>; each test records what it measured (beside asserting on it), and the session
writes the JSON and a markdown table with the command, commit, date and machine. Without the variable, record()
does nothing."""
from __future__ import annotations

import os
import shlex
import sys

_recorded: dict[str, dict] = {}


def record(key: str, value, what: str) -> None:
    """One measured number (or list of numbers) under a stable key, with what it is."""
    if os.environ.get("PYMEMORY_MEASUREMENTS"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        _recorded[key] = {"value": value, "what": what, "test": test}


def write_report() -> None:
    path = os.environ.get("PYMEMORY_MEASUREMENTS")
    if not path or not _recorded:
        return
    from pymemory.evaluation import report

    meta = report.run_metadata()
    meta["command"] = f"PYMEMORY_MEASUREMENTS={path} python -m pytest " + shlex.join(sys.argv[1:])
    report.write_json(path, {**meta, "measurements": dict(sorted(_recorded.items()))})

    def fmt(v):
        if isinstance(v, list):
            return ", ".join(fmt(x) for x in v)
        return f"{v:.5g}" if isinstance(v, float) else str(v)

    rows = [[key, fmt(m["value"]), m["what"], f"`{m['test']}`"] for key, m in sorted(_recorded.items())]
    body = ("Numbers measured by the tests that assert on them (each row: the test that measured it).\n\n"
            + report.markdown_table(["measurement", "value", "what", "test"], rows))
    md = path[:-5] + ".md" if path.endswith(".json") else path + ".md"
    report.write_markdown(md, "Fidelity measurements from the test suite", meta, body)
