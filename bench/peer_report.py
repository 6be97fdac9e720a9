"""The peer benchmark's numbers and its Markdown table.

Every row pools one arm's requests over all rounds. Tokens/s per request is
Σ output tokens ÷ Σ request latency (one request at a time, so the same as
the arm's throughput); TPOT is decode only (prefill excluded). τ counts the
tokens one target forward commits after the prefill, the same way for both
servers (llama.cpp's from its accepted-token counter: forwards = output − 1 −
accepted). "vs llama.cpp none" divides by llama.cpp target-only's tokens/s in
the same run; "vs own none" by the same server's target-only arm. Output
tokens/s is the row's throughput: its tokens over the time any of its
requests was in flight (with several requests at once, the server's rate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specray.bench.common import first_divergence, machine_header
from specray.bench.serve_metrics import RequestRecord, divide, mode_summary, per_token_rate

BASELINE = "llama.cpp none"


Rounds = list[list[RequestRecord]]  # one row's records, by round


def _records(result: dict[str, Any], arm: str, speculative: bool | None) -> Rounds:
    by_round: Rounds = [[] for _ in range(result["settings"]["rounds"])]
    for run in result["runs"]:
        if run["arm"] != arm:
            continue
        for raw in run["records"]:
            record = RequestRecord(**raw)
            if speculative is None or record.speculative == speculative:
                by_round[run["round"]].append(record)
    return by_round


def _rows(result: dict[str, Any]) -> list[tuple[str, str, Rounds]]:
    """(row name, the row its 'own none' is, records) for every row."""
    rows = []
    for arm in result["arms"]:
        name = arm["name"]
        if arm["system"] == "llama.cpp":
            rows.append((name, BASELINE, _records(result, name, None)))
        else:
            rows.append((f"{name} (spec)", f"{name} (no spec)", _records(result, name, True)))
            rows.append((f"{name} (no spec)", f"{name} (no spec)", _records(result, name, False)))
    return rows


def _rate(records: Sequence[RequestRecord]) -> float | None:
    """Σ output tokens ÷ Σ request latency over the successful requests."""
    return per_token_rate(r for r in records if r.ok)


def _flat(rounds: Rounds) -> list[RequestRecord]:
    return [record for records in rounds for record in records]


def _strip(tokens: Sequence[int], eos: Sequence[int]) -> list[int]:
    kept = list(tokens)
    while kept and kept[-1] in eos:
        kept.pop()
    return kept


def _outputs(rounds: Rounds, eos: Sequence[int]) -> dict[str, list[int]]:
    """Every successful request's output, stop token left off, by prompt and round."""
    return {
        f"{r.prompt_id} round {n}": _strip(r.token_ids, eos)
        for n, chosen in enumerate(rounds)
        for r in chosen
        if r.ok
    }


def _divergence(
    outputs: dict[str, list[int]], reference: dict[str, list[int]]
) -> dict[str, int | None]:
    """Where each output first differs from the reference's for the same
    prompt and round (None: identical)."""
    return {
        key: first_divergence(tokens, reference[key])
        for key, tokens in outputs.items()
        if key in reference
    }


def summarize(result: dict[str, Any], eos: Sequence[int]) -> list[dict[str, Any]]:
    rows = _rows(result)
    stats = {name: mode_summary(_flat(rounds)) for name, _, rounds in rows}
    outputs = {name: _outputs(rounds, eos) for name, _, rounds in rows}
    rates = {name: _rate(_flat(rounds)) for name, _, rounds in rows}
    base_rate = rates[BASELINE]
    base_throughput = stats[BASELINE]["output_tokens_per_s"]
    out = []
    for name, own, rounds in rows:
        s = stats[name]
        divergence = _divergence(outputs[name], outputs[BASELINE])
        own_divergence = _divergence(outputs[name], outputs[own])
        rate, own_rate = rates[name], rates[own]
        out.append(
            {
                "row": name,
                "requests": s["requests"],
                "failed": s["failed"],
                "output_tokens": s["output_tokens"],
                "tokens_per_s": rate,
                "output_tokens_per_s": s["output_tokens_per_s"],
                "output_vs_llama_none": divide(s["output_tokens_per_s"], base_throughput),
                "tpot_ms": s["tpot_ms"]["mean"],
                "ttft_ms": s["ttft_ms"]["mean"],
                "tau": s["tau"],
                "acceptance_rate": s["acceptance_rate"],
                "vs_llama_none": divide(rate, base_rate),
                "vs_own_none": divide(rate, own_rate),
                "identical_to_llama_none": sum(d is None for d in divergence.values()),
                "compared": len(divergence),
                "first_divergence": divergence,
                "identical_to_own_none": sum(d is None for d in own_divergence.values()),
                "compared_to_own": len(own_divergence),
                "tokens_per_s_by_round": [_rate(r) for r in rounds],
            }
        )
    return out


def _num(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _in_flight(settings: dict[str, Any]) -> str:
    concurrency = settings.get("concurrency", 1)
    return "one request at a time" if concurrency == 1 else f"{concurrency} requests at once"


def _switch_lines(switches: dict[str, str]) -> list[str]:
    if not switches:
        return []
    named = ", ".join(f"{k}={v}" for k, v in switches.items())
    return [f"specray ran with {named} (instruction sets restricted).", ""]


def render(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        f"# specray and llama.cpp serving {settings['target']} ({result['target_gguf']})",
        "",
        machine_header(result["machine"]),
        "",
        *_switch_lines(result.get("isa_switches") or {}),
        f"llama-server: {result['llama_server']['version']}; {settings['threads']} threads; "
        f"draft model {settings['draft_model']} (at most {settings['draft_max']} a round)",
        f"Prompts: {', '.join(settings['prompts'])} ({settings['split']}), "
        f"{settings['max_tokens']} tokens, greedy, {_in_flight(settings)}, "
        f"{settings['rounds']} rounds (arm order reversed every other round).",
        "",
        f"`{result['command']}`",
        "",
        "| arm | tokens/s per request | by round | vs llama.cpp none | vs own none | "
        "output tokens/s | vs llama.cpp none | TPOT ms | TTFT ms | τ | accepted | "
        "outputs = own none | outputs = llama.cpp none |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        by_round = " / ".join(_num(v) for v in row["tokens_per_s_by_round"])
        lines.append(
            f"| {row['row']} | {_num(row['tokens_per_s'])} | {by_round} | "
            f"{_num(row['vs_llama_none'], 2, '×')} | {_num(row['vs_own_none'], 2, '×')} | "
            f"{_num(row['output_tokens_per_s'])} | "
            f"{_num(row['output_vs_llama_none'], 2, '×')} | {_num(row['tpot_ms'])} | "
            f"{_num(row['ttft_ms'], 0)} | {_num(row['tau'], 2)} | "
            f"{_num(row['acceptance_rate'], 2)} | "
            f"{row['identical_to_own_none']}/{row['compared_to_own']} | "
            f"{row['identical_to_llama_none']}/{row['compared']} |"
        )
    lines += ["", "Server commands of the first round:", ""]
    seen = set()
    for run in result["runs"]:
        if run["arm"] not in seen:
            seen.add(run["arm"])
            lines.append(f"- {run['arm']}: `{' '.join(run['server_command'])}`")
            if run.get("weights_choice"):
                lines.append(f"  - start-up: {run['weights_choice']}")
    return "\n".join(lines) + "\n"
