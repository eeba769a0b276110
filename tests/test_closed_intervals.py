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


def test_versus_gives_paired_differences_to_another_policy(tmp_path):
    tool = _tool()
    full = _entry([3.0, 3.2, 2.8, 3.1])
    sink = _entry([3.4, 3.6, 3.2, 3.5], answer=9.0)
    every32 = _entry([3.2, 3.4, 3.0, 3.3], answer=2.0)
    every16 = _entry([3.1, 3.3, 2.9, 3.2], answer=2.5)  # 0.1 nats better on every text, 0.5 worse on the answer
    report = {"sample_tokens": 1024, "tables": {"25%": {"full cache": full, "sink": sink, "every 32": every32,
                                                        "every 16": every16}}}
    rows = tool.versus(report, "every 32")["25%"]
    assert set(rows) == {"sink", "every 16"}
    assert rows["every 16"]["text"] == pytest.approx((-0.1, -0.1, -0.1))
    assert "answer" not in rows["every 16"]  # one retrieval sample: no interval
    assert rows["sink"]["text"][0] == pytest.approx(0.2)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "namm_closed_intervals.py"), "--out",
                           str(tmp_path / "out"), str(path), "--versus", "every 32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out.md").read_text()
    assert "Against `every 32`" in md and "| every 16 | -0.1000 [-0.1000, -0.1000] | - |" in md


def test_overlapping_samples_are_one_cluster():
    tool = load_tool("eval_trained_namm")
    ids = ["h0:text:a/book@0", "h1:text:a/book@100", "h2:text:a/book@600", "h3:text:a/book@1200",
           "h4:text:b/other@50", "r0:passkey:1@2"]
    # @600 overlaps @100's range [100, 612): a chain is one cluster; @1200 starts after it; other texts never join
    assert list(tool.overlap_clusters(ids, 512)) == [0, 0, 0, 1, 2, 3]
    assert len(set(tool.overlap_clusters(ids, None))) == len(ids)


def test_shared_text_is_not_counted_twice():
    """Each text scored twice from overlapping offsets, with the same NLLs: clustered, the interval is that of the
    texts once; treated as independent it would narrow as if the data had doubled."""
    tool = load_tool("eval_trained_namm")
    values = {"full": [3.0, 3.2, 2.8, 3.1, 3.3], "sink": [3.4, 3.6, 3.2, 3.5, 3.6], "policy": [3.0, 3.6, 3.2, 3.3, 3.4]}

    def entry(name: str, copies: int) -> dict:
        return {"nll_per_sample": {f"h{i}{c}:text:book@{i * 5000 + c}": v for i, v in enumerate(values[name])
                                   for c in range(copies)}}

    once = tool.closed_interval(*(entry(n, 1) for n in ("policy", "sink", "full")), span=512)
    twice = tool.closed_interval(*(entry(n, 2) for n in ("policy", "sink", "full")), span=512)
    naive = tool.closed_interval(*(entry(n, 2) for n in ("policy", "sink", "full")))
    assert (twice["n_text"], twice["n_clusters"], once["n_clusters"]) == (10, 5, 5)
    assert (twice["low"], twice["high"], twice["closed"]) == pytest.approx((once["low"], once["high"], once["closed"]))
    assert naive["n_clusters"] == 10 and naive["high"] - naive["low"] < 0.9 * (once["high"] - once["low"])


@pytest.mark.parametrize("args, message", [
    # held-out score and weight types belong to the run's length
    (["--sample-tokens", "1024"], "add --no-reproduce --quants ''"),
    (["--sample-tokens", "200", "--no-reproduce", "--quants", ""], "--sample-tokens must be at least 256"),
    (["--baselines", "h2o,snapkv"], "--baselines takes a comma-separated subset of h2o,tova,random"),
    (["--test-seed", "0"], "--test-seed 0 is the run's seed"),  # the run's seed chose its shipped generation
    # with the run's own NAMM left out there must be something else to score, and nothing that scores the run's NAMM
    (["--only-also", "--no-reproduce", "--quants", ""], "(no --also)"),
    (["--only-also", "--also", "x=y.gguf"], "(--no-reproduce missing, --quants not '')"),
    # another model's scores cannot reproduce the run's held-out loss or its weight types
    (["--model", "qwen2.5-coder-0.5b-instruct"], "add --no-reproduce --quants ''"),
    (["--model", "/nowhere/model.gguf", "--no-reproduce", "--quants", ""], "--model '/nowhere/model.gguf'"),
])
def test_eval_bad_arguments_error_before_any_work(tmp_path, args, message):
    from pymemory.namm.training.config import TrainConfig

    config = TrainConfig(sample_tokens=512, scored_tokens=256)
    assert config.seed == 0
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_trained_namm.py"), "--run", str(tmp_path),
                           "--out", str(tmp_path / "report")] + args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not list(tmp_path.glob("report*"))


def test_eval_runs_a_shipped_namm_without_its_run_directory():
    """runs/ is not kept between machines: a shipped NAMM's JSON holds its run's config and log, its GGUF the vector."""
    from pymemory.namm.checkpoint import load_gguf
    from pymemory.namm.packaged import packaged_namms

    tool = load_tool("eval_trained_namm")
    config, shipped, shipped_info = tool.run_config("smollm2-rate")
    assert shipped == packaged_namms()["smollm2-rate"]
    info = json.loads(shipped.with_suffix(".json").read_text())
    assert config.to_dict() == tool.TrainConfig.from_dict(info["config"]).to_dict()
    assert (config.sample_tokens, config.mode) == (512, "budget_zmax")
    log, vector = tool.run_log_and_vector("smollm2-rate", shipped, shipped_info)
    # the reproduction reads the logged held-out loss of the shipped generation
    assert any(h["generation"] == vector.iteration for h in log["heldout"]) and "sink" in log["heldout_baselines"]
    assert vector.iteration == info["generation"]
    assert (vector.theta == load_gguf(shipped)[0].theta).all() and vector.theta.any()
    by_path, gguf, _ = tool.run_config(str(shipped.with_suffix(".json")))  # or the path of its JSON
    assert gguf == shipped and by_path.to_dict() == config.to_dict()


def test_eval_names_a_run_that_is_neither(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_trained_namm.py"), "--run",
                           str(tmp_path / "nothing"), "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is neither a train-namm run directory nor a shipped NAMM" in done.stderr
    assert not list(tmp_path.glob("report*"))


def test_join_compares_rows_of_runs_that_reproduce_each_other():
    tool = _tool()
    full, sink = _entry([3.0, 3.2]), _entry([3.4, 3.6], answer=9.0)
    def answers(*nll):  # two retrievals: a paired difference needs two samples
        e = _entry([3.3, 3.5], nll[0])
        e["nll_per_sample"]["r1:kv:2@3:book@9"] = nll[1]
        return e

    first = {"commit": "a", "tables": {"t": {"full cache": full, "sink": sink, "h2o": answers(4.0, 5.0)}}}
    second = {"commit": "b", "tables": {"t": {"full cache": full, "sink": sink, "keys": answers(1.0, 2.0)}}}
    both = tool.joined([first, second], ["a.json", "b.json"])
    assert sorted(both["tables"]["t"]) == ["full cache", "h2o", "keys", "sink"] and both["commit"] == "a, b"
    assert tool.versus(both, "h2o")["t"]["keys"]["answer"][0] == pytest.approx(-3.0)
    moved = {"tables": {"t": {"full cache": full, "sink": _entry([3.4, 3.7])}}}
    with pytest.raises(ValueError, match="'sink' in 't' scored differently in b.json"):
        tool.joined([first, moved], ["a.json", "b.json"])
    with pytest.raises(ValueError, match="b.json has a table 'u'"):
        tool.joined([first, {"tables": {"u": {}}}], ["a.json", "b.json"])


def test_pool_makes_one_test_set_of_runs_on_other_samples(tmp_path):
    tool = _tool()

    def run(seed: int, texts: dict[str, list[float]], offsets: list[int]) -> dict:
        return {"model": "m", "sample_tokens": 512, "test_seed": seed, "commit": f"c{seed}",
                "tables": {"t": {name: {"nll_per_sample": {f"h{i}:text:book@{o}": v
                                                           for i, (o, v) in enumerate(zip(offsets, values))}}
                                 for name, values in texts.items()}}}

    first = run(2, {"full cache": [3.0, 3.2], "sink": [3.4, 3.6], "keys": [3.0, 3.6], "rate": [3.4, 3.4]}, [0, 5000])
    # the same ids ("h0", "h1") for other texts; its h0 overlaps the first run's h1 (book@5000) by 412 tokens
    second = run(4, {"full cache": [2.8, 3.1], "sink": [3.2, 3.5], "keys": [3.0, 3.3]}, [5100, 9000])
    both = tool.pooled([first, second], ["a.json", "b.json"])
    assert sorted(both["tables"]["t"]) == ["full cache", "keys", "sink"]  # rate: scored in one run only
    assert both["test_seed"] == [2, 4] and both["commit"] == "c2, c4"
    row = tool.intervals(both)["t"]["keys"]
    # (mean sink - mean keys) / (mean sink - mean full) over all four texts
    assert row["closed"] == pytest.approx((13.7 - 12.9) / (13.7 - 12.1))
    assert (row["n_text"], row["n_clusters"]) == (4, 3)  # book@5000 and book@5100 share text: one cluster
    with pytest.raises(ValueError, match="b.json has sample_tokens 1024"):
        tool.pooled([first, {**second, "sample_tokens": 1024}], ["a.json", "b.json"])
    no_sink = run(5, {"full cache": [2.8, 3.1], "keys": [3.0, 3.3]}, [0, 9000])
    with pytest.raises(ValueError, match="every report needs a 'sink' row"):
        tool.pooled([first, no_sink], ["a.json", "b.json"])
    paths = []
    for name, report in (("a", first), ("b", second)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    command = [sys.executable, str(ROOT / "tools" / "namm_closed_intervals.py"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command + [str(p) for p in paths] + ["--pool"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| keys | 4 (3) | +0.500 |" in (tmp_path / "out.md").read_text()
    done = subprocess.run(command + [str(p) for p in paths] + ["--pool", "--join"], capture_output=True, text=True)
    assert done.returncode == 2 and "exclude each other" in done.stderr
    # A test set whose policies were scored in two runs on the same samples: joined first, then pooled.
    (tmp_path / "b_rate.json").write_text(json.dumps(run(4, {"full cache": [2.8, 3.1], "sink": [3.2, 3.5],
                                                             "rate": [3.1, 3.5]}, [5100, 9000])))
    group = f"{paths[1]},{tmp_path / 'b_rate.json'}"
    done = subprocess.run(command + [str(paths[0]), group, "--pool", "--versus", "keys"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    pooled_rows = json.loads((tmp_path / "out.json").read_text())["reports"][f"{paths[0]} + {group}"]["tables"]["t"]
    assert pooled_rows["rate"]["closed"] == pytest.approx((13.7 - 13.4) / (13.7 - 12.1))  # all four texts
    (tmp_path / "b_moved.json").write_text(json.dumps(run(4, {"full cache": [2.8, 3.1], "sink": [3.2, 3.6]},
                                                          [5100, 9000])))
    done = subprocess.run(command + [str(paths[0]), f"{paths[1]},{tmp_path / 'b_moved.json'}", "--pool"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "'sink' in 't' scored differently" in done.stderr
