"""What ``specray generate`` and ``specray client generate`` print at the
end of a generation: one JSON object with ``--json`` (the same shape from
both, so scripts can switch between them), else a summary line on stderr
after the streamed text."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def print_result(
    token_ids: Sequence[int],
    text: str,
    finish_reason: str | None,
    seed: int | None,
    prompt_tokens: int,
    stats: dict[str, Any],
    as_json: bool,
) -> None:
    if as_json:
        result = {
            "token_ids": list(token_ids),
            "text": text,
            "finish_reason": finish_reason,
            "seed": seed,
            "prompt_tokens": prompt_tokens,
            "stats": stats,
        }
        print(json.dumps(result))
        return
    print()
    print(
        f"[{len(token_ids)} tokens, {stats['tokens_per_s']} tok/s, "
        f"τ={stats['mean_acceptance_length']}, finish={finish_reason}]",
        file=sys.stderr,
    )
