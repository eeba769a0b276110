"""One request's work on its slot, run in a worker thread: restore or save sessions, prefill what is new,
generate.

Data flow: the event loop hands :func:`run_turn` an :class:`~.slots.Assignment` and a :class:`Turn`; the
thread calls ``emit(piece)`` for every text piece (the caller forwards it to the event loop) and returns a
:class:`TurnResult`. Every engine call is one GIL-free C++ step, and ``turn.cancel`` is checked between steps
(prefill chunks and tokens), so a client that disconnects stops the work within one step.

What the cache holds is tracked as text (``Slot.fed_text``: rendered prompts and raw replies). A request whose
rendering extends it prefills only the rest, however many tokens the policy has evicted since — the cache never
has to equal the transcript. Anything else (an edited history, another conversation) resets the slot and streams
the whole request through the cache. The system prompt of a fresh chat (with BOS) is pinned: the policy never
evicts it, so its instructions hold however long the conversation grows.
"""
from __future__ import annotations

import codecs
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidArgumentError
from ..text import TextAssembler, common_prefix_length
from .errors import bad_request
from .sessions import SessionStore
from .slots import Assignment

log = logging.getLogger("pymemory.server")


@dataclass
class Turn:
    kind: str                    # "chat" | "completion"
    rendered: str                # full text of the request
    system_text: str | None      # chat: the rendered system message alone, pinned on a fresh slot
    messages: list               # chat: the request's messages (kept with the session)
    max_tokens: int
    sampling: object             # _core.SamplingParams
    stop: list[str]
    ignore_eos: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class TurnResult:
    text: str = ""
    finish_reason: str = "stop"  # stop | length | cancelled
    prompt_tokens: int = 0       # tokens of the conversation before the reply (cached + prefilled)
    prefilled: int = 0           # prompt tokens decoded by this request
    completion_tokens: int = 0
    reused: bool = False         # continued what the slot held
    rewound: int = 0             # tokens of the previous reply taken back (cut by a stop string, regenerated)
    restored: bool = False       # came back from disk
    warning: str | None = None
    prefill_seconds: float = 0.0
    generate_seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def run_turn(model, store: SessionStore | None, a: Assignment, turn: Turn, emit: Callable[[str], None],
             pin_system_prompt: bool) -> TurnResult:
    slot, engine, result = a.slot, a.slot.engine, TurnResult()
    if a.save_first is not None and store is not None:
        store.save(a.save_first, engine)
    if a.restore is not None and store is not None:
        try:
            slot.fed_text, slot.messages = store.load(a.restore, engine)
            slot.kind = a.restore.kind
            result.restored = True
        except InvalidArgumentError as exc:
            result.warning = str(exc)
            log.warning("%s; serving the request with a full prefill", exc)
            slot.forget()
            slot.session_id = a.session_id

    t0 = time.perf_counter()
    fed = slot.fed_text
    if fed and slot.kind == turn.kind and len(turn.rendered) > len(fed) and turn.rendered.startswith(fed):
        delta_text, fresh = turn.rendered[len(fed):], False
    else:
        delta_text, fresh = turn.rendered, not _rewind_to_fit(slot, engine, turn, result)
        if not fresh:
            delta_text = turn.rendered[len(slot.fed_text):]
    if fresh:
        engine.reset()
        slot.fed_text, slot.kind = "", turn.kind
    result.reused = not fresh
    special = turn.kind == "chat"  # chat templates spell their markers as special tokens
    add_bos = fresh and bool(model.info["add_bos"])
    tokens = model.tokenize(delta_text, add_bos, special)
    result.prompt_tokens = engine.stats()["tokens_seen"] + len(tokens)
    slot.fed_text = ""  # until the prefill has finished, the cache matches no text
    if fresh and pin_system_prompt and turn.system_text:
        system_tokens = model.tokenize(turn.system_text, add_bos, True)
        n_pin = common_prefix_length(system_tokens, tokens)
        if n_pin >= engine.capacity:
            raise bad_request(f"the system prompt is {n_pin} tokens but the cache holds {engine.capacity}; "
                              "shorten it or start the server with a larger --window", "messages[0].content",
                              code="context_length_exceeded")
        engine.feed(tokens[:n_pin])
        engine.pin_prefix(n_pin)
        tokens = tokens[n_pin:]
        result.prefilled += n_pin
    last_prompt_token = tokens[-1] if tokens else None
    step = max(1, engine.prefill_chunk)
    for start in range(0, len(tokens), step):
        if turn.cancel.is_set():
            result.finish_reason = "cancelled"
            slot.forget()
            return _finish(result, engine)
        engine.feed(tokens[start:start + step])
        result.prefilled += min(step, len(tokens) - start)
    result.prefill_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    sampler = model_sampler(model, turn.sampling)
    assembler = TextAssembler(turn.stop)
    raw = bytearray()  # every generated token that went into the cache, as the chat template would spell it
    marks = ReplyMarks(turn.rendered, model, last_prompt_token, special)
    pieces: list[str] = []
    result.finish_reason = "length"
    try:
        while result.completion_tokens < turn.max_tokens:
            if turn.cancel.is_set():
                result.finish_reason = "cancelled"
                break
            token = engine.sample(sampler)
            result.completion_tokens += 1
            if model.is_end_of_generation(token) and not turn.ignore_eos:
                result.finish_reason = "stop"
                break
            engine.feed([token])
            raw += model.token_bytes(token, special)
            marks.fed(model.token_bytes(token, special))
            piece = assembler.push(model.token_bytes(token, False))
            if piece:
                pieces.append(piece)
                emit(piece)
            if assembler.stopped:
                result.finish_reason = "stop"
                break
        tail = assembler.flush()
        if tail:
            pieces.append(tail)
            emit(tail)
    finally:
        # The cache holds the prompt and every fed reply token, whatever stopped the loop.
        slot.fed_text = turn.rendered + raw.decode("utf-8", errors="replace")
        slot.marks = marks.points()
        slot.kind = turn.kind
        slot.turns += 1
        if turn.kind == "chat":
            slot.messages = turn.messages + [{"role": "assistant", "content": assembler.text}]
    result.text = "".join(pieces)
    result.generate_seconds = time.perf_counter() - t1
    return _finish(result, engine)


class ReplyMarks:
    """Points of a turn's text where the cache could be cut back to by rewinding tokens: before the prompt's last
    token, after the prompt, and after every generated token that ends on a character boundary. A list of
    (offset in fed_text, tokens to rewind), for the next request of the conversation."""

    def __init__(self, rendered: str, model, last_prompt_token: int | None, special: bool):
        self._base = len(rendered)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0
        self._after: list[tuple[int, int]] = [(self._base, 0)]  # (offset, tokens generated up to it)
        self._before_prompt_end = None
        if last_prompt_token is not None:
            text = model.token_bytes(last_prompt_token, special).decode("utf-8", errors="replace")
            if text and rendered.endswith(text):
                self._before_prompt_end = self._base - len(text)

    def fed(self, data: bytes) -> None:
        self._chars += len(self._decoder.decode(data))
        n = len(self._after)
        if not self._decoder.getstate()[0]:  # no half character pending: a text boundary
            self._after.append((self._base + self._chars, n))
        else:
            self._after.append((-1, n))

    def points(self) -> list[tuple[int, int]]:
        total = len(self._after) - 1
        out = [(offset, total - k) for offset, k in self._after if offset >= 0]
        if self._before_prompt_end is not None:
            out.append((self._before_prompt_end, total + 1))
        return out


def _rewind_to_fit(slot, engine, turn: Turn, result: TurnResult) -> bool:
    """The request diverges from the slot's cache inside the last reply (a stop string cut it, or the client
    regenerates it): take the extra tokens back instead of re-reading the conversation. True when that worked."""
    fed = slot.fed_text
    if not fed or slot.kind != turn.kind or not slot.marks or engine.policy in ("h2o", "tova", "namm"):
        return False
    common = _common_prefix(fed, turn.rendered)
    usable = [(offset, n) for offset, n in slot.marks if offset <= common and offset < len(turn.rendered)]
    if not usable:
        return False
    offset, n = max(usable)
    try:
        engine.rewind(n)
    except ValueError:  # those tokens are no longer all in the cache
        return False
    slot.fed_text, slot.marks = fed[:offset], []
    result.rewound = n
    return True


def _common_prefix(a: str, b: str) -> int:
    """common_prefix_length for long strings: a binary search on slice equality (C speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def model_sampler(model, params):
    from .._loader import _core

    return _core.Sampler(model, params)


def _finish(result: TurnResult, engine) -> TurnResult:
    result.stats = engine.stats()
    return result
