"""Exact stop-sequence cutting, for whole answers and for streams.

A stop sequence can span several tokens, so a stream cannot show text that
might be the start of one: :class:`StopCutter` holds back the longest tail that
is a prefix of some stop sequence and releases it once it can no longer match.
Cutting a stream piece by piece gives exactly the text that :func:`cut_at_stop`
gives for the whole answer.

Example::

    >>> cut_at_stop("Hello</s> world", ["</s>"])
    ('Hello', True)
    >>> c = StopCutter(["###"])
    >>> c.feed("a #"), c.feed("# b"), c.feed("#"), c.feed("## c")
    ('a ', '## b', '', '')
    >>> c.stopped
    True
"""

from __future__ import annotations

from typing import Iterable, Sequence


def clean_stops(stops: Iterable[str] | None) -> tuple[str, ...]:
    """De-duplicated stop sequences, in order; rejects empty strings and non-strings."""
    out: list[str] = []
    for i, s in enumerate(stops or ()):
        if not isinstance(s, str):
            raise ValueError(f"stop[{i}]={s!r} must be a string")
        if not s:
            raise ValueError(f"stop[{i}] is an empty string; stop sequences must be non-empty")
        if s not in out:
            out.append(s)
    return tuple(out)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut right before its earliest stop sequence, and whether one was found."""
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


class StopCutter:
    """Streams text through, cutting before the earliest stop sequence.

    ``feed(piece)`` returns the text that is now safe to show; after a stop
    sequence is seen, ``stopped`` is True and later pieces are dropped.
    ``flush()`` returns the held-back tail at the end of the stream.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + piece
        cut, found = cut_at_stop(buf, self.stops)
        if found:
            self.stopped = True
            self._held = ""
            return cut
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _partial_tail(self, buf: str) -> int:
        # The longest suffix of buf that is a proper prefix of a stop sequence:
        # any match that starts in the released text would have been found whole.
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
