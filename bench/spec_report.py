"""The in-process benchmark's report: Markdown tables, a plot (matplotlib,
only when plotting) and the JSON record, written side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specray.bench.common import ALL, HF, SPECRAY, TARGET_ONLY, cell, machine_line, write_report


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    gguf = ", GGUF blocks" if result.get("weights", "dense") == "gguf" else ""
    if result.get("draft_weights", "dense") == "gguf":
        gguf += ", draft models on GGUF blocks"
    lines = [
        f"### {result['target']} ({result['dtype']}{gguf}, {result['threads']} threads, "
        f"max {result['max_tokens']} tokens, {len(result['prompts'])} prompts, "
        f"best of {result['repeats']})",
        "",
        f"Machine: {machine_line(machine)}; load average before "
        f"{cell(machine['loadavg'][0])}, after {cell(result['loadavg_after'][0])}. "
        f"Bench time {result['bench_s']:.0f} s.",
        "",
        "Wall clock unless marked CPU (this process's CPU seconds, see docs). speedup: "
        "tokens/s over specray target-only, prefill included; decode: without the first round.",
        "",
        "| category | impl | drafter | k | tok/s | speedup | CPU speedup | decode speedup | "
        "α | α_eff | τ | c | v(k+1) | S | achieved | CPU S | CPU achieved | ours/HF | "
        "ours/HF CPU |",
        "|---" * 19 + "|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['category']} | {r['impl']} | {r['label']} | {r['k'] or '–'} | "
            f"{cell(r['tokens_per_s'])} | {cell(r['speedup'])}× | {cell(r['cpu_speedup'])}× | "
            f"{cell(r.get('decode_speedup'))} | {cell(r.get('alpha'))} | "
            f"{cell(r.get('alpha_eff'))} | {cell(r.get('tau'))} | {cell(r.get('c'), 3)} | "
            f"{cell(r.get('verify_cost'))} | {cell(r.get('S'))} | {cell(r.get('achieved'))} | "
            f"{cell(r.get('cpu_S'))} | {cell(r.get('cpu_achieved'))} | "
            f"{cell(r.get('vs_hf'))} | {cell(r.get('vs_hf_cpu'))} |"
        )
    lines += [
        "",
        "Where a decode round's time goes (all categories):",
        "",
        "| drafter | round ms | propose | verify | other |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["category"] == ALL and r["impl"] == SPECRAY:
            lines.append(
                f"| {r['label']} | {cell(r['round_ms'], 1)} | {cell(r['share_propose'] * 100, 1)}% "
                f"| {cell(r['share_verify'] * 100, 1)}% | {cell(r['share_other'] * 100, 1)}% |"
            )
    lines += ["", *_divergence_table(result["comparisons"], "vs_target_only", "our target-only")]
    lines += [
        "",
        *_divergence_table(result["comparisons"], "vs_hf_same_drafter", "HF, same drafter"),
    ]
    lines += calibration_tables(result.get("survival_calibration", {}))
    check = result.get("fp32_check")
    if check:
        title = f"our fp32 target-only ({check['max_tokens']} tokens)"
        lines += ["", *_divergence_table(check["comparisons"], "vs_target_only", title)]
    lines += ["", "Goals:", ""]
    for goal, value in result["goals"].items():
        lines.append(f"- {goal}: {_fmt_goal(value)}")
    lines.append("")
    return "\n".join(lines)


def calibration_tables(calibrations: dict[str, list[dict[str, float]]]) -> list[str]:
    """Per adaptive run, its copies' estimated survival against what the
    tokens did, judged in hindsight over the whole run, and the map's value."""
    lines: list[str] = []
    for label, rows in calibrations.items():
        if not rows:
            continue
        lines += [
            "",
            f"Copies' survival, {label} (every proposed token judged in hindsight, all prompts):",
            "",
            "| estimate bin | tokens | mean estimate | survived | calibrated |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| [{row['low']:.2f}, {row['high']:.2f}) | {row['judged']:.0f} | "
                f"{cell(row['estimate'], 3)} | {cell(row['survived'], 3)} | "
                f"{cell(row['calibrated'], 3)} |"
            )
    return lines


def _divergence_table(comparisons: Sequence[dict[str, Any]], key: str, title: str) -> list[str]:
    """Per prompt and method: ``=`` when the greedy output equals ``title``'s,
    else the index of the first differing token."""
    methods = list(dict.fromkeys(m for c in comparisons for m in c[key]))
    lines = [
        f"Greedy output vs {title} (`=` identical, else first differing token):",
        "",
        "| prompt | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for c in comparisons:
        cells = ["=" if c[key].get(m, "–") is None else str(c[key].get(m, "–")) for m in methods]
        lines.append(f"| {c['prompt_id']} | " + " | ".join(cells) + " |")
    return lines


def _fmt_goal(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items()) or "–"
    return cell(value)


def plot(result: dict[str, Any], path: Path) -> None:
    """Speedup by category and drafter, on the wall clock and on CPU time."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path} (pip install 'specray[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not (r["impl"] == SPECRAY and r["label"] == TARGET_ONLY)]
    categories = list(dict.fromkeys(r["category"] for r in rows))
    methods = list(dict.fromkeys(f"{r['impl']}:{r['label']}" for r in rows))
    by_key = {(f"{r['impl']}:{r['label']}", r["category"]): r for r in rows}
    width = 0.8 / max(len(methods), 1)
    size = (max(8.0, 1.6 * len(categories) * len(methods) / 3), 7.5)
    fig, axes = plt.subplots(2, 1, figsize=size, sharex=True)
    panels = (("speedup", "tokens/s"), ("cpu_speedup", "tokens per CPU-second"))
    for ax, (key, unit) in zip(axes, panels, strict=True):
        for i, method in enumerate(methods):
            values = [by_key[method, c][key] if (method, c) in by_key else 0.0 for c in categories]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(categories))]
            hatch = "//" if method.startswith(HF) else None
            ax.bar(xs, values, width, label=method, hatch=hatch)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{unit}\n÷ specray target-only")
    axes[-1].set_xticks(range(len(categories)), categories)
    axes[0].set_title(f"{result['target']} ({result['dtype']}), batch 1, greedy")
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path, tag: str | None) -> None:
    name = Path(result["target"]).name
    stem = f"spec_{name}_{result['dtype']}" + (f"_{tag}" if tag else "")
    write_report(out_dir, stem, result, markdown(result))
    plot(result, out_dir / f"{stem}.png")
