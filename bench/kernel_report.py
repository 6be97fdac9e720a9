"""Markdown for :mod:`specray.bench.kernel_bench` results."""

from __future__ import annotations

import statistics
from typing import Any

DECODE_GOAL = 1.25  # specray decode time per token at most this times llama.cpp's


def _k(table: dict[Any, float], k: int) -> float | None:
    return table.get(k, table.get(str(k)))  # JSON turns int keys into strings


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### Weight formats: {result['model']} ({result['gguf']}), {result['threads']} threads",
        "",
        f"CPU: {result['cpu']}. torch {result['torch']}. Load average "
        f"{result['load_average_start']} at start, {result.get('load_average_end')} at end "
        "(a shared machine: other work moves these timings).",
        f"Share of the GGUF's matmul parameters in 4-bit blocks: "
        f"{result['gguf_int4_share']:.1%}. Which kernel each weight of each model runs: "
        "the kernels row below (blocks: the block kernel; int8: per channel; int4).",
        "",
    ]
    if "layers_ms" in result:
        lines += _layers(result["layers_ms"])
    models: dict[str, Any] = result["models"]
    llama = result["llama_cpp"] if isinstance(result["llama_cpp"], dict) else None
    lines += _models(models, llama)
    lines += _agreement(models, result["agreement_reference"])
    lines += _goals(models, llama, result["llama_cpp"], result.get("paired_decode"))
    if "probe_recommendation" in result:
        lines += ["", f"Probe on these layer timings: {result['probe_recommendation']}"]
    return "\n".join(lines) + "\n"


def _layers(layers: dict[str, dict[str, dict[Any, float]]]) -> list[str]:
    lines = [
        "#### Per layer (ms for one matmul, weights from DRAM)",
        "",
        "| layer [out x in] | format | 1 row | 2 | 4 | 9 | 17 | cost(9)/cost(1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, formats in layers.items():
        for fmt, by_rows in formats.items():
            one, nine = _k(by_rows, 1), _k(by_rows, 9)
            cells = " | ".join(_fmt(_k(by_rows, k)) for k in (1, 2, 4, 9, 17))
            ratio = nine / one if one and nine else None
            lines.append(f"| {name} | {fmt} | {cells} | {_fmt(ratio)} |")
    return [*lines, ""]


def _models(models: dict[str, Any], llama: dict[str, Any] | None) -> list[str]:
    names = list(models)
    header = "| | " + " | ".join(names) + (" | llama.cpp |" if llama else " |")
    lines = [
        "#### Whole model",
        "",
        header,
        "|---" * (len(names) + 1 + (1 if llama else 0)) + "|",
    ]

    def row(label: str, ours: list[str], theirs: str) -> None:
        lines.append(f"| {label} | " + " | ".join(ours) + (f" | {theirs} |" if llama else " |"))

    row(
        "decode ms/token",
        [_fmt(m["decode_ms_per_token"], ".1f") for m in models.values()],
        _fmt(llama["decode_ms_per_token"], ".1f") if llama else "",
    )
    row(
        "prefill 512, tokens/s",
        [_fmt(m["prefill_512_tokens_per_s"], ".0f") for m in models.values()],
        _fmt(llama["prefill_512_tokens_per_s"], ".0f") if llama else "",
    )
    row(
        "weights in memory, MB",
        [_fmt(m["param_bytes"] / 1e6, ".0f") for m in models.values()],
        "",
    )
    row(
        "matmul kernels (weights on each)",
        [
            ", ".join(f"{name} {count}" for name, count in m["kernels"].items())
            if "kernels" in m
            else "—"
            for m in models.values()
        ],
        "",
    )
    for k in range(1, 18):
        theirs = _k(llama["verify_cost_ratio"], k) if llama else None
        row(
            f"verify cost({k})/cost(1)",
            [_fmt(_k(m["verify_cost_ratio"], k)) for m in models.values()],
            _fmt(theirs),
        )
    return [*lines, ""]


def _agreement(models: dict[str, Any], reference: str) -> list[str]:
    names = list(models)
    lines = [
        "#### Greedy agreement, pair by pair (argmax per position, teacher-forced along "
        f"{reference}'s greedy continuations)",
        "",
        "| format | vs | agreement | positions | first disagreement per prompt |",
        "|---|---|---|---|---|",
    ]
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            agree = models[name]["agreement"][other]
            lines.append(
                f"| {name} | {other} | {agree['rate']:.1%} | {agree['positions']} | "
                f"{agree['first_disagreement']} |"
            )
    return [*lines, ""]


def _paired(paired: dict[str, Any]) -> list[str]:
    formats = list(paired["ours_ms"])
    lines = [
        f"#### Decode alternated with llama.cpp ({paired['rounds']} rounds; ms per token, "
        "median of each side's calls in the round)",
        "",
        "| round | "
        + " | ".join(formats)
        + " | llama.cpp | "
        + " | ".join(f"{f} / llama.cpp" for f in formats)
        + " |",
        "|---" * (2 * len(formats) + 2) + "|",
    ]
    for i, theirs in enumerate(paired["llama_cpp_ms"]):
        ours = " | ".join(f"{paired['ours_ms'][f][i]:.1f}" for f in formats)
        ratios = " | ".join(f"{paired['ratios'][f][i]:.2f}" for f in formats)
        lines.append(f"| {i + 1} | {ours} | {theirs:.1f} | {ratios} |")
    return [*lines, ""]


def _goals(
    models: dict[str, Any], llama: dict[str, Any] | None, note: Any, paired: dict[str, Any] | None
) -> list[str]:
    lines = ["#### Goals", ""]
    if llama is None:
        return [*lines, f"llama.cpp: {note}.", ""]
    on_file = {name: m for name, m in models.items() if name.startswith("gguf")}
    if not on_file:
        return [*lines, "no gguf run to compare.", ""]
    if paired is not None:
        lines = [*_paired(paired), *lines]
    for name, ours in on_file.items():
        if paired is not None:
            ratio = statistics.median(paired["ratios"][name])
            how = f"median of {paired['rounds']} paired rounds"
        else:
            ratio = ours["decode_ms_per_token"] / llama["decode_ms_per_token"]
            how = (
                f"{ours['decode_ms_per_token']:.1f} ms vs llama.cpp "
                f"{llama['decode_ms_per_token']:.1f} ms, not paired"
            )
        status = "met" if ratio <= DECODE_GOAL else "NOT met"
        lines.append(
            f"- decode on the same GGUF, {name}: {ratio:.2f}x llama.cpp's time per token "
            f"({how}; goal <= {DECODE_GOAL}x): {status}."
        )
    theirs9 = _k(llama["verify_cost_ratio"], 9)
    for name, m in models.items():
        ours9 = _k(m["verify_cost_ratio"], 9)
        if ours9 is None or theirs9 is None:
            continue
        verdict = "met" if ours9 <= theirs9 else "NOT met"
        lines.append(
            f"- verify cost(9)/cost(1), {name}: {ours9:.2f} vs llama.cpp {theirs9:.2f}: {verdict}."
        )
    return [*lines, ""]
