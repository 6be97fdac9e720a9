"""The CPU's ``/proc/cpuinfo``: read once per call, its flags parsed in one
place for the kernels that need them (the block kernel's build, the
hardware probe)."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def read_cpuinfo(path: Path = CPUINFO) -> str:
    """The text of ``path``; empty where it cannot be read (not Linux)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def flags_in(text: str) -> frozenset[str]:
    """Every flag of the ``flags`` lines of cpuinfo ``text``."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags |= set(value.split())
    return frozenset(flags)
