"""The end of a one-model benchmark: its record and report written together,
the title naming the run's settings, the table read from the rows by column."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from specray.bench.run_report import Cell, column_report, publish_run, run_title

MACHINE = {"cpu": "Test CPU", "cpu_flags": ["avx2"], "cpu_count": 2, "torch": "2", "loadavg": [0.5]}
COLUMNS: dict[str, Cell] = {
    "size": "size",
    "ms": "ms",
    "ok": lambda row: "yes" if row["ok"] else "NO",
}


def test_the_title_names_target_dtype_threads_then_the_details() -> None:
    result = {"target": "tiny", "dtype": "float32", "threads": 2}
    assert run_title("Prefill", result) == "Prefill: tiny (float32, 2 threads)"
    assert (
        run_title("Prefill", result, "best of 3") == "Prefill: tiny (float32, 2 threads, best of 3)"
    )


def test_a_column_shows_a_key_or_what_a_function_derives() -> None:
    rows = [{"size": 1, "ms": 0.5, "ok": True}, {"size": 8, "ms": 2.0, "ok": False}]
    text = column_report("T", {"machine": MACHINE, "rows": rows}, COLUMNS, 0, notes=["`cmd`"])
    lines = text.split("\n")
    assert lines[0] == "### T" and lines[2].startswith("Machine: Test CPU (avx2)")
    assert lines[4:6] == ["`cmd`", ""]  # each note a paragraph above the table
    assert lines[6:] == [
        "| size | ms | ok |",
        "| ---: | ---: | ---: |",
        "| 1 | 0.5 | yes |",
        "| 8 | 2.0 | NO |",
        "",
    ]


def test_publish_writes_the_record_and_its_report(tmp_path: Path) -> None:
    args = argparse.Namespace(target="models/tiny", dtype="float32", threads=2, out=tmp_path)

    def markdown(result: dict[str, Any]) -> str:
        return f"rows: {len(result['rows'])}\n"

    result = publish_run(
        "specray.bench.x", "x", ["--threads", "2"], args, ("target", "threads"), markdown, rows=[{}]
    )
    assert result["command"] == "python -m specray.bench.x --threads 2"
    assert (result["target"], result["threads"], result["rows"]) == ("models/tiny", 2, [{}])
    assert "dtype" not in result  # only the flags named are recorded
    assert json.loads((tmp_path / "x_tiny.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "x_tiny.md").read_text() == "rows: 1\n"
