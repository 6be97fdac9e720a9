"""Incremental detokenization for streaming, safe across split UTF-8 characters.

Decoding each token on its own breaks byte-level BPE: one character can span
several tokens, and SentencePiece-style tokenizers drop a leading space when a
token is decoded at the start of a string. So, like vLLM and TGI, each step
decodes a short window ``ids[prefix_offset:]`` and emits only what it adds to
the text of ``ids[prefix_offset:read_offset]``. While the window's text ends in
U+FFFD the character is still incomplete; nothing is emitted and the window
grows until it completes. The window then slides forward, so a step costs
``O(1)`` in the length of the output.

This class only turns tokens into text. Stop strings (and holding back text
that could start one) are :class:`specray.actors.engine.stopping.StopChecker`'s
job, which reads text from here one token at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens in the first window: enough context for the tokenizer to decide
# whether the first output token starts with a space.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas that never end mid-character."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The decode window: tokens already emitted (context for the next
        # delta), then from ``_read_offset`` on the tokens not yet emitted.
        # It starts with the tail of the prompt and slides past each delta.
        self._window: list[int] = [int(t) for t in prompt_ids[-_PROMPT_CONTEXT:]]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        self.num_output_tokens = 0

    def append(self, token_id: int) -> str:
        """Add one output token; return the text it completes (often "")."""
        self._window.append(int(token_id))
        self.num_output_tokens += 1
        window_text = self._decode(self._window)
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_REPLACEMENT):
            return ""
        return self._slide(window_text)

    def extend(self, token_ids: Sequence[int]) -> str:
        """Add several output tokens; return the text they complete."""
        return "".join(self.append(t) for t in token_ids)

    def flush(self) -> str:
        """Return the text still held back, for when no more tokens will come.

        Held-back text ends in an incomplete character, so it decodes with
        U+FFFD: the same text a full ``decode`` of the output gives.
        """
        return self._slide(self._decode(self._window))

    def _slide(self, window_text: str) -> str:
        delta = window_text[len(self._prefix_text) :]
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        text = self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
        if not isinstance(text, str):
            raise TypeError(f"tokenizer.decode returned {type(text).__name__}, expected str")
        return text
