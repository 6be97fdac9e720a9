"""The verbatim-edit prompt category: small edits whose answer repeats the prompt."""

from __future__ import annotations

from specray.bench.prompts import EDIT_CATEGORIES, load_prompts


def _body(prompt: str) -> list[str]:
    """The fenced block a prompt asks to edit, as lines."""
    fence = prompt.index("```")
    start = prompt.index("\n", fence) + 1
    return prompt[start : prompt.rindex("```")].strip("\n").splitlines()


def test_every_split_edits_long_blocks_and_asks_for_all_of_them_back() -> None:
    prompts = load_prompts(EDIT_CATEGORIES)
    assert {p.split for p in prompts} == {"train", "eval"}
    assert len(load_prompts(EDIT_CATEGORIES, split="eval")) >= 4
    for prompt in prompts:
        assert "Change nothing else" in prompt.prompt, prompt.id
        assert "Return the complete" in prompt.prompt, prompt.id
        assert len(_body(prompt.prompt)) >= 30, prompt.id


def test_held_out_edits_share_no_source_with_the_training_half() -> None:
    def blocks(split: str) -> list[set[str]]:
        return [
            {line.strip() for line in _body(p.prompt) if len(line.strip()) > 3}
            for p in load_prompts(EDIT_CATEGORIES, split=split)
        ]

    for held_out in blocks("eval"):
        for seen in blocks("train"):
            assert len(held_out & seen) <= 2  # an import line or a decorator, not a text
