"""Structured output: a request's tokens must match a JSON schema, any JSON
object, a regular expression or one of a list of strings.

The grammar engine is llguidance (maintained, used by vLLM and llama.cpp):
its matcher follows the committed tokens and says which tokens may come
next as a bitmask over the vocabulary. Speculation stays on and lossless:

- a **draft** is cut at its first token the grammar forbids
  (:meth:`GrammarMatcher.clip`), so everything verified could be accepted;
- the target's logits at every verified position are **masked** by what
  the grammar allows after the drafts before it (:meth:`GrammarMatcher.masks`),
  and rejection sampling runs against that masked distribution, which is
  exactly what constrained target-only decoding samples from (greedy:
  identical tokens);
- the matcher consumes only **committed** tokens (:meth:`GrammarMatcher.commit`):
  drafts are consumed to compute masks and rolled back at once, so a
  rejected draft never moves it, whatever the KV caches do.

When the grammar is complete only the end-of-sequence tokens remain allowed,
so a finished JSON value is followed by EOS and the request stops there.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import llguidance.hf
import torch

GuideKind = Literal["json_schema", "json_object", "regex", "choice"]
GUIDE_KINDS: tuple[GuideKind, ...] = ("json_schema", "json_object", "regex", "choice")


class GrammarError(ValueError):
    """The guide is not a grammar the engine can compile."""


@dataclass(frozen=True)
class Guide:
    """What a request's output must match. ``spec`` is the JSON schema
    (JSON text), the regular expression, or the choices as a JSON list of
    strings; unused for ``json_object``."""

    kind: GuideKind
    spec: str = ""

    def grammar(self) -> str:
        """The llguidance grammar; :class:`GrammarError` naming the problem."""
        if self.kind not in GUIDE_KINDS:
            raise GrammarError(f"guide kind must be one of {GUIDE_KINDS}, got {self.kind!r}")
        if self.kind == "json_object":
            grammar = llguidance.grammar_from("json_schema", '{"type": "object"}')
        elif self.kind == "choice":
            choices = _choices(self.spec)
            grammar = llguidance.grammar_from("choice", json.dumps(choices))
        else:
            grammar = llguidance.grammar_from(self.kind, self.spec)
        problem = llguidance.LLMatcher.validate_grammar(grammar)
        if problem:
            raise GrammarError(f"{self.kind}: {problem.strip()}")
        return grammar

    def check(self) -> None:
        """Raise :class:`GrammarError` unless the guide compiles."""
        self.grammar()


def _choices(spec: str) -> list[str]:
    try:
        choices: Any = json.loads(spec)
    except json.JSONDecodeError as error:
        raise GrammarError(f"choice: not a JSON list of strings ({error})") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("choice: needs a non-empty list of strings")
    return choices


class GrammarCompiler:
    """Matchers for one tokenizer. Building llguidance's view of a large
    vocabulary takes seconds, so it is built once, on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        """``tokenizer``: a Hugging Face fast tokenizer; ``vocab_size``: the
        model's (its logits' width, at least the tokenizer's)."""
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def matcher(self, guide: Guide) -> GrammarMatcher:
        grammar = guide.grammar()
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self.vocab_size
                )
            ll_tokenizer = self._ll_tokenizer
        return GrammarMatcher(llguidance.LLMatcher(ll_tokenizer, grammar), self.vocab_size)


class GrammarMatcher:
    """One request's grammar state, always at its committed tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        if matcher.is_error():
            raise GrammarError(matcher.get_error())

    @property
    def done(self) -> bool:
        """The grammar is complete: only end-of-sequence tokens may follow."""
        return bool(self._matcher.is_stopped())

    def clip(self, token_ids: Sequence[int]) -> int:
        """How many leading ``token_ids`` the grammar allows after the
        committed tokens (a draft is cut there)."""
        allowed = int(self._matcher.try_consume_tokens(list(token_ids)))
        if allowed:
            self._matcher.rollback(allowed)
        return allowed

    def masks(self, draft_ids: Sequence[int]) -> torch.Tensor:
        """``[len(draft_ids) + 1, vocab_size]`` bool: the tokens allowed at
        each verified position, after the committed tokens and the drafts
        before it. The drafts must be allowed (:meth:`clip`)."""
        rows = len(draft_ids) + 1
        # llguidance.torch does this too, but importing it compiles a kernel
        # with torch._dynamo: seconds added to every worker's start-up.
        bitmask = torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for row in range(rows):
            words = bitmask[row]
            self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
            if row < len(draft_ids) and not self._matcher.consume_token(draft_ids[row]):
                raise GrammarError(f"draft token {draft_ids[row]} is not allowed here")
        if draft_ids:
            self._matcher.rollback(len(draft_ids))
        return _unpack(bitmask, self.vocab_size)

    def commit(self, token_ids: Sequence[int]) -> None:
        """Follow the round's committed tokens (each allowed by its mask)."""
        for token_id in token_ids:
            if self._matcher.is_stopped():
                return  # past the end of the grammar only EOS follows; nothing to track
            if not self._matcher.consume_token(token_id):
                raise GrammarError(f"committed token {token_id} is not allowed by the grammar")


def _unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's int32 bitmask ``[rows, ceil(vocab / 32)]`` as bool ``[rows, vocab]``."""
    bits = torch.arange(32, dtype=torch.int32)
    unpacked = (bitmask.unsqueeze(-1) >> bits) & 1  # [rows, words, 32]
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab] with every token ``allowed`` [rows, vocab]
    forbids at -inf."""
    return logits.masked_fill(~allowed, float("-inf"))
