"""Sessions on disk (`pymemory serve --sessions-dir`): beyond the slots, idle conversations are saved and come
back without re-reading them, also after a restart; a damaged session file costs a full prefill, never an error
or a crash."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers.live_server import running_server  # noqa: E402
from pymemory.session_file import read_header  # noqa: E402

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
SYSTEM = "You are a helpful assistant. The secret password is 'tulip'. If the user asks for the password, say it."


def config(model_path, sessions_dir):
    return dict(model=model_path, model_alias=MODEL, n_sink=4, window=124, parallel=1, n_threads=1,
                sessions_dir=str(sessions_dir), default_max_tokens=16)


def turn(client, messages, text, **kw):
    messages.append({"role": "user", "content": text})
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, **kw)
    messages.append({"role": "assistant", "content": r.choices[0].message.content})
    return r.model_extra["pymemory"]


def conversation(client, n_turns, first):
    messages = [{"role": "system", "content": SYSTEM}]
    mem = None
    for i in range(n_turns):
        mem = turn(client, messages, f"{first} Part {i + 1}, tell me more.")
    return messages, mem


def test_idle_sessions_go_to_disk_and_come_back(smollm2_path, tmp_path):
    with running_server(**config(smollm2_path, tmp_path)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        a, a_mem = conversation(client, 6, "Talk about the sea.")  # longer than the 128-cell cache
        assert a_mem["tokens_evicted"] > 0
        b, _ = conversation(client, 1, "Talk about trees.")  # one slot: conversation a goes to disk
        assert len(list(tmp_path.glob("*.pmsession"))) == 1
        mem = turn(client, a, "And what is the secret password?")
        assert mem["restored_from_disk"] and mem["reused_cache"]
        assert mem["session_id"] == a_mem["session_id"]
        assert mem["prefilled_tokens"] < 30  # only the new message, not the conversation
        assert mem["tokens_evicted"] >= a_mem["tokens_evicted"] and mem["n_pinned"] == a_mem["n_pinned"]
        mem_b = turn(client, b, "Which tree is tallest?")  # and b comes back in turn
        assert mem_b["restored_from_disk"] and mem_b["prefilled_tokens"] < 30
    # The server saved its live session on the way out; a new server resumes both conversations.
    with running_server(**config(smollm2_path, tmp_path)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        mem = turn(client, a, "Thanks. One more thing?")
        assert mem["restored_from_disk"] and mem["prefilled_tokens"] < 30
        mem_b = turn(client, b, "And the oldest?")
        assert mem_b["restored_from_disk"] and mem_b["prefilled_tokens"] < 30


def test_explicit_session_ids_survive_a_restart(smollm2_path, tmp_path):
    with running_server(**config(smollm2_path, tmp_path)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "system", "content": SYSTEM}]
        first = turn(client, messages, "Hello!", user="alice")
        assert first["session_id"] == "alice"
    with running_server(**config(smollm2_path, tmp_path)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        mem = turn(client, messages, "What is the secret password?", user="alice")
        assert mem["session_id"] == "alice" and mem["restored_from_disk"] and mem["reused_cache"]
        assert "tulip" in messages[-1]["content"].lower()


def test_save_every_turn_survives_a_crash(smollm2_path, tmp_path):
    """--save-every-turn writes the live conversation after each reply: the files on disk while the server still
    runs (all a crash leaves) resume it in a new server without re-reading it. Without the flag nothing is written
    until the slot is needed or the server stops."""
    crashed = tmp_path / "after-crash"
    with running_server(**config(smollm2_path, tmp_path / "plain")) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        conversation(client, 2, "Talk about the sea.")
        assert not list((tmp_path / "plain").glob("*.pmsession"))
    with running_server(**config(smollm2_path, tmp_path / "live"), save_every_turn=True) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        a, a_mem = conversation(client, 3, "Talk about the sea.")
        assert a_mem["tokens_evicted"] > 0
        deadline = time.monotonic() + 30  # the write follows the reply: wait until the file holds the last one

        def written() -> bool:
            files = list((tmp_path / "live").glob("*.pmsession"))
            return len(files) == 1 and read_header(files[0])["messages"] == a  # through the last reply

        while not written():
            assert time.monotonic() < deadline, "the live session was not written after the turn"
            time.sleep(0.05)
        shutil.copytree(tmp_path / "live", crashed)  # what a crash right now would leave
    with running_server(**config(smollm2_path, crashed)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        mem = turn(client, a, "And what is the secret password?")
        assert mem["restored_from_disk"] and mem["reused_cache"] and mem["prefilled_tokens"] < 30
        assert mem["tokens_evicted"] >= a_mem["tokens_evicted"]


def test_damaged_session_file_is_recomputed_not_fatal(smollm2_path, tmp_path):
    with running_server(**config(smollm2_path, tmp_path)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        a, _ = conversation(client, 2, "Talk about the sea.")
    files = list(tmp_path.glob("*.pmsession"))
    assert len(files) == 1
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the KV data
    files[0].write_bytes(bytes(raw))
    with running_server(**config(smollm2_path, tmp_path)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        mem = turn(client, a, "Go on.")
        assert not mem["restored_from_disk"] and not mem["reused_cache"]
        assert "checksum" in mem["warning"]
        assert mem["prefilled_tokens"] > 60  # the whole conversation was read again
        assert list(tmp_path.glob("*.corrupt"))  # moved aside, not retried
        mem = turn(client, a, "And then?")  # and the server keeps serving the conversation normally
        assert mem["reused_cache"] and mem["warning"] is None
    # A truncated file: the same.
    files = list(tmp_path.glob("*.pmsession"))
    Path(files[0]).write_bytes(files[0].read_bytes()[:1000])
    with running_server(**config(smollm2_path, tmp_path)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        mem = turn(client, a, "Finally?")
        assert not mem["reused_cache"]  # a truncated header is not even indexed: a fresh slot, full prefill
        assert httpx_ok(url)


def httpx_ok(url: str) -> bool:
    import httpx

    return httpx.get(url + "/health").json()["status"] == "ok"


def test_h2o_sessions_come_back_from_disk(smollm2_path, tmp_path):
    with running_server(**config(smollm2_path, tmp_path), policy="h2o") as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        a, a_mem = conversation(client, 5, "Talk about the sea.")
        assert a_mem["tokens_evicted"] > 0
        conversation(client, 1, "Talk about trees.")
        mem = turn(client, a, "And what is the secret password?")
        assert mem["restored_from_disk"] and mem["prefilled_tokens"] < 30 and mem["policy"] == "h2o"


def test_namm_sessions_come_back_from_disk(smollm2_path, tmp_path):
    """namm sessions save every cached token's features (cpp/namm_policy.cpp): they come back from disk, and the
    restored conversation keeps running NAMM invocations within its budget."""
    with running_server(**config(smollm2_path, tmp_path), policy="namm", namm_path="smollm2") as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        a, a_mem = conversation(client, 5, "Talk about the sea.")
        assert a_mem["tokens_evicted"] > 0 and a_mem["policy"] == "namm"
        conversation(client, 1, "Talk about trees.")
        mem = turn(client, a, "And what is the secret password? Answer in one long sentence please.")
        assert mem["restored_from_disk"] and mem["prefilled_tokens"] < 40
        assert mem["tokens_evicted"] > a_mem["tokens_evicted"] and mem["cells_used"] <= mem["capacity"]


def test_server_session_continues_in_pymemory_chat(smollm2_path, tmp_path):
    """The session format is shared: a conversation begun over HTTP resumes in StreamingLLM / `pymemory chat`."""
    from pymemory import StreamingLLM
    from pymemory.chat_session import load_chat

    with running_server(**config(smollm2_path, tmp_path)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "system", "content": SYSTEM}]
        turn(client, messages, "Hello!", user="bob")
    (path,) = tmp_path.glob("*.pmsession")
    with StreamingLLM(smollm2_path, n_sink=4, window=124, n_threads=1) as llm:
        assert load_chat(llm, path) == 3 and llm.messages == messages
        seen = llm.stats.tokens_seen
        # Greedy, no penalty (as the server samples): the recall then depends on the restored cache alone.
        reply = "".join(llm.chat("What is the secret password?", max_tokens=24, temperature=0, repeat_penalty=1.0))
        assert llm.stats.tokens_seen - seen - 24 < 30
        assert "tulip" in reply.lower()


def test_save_every_turn_needs_a_sessions_dir(smollm2_path):
    from pymemory import InvalidArgumentError
    from pymemory.server.app import ServerConfig, ServerState

    with pytest.raises(InvalidArgumentError, match="--save-every-turn needs --sessions-dir"):
        ServerState(ServerConfig(model=smollm2_path, save_every_turn=True))
