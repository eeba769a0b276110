"""The OpenAI request and response shapes the server speaks, validated by hand.

Requests are parsed from JSON into :class:`TurnRequest` (one shape for chat and plain completions) with a
clear 400 for every field the server cannot honour; responses are plain dicts built here, so the wire format is
written in one place. Fields follow https://platform.openai.com/docs/api-reference/chat closely enough that the
official ``openai`` client works unchanged; pymemory adds one extension field, ``"pymemory"``, with the memory's
state (see :func:`memory_field`).
"""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError, bad_request

# Roles a chat template understands. "developer" is OpenAI's newer name for "system".
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_SESSION_ID = 256


@dataclass
class TurnRequest:
    """One chat or completion request, validated."""

    kind: str                            # "chat" | "completion"
    model: str
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: normalised {"role", "content"}
    prompt: str = ""                     # completion
    max_tokens: int | None = None        # None = the server's default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False             # extension (as llama.cpp's server): keep generating past end-of-generation
    session_id: str | None = None        # X-Session-Id header, else the "user" field


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number (got {value!r})", name)
    if not lo <= value <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi} (got {value})", name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer (got {value!r})", name)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"'{name}' must be {bound} (got {value})", name)
    return value


def _content_text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"messages[{index}].content: only text parts are supported (got {kind!r})",
                                  f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{index}].content must be a string or a list of text parts (got {content!r})",
                      f"messages[{index}].content")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r}); tool and "
                              "function messages are not supported", f"messages[{i}].role")
        if "content" not in m or m["content"] is None:
            raise bad_request(f"messages[{i}] has no 'content'", f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": _content_text(m["content"], i)})
    for i, m in enumerate(out[1:], start=1):
        if m["role"] == "system":
            raise bad_request(f"messages[{i}]: a system message may only open the conversation (it is pinned in "
                              "the cache)", f"messages[{i}].role")
    return out


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
        raise bad_request(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    return [s for s in stop if s]


def _unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise bad_request(f"'n' must be a positive integer (got {n!r})", "n")
    if n is not None and n != 1:
        raise bad_request(f"'n' = {n} is not supported: this server returns one choice per request (n = 1)", "n")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this server", name, code="unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("'logprobs' is not supported by this server", "logprobs", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in (None, "text")):
        raise bad_request("'response_format' other than text is not supported", "response_format",
                          code="unsupported_parameter")


def parse_turn(body: dict, kind: str, header_session: str | None) -> TurnRequest:
    """Validates a /v1/chat/completions (kind "chat") or /v1/completions (kind "completion") body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required (see GET /v1/models)", "model", code="missing_model")
    _unsupported(body)
    req = TurnRequest(kind=kind, model=model)
    if kind == "chat":
        req.messages = _messages(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise bad_request("'prompt' must be a non-empty string (batches of prompts are not supported)",
                              "prompt")
        if body.get("echo"):
            raise bad_request("'echo' is not supported", "echo", code="unsupported_parameter")
        if body.get("suffix"):
            raise bad_request("'suffix' is not supported", "suffix", code="unsupported_parameter")
        req.prompt = prompt
    max_tokens = _integer(body, "max_completion_tokens", 0)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 0)
    req.max_tokens = max_tokens
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    req.min_p = _number(body, "min_p", 0.05, 0.0, 1.0)
    req.repeat_penalty = _number(body, "repeat_penalty", 1.0, 0.0, 10.0)
    req.top_k = _integer(body, "top_k", 0) or 0
    req.seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    req.stop = _stop(body)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("'ignore_eos' must be true or false", "ignore_eos")
    req.ignore_eos = ignore_eos
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be true or false", "stream")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        if not req.stream:
            raise bad_request("'stream_options' is only allowed with stream: true", "stream_options")
        req.include_usage = bool(options.get("include_usage", False))
    session = header_session if header_session else body.get("user")
    if session is not None:
        if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_ID:
            raise bad_request(f"the session id (X-Session-Id header or 'user') must be a string of 1 to "
                              f"{MAX_SESSION_ID} characters", "user")
        req.session_id = session
    return req


# ---- responses -------------------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def memory_field(stats: dict, extra: dict) -> dict:
    """The "pymemory" extension: the slot's cache after the turn, and how the turn used it."""
    return {
        "cells_used": stats["cells_used"],
        "capacity": stats["capacity"],
        "n_pinned": stats["n_pinned"],
        "peak_cells": stats["peak_cells"],
        "tokens_seen": stats["tokens_seen"],
        "evictions": stats["evictions"],
        "tokens_evicted": stats["tokens_evicted"],
        "max_pos": stats["max_pos"],
        **extra,
    }


def completion_object(req: TurnRequest, rid: str, created: int, text: str, finish: str, usage_: dict,
                      memory: dict) -> dict:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
            "usage": usage_, "system_fingerprint": None, "pymemory": memory}


def chunk_object(req: TurnRequest, rid: str, created: int, text: str | None, finish: str | None,
                 first: bool = False, memory: dict | None = None) -> dict:
    if req.kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
           "system_fingerprint": None}
    if memory is not None:
        out["pymemory"] = memory
    return out


def usage_chunk(req: TurnRequest, rid: str, created: int, usage_: dict, memory: dict) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [], "usage": usage_,
            "system_fingerprint": None, "pymemory": memory}


def now() -> int:
    return int(time.time())
