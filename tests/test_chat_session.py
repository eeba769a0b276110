"""`pymemory chat --save/--load` (pymemory/chat_session.py): a chat resumes from its session file without
re-reading the conversation, on the same format the server writes; bad files give a clean error."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pymemory import InvalidArgumentError, StreamingLLM
from pymemory.chat_session import load_chat, save_chat
from pymemory.session_file import SessionFileError

pytestmark = pytest.mark.model

SYSTEM = "You are a helpful assistant. The secret password is 'tulip'. If the user asks for the password, say it."


# Greedy with no penalty: what the reply recalls then depends on the cache alone (the chat default's repetition
# penalty steers this model away from repeating the secret it was asked for).
RAW = dict(temperature=0, repeat_penalty=1.0)


def llm(path, **kw):
    return StreamingLLM(path, n_sink=4, window=124, pin_system_prompt=True, n_threads=1, **kw)


@pytest.mark.parametrize("memory", [{}, {"policy": "namm", "namm_path": "smollm2"}], ids=["sink", "namm"])
def test_saved_chat_resumes_without_rereading(smollm2_path, tmp_path, memory):
    session = tmp_path / "chat.pmsession"
    with llm(smollm2_path, **memory) as a:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about the sea."}]
        "".join(a.chat(messages, max_tokens=40, **RAW))
        for text in ("And the sky?", "And the mountains?", "And rivers?"):
            "".join(a.chat(text, max_tokens=40, **RAW))
        assert a.stats.tokens_evicted > 0
        save_chat(a, session)
        saved_stats, saved_messages = a.stats, list(a.messages)
    with llm(smollm2_path, **memory) as b:
        assert load_chat(b, session) == len(saved_messages)
        assert b.messages == saved_messages and b.stats == saved_stats
        seen = b.stats.tokens_seen
        reply = "".join(b.chat("What is the secret password?", max_tokens=24, **RAW))
        new_prompt_tokens = b.stats.tokens_seen - seen - 24
        assert new_prompt_tokens < 30  # only the new user turn was read, not the conversation
        assert "tulip" in reply.lower()  # the pinned system prompt came back with the cache


def test_load_errors_are_clean(smollm2_path, tmp_path):
    session = tmp_path / "chat.pmsession"
    with llm(smollm2_path) as a:
        "".join(a.chat("Hello", max_tokens=8, temperature=0))
        save_chat(a, session)
    with llm(smollm2_path) as b:
        with pytest.raises(SessionFileError, match="not found"):
            load_chat(b, tmp_path / "missing.pmsession")
        damaged = tmp_path / "damaged.pmsession"
        raw = bytearray(session.read_bytes())
        raw[-50] ^= 1
        damaged.write_bytes(bytes(raw))
        with pytest.raises(SessionFileError, match="checksum"):
            load_chat(b, damaged)
        "".join(b.chat("Still works", max_tokens=4, temperature=0))  # b is usable after the refusals
    with StreamingLLM(smollm2_path, n_sink=4, window=252, n_threads=1) as other:
        with pytest.raises(InvalidArgumentError, match="window 124"):
            load_chat(other, session)
        assert other.stats.cells_used == 0
    with llm(smollm2_path) as empty, pytest.raises(InvalidArgumentError, match="empty"):
        save_chat(empty, tmp_path / "x.pmsession")


def test_cli_save_then_load(smollm2_path, tmp_path):
    session = tmp_path / "cli.pmsession"
    base = [sys.executable, "-m", "pymemory.cli", "chat", "--model", smollm2_path, "--window", "124",
            "--threads", "1", "--temperature", "0", "--max-tokens", "16", "--pin-system-prompt"]
    first = subprocess.run(base + ["--system", SYSTEM, "--save", str(session)], input="Hello there!\n",
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "session saved" in first.stderr and session.is_file()
    second = subprocess.run(base + ["--load", str(session), "--show-cache"],
                            input="What is the secret password?\n", capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "resumed 3 messages" in second.stderr and "tulip" in second.stdout.lower()
    bad = subprocess.run(base + ["--load", str(tmp_path / "nope.pmsession")], input="", capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "session file not found" in bad.stderr and "Traceback" not in bad.stderr
