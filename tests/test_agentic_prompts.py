"""The agentic / multi-turn prompt category: sessions whose later turns quote earlier outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specray.bench.prompts import (
    ALL_CATEGORIES,
    CATEGORIES,
    EDIT_CATEGORIES,
    PROMPT_DIR,
    SESSION_CATEGORIES,
    SPLITS,
    load_prompts,
    sessions,
)


def test_sessions_are_complete_ordered_and_in_one_split() -> None:
    prompts = load_prompts(["agentic"])
    grouped = sessions(prompts)
    assert 6 <= len(grouped) <= 10
    assert sum(map(len, grouped)) == len(prompts)
    assert {s[0].split for s in grouped} == set(SPLITS)
    for session in grouped:
        assert 3 <= len(session) <= 6
        assert [p.turn for p in session] == list(range(1, len(session) + 1))
        assert all(p.category == "agentic" and p.prompt.strip() for p in session)
        assert [p.id for p in session] == [f"{session[0].session}-t{p.turn}" for p in session]


def test_later_turns_share_text_with_the_session() -> None:
    # A later turn quotes the file, query or table the session works on, as
    # another turn shows it (the model's earlier output, re-quoted).
    for session in sessions(load_prompts(["agentic"])):
        lines = [
            {line.strip() for line in p.prompt.splitlines() if len(line.strip()) > 8}
            for p in session
        ]
        for turn in range(1, len(session)):
            shared = max(len(lines[turn] & other) for i, other in enumerate(lines) if i != turn)
            assert shared >= 3, session[turn].id


def test_the_default_categories_are_unchanged() -> None:
    assert ALL_CATEGORIES == CATEGORIES + SESSION_CATEGORIES + EDIT_CATEGORIES
    assert {p.category for p in load_prompts()} == set(CATEGORIES)
    assert all(p.session is None and p.turn is None for p in load_prompts())
    evals = load_prompts(["chat", "agentic"], split="eval")
    assert list(dict.fromkeys(p.category for p in evals)) == ["chat", "agentic"]
    assert all(p.split == "eval" for p in evals)
    assert sessions(load_prompts(["chat"])) == []


def test_session_fields_are_validated(tmp_path: Path) -> None:
    lines = [
        json.loads(line)
        for line in (PROMPT_DIR / "agentic.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    lines[0], lines[1] = lines[1], lines[0]  # turn 2 before turn 1
    (tmp_path / "agentic.jsonl").write_text("\n".join(map(json.dumps, lines)), encoding="utf-8")
    with pytest.raises(ValueError):
        load_prompts(["agentic"], directory=tmp_path)
    chat = json.loads((PROMPT_DIR / "chat.jsonl").read_text(encoding="utf-8").splitlines()[0])
    (tmp_path / "chat.jsonl").write_text(json.dumps({**chat, "session": "x", "turn": 1}))
    with pytest.raises(ValueError):
        load_prompts(["chat"], directory=tmp_path)
