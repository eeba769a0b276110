"""`pymemory eval ruler`: the task generators (pure, with a word-count tokenizer), their token lengths on SmolLM2's
tokenizer, typed refusals of bad settings, and one tiny end-to-end run."""
from __future__ import annotations

import json
import random

import pytest

from pymemory.cli import main
from pymemory.errors import InvalidArgumentError
from pymemory.evaluation import ruler

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do")
_WORDS = [a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in _SYLLABLES]  # 1,000 distinct 6-letter words
PROSE = " ".join(f"The {_WORDS[i]} met {_WORDS[(7 * i) % 1000]} near {_WORDS[(13 * i) % 1000]} at dawn."
                 for i in range(1000))
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")


def words(text: str) -> int:
    return len(text.split())


def sample(task, seed=0, target=800, count=words):
    return ruler.generate_sample(task, count, target, random.Random(seed), PROSE)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_generators_are_deterministic_by_seed_and_near_the_target_length(task):
    a, b, c = sample(task, 1), sample(task, 1), sample(task, 2)
    assert a.as_dict() == b.as_dict()
    assert c.prompt != a.prompt and c.expected != a.expected
    n = words(a.prompt) + 1  # + BOS
    assert abs(n - 800) <= 0.03 * 800, n
    assert a.expected and all(isinstance(e, str) and e for e in a.expected)


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_every_answer_is_in_the_context_at_its_stated_depth(task):
    for seed in range(5):
        s = sample(task, seed)
        start, end = s.haystack
        for needle in s.needles:
            assert s.prompt[needle.char_offset:needle.char_offset + len(needle.text)] == needle.text
            assert start <= needle.char_offset < end
            # Depth = share of the haystack's own tokens (other needles not counted) before the needle.
            before = s.prompt[start:needle.char_offset]
            others = [n for n in s.needles if n.char_offset < needle.char_offset]
            hay_before = words(before) - sum(words(n.text) for n in others)
            hay_total = words(s.prompt[start:end]) - sum(words(n.text) for n in s.needles)
            assert abs(hay_before / hay_total - needle.depth) < 0.02, (task, seed, needle)
        hidden = " ".join(n.text for n in s.needles)
        for e in s.expected:  # each expected answer is stated by a needle, never by the question
            assert e in hidden
        question = s.prompt[end:]
        if task != "vt":
            assert all(e not in question for e in s.expected)
        depths = [n.depth for n in s.needles]
        assert all(0.0 <= d <= 1.0 for d in depths)
    if task == "vt":  # the chain is in order: each assignment reads the variable assigned before it
        s = sample(task, 3)
        offsets = [s.prompt.index(f"VAR {name} =") for name in s.expected]
        assert offsets == sorted(offsets)


def test_extraction_tasks_expect_the_most_frequent_words():
    s = sample("cwe", 4)
    body = s.prompt[s.haystack[0]:s.haystack[1]].split()
    entries = [w for w in body if not w.rstrip(".").isdigit()]
    counts = {w: entries.count(w) for w in set(entries)}
    common = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(common) == set(s.expected) and min(counts[w] for w in s.expected) > max(
        c for w, c in counts.items() if w not in s.expected)
    s = sample("fwe", 4)
    coded = [w for w in s.prompt[s.haystack[0]:s.haystack[1]].split() if w != "...."]
    counts = {w: coded.count(w) for w in set(coded)}
    ranked = sorted(counts.values(), reverse=True)
    assert [counts[w] for w in s.expected] == ranked[:3] and ranked[2] > ranked[3]


def test_string_match_all_scores_the_fraction_found():
    assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert ruler.string_match_all("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0


def test_bad_settings_are_refused_before_any_work():
    ok = dict(tasks=("niah_single",), context_tokens=1024, ratios=(0.5,), policies=("full",), samples=1)
    ruler.check_config(ruler.RulerConfig(**ok))
    for change, message in ((dict(tasks=("niah_double",)), "unknown RULER task"),
                            (dict(ratios=(0.0,)), r"in \(0, 1\]"), (dict(ratios=(1.5,)), r"in \(0, 1\]"),
                            (dict(samples=0), "samples"), (dict(context_tokens=32), "too short"),
                            (dict(context_tokens=64, ratios=(0.05,)), "sinks")):
        with pytest.raises(InvalidArgumentError, match=message):
            ruler.check_config(ruler.RulerConfig(**{**ok, **change}))
    with pytest.raises(InvalidArgumentError, match="too short for task 'niah_multiquery'.*--context"):
        sample("niah_multiquery", target=120)
    with pytest.raises(InvalidArgumentError, match="too short for task 'cwe'"):
        sample("cwe", target=100)


def test_cli_refuses_bad_input_with_a_message(capsys, tmp_path):
    for argv, message in ((["--tasks", "niah_single,haystack"], "unknown RULER task"),
                          (["--ratios", "0.5,2"], "(0, 1]"), (["--policy", "sink,colour=blue"], "key=value")):
        assert main(["eval", "ruler", "--model", str(tmp_path / "absent.gguf"), *argv]) == 1
        assert message in capsys.readouterr().err  # refused before the (missing) model is even looked for


@pytest.mark.model
def test_generated_lengths_on_smollm2_tokens(smollm2_model):
    def count(text):
        return len(smollm2_model.tokenize(text, False, False))

    from pymemory import assets

    prose = assets.read_text("austen", part="prideprejudice")
    for task in ruler.TASKS:
        s = ruler.generate_sample(task, count, 1024, random.Random(0), prose)
        n = len(smollm2_model.tokenize(s.prompt, True, False))
        assert abs(n - 1024) <= 0.03 * 1024, (task, n)


@pytest.mark.model
def test_tiny_ruler_run_reports_every_cell_and_full_cache_finds_an_easy_needle(tmp_path, smollm2_path):
    out = tmp_path / "ruler.json"
    assert main(["eval", "ruler", "--model", smollm2_path, "--context", "256", "--tasks",
                 "niah_single,niah_multikey", "--ratios", "0.5", "--policy", "full", "--policy", "tova", "--samples",
                 "1", "--threads", "1",
                 "--json", str(out), "--md", str(tmp_path / "ruler.md"), "--plot", str(tmp_path / "ruler.png")]) == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("pymemory eval ruler") and data["commit"] and data["machine"]["cores"] >= 1
    assert data["settings"]["context_tokens"] == 256 and data["settings"]["ratios"] == [0.5]
    cells = {(c["task"], c["policy"], c["ratio"]): c for c in data["cells"]}
    tasks, runs = ("niah_single", "niah_multikey"), (("full", 1.0), ("tova", 0.5))
    assert set(cells) == {(t, p, r) for t in tasks for p, r in runs}
    for c in cells.values():
        assert 0.0 <= c["score"] <= 1.0 and len(c["runs"]) == 1
        run = c["runs"][0]
        assert abs(run["prompt_tokens"] - 256) <= 26 and run["forced_evictions"] == 0  # whole sentences: +-10 %
        assert run["peak_cells"] <= (128 if c["policy"] == "tova" else 256 + 64)
    assert cells[("niah_single", "full", 1.0)]["score"] == 1.0  # one needle in 200 tokens of noise
    assert cells[("niah_single", "tova", 0.5)]["cache_cells"] == 128
    assert {(s["spec"], s["ratio"]) for s in data["summary"]} == {("full", 1.0), ("tova", 0.5)}
    assert "| niah_single | niah_multikey | mean |" in (tmp_path / "ruler.md").read_text()
    assert (tmp_path / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
