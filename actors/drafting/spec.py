"""One way to name a drafter, everywhere: ``--draft`` on the command line,
an entry of the serve config's ``drafts:``, a draft replica.

=================  ===========  ====================================================
``--draft``        ``kind``     drafter
=================  ===========  ====================================================
``none``           (no spec)    target-only decoding
``ngram``          ``ngram``    prompt lookup (copies from the context; no model)
``NAME``           ``model``    a draft model: a registered name or a local path
``ngram+NAME``     ``hybrid``   lookup where the text is copied, the model elsewhere
``head:DIR``       ``head``     a trained head that reads the target's hidden states
=================  ===========  ====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from specray.actors.drafting.base import DraftPaths

DRAFTER_KINDS = ("ngram", "model", "hybrid", "head")
NO_DRAFTER = "none"
HYBRID_PREFIX = "ngram+"
HEAD_PREFIX = "head:"


@dataclass(frozen=True)
class DrafterSpec:
    kind: str
    # model, hybrid: the draft model (registered name or path); head: its directory
    model: str | None = None
    max_ngram: int = 5  # lookup n-gram sizes (ngram, hybrid)
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(f"drafter kind must be one of {DRAFTER_KINDS}, got {self.kind!r}")
        if self.kind == "ngram" and self.model:
            raise ValueError("an `ngram` drafter takes no model")
        if self.kind != "ngram" and not self.model:
            raise ValueError(f"a `{self.kind}` drafter needs `model` (a name or a path)")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}"
            )

    @classmethod
    def parse(cls, text: str) -> DrafterSpec | None:
        """The drafter ``--draft`` names; None for ``none`` (target-only)."""
        if text == NO_DRAFTER:
            return None
        if text == "ngram":
            return cls("ngram")
        if text.startswith(HYBRID_PREFIX):
            return cls("hybrid", text.removeprefix(HYBRID_PREFIX))
        if text.startswith(HEAD_PREFIX):
            directory = text.removeprefix(HEAD_PREFIX)
            if not directory:
                raise ValueError("--draft head:DIR needs a directory after 'head:'")
            return cls("head", directory)
        if not text:
            raise ValueError("--draft needs a value: none, ngram, a model, ngram+MODEL or head:DIR")
        return cls("model", text)

    @property
    def name(self) -> str:
        """The ``--draft`` text naming this drafter (what model info reports)."""
        if self.kind == "ngram":
            return "ngram"
        assert self.model is not None
        prefix = {"hybrid": HYBRID_PREFIX, "head": HEAD_PREFIX}.get(self.kind, "")
        return prefix + self.model

    @property
    def paths(self) -> DraftPaths:
        return DraftPaths(model=self.kind != "ngram", lookup=self.kind in ("ngram", "hybrid"))

    @property
    def model_path(self) -> Path | None:
        return Path(self.model).expanduser() if self.model else None

    def with_model(self, model: str | Path) -> DrafterSpec:
        """This spec with its model resolved (e.g. a name to its local directory)."""
        return replace(self, model=str(model))
