"""Incremental detokenization: the text of a growing list of token ids, one token's worth of decoding at a time.

Decoding the whole output again for every new token costs O(n) per token, O(n^2) per request. ``TextStream``
decodes a window instead, as text-generation-inference and vLLM do: the tokens turned into text by the previous
step (``prefix``) and the new ones after them; the text the new tokens add is what the window's decoding has beyond
the prefix's. A window that ends inside a character (a byte-level token that is half of a UTF-8 sequence decodes
to U+FFFD) adds nothing until the character is complete. Tokenizers that decode a token differently by what
comes before it (SentencePiece's leading space) get the same text as a whole decode, because the window always
starts at an earlier token and only the difference is taken. Tested against the whole decode, token by token,
for byte-level BPE and SentencePiece tokenizers.
"""

from __future__ import annotations


class TextStream:
    """The text of one request's generated tokens (``skip_special_tokens``), grown by ``add``."""

    def __init__(self) -> None:
        self.text = ""
        self._prefix = 0  # window start: ids[_prefix:_read] are decoded in the text already
        self._read = 0

    def add(self, tokenizer, ids: list[int]) -> str:
        """The text of all of ``ids`` (the previous call's ids plus new ones at the end)."""
        prefix_text = tokenizer.decode(ids[self._prefix : self._read], skip_special_tokens=True)
        window_text = tokenizer.decode(ids[self._prefix :], skip_special_tokens=True)
        if len(window_text) > len(prefix_text) and not window_text.endswith("\ufffd"):
            self.text += window_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(ids)
        return self.text + self.pending(window_text, prefix_text)

    @staticmethod
    def pending(window_text: str, prefix_text: str) -> str:
        """What a window that ends inside a character shows beyond the prefix (its U+FFFD included): part of
        the text now, replaced once the character completes (the caller holds U+FFFD back from streams)."""
        return window_text[len(prefix_text) :] if window_text.endswith("\ufffd") else ""


def first_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the first of ``stops`` begins in ``text`` at or after ``start`` (None: none does)."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not safe to send yet: an incomplete UTF-8 character, or the start of
    a stop string that the next tokens may complete."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold
