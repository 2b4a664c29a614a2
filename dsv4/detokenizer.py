"""IncrementalDetokenizer: token ids -> text deltas for one completion, with stop strings.

Decodes only a short tail of tokens per step (vLLM's prefix / read offsets): the text of
tokens [prefix, read) is already known, so decoding [prefix, end) and dropping that known text
gives the new text, and the work per token stays constant. It holds back (a) an unfinished UTF-8
sequence (a trailing U+FFFD) and (b) a tail that could still grow into a stop string, so a
streamed delta never has to be taken back. When a stop string appears the text is cut before it
(or after it with include_stop_str_in_output) and `stopped` names it. Stop strings are looked
for only once the output is longer than min_tokens, and only where they end in new text.
"""

from __future__ import annotations

from dsv4.sampling_params import SamplingParams
from dsv4.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.token_ids: list[int] = []
        self.decoded = ""  # all text decoded so far (some of it may be held back)
        self.text = ""  # text emitted so far
        self.stopped: str | None = None  # the stop string that ended the output
        self._prefix = self._read = 0  # token offsets: [prefix, read) is decoded context

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def add(self, new_token_ids: list[int], final: bool = False) -> str:
        """Feed tokens; returns the new text that is safe to emit."""
        self.token_ids.extend(new_token_ids)
        if self.stopped is not None:
            return ""
        known = self._decode(self.token_ids[self._prefix:self._read])
        tail = self._decode(self.token_ids[self._prefix:])
        if (final or not tail.endswith("\ufffd")) and len(tail) >= len(known):
            self.decoded += tail[len(known):]
            self._prefix, self._read = self._read, len(self.token_ids)
        full = self.decoded
        cut = len(full)
        # stop strings count from the token after min_tokens on, in text not yet emitted
        stops = self.params.stop if len(self.token_ids) > self.params.min_tokens else ()
        for stop in stops:
            at = full.find(stop, max(0, len(self.text) - len(stop) + 1))
            if at != -1:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                if end <= cut:
                    cut, self.stopped = end, stop
        if self.stopped is None and not final:
            cut -= self._held_back(full)
        delta = full[len(self.text):cut] if cut > len(self.text) else ""
        self.text += delta
        return delta

    def _held_back(self, full: str) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of a stop string."""
        hold = 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return hold
