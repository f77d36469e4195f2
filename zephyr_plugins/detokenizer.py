"""Incremental detokenization with exact stop strings.

:class:`TextStream` turns one row's generated token ids into text pieces that
never need to be taken back:

- multi-byte characters split over tokens are held until complete (a trailing
  U+FFFD means "incomplete");
- sentencepiece's leading-space handling is kept by decoding a short window
  of tokens and emitting only what the newest token added (the vLLM/TGI
  "prefix offset" method), so the concatenation of the pieces equals
  ``tokenizer.decode(all_ids, skip_special_tokens=True)``;
- text that could be the start of a stop string is held back until it is
  known not to be one; when a stop string appears, the text is cut right
  before it and the stream finishes.

Example::

    >>> ts = TextStream(tokenizer, stop=("\\n\\n",))
    >>> piece = ts.push(token_id)         # new stable text (maybe "")
    >>> ts.finished, ts.finish_reason     # (True, "stop") once a stop string appeared
    >>> rest = ts.finish("length")        # whatever was held back
"""

from __future__ import annotations

from typing import Optional, Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (stable characters only)
        self.emitted = 0  # characters of ``text`` handed out
        self.finished = False
        self.finish_reason: Optional[str] = None
        self._prefix = 0  # token window [prefix, read) whose text is already in ``text``
        self._read = 0
        self._scanned = 0  # characters of ``text`` already searched for stop strings

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # token-level use (benchmarks): ids only
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final."""
        if self.finished:
            return ""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        text = self.text
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self._scanned - longest + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = max(min(hits), self.emitted)
                self.text = text[:cut]
                self.finished, self.finish_reason = True, "stop"
                return self._take(cut)
            self._scanned = len(text)
            return self._take(len(text) - _held_back(text, self.stop))
        return self._take(len(text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def finish(self, reason: str) -> str:
        """End the stream (EOS, length, cancel); return all text not yet handed out.

        A generation that ends inside a multi-byte character keeps its
        replacement character, exactly as a full decode shows it.
        """
        if self.finished:
            return ""
        full = self._decode(self.ids[self._prefix :])
        before = self._decode(self.ids[self._prefix : self._read])
        self.text += full[len(before) :]
        self._prefix = self._read = len(self.ids)
        piece = self._release()
        if not self.finished:
            piece += self._take(len(self.text))
            self.finished, self.finish_reason = True, reason
        return piece


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold
