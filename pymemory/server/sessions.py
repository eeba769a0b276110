"""Sessions on disk: idle conversations beyond the N slots, and every conversation across restarts.

The store keeps an index of the session files in ``--sessions-dir`` (read from their headers at start-up, so a
restarted server resumes them) and, per session, the text its cache holds, so that a request can find its
conversation by content as well as by id. Files are ``pymemory.session_file`` files: the same format as
``pymemory chat --save``.

Event loop side: :meth:`SessionStore.stage` (a slot's session is about to be written) and :meth:`find` (a request
looks for its conversation; a found session leaves the index while it lives in a slot). Worker-thread side:
:meth:`save` and :meth:`load`, which do the engine and file work. A staged session is loadable only once its
write has finished (``ready``), so a session that is being written out while its next request arrives is
restored, not recomputed. A damaged file is moved aside (``*.corrupt``) and the request is served by a full
prefill: the request carries the whole conversation anyway.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..session_file import SUFFIX, SessionFileError, read_header, read_session, write_session

if TYPE_CHECKING:
    from .slots import RouteKey

log = logging.getLogger("pymemory.server")


@dataclass
class StoredSession:
    session_id: str
    explicit: bool
    kind: str
    fed_text: str
    path: Path
    messages: list = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class SessionStore:
    def __init__(self, directory: str | os.PathLike, settings: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.settings = settings  # model and memory settings; files written with others are not resumed
        self.index: dict[str, StoredSession] = {}

    def path_for(self, session_id: str) -> Path:
        return self.directory / (hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:32] + SUFFIX)

    def scan(self) -> int:
        """Indexes the session files already in the directory; returns how many can be resumed."""
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            try:
                header = read_header(path)
            except SessionFileError as exc:
                log.warning("session file skipped: %s", exc)
                continue
            if header.get("kind") != "server" or header.get("settings") != self.settings:
                log.info("session file %s was saved with other settings (%s); not resumed", path.name,
                         header.get("settings"))
                continue
            stored = StoredSession(str(header["session_id"]), bool(header.get("explicit")),
                                   str(header.get("turn_kind", "chat")), str(header.get("fed_text", "")), path)
            stored.ready.set()
            self.index[stored.session_id] = stored
        return len(self.index)

    # ---- event loop side -------------------------------------------------------------------------------------

    def stage(self, session_id: str, explicit: bool, kind: str, fed_text: str, messages: list) -> StoredSession:
        stored = StoredSession(session_id, explicit, kind, fed_text, self.path_for(session_id), list(messages))
        self.index[session_id] = stored
        return stored

    def find(self, key: "RouteKey") -> StoredSession | None:
        """The stored conversation a request continues (by id, else by content); it leaves the index."""
        if key.session_id is not None:
            stored = self.index.get(key.session_id)
        else:
            matches = [s for s in self.index.values() if not s.explicit and s.kind == key.kind and s.fed_text and
                       len(key.rendered) > len(s.fed_text) and key.rendered.startswith(s.fed_text)]
            stored = max(matches, key=lambda s: len(s.fed_text)) if matches else None
        if stored is not None:
            del self.index[stored.session_id]
        return stored

    # ---- worker thread side ----------------------------------------------------------------------------------

    def save(self, stored: StoredSession, engine) -> None:
        try:
            header = {
                "kind": "server",
                "session_id": stored.session_id,
                "explicit": stored.explicit,
                "turn_kind": stored.kind,
                "fed_text": stored.fed_text,
                "messages": stored.messages,
                "settings": self.settings,
                "saved_at": time.time(),
            }
            write_session(stored.path, header, engine.save_state())
        except Exception as exc:  # noqa: BLE001 - reported, and the session is recomputed when it comes back
            stored.error = f"{type(exc).__name__}: {exc}"
            log.warning("session %s could not be saved: %s", stored.session_id, stored.error)
        finally:
            stored.ready.set()

    def write_live(self, session_id: str, explicit: bool, kind: str, fed_text: str, messages: list, engine) -> None:
        """Writes a conversation that stays in its slot (--save-every-turn): not indexed here, since it is live, but
        a server restarted after a crash finds it in scan()."""
        self.save(StoredSession(session_id, explicit, kind, fed_text, self.path_for(session_id), list(messages)),
                  engine)

    def load(self, stored: StoredSession, engine) -> tuple[str, list]:
        """Restores the session into the engine; returns the text its cache holds and its chat messages.
        Raises SessionFileError."""
        if not stored.ready.wait(timeout=120):
            raise SessionFileError(f"session {stored.session_id!r} is still being written")
        if stored.error:
            raise SessionFileError(f"session {stored.session_id!r} was not saved ({stored.error})")
        try:
            header, state = read_session(stored.path)
            if header.get("session_id") != stored.session_id or header.get("settings") != self.settings:
                raise SessionFileError(f"{stored.path.name} does not hold session {stored.session_id!r} with "
                                       "this server's settings")
            engine.load_state(state)
        except (SessionFileError, ValueError) as exc:
            engine.reset()
            self._quarantine(stored.path)
            raise SessionFileError(f"session {stored.session_id!r} could not be restored: {exc}") from None
        messages = header.get("messages")
        return str(header.get("fed_text", "")), messages if isinstance(messages, list) else []

    def _quarantine(self, path: Path) -> None:
        try:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        except OSError:
            pass
