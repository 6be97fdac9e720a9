"""nccl-tests' all-reduce numbers: the busbw formula, its output format and a parser.

``all_reduce_perf`` prints one row per message size; this module reads that
output and writes the same table for numbers measured any other way, so a
node measured with nccl-tests and one measured with torch.distributed read
alike. Definitions (nccl-tests' doc/PERFORMANCE.md): ``algbw = size / time``
and, for all-reduce over n ranks, ``busbw = algbw × 2(n−1)/n``, which is
comparable with the hardware's link bandwidth whatever n is. No torch here:
the planner reads these definitions too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# nccl-tests' names for its ``-d`` data types, by torch dtype name.
NCCL_TYPE_NAMES = {
    "float32": "float",
    "float16": "half",
    "bfloat16": "bfloat16",
    "float64": "double",
    "int32": "int32",
    "int64": "int64",
    "int8": "int8",
    "uint8": "uint8",
}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_DEVICE_LINE = re.compile(r"^#\s+Rank\s+\d+\s+(?:Group\s+\d+\s+)?Pid\s+\d+\s+on\s+(\S+)\s+device")


@dataclass(frozen=True)
class AllReduceRow:
    """One message size: the columns nccl-tests prints (out-of-place)."""

    size_bytes: int
    count: int  # elements
    dtype: str  # nccl-tests' type name
    time_us: float
    algbw_gbps: float  # GB/s, 1 GB = 1e9 bytes, as nccl-tests
    busbw_gbps: float
    wrong: int = 0  # values nccl-tests found wrong (0 when not checked)


@dataclass(frozen=True)
class NcclTestsRun:
    """A parsed ``all_reduce_perf`` run."""

    rows: tuple[AllReduceRow, ...]
    ranks: int  # from "Using devices"; 0 if the output did not list them
    hosts: tuple[str, ...]
    avg_busbw_gbps: float | None


def bus_factor(ranks: int) -> float:
    """2(n−1)/n: how much of an all-reduce's data crosses each rank's link."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    return 2.0 * (ranks - 1) / ranks


def row_from_time(
    size_bytes: int, itemsize: int, dtype: str, seconds: float, ranks: int
) -> AllReduceRow:
    """The row nccl-tests would print for one all-reduce of ``size_bytes`` taking ``seconds``."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    algbw = size_bytes / seconds / 1e9
    return AllReduceRow(
        size_bytes=size_bytes,
        count=size_bytes // itemsize,
        dtype=dtype,
        time_us=seconds * 1e6,
        algbw_gbps=algbw,
        busbw_gbps=algbw * bus_factor(ranks),
    )


def parse_size(text: str) -> int:
    """nccl-tests' size syntax for ``-b`` / ``-e``: ``8``, ``64K``, ``128M``, ``1G``."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text.upper())
    if match is None:
        raise ValueError(f"size must look like 8, 64K, 128M or 1G, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def sweep_sizes(min_bytes: int, max_bytes: int, factor: int, itemsize: int) -> list[int]:
    """Sizes from ``min_bytes`` to ``max_bytes`` multiplying by ``factor`` (nccl-tests ``-f``),
    each a whole number of elements."""
    if min_bytes < itemsize:
        raise ValueError(f"--min-bytes must be >= one element ({itemsize} B), got {min_bytes}")
    if max_bytes < min_bytes:
        raise ValueError(f"--max-bytes must be >= --min-bytes ({min_bytes}), got {max_bytes}")
    if factor < 2:
        raise ValueError(f"--factor must be >= 2, got {factor}")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size - size % itemsize)
        size *= factor
    return sizes


def parse_all_reduce_perf(text: str) -> NcclTestsRun:
    """Rows of an ``all_reduce_perf`` output (out-of-place columns).

    Data rows are the lines not starting with ``#``; their last eight fields
    are out-of-place and in-place ``time algbw busbw #wrong``, whatever
    columns (``root``) a given nccl-tests version puts before them.
    Raises ``ValueError`` when the output has no rows (a failed run).
    """
    rows: list[AllReduceRow] = []
    hosts: list[str] = []
    avg: float | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            device = _DEVICE_LINE.match(stripped)
            if device:
                hosts.append(device.group(1))
            elif stripped.startswith("# Avg bus bandwidth"):
                avg = float(stripped.split(":", 1)[1])
            continue
        fields = stripped.split()
        if len(fields) < 11 or not fields[0].isdigit():
            continue  # NCCL's own log lines (NCCL INFO ...)
        time_us, algbw, busbw, wrong = fields[-8:-4]
        rows.append(
            AllReduceRow(
                size_bytes=int(fields[0]),
                count=int(fields[1]),
                dtype=fields[2],
                time_us=float(time_us),
                algbw_gbps=float(algbw),
                busbw_gbps=float(busbw),
                wrong=int(wrong) if wrong.isdigit() else 0,
            )
        )
    if not rows:
        raise ValueError("no all_reduce_perf result rows in the output (did the run fail?)")
    return NcclTestsRun(tuple(rows), len(hosts), tuple(dict.fromkeys(hosts)), avg)


def format_table(rows: Sequence[AllReduceRow], redop: str = "sum") -> str:
    """The rows in nccl-tests' column layout."""
    lines = [
        f"# {'size':>10}  {'count':>12}  {'type':>8}  {'redop':>6}  {'time':>9}  "
        f"{'algbw':>7}  {'busbw':>7}  {'#wrong':>6}",
        f"# {'(B)':>10}  {'(elements)':>12}  {'':>8}  {'':>6}  {'(us)':>9}  "
        f"{'(GB/s)':>7}  {'(GB/s)':>7}  {'':>6}",
    ]
    for row in rows:
        lines.append(
            f"  {row.size_bytes:>10}  {row.count:>12}  {row.dtype:>8}  {redop:>6}  "
            f"{row.time_us:>9.2f}  {row.algbw_gbps:>7.3f}  {row.busbw_gbps:>7.3f}  {row.wrong:>6}"
        )
    return "\n".join(lines)
