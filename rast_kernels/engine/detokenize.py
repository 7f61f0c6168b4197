"""Incremental detokenization and stop-string matching on the host.

:class:`IncrementalText` keeps a sequence's decoded text up to date token by token without decoding the whole
sequence at every poll: it decodes only a window from a few tokens back (``decode(ids[prefix:])`` against
``decode(ids[prefix:read])``, so tokenizers whose pieces depend on their left neighbour, such as SentencePiece's
leading spaces or byte-level multi-byte characters, come out as in a full decode) and holds back an incomplete
character (a trailing U+FFFD). Stop strings are searched only in the new text plus a tail as long as the longest
stop string minus one. The final text of a sequence is still one full decode (:func:`final_text`), so what
:class:`~.outputs.GenerationOutput` holds never depends on the polling.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

Decode = Callable[[List[int]], str]


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> Tuple[int, Optional[str]]:
    """(index of the earliest stop-string occurrence in ``text[start:]`` (absolute) or -1, that stop string)."""
    best, which = -1, None
    for s in stops:
        j = text.find(s, start)
        if j >= 0 and (best < 0 or j < best):
            best, which = j, s
    return best, which


def stop_prefix(decode: Decode, toks: List[int], stops: Sequence[str]):
    """The fewest leading tokens whose decoded text contains a stop string, and that string; ``(None, None)`` if
    the full text has none. Binary search: containing a stop string is monotone in the prefix."""
    if not toks or find_stop(decode(toks), stops)[0] < 0:
        return None, None
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if find_stop(decode(toks[:mid]), stops)[0] >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo, find_stop(decode(toks[:lo]), stops)[1]


def final_text(decode: Decode, toks: List[int], stops: Sequence[str]):
    """``(text, kept tokens, stop string or None)``: the full decode of ``toks``, cut just before the first stop
    string when one occurs (the tokens then run up to and including the one that completed it)."""
    if stops:
        k, s = stop_prefix(decode, toks, stops)
        if k is not None:
            full = decode(toks[:k])
            return full[:find_stop(full, stops)[0]], toks[:k], s
    return decode(toks), toks, None


class IncrementalText:
    """A sequence's text, extended as tokens arrive (module docstring)."""

    __slots__ = ("decode", "stops", "hold", "ids", "text", "_prefix", "_read", "stop_at")

    def __init__(self, decode: Decode, stops: Sequence[str]):
        self.decode = decode
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # a tail that could still start a stop
        self.ids: List[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] is the window already turned into text
        self._read = 0
        self.stop_at = -1  # index in `text` of the first stop string, once seen

    def extend(self, new_ids: List[int]) -> bool:
        """Append tokens; returns True when a stop string has appeared (:attr:`stop_at` is then set)."""
        if not new_ids:
            return self.stop_at >= 0
        self.ids.extend(new_ids)
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stops and self.stop_at < 0:
                self.stop_at = find_stop(self.text, self.stops, max(0, old_len - self.hold))[0]
        return self.stop_at >= 0

    def stable(self) -> str:
        """The part of the text that can no longer change: before a stop string, or without the tail that could
        still start one."""
        if self.stop_at >= 0:
            return self.text[:self.stop_at]
        return self.text[:len(self.text) - self.hold] if self.hold else self.text
