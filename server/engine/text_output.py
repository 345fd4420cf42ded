"""A request's output text as its tokens arrive: deltas safe to stream, and the cut at the first stop string.

Text is decoded from all output tokens each time (a tokenizer may merge bytes across tokens, so decoding tokens one by
one would be wrong); a delta holds back a trailing replacement character (an unfinished UTF-8 sequence) and any
suffix that could still grow into a stop string, so streamed text is never taken back.
"""

from collections.abc import Callable

REPLACEMENT_CHAR = "\ufffd"


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # the whole output text so far (cut at a stop string once one is found)
        self.num_emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found; no more text

    def update(self, output_token_ids: list[int]) -> bool:
        """Decode the output so far; True when it now contains a stop string (the text is cut before it)."""
        if self.stopped:
            return True
        text = self.decode(output_token_ids)
        for stop in self.stop:
            # Why search only near the new text: a stop string wholly inside the emitted part would have been found.
            index = text.find(stop, max(self.num_emitted - len(stop) + 1, 0))
            if index != -1 and (not self.stopped or index < len(self.text)):
                self.text, self.stopped = text[:index], True
        if not self.stopped:
            self.text = text
        return self.stopped

    def take_delta(self, final: bool) -> str:
        """New text that can be streamed now; everything left when `final`."""
        end = len(self.text) if final or self.stopped else self._safe_end()
        delta = self.text[self.num_emitted:end]
        self.num_emitted = max(self.num_emitted, end)
        return delta

    def _safe_end(self) -> int:
        end = len(self.text)
        if self.text.endswith(REPLACEMENT_CHAR):
            end -= 1
        held = 0  # the longest suffix of text[:end] that is a proper prefix of some stop string
        for stop in self.stop:
            for length in range(min(len(stop) - 1, end), held, -1):
                if self.text.endswith(stop[:length], 0, end):
                    held = length
                    break
        return max(end - held, self.num_emitted)
