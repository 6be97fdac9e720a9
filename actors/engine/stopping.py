"""Where a request's output ends, one verified round (several tokens) at a time.

One :class:`StopChecker` per request is the single place where output is cut,
and it also produces the text to stream. Each round the engine hands it all
tokens committed that round; it walks them in order and, per token:

1. counts it (it is kept in ``token_ids`` whatever happens next);
2. EOS (unless ``ignore_eos``) or a ``stop_token_ids`` entry finishes with
   ``"stop"``; that token's text is left out, as in vLLM;
3. otherwise asks the :class:`TokenDecoder` (an
   :class:`~specray.actors.engine.detokenizer.IncrementalDetokenizer`) for the
   token's text and looks for a stop string; one finishes with ``"stop"`` and the
   text is cut just before it (the stop string is never in the output);
4. reaching ``max_tokens`` finishes with ``"length"``.

Tokens after the one that finished are dropped. A stop wins over ``"length"``
on the same token. Text that could be the start of a stop string is held back
until it is ruled out, so streamed text never has to be taken back: every stop
string found starts in held-back text. The detokenizer, in turn, holds back
incomplete UTF-8 characters. When the request finishes, all remaining text is
released, so the concatenated deltas are the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from specray.actors.sampling.params import StoppingCriteria

FinishReason = Literal["stop", "length"]


class TokenDecoder(Protocol):
    """Turns output tokens into text, one token at a time."""

    def append(self, token_id: int) -> str:
        """Add one token; return the text that became final."""
        ...

    def flush(self) -> str:
        """Return all text still held back; no more tokens will follow."""
        ...


@dataclass(frozen=True)
class StreamDelta:
    """What one round adds to a request's output."""

    token_ids: list[int]  # this round's tokens to keep, a prefix of the committed ones
    text: str  # new text safe to show; "" without a decoder
    finish_reason: FinishReason | None  # None while the request goes on
    # Why it stopped, as in vLLM: the stop token id or stop string; None for
    # EOS, for "length" and while running.
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """Applies one request's :class:`StoppingCriteria` to its output, round by round."""

    def __init__(self, criteria: StoppingCriteria, decoder: TokenDecoder | None = None) -> None:
        if criteria.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {criteria.max_tokens}")
        if any(not s for s in criteria.stop):
            raise ValueError("stop strings must be non-empty")
        if criteria.stop and decoder is None:
            raise ValueError("stop strings need a decoder to produce text")
        self._max_tokens = criteria.max_tokens
        self._stop_strings = criteria.stop
        self._stop_token_ids = frozenset(criteria.stop_token_ids)
        self._eos_token_ids = frozenset(() if criteria.ignore_eos else criteria.eos_token_ids)
        self._decoder = decoder
        # Text past what has been emitted: at most a possible stop-string prefix
        # between rounds, so searching it costs O(1) in the output length.
        self._pending = ""
        self.num_output_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, new_token_ids: Sequence[int]) -> StreamDelta:
        """Take the tokens committed this round; return what to keep and show."""
        if self.finished:
            raise RuntimeError(f"request already finished ({self.finish_reason})")
        kept: list[int] = []
        emitted: list[str] = []
        for raw_token_id in new_token_ids:
            token_id = int(raw_token_id)
            kept.append(token_id)
            self.num_output_tokens += 1
            if token_id in self._eos_token_ids:
                self._finish("stop", None)
            elif token_id in self._stop_token_ids:
                self._finish("stop", token_id)
            else:
                if self._decoder is not None:
                    emitted.append(self._add_text(self._decoder.append(token_id)))
                if not self.finished and self.num_output_tokens >= self._max_tokens:
                    self._finish("length", None)
            if self.finished:
                break
        if self.finished and not isinstance(self.stop_reason, str):
            emitted.append(self._release_all())
        return StreamDelta(kept, "".join(emitted), self.finish_reason, self.stop_reason)

    def _finish(self, reason: FinishReason, stop_reason: int | str | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def _add_text(self, text: str) -> str:
        """Append new text; return the part that is safe to emit now."""
        self._pending += text
        stop_at, stop_string = self._find_stop(self._pending)
        if stop_string is not None:
            emit = self._pending[:stop_at]
            self._pending = ""
            self._finish("stop", stop_string)
            return emit
        keep = self._possible_stop_prefix(self._pending)
        emit = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return emit

    def _release_all(self) -> str:
        """Emit everything left once no more tokens will come."""
        if self._decoder is None:
            return ""
        # Incomplete trailing bytes can still complete a stop string, however
        # unlikely; _add_text then switches the finish to that stop string.
        emit = self._add_text(self._decoder.flush())
        if not isinstance(self.stop_reason, str):
            emit += self._pending
            self._pending = ""
        return emit

    def _find_stop(self, text: str) -> tuple[int, str | None]:
        """The earliest stop string in ``text``: (start, string) or (-1, None).

        The earliest start cuts the most; it is also the only cut that leaves
        no stop string in the output.
        """
        best_at, best = -1, None
        for stop_string in self._stop_strings:
            at = text.find(stop_string)
            if at >= 0 and (best is None or at < best_at):
                best_at, best = at, stop_string
        return best_at, best

    def _possible_stop_prefix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that a stop string starts with."""
        longest = 0
        for stop_string in self._stop_strings:
            for length in range(min(len(stop_string) - 1, len(text)), longest, -1):
                if text.endswith(stop_string[:length]):
                    longest = length
                    break
        return longest
