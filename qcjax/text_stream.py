"""One row's text as tokens arrive (`TextStream`): cut at stop tokens and stop strings, never showing text that can
still change. Used by infer.py's streaming, the server and the evaluation."""
from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """One row's text as tokens arrive: cut at the first stop token or stop string, and only ever hand out text
    that cannot change (held back: a tail that may be the start of a stop string, an incomplete UTF-8 character).

        ts = TextStream(tok.decode, stop_ids, ["\\n\\n"]); print(ts.feed(new_ids), end=""); ...; print(ts.flush())
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = ()):
        self._decode = decode
        self._stop_ids = set(int(i) for i in stop_ids)
        self._stops = [s for s in stop_strings if s]
        self._ids: list[int] = []
        self._shown = 0
        self.text = ""
        self.stopped = False  # a stop token or string was seen: nothing more is taken

    def feed(self, ids: Sequence[int]) -> str:
        """Take new token ids; return the new text that is safe to show."""
        if self.stopped:
            return ""
        for i in ids:
            if int(i) in self._stop_ids:
                self.stopped = True
                break
            self._ids.append(int(i))
        full = self._decode(self._ids)
        hits = [k for k in (full.find(s) for s in self._stops) if k >= 0]
        if hits:
            full, self.stopped = full[: min(hits)], True
        self.text = full
        if self.stopped:
            return self._take(len(full))
        safe = len(full)
        while safe and full[safe - 1] == "\ufffd":  # an incomplete multi-byte character at the end
            safe -= 1
        hold = max((n for s in self._stops for n in range(1, min(len(s) - 1, safe) + 1)
                    if full[safe - n: safe] == s[:n]), default=0)  # a tail that could become a stop string
        return self._take(max(safe - hold, self._shown))

    def flush(self) -> str:
        """At the end: whatever was held back."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        out = self.text[self._shown: upto]
        self._shown = max(self._shown, upto)
        return out
