"""The router benchmark's report: the Ray overhead against the in-process
engine, the concurrency sweep and the goals, as Markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specray.bench.common import machine_line
from specray.bench.router_runs import RunResult


def overhead_table(engine: list[RunResult], router: list[RunResult]) -> list[dict[str, Any]]:
    """Per batched round: wall × concurrency ÷ request-rounds (same requests,
    same greedy output and fixed γ, so both sides run the same rounds)."""
    rows = []
    for e in engine:
        match = [r for r in router if (r.mode, r.concurrency) == (e.mode, e.concurrency)]
        if not match:
            continue
        r = match[0]
        engine_round = e.wall_s * e.concurrency / e.rounds
        router_round = r.wall_s * r.concurrency / r.rounds
        rows.append(
            {
                "mode": e.mode,
                "concurrency": e.concurrency,
                "engine_tokens_per_s": round(e.tokens_per_s, 3),
                "router_tokens_per_s": round(r.tokens_per_s, 3),
                "engine_round_ms": round(1e3 * engine_round, 2),
                "router_round_ms": round(1e3 * router_round, 2),
                "overhead_pct": round(100 * (router_round / engine_round - 1), 2),
                "router_transport_ms": round(r.transport_ms, 2),
                "router_transport_pct": round(100 * r.transport_ms / max(r.round_ms, 1e-9), 2),
                "same_rounds": e.rounds == r.rounds,
                "same_output": _same(e.outputs, r.outputs),
            }
        )
    return rows


def _same(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Fraction of requests (matched by position) with identical tokens."""
    left, right = list(a.values()), list(b.values())
    return sum(x == y for x, y in zip(left, right, strict=True)) / max(len(left), 1)


def sweep_table(sweep: list[RunResult]) -> list[dict[str, Any]]:
    baseline = {(r.phase, r.concurrency): r for r in sweep if r.mode == "none"}
    rows = []
    for r in sweep:
        base = baseline[(r.phase, r.concurrency)]
        rows.append(
            {
                "phase": r.phase,
                "mode": r.mode,
                "concurrency": r.concurrency,
                "requests": r.requests,
                "tokens_per_s": round(r.tokens_per_s, 3),
                "vs_none": round(r.tokens_per_s / base.tokens_per_s, 3),
                "tau": round(r.tau, 3),
                "draft_tokens": r.draft_tokens,
                "accepted_tokens": r.accepted_tokens,
                "mean_ttft_s": round(r.mean_ttft_s, 3),
                "wall_s": round(r.wall_s, 2),
                "round_ms": round(r.round_ms, 2),
                "transport_ms": round(r.transport_ms, 2),
                "same_output_as_none": _same(base.outputs, r.outputs),
            }
        )
    return rows


def goals(sweep: list[RunResult]) -> dict[str, Any]:
    by = {(r.phase, r.mode, r.concurrency): r for r in sweep}
    levels = sorted({r.concurrency for r in sweep})
    phases = sorted({r.phase for r in sweep})
    spec_vs_none = {
        phase: {
            f"c={c}": round(
                by[(phase, phase, c)].tokens_per_s / by[(phase, "none", c)].tokens_per_s, 3
            )
            for c in levels
        }
        for phase in phases
    }
    scaling = {
        f"{phase}/{mode}": round(
            by[(phase, mode, 8)].tokens_per_s / by[(phase, mode, 1)].tokens_per_s, 3
        )
        for phase in phases
        for mode in ("none", phase)
        if (phase, mode, 1) in by and (phase, mode, 8) in by
    }
    return {"spec_vs_none": spec_vs_none, "tokens_per_s_c8_over_c1": scaling}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Router benchmark: {result['target']} ({result['dtype']})",
        "",
        f"Machine: {machine_line(result['machine'])}.",
        "",
        f"max_tokens {result['max_tokens']}, k {result['k']}, target threads "
        f"{result['threads']}, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['load_avg_at_end'])}; "
        f"{result['elapsed_s']} s in all.",
        "",
        "## Actor round trips (median)",
        "",
        "| call | ms |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in result["round_trips_ms"].items()),
        "",
        "## Ray overhead against the in-process engine",
        "",
        "| mode | c | engine tok/s | router tok/s | engine ms/round | router ms/round "
        "| wall overhead | transport ms/round | transport share | same rounds | same output |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *(
            f"| {r['mode']} | {r['concurrency']} | {r['engine_tokens_per_s']} | "
            f"{r['router_tokens_per_s']} | {r['engine_round_ms']} | {r['router_round_ms']} | "
            f"{r['overhead_pct']}% | {r['router_transport_ms']} | "
            f"{r['router_transport_pct']}% | {r['same_rounds']} | {r['same_output']:.2f} |"
            for r in result["overhead"]
        ),
        "",
        "## Concurrency sweep through the router",
        "",
        "| router | mode | c | requests | tok/s | × none | τ | drafted | accepted | TTFT s "
        "| ms/round | transport ms/round | same output |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['phase']} | {r['mode']} | {r['concurrency']} | {r['requests']} | "
            f"{r['tokens_per_s']} | "
            f"{r['vs_none']} | {r['tau']} | {r['draft_tokens']} | {r['accepted_tokens']} | "
            f"{r['mean_ttft_s']} | {r['round_ms']} | {r['transport_ms']} | "
            f"{r['same_output_as_none']:.2f} |"
            for r in result["sweep"]
        ),
        "",
        "## Goals",
        "",
        f"- spec ÷ none per concurrency: {result['goals']['spec_vs_none']}",
        f"- tokens/s at c=8 ÷ c=1: {result['goals']['tokens_per_s_c8_over_c1']}",
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path, tag: str | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"router_{Path(result['target']).name}_{result['dtype']}" + (f"_{tag}" if tag else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out_dir / f"{stem}.md").write_text(text)
    print(text)
