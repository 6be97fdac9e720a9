"""The suffix-cache benchmark on a tiny served model: every turn of a
session in order through both arms, greedy outputs equal, the report's
totals split into first and later turns."""

from __future__ import annotations

from pathlib import Path

from serving_helpers import save_served_model

from specray.bench import suffix_cache_bench
from specray.bench.prompts import load_prompts, sessions


def test_sessions_run_in_order_through_both_arms(tmp_path: Path) -> None:
    model = save_served_model(tmp_path / "model")
    argv = [
        "--target", str(model), "--dtype", "float32", "--threads", "1", "--sessions", "1",
        "--max-tokens", "6", "--max-len", "2048", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = suffix_cache_bench.main(argv)
    session = sessions(load_prompts(["agentic"]))[0]
    assert [row["id"] for row in result["rows"]] == [p.id for p in session]
    for row in result["rows"]:
        assert row["identical"], row["id"]  # drafts never change greedy output
        assert len(row["cache"]["output_ids"]) == 6
    summary = result["summary"]
    assert summary["identical"] == summary["requests"] == len(session)
    assert set(summary["first"]) == {"cache", "no cache", "speedup_median"}
    text = (tmp_path / "out" / "suffix_cache_model_dense.md").read_text()
    assert "each turn sent alone" in text and "Later turns" in text
