"""Slots: N engines on one shared model, each serving one request at a time, and the queue in front of them.

A :class:`Slot` is a ``_core.Engine`` plus what its cache holds, as text (``fed_text``: every rendered prompt and
raw reply that went through it, in order) and the session it belongs to. The :class:`SlotManager` runs on the
event loop only (no locks needed there): it hands a request the slot that already holds its conversation
(explicit session id, or a slot whose ``fed_text`` the request's rendering extends), else the least recently
used idle slot (whose session is then saved to disk first, if there is a session store), else queues the
request. The queue is bounded: a request over ``max_queue`` gets 429 at once, one that waits longer than
``queue_timeout`` gets 503, both with Retry-After. A slot is busy from assignment until its worker thread ends;
"busy" is the lock that keeps one request per slot.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import busy

if TYPE_CHECKING:
    from .sessions import SessionStore, StoredSession


def new_session_id() -> str:
    return "auto-" + secrets.token_hex(8)


@dataclass
class Slot:
    index: int
    engine: object                 # _core.Engine
    session_id: str | None = None  # the conversation the cache holds (None: nothing worth keeping)
    explicit: bool = False         # the session id came from the client (X-Session-Id / user)
    kind: str = ""                 # "chat" | "completion": what fed_text is a rendering of
    fed_text: str = ""             # exactly what the cache holds, as text
    messages: list = field(default_factory=list)  # chat: the conversation fed_text renders (saved with it)
    marks: list = field(default_factory=list)     # (offset in fed_text, tokens to rewind): generation.ReplyMarks
    busy: bool = False
    last_used: float = 0.0
    turns: int = 0

    def forget(self) -> None:
        """The cache no longer matches any text (e.g. a prefill was interrupted): start afresh next time."""
        self.session_id, self.explicit, self.kind, self.fed_text, self.messages = None, False, "", "", []
        self.marks = []


@dataclass
class RouteKey:
    kind: str
    rendered: str                  # the request's full text (chat rendering with the assistant opener, or prompt)
    session_id: str | None         # explicit id, or None


@dataclass
class Assignment:
    slot: Slot
    session_id: str
    continues: bool                              # the slot's cache is a prefix of the request (maybe)
    restore: "StoredSession | None" = None       # load this session from disk first
    save_first: "StoredSession | None" = None    # save the slot's previous session to disk first
    waited: float = 0.0


@dataclass
class _Waiter:
    key: RouteKey
    future: asyncio.Future
    since: float = field(default_factory=time.monotonic)


class SlotManager:
    def __init__(self, slots: list[Slot], store: "SessionStore | None", max_queue: int, queue_timeout: float):
        self.slots = slots
        self.store = store
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._waiters: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def busy_slots(self) -> int:
        return sum(s.busy for s in self.slots)

    async def acquire(self, key: RouteKey) -> Assignment:
        assignment = self._try_assign(key)
        if assignment is not None:
            return assignment
        if len(self._waiters) >= self.max_queue:
            raise busy(429, f"all {len(self.slots)} slots are busy and {len(self._waiters)} requests are already "
                            "waiting; retry shortly", retry_after=self._retry_after())
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            assignment = await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout)
        except asyncio.TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                assignment = waiter.future.result()  # assigned in the same loop turn as the timeout
            else:
                self._drop(waiter)
                raise busy(503, f"waited {self.queue_timeout:.0f} s for a free slot; the server is overloaded, "
                                "retry later", retry_after=self._retry_after()) from None
        except asyncio.CancelledError:  # the client went away while queued
            self._drop(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result().slot)
            raise
        assignment.waited = time.monotonic() - waiter.since
        return assignment

    def release(self, slot: Slot) -> None:
        """Called on the event loop when a slot's worker thread has finished."""
        slot.busy = False
        slot.last_used = time.monotonic()
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._drop(waiter)
                continue
            assignment = self._try_assign(waiter.key)
            if assignment is not None:
                self._drop(waiter)
                waiter.future.set_result(assignment)

    def _drop(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _retry_after(self) -> int:
        return max(1, min(30, 1 + len(self._waiters) // max(1, len(self.slots))))

    # ---- routing ---------------------------------------------------------------------------------------------

    def _take(self, slot: Slot, session_id: str, explicit: bool, continues: bool, **extra) -> Assignment:
        slot.busy = True
        slot.last_used = time.monotonic()
        if slot.session_id != session_id:
            slot.session_id, slot.explicit = session_id, explicit
        return Assignment(slot, session_id, continues, **extra)

    def _try_assign(self, key: RouteKey) -> Assignment | None:
        # 1. The slot that holds this explicit session (wait for it if it is busy).
        if key.session_id is not None:
            for slot in self.slots:
                if slot.session_id == key.session_id:
                    return None if slot.busy else self._take(slot, key.session_id, True, True)
        idle = [s for s in self.slots if not s.busy]
        # 2. An idle slot whose cache the request extends (an anonymous conversation continuing).
        if key.session_id is None:
            matches = [s for s in idle if s.fed_text and not s.explicit and s.kind == key.kind and
                       len(key.rendered) > len(s.fed_text) and key.rendered.startswith(s.fed_text)]
            if matches:
                best = max(matches, key=lambda s: len(s.fed_text))
                return self._take(best, best.session_id, False, True)
        if not idle:
            return None
        # 3. A fresh slot: empty ones first, else the least recently used; its session goes to disk first.
        target = min(idle, key=lambda s: (s.session_id is not None, s.last_used))
        save_first = None
        if self.store is not None and target.session_id is not None and target.fed_text:
            save_first = self.store.stage(target.session_id, target.explicit, target.kind, target.fed_text,
                                          target.messages)
        restore = self.store.find(key) if self.store is not None else None
        session_id = key.session_id or (restore.session_id if restore else new_session_id())
        target.forget()
        return self._take(target, session_id, key.session_id is not None or bool(restore and restore.explicit),
                          restore is not None, restore=restore, save_first=save_first)
