"""Turning a stream of token bytes into text pieces: UTF-8 assembly and stop strings.

A token is a byte string that may end in the middle of a multi-byte UTF-8 character (emoji, CJK), so pieces
are assembled with an incremental decoder and a character is released only once it is complete. Stop strings
can span tokens, so text that might be the beginning of a stop string is held back until it is decided.
"""
from __future__ import annotations

import codecs
from typing import Iterable, Sequence


class TextAssembler:
    """Feed token bytes, get printable text; stops at the first stop string.

    >>> t = TextAssembler(stop=["\\nUser:"])
    >>> t.push(b"Hello"), t.push(b"\\nUs"), t.push(b"er: hi")
    ('Hello', '', '')
    >>> t.stopped, t.flush()
    (True, '')
    """

    def __init__(self, stop: Sequence[str] | None = None) -> None:
        stops = [s for s in (stop or []) if s]
        if stop is not None and not all(isinstance(s, str) for s in stop):
            raise TypeError("stop must be a list of strings")
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text not yet released (may start a stop string)
        self.stopped = False
        self.stop_string: str | None = None
        self.text = ""  # everything released so far

    def push(self, data: bytes) -> str:
        """Adds one token's bytes; returns the text that is now safe to show (possibly empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def flush(self) -> str:
        """Ends the stream: returns held-back text (an incomplete final character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = None
        for s in self._stops:
            i = self._pending.find(s)
            if i >= 0 and (cut is None or i < cut):
                cut, self.stop_string = i, s
        if cut is not None:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final or not self._stops:
            out, self._pending = self._pending, ""
        else:
            # Keep the longest tail that is a prefix of some stop string.
            keep = 0
            for n in range(min(self._hold, len(self._pending)), 0, -1):
                tail = self._pending[-n:]
                if any(s.startswith(tail) for s in self._stops):
                    keep = n
                    break
            out = self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep :]
        self.text += out
        return out


def decode_all(pieces: Iterable[bytes]) -> str:
    """Decodes a whole token sequence's bytes at once (invalid bytes become U+FFFD)."""
    return b"".join(pieces).decode("utf-8", errors="replace")


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two strings or token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
