"""A StreamingLLM chat saved to a session file and resumed without re-reading it (`pymemory chat --save/--load`).

The file is the one `pymemory serve --sessions-dir` writes (pymemory/session_file.py): the engine state (KV
cells, cache mirror, pinned prefix, counters) plus a header with the conversation's messages and the text the
cache holds. A server session that carries its messages loads here too, so a conversation begun over HTTP can
be continued in the terminal (same model and memory settings; the engine checks them).
"""
from __future__ import annotations

import os
import time

from .errors import InvalidArgumentError
from .session_file import SessionFileError, read_session, write_session
from .streaming import StreamingLLM


def save_chat(llm: StreamingLLM, path: str | os.PathLike) -> None:
    """Writes the chat's cache and conversation to `path` (atomically)."""
    engine = llm.engine
    if not llm.messages:
        raise InvalidArgumentError("nothing to save: the conversation is empty")
    header = {
        "kind": "chat",
        "messages": llm.messages,
        "fed_text": llm._chat_fed_text,
        "turn_kind": "chat",
        "settings": {"model": llm.model_info["description"], "policy": llm.policy, "n_sink": llm.n_sink,
                     "window": llm.window, "chat_template": llm.chat_template},
        "saved_at": time.time(),
    }
    write_session(path, header, engine.save_state())


def load_chat(llm: StreamingLLM, path: str | os.PathLike) -> int:
    """Restores a saved chat into `llm` (replacing its conversation); returns the number of messages.

    Raises SessionFileError for a missing, damaged or message-less file and InvalidArgumentError when it was saved
    with another model or memory settings; `llm` is then left empty and usable."""
    header, state = read_session(path)
    messages = header.get("messages")
    if header.get("turn_kind", "chat") != "chat" or not isinstance(messages, list) or not messages:
        raise SessionFileError(f"{os.fspath(path)!r} holds no chat messages (a completion session?); it cannot "
                               "be continued as a chat")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages):
        raise SessionFileError(f"{os.fspath(path)!r} is damaged (its messages are not role/content pairs)")
    fed_text = header.get("fed_text")
    if not isinstance(fed_text, str) or not fed_text:
        raise SessionFileError(f"{os.fspath(path)!r} is damaged (no cached text)")
    llm.reset()
    llm.engine.load_state(state)  # checks model and settings; resets the engine on any mismatch
    llm.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    llm._chat_fed_text = fed_text
    llm._stream_started = True
    return len(messages)
