"""A request's output text as its tokens arrive: deltas safe to stream, and the cut at the first stop string.

Decoding is incremental, with constant work per new token (vLLM's prefix / read offsets): each update decodes only a
short window, the tokens of the previous update that produced text (the prefix, for context: a tokenizer may merge
bytes across tokens, strip a leading space, and so on) plus the new ones, and keeps what the window adds beyond the
prefix's own text. Text whose last character is unfinished (a trailing replacement character: a UTF-8 sequence split
across tokens) is not committed until a later token completes it, so the text is the same as a full decode.

A delta holds back a trailing replacement character and any suffix that could still grow into a stop string, so
streamed text is never taken back.
"""

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """decode(tokens) for a growing token list, decoding only a bounded window per update."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.num_tokens = 0  # tokens fed so far
        self._committed = ""  # text of every fed token before `_pending_ids`; never changes once here
        self._prefix_ids: list[int] = []  # the last committed tokens that produced text: context for the next decode
        self._prefix_text = ""  # decode(_prefix_ids) on its own
        self._pending_ids: list[int] = []  # fed tokens whose text is not committed yet (it ends unfinished)
        self._tail = ""  # their text so far, in context

    @property
    def text(self) -> str:
        """decode(every token fed): the committed text and the pending tail (which may end unfinished)."""
        return self._committed + self._tail

    def feed(self, new_token_ids: Sequence[int]) -> None:
        if not new_token_ids:
            return
        self.num_tokens += len(new_token_ids)
        self._pending_ids += new_token_ids
        window_text = self.decode(self._prefix_ids + self._pending_ids)
        if window_text == self._prefix_text:
            # Why drop them: they add no text here (special tokens a decode skips); keeping them would let a run of
            # them (EOS after EOS under ignore_eos) grow the window without bound.
            self._pending_ids, self._tail = [], ""
            return
        self._tail = window_text[len(self._prefix_text):]
        if window_text.endswith(REPLACEMENT_CHAR):
            return  # maybe an unfinished character: a later token may complete it, so nothing is committed yet
        self._committed += self._tail
        self._prefix_ids, self._pending_ids, self._tail = self._pending_ids, [], ""
        self._prefix_text = self.decode(self._prefix_ids)


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = (), include_stop: bool = False,
                 min_tokens: int = 0) -> None:
        self.decoder = IncrementalDecoder(decode)
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop  # a stop string found stays at the end of the text
        self.min_tokens = min_tokens  # a stop string counts only where it ends in text of later tokens
        self.text = ""  # the whole output text so far (cut at a stop string once one is found)
        self.num_emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found; no more text
        self._stop_floor = 0  # a stop string must end past this many characters (the text of the first min_tokens)

    def update(self, output_token_ids: Sequence[int], num_tokens: int | None = None) -> bool:
        """Take the output so far, the first `num_tokens` of it (default: all; the engine leaves out a stop token whose
        text is not wanted), reading only the tokens not seen before. True when the text now contains a stop string
        (the text is cut before it, or after it with include_stop)."""
        if self.stopped:
            return True
        num_tokens = len(output_token_ids) if num_tokens is None else num_tokens
        assert num_tokens >= self.decoder.num_tokens, "the output only grows"
        self.decoder.feed(output_token_ids[self.decoder.num_tokens:num_tokens])
        text = self.decoder.text
        if num_tokens <= self.min_tokens:  # why <=: as vLLM, stop strings count in the text of later tokens only
            self._stop_floor = len(text)
            self.text = text
            return False
        cut = None
        for stop in self.stop:
            # Why search only near the new text: a stop string wholly inside the emitted part would have been found.
            index = text.find(stop, max(max(self.num_emitted, self._stop_floor) - len(stop) + 1, 0))
            if index != -1 and (cut is None or index < cut[0]):
                cut = (index, index + len(stop) if self.include_stop else index)
        if cut is not None:
            self.text, self.stopped = text[:cut[1]], True
        else:
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
