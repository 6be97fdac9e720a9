"""The budget-beside-fixed-k report over hand-made result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specray.bench.budget_vs_fixed import main

MACHINE = {"cpu": "test CPU", "cpu_flags": ["avx2"], "cpu_count": 2, "torch": "2.13.0"}


def _result(fixed: bool, k: int, tpot: float, out: float, base_out: float) -> dict[str, Any]:
    def arm(tpot_ms: float, out_tok_s: float) -> dict[str, Any]:
        return {"tpot_ms": {"mean": tpot_ms}, "output_tokens_per_s": out_tok_s}

    modes = {"spec": arm(tpot, out), "no_spec": arm(80.0, base_out)}
    rows = [{"category": "code_edit", "spec_tokens_per_s": out / 4}]
    run = {"concurrency": 4, "modes": modes, "categories": rows}
    return {
        "model": {"drafts": ["suffix"]},
        "settings": {"fixed_speculation": fixed, "gamma": k},
        "machine": MACHINE,
        "runs": [run],
    }


def test_the_budget_is_set_beside_the_best_fixed_k(tmp_path: Path) -> None:
    results = [
        _result(False, 16, 40.0, 90.0, 50.0),
        _result(False, 16, 44.0, 80.0, 50.0),  # two adaptive runs: their mean
        _result(True, 16, 38.0, 100.0, 52.0),
        _result(True, 8, 50.0, 70.0, 48.0),
    ]
    paths = []
    for i, result in enumerate(results):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(result))
    out = tmp_path / "report.md"
    assert main(["--out", str(out), *map(str, paths)]) == 0
    text = out.read_text()
    assert "| suffix | 4 | adaptive | 2 | 42.0 | 85.00 | 80.0 | 50.00 |" in text
    # best fixed k = 16 by out tok/s: 85 / 100, TPOT 38 / 42, and 85 / 50 over target-only
    assert "| suffix | 4 | fixed k = 16 | 0.85 | 0.90 | 1.70 |" in text
    assert "| suffix | 4 | code_edit | fixed k = 16 | 0.85 |" in text  # 21.25 / 25
    assert "test CPU (avx2), 2 cores" in text
