"""The end of a benchmark that measures one model: its record written with
its report, the report's title naming the run's settings, and its table
read from the record's rows by column."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from specray.bench.common import report_head, run_record, table, write_run_report

# What a column shows of a row: the value under a key, or one derived from the row.
Cell = str | Callable[[dict[str, Any]], object]


def publish_run(
    module: str,
    kind: str,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    flags: Sequence[str],
    markdown: Callable[[dict[str, Any]], str],
    **measured: Any,
) -> dict[str, Any]:
    """The run's record (:func:`run_record`), written under ``args.out`` with
    its ``markdown`` report (:func:`write_run_report`), and returned."""
    result = run_record(module, argv, args, flags, **measured)
    write_run_report(args.out, kind, result, markdown(result))
    return result


def run_title(subject: str, result: dict[str, Any], *details: str) -> str:
    """``SUBJECT: TARGET (DTYPE, N threads, DETAILS...)``: a report's title,
    the settings every run of one model records first."""
    settings = [result["dtype"], f"{result['threads']} threads", *details]
    return f"{subject}: {result['target']} ({', '.join(settings)})"


def column_table(
    columns: Mapping[str, Cell], rows: Sequence[dict[str, Any]], left: int = 1
) -> list[str]:
    """:func:`table` of ``rows``, a column per ``columns`` item: its header,
    and the key (or function) that gives each row's cell."""
    cells = [[_cell(row, how) for how in columns.values()] for row in rows]
    return table(list(columns), cells, left)


def column_report(
    title: str,
    result: dict[str, Any],
    columns: Mapping[str, Cell],
    left: int = 1,
    notes: Sequence[str] = (),
) -> str:
    """A report of ``result["rows"]`` (see :func:`column_table`) under its
    title and machine, each of ``notes`` a paragraph above the table."""
    paragraphs = [line for note in notes for line in (note, "")]
    lines = [*report_head(title, result["machine"]), *paragraphs]
    return "\n".join([*lines, *column_table(columns, result["rows"], left), ""])


def _cell(row: dict[str, Any], how: Cell) -> object:
    return row[how] if isinstance(how, str) else how(row)
