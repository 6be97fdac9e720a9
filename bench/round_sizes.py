"""Speculative rounds by the tokens their target verified, beside a
target-only round: what the verify cost model priced them at, what they
waited, and the most such rounds could ever gain.

A round of ``v`` verified tokens that waited ``w`` ms commits at most ``v``
tokens; a target-only decode round of ``plain`` tokens in ``plain ms``
commits ``plain``. The round pays for its time when it commits
``break-even = plain × w ÷ plain ms`` tokens, so ``v ÷ break-even`` bounds
what speculation gains with rounds of that size even if every drafted
token were accepted. Shared by the router bench (``router_phases``) and the
served one (``specray bench serve``, from Admin diagnostics).
"""

from __future__ import annotations

from typing import Any

from specray.bench.common import cell

# Each size: rounds, mean price and mean wait (ms).
Sizes = dict[str, dict[str, float]]

HEADERS = ["verified", "rounds", "priced", "verify wait", "plain", "break-even"]
HEADERS += ["verified ÷ break-even"]

TEXT = (
    "Speculative rounds by the tokens their target verified (ms): what the budget "
    "priced them at, what they took, the target-only decode round of the same level "
    "(tokens in ms), and the tokens a round must commit to pay for its time beside it "
    "(break-even). A round commits at most the tokens it verifies, so verified ÷ "
    "break-even bounds what speculation gains with such rounds, were every drafted "
    "token accepted. Rounds smaller than the plain one (a level's last requests) "
    "are left out."
)


def sizes_ms(by_verified: dict[str, dict[str, Any]]) -> Sizes:
    """Per size, mean price and wait in ms, from the router's summed seconds
    (``RoundTimings.by_verified`` as JSON)."""
    return {
        str(tokens): {
            "rounds": size["rounds"],
            "priced_ms": 1e3 * size["priced_s"] / size["rounds"],
            "wait_ms": 1e3 * size["wait_s"] / size["rounds"],
        }
        for tokens, size in sorted(by_verified.items(), key=lambda kv: int(kv[0]))
        if size["rounds"]
    }


def plain_round(sizes: Sizes) -> tuple[int, float] | None:
    """A target-only arm's decode round: its most frequent verified size
    (the prompts' prefill rounds are the rest) and that size's wait in ms."""
    if not sizes:
        return None
    size = max(sizes, key=lambda s: sizes[s]["rounds"])
    return int(size), sizes[size]["wait_ms"]


def size_rows(spec: Sizes, plain: tuple[int, float]) -> list[list[Any]]:
    """One row per size of ``spec`` at least the plain round's, as :data:`HEADERS`."""
    plain_tokens, plain_ms = plain
    rows = []
    for size, entry in sorted(spec.items(), key=lambda kv: int(kv[0])):
        if int(size) < plain_tokens:
            continue
        even = plain_tokens * entry["wait_ms"] / plain_ms
        rows.append(
            [
                size,
                int(entry["rounds"]),
                cell(entry["priced_ms"], 1),
                cell(entry["wait_ms"], 1),
                f"{plain_tokens} in {cell(plain_ms, 1)}",
                cell(even),
                cell(int(size) / even),
            ]
        )
    return rows
