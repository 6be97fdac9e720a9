"""One way to name a drafter, everywhere: ``--draft`` on the command line,
an entry of the serve config's ``drafts:``, a draft replica.

=================  ===========  ====================================================
``--draft``        ``kind``     drafter
=================  ===========  ====================================================
``none``           (no spec)    target-only decoding
``ngram``          ``ngram``    prompt lookup (copies from the context; no model)
``NAME``           ``model``    a draft model: a registered name or a local path
``ngram+NAME``     ``hybrid``   lookup where the text is copied, the model elsewhere
``suffix``         ``suffix``   suffix trees over the request and earlier outputs
``suffix+NAME``    ``suffix_hybrid``  suffix trees where they match, the model elsewhere
``head:DIR``       ``head``     a trained head that reads the target's hidden states
``dspark:DIR``     ``dspark``   DSpark's block drafter (DeepSpec's checkpoint format)
``mtp``            ``mtp``      the target checkpoint's own multi-token-prediction block
=================  ===========  ====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from specray.actors.drafting.base import DraftPaths
from specray.actors.drafting.dspark.config import DSparkConfig

NO_DRAFTER = "none"
# Kinds named by their kind alone: they need no model of their own.
MODELLESS = ("ngram", "suffix", "mtp")
# Kinds named ``PREFIX`` + their model (a name, a path or a directory).
PREFIXES = {
    "hybrid": "ngram+",
    "suffix_hybrid": "suffix+",
    "head": "head:",
    "dspark": "dspark:",
}
DRAFTER_KINDS = (*MODELLESS, "model", *PREFIXES)
LOOKUP_KINDS = ("ngram", "hybrid", "suffix", "suffix_hybrid")  # they copy from the context
MODEL_KINDS = ("model", "hybrid", "suffix_hybrid")  # a draft model (name or path)
# Lookup and nothing else: no model, no hidden states, well under a
# millisecond a round (what may run in the router's own process).
PURE_LOOKUP_KINDS = ("ngram", "suffix")
HIDDEN_STATE_KINDS = ("head", "dspark", "mtp")  # fed the target's hidden states


@dataclass(frozen=True)
class DrafterSpec:
    kind: str
    # model, hybrid: the draft model (registered name or path); head, dspark: its directory
    model: str | None = None
    max_ngram: int = 5  # lookup n-gram sizes (ngram, hybrid)
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(f"drafter kind must be one of {DRAFTER_KINDS}, got {self.kind!r}")
        if self.kind in MODELLESS and self.model:
            raise ValueError(f"an `{self.kind}` drafter takes no model")
        if self.kind not in MODELLESS and not self.model:
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
        if text in MODELLESS:
            return cls(text)
        for kind, prefix in PREFIXES.items():
            if text.startswith(prefix):
                model = text.removeprefix(prefix)
                if not model:
                    raise ValueError(f"--draft {prefix}... needs a model or directory after it")
                return cls(kind, model)
        if not text:
            choices = ", ".join(
                [NO_DRAFTER, *MODELLESS, "MODEL", *(p + "X" for p in PREFIXES.values())]
            )
            raise ValueError(f"--draft needs a value: {choices}")
        return cls("model", text)

    @property
    def name(self) -> str:
        """The ``--draft`` text naming this drafter (what model info reports)."""
        if self.kind in MODELLESS:
            return self.kind
        assert self.model is not None
        return PREFIXES.get(self.kind, "") + self.model

    @property
    def paths(self) -> DraftPaths:
        """How this drafter drafts; a DSpark drafter's block size is read
        from its ``config.json`` (the router prices drafts without loading it)."""
        block = 1
        if self.kind == "dspark" and self.model_path is not None:
            block = DSparkConfig.load(self.model_path).block_size
        return DraftPaths(
            model=self.kind not in ("ngram", "suffix"),
            lookup=self.kind in LOOKUP_KINDS,
            block=block,
            reads_prompt=self.kind not in HIDDEN_STATE_KINDS,
        )

    @property
    def model_path(self) -> Path | None:
        return Path(self.model).expanduser() if self.model else None

    def with_model(self, model: str | Path) -> DrafterSpec:
        """This spec with its model resolved (e.g. a name to its local directory)."""
        return replace(self, model=str(model))
