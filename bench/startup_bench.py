"""How long `specray serve` takes to become ready and how much memory it
holds once it is: the figures the README quotes.

Starts ``specray serve`` (its default config unless flags say otherwise) as
a subprocess on free ports, times the line containing ``ready``, then sums
the resident memory of every process under it (the front door, Ray's
daemons, the router, the target shards and the draft replicas), grouped by
what each process is, and stops it with SIGTERM. The models must already be
in the store (fetching is not start-up).

    python -m specray.bench.startup_bench                      # the default config
    python -m specray.bench.startup_bench -- --config FILE     # flags after -- go to serve

Writes ``startup_<tag>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specray.bench.common import machine_header, machine_info, stop_process, write_report

# The log line in which the router accounts for its start (cluster/router.py).
STARTED = "router started in "
# What a process is, from its command line (first match wins).
ROLES = (
    ("ray::TargetShard", "target shard"),
    ("ray::DraftWorker", "draft replica"),
    ("ray::Router", "router"),
    ("specray.deploy.cli", "front door"),
    ("raylet", "Ray daemons"),
    ("gcs_server", "Ray daemons"),
    ("ray", "Ray daemons"),
)


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += children.get(pid, [])
    return found


def rss_bytes(pid: int) -> int:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "other"
    return next((name for key, name in ROLES if key in cmdline), "other")


def measure(serve_args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "specray.deploy.cli", "serve", "--port", "0"]
    command += ["--http-port", "0", *serve_args]
    with tempfile.TemporaryFile("w+") as log:  # for the router's account of its start
        began = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        ready_s, ready_line = None, ""
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if "ready" in line:
                    ready_s = time.perf_counter() - began
                    ready_line = line.strip()
                    break
                if time.perf_counter() - began > timeout_s:
                    break
            if ready_s is None:
                raise RuntimeError(f"`specray serve` was not ready within {timeout_s:g} s")
            time.sleep(5)  # let the replicas settle after their profiles
            by_role: dict[str, int] = defaultdict(int)
            counts: dict[str, int] = defaultdict(int)
            for pid in descendants(proc.pid):
                name = role(pid)
                by_role[name] += rss_bytes(pid)
                counts[name] += 1
        finally:
            stop_process(proc, grace_s=120)
        log.seek(0)
        started = [line.split(STARTED, 1)[1].strip() for line in log if STARTED in line]
    return {
        "command": " ".join(command),
        "ready_s": round(ready_s, 1),
        "ready_line": ready_line,
        "router_started": started[0] if started else None,
        "rss_gb_by_role": {k: round(v / 1e9, 2) for k, v in sorted(by_role.items())},
        "processes_by_role": dict(sorted(counts.items())),
        "rss_gb_total": round(sum(by_role.values()) / 1e9, 2),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### `specray serve` start-up ({result['tag']})",
        "",
        machine_header(result["machine"]) + " Models already in the store.",
        "",
        f"`{result['command']}`",
        "",
        f"Ready after **{result['ready_s']} s**; **{result['rss_gb_total']} GB** resident in all.",
        "",
    ]
    if result.get("router_started"):
        lines += [f"The router's own start (its log): {result['router_started']}.", ""]
    lines += [
        "| process | count | resident GB |",
        "|---|---:|---:|",
    ]
    for name, gb in result["rss_gb_by_role"].items():
        lines.append(f"| {name} | {result['processes_by_role'][name]} | {gb} |")
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, serve_args = build_parser().parse_known_args(argv)
    serve_args = [a for a in serve_args if a != "--"]
    result = {"tag": args.tag, "machine": machine_info(), **measure(serve_args, args.timeout)}
    write_report(args.out, f"startup_{args.tag}", result, markdown(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tag", default="default_config")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


if __name__ == "__main__":
    main()
