"""The shipped speculative-decoding prompt set, in SpecBench's categories.

One JSONL file per category under ``bench/prompts/``; each line holds ``id``,
``category``, ``split`` and ``prompt`` (the user message; callers apply the
tokenizer's chat template). ``split`` is ``train`` or ``eval`` so that a
drafter trained on one half can be measured on the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).parent / "prompts"
CATEGORIES = ("code_edit", "summarization", "chat", "math", "translation")
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    split: str
    prompt: str


def load_prompts(
    categories: Iterable[str] | None = None,
    split: str | None = None,
    directory: Path = PROMPT_DIR,
) -> list[Prompt]:
    """Prompts in category order (as ``categories`` lists them, else
    :data:`CATEGORIES`), file order within one; ``split=None`` keeps both."""
    wanted = tuple(categories) if categories is not None else CATEGORIES
    unknown = [c for c in wanted if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    prompts = []
    for category in wanted:
        path = directory / f"{category}.jsonl"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            prompt = Prompt(record["id"], record["category"], record["split"], record["prompt"])
            if prompt.category != category or prompt.split not in SPLITS:
                raise ValueError(f"{path}:{number}: bad category or split in {record['id']!r}")
            if split is None or prompt.split == split:
                prompts.append(prompt)
    return prompts
