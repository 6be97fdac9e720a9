"""The shipped speculative-decoding prompt set, in SpecBench's categories.

One JSONL file per category under ``bench/prompts/``; each line holds ``id``,
``category``, ``split`` and ``prompt`` (the user message; callers apply the
tokenizer's chat template). ``split`` is ``train`` or ``eval`` so that a
drafter trained on one half can be measured on the other.

**Sessions.** The ``agentic`` category holds multi-turn sessions of an agent
at work (edit, run, read the error, edit again): each line also has
``session`` and ``turn`` (1, 2, ...), every turn is a self-contained user
message, and later turns quote code, logs and tool output that earlier turns
asked the model to write, so a drafter that remembers earlier outputs can copy
them. A session is in one split, and its turns must be sent in order, one
after the other (:func:`sessions`). It is listed in :data:`SESSION_CATEGORIES`,
not in :data:`CATEGORIES`, so runs over the default categories stay as they
were.

**Verbatim edits.** The ``verbatim_edit`` category (:data:`EDIT_CATEGORIES`,
also outside the defaults) asks for a small change to a block of code, JSON
or SQL (rename a name, change a value, fix one line) and for the complete
result and nothing else, so most of the answer repeats the prompt: the case
drafting from the prompt is built for, and the one the serving goal of
``docs/benchmarks.md`` is stated on. Its ``eval`` half does not share a
source text with its ``train`` half.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).parent / "prompts"
CATEGORIES = ("code_edit", "summarization", "chat", "math", "translation")
SESSION_CATEGORIES = ("agentic",)
EDIT_CATEGORIES = ("verbatim_edit",)
ALL_CATEGORIES = CATEGORIES + SESSION_CATEGORIES + EDIT_CATEGORIES
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    split: str
    prompt: str
    session: str | None = None  # the session this turn belongs to (session categories)
    turn: int | None = None  # 1-based position in its session


def load_prompts(
    categories: Iterable[str] | None = None,
    split: str | None = None,
    directory: Path = PROMPT_DIR,
) -> list[Prompt]:
    """Prompts in category order (as ``categories`` lists them, else
    :data:`CATEGORIES`), file order within one (a session's turns in order);
    ``split=None`` keeps both."""
    wanted = tuple(categories) if categories is not None else CATEGORIES
    unknown = [c for c in wanted if c not in ALL_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {', '.join(ALL_CATEGORIES)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    prompts = []
    for category in wanted:
        path = directory / f"{category}.jsonl"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            prompt = Prompt(
                record["id"],
                record["category"],
                record["split"],
                record["prompt"],
                record.get("session"),
                record.get("turn"),
            )
            if prompt.category != category or prompt.split not in SPLITS:
                raise ValueError(f"{path}:{number}: bad category or split in {record['id']!r}")
            if (prompt.session is not None) != (category in SESSION_CATEGORIES):
                raise ValueError(f"{path}:{number}: session fields belong to session categories")
            if split is None or prompt.split == split:
                prompts.append(prompt)
    for session in sessions(prompts):
        turns = [p.turn for p in session]
        if turns != list(range(1, len(turns) + 1)) or len({p.split for p in session}) != 1:
            raise ValueError(f"session {session[0].session!r}: turns {turns} out of order or split")
    return prompts


def sessions(prompts: Iterable[Prompt]) -> list[list[Prompt]]:
    """The session prompts among ``prompts`` grouped by session, in first-seen
    order, each in the order given (file order: turn order)."""
    grouped: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        if prompt.session is not None:
            grouped.setdefault(prompt.session, []).append(prompt)
    return list(grouped.values())
