"""The serving benchmark's report: the analytic limit per category, the
Markdown tables and the PNG plots, for one result or several combined
(``--plot-from``: one per drafter, say)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specray.actors.engine.gamma import speedup
from specray.bench.common import alpha_from_tau, cell, machine_line
from specray.bench.serve_metrics import ALL, ARM_NAMES, BASE, SPEC
from specray.bench.server_diagnostics import diagnostics_lines

LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL"))


def attach_limit(
    rows: list[dict[str, Any]], gamma: int, draft_cost: float | None, verify_cost: float | None
) -> None:
    """Add α_eff (the i.i.d. acceptance matching the measured τ at γ) to each
    category row and, given the costs c and v, the analytic limit S and the
    achieved fraction TPOT speedup ÷ S. S assumes a fixed γ; under adaptive
    γ rounds draft fewer, so read it as a reference only."""
    for row in rows:
        if row["tau"] is None or gamma < 1:
            continue
        row["alpha_eff"] = alpha_from_tau(row["tau"], gamma)
        if draft_cost is not None and verify_cost is not None:
            row["S"] = speedup(row["alpha_eff"], gamma, draft_cost, verify_cost)
            tpot_speedup = row["tpot_speedup"]
            row["achieved"] = tpot_speedup / row["S"] if tpot_speedup is not None else None


def load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def latency_cell(stats: dict[str, float | None]) -> str:
    return " / ".join(cell(stats[k], 1) for k in ("mean", "median", "p99"))


def run_title(run: dict[str, Any]) -> str:
    parts = []
    if run["concurrency"] is not None:
        parts.append(f"concurrency {run['concurrency']}")
    if run["request_rate"] is not None:
        parts.append(f"Poisson {run['request_rate']:g} req/s")
    return ", ".join(parts) or "all at once"


def run_tables(run: dict[str, Any], greedy: bool) -> list[str]:
    lines = [
        f"#### {run_title(run)}",
        "",
        "| arm | done | failed | out tok/s | req/s | TTFT ms | TPOT ms | ITL ms | E2EL ms | "
        "acceptance | τ | prompt tokens cached |",
        "|---" * 12 + "|",
    ]
    for arm, stats in run["modes"].items():
        latencies = " | ".join(latency_cell(stats[key]) for key, _ in LATENCIES)
        cached = stats.get("cached_tokens")  # absent from results written before it was kept
        cached_cell = "–" if cached is None else f"{cached} / {stats['prompt_tokens']}"
        lines.append(
            f"| {ARM_NAMES[arm]} | {stats['completed']} | {stats['failed']} | "
            f"{cell(stats['output_tokens_per_s'])} | {cell(stats['requests_per_s'], 3)} | "
            f"{latencies} | {cell(stats['acceptance_rate'])} | {cell(stats['tau'])} | "
            f"{cached_cell} |"
        )
    lines += [
        "",
        "| category | pairs | req tok/s spec | req tok/s no spec | speedup | TPOT spec ms | "
        "TPOT no-spec ms | TPOT speedup | acceptance | τ | α_eff | S | achieved |",
        "|---" * 13 + "|",
    ]
    for row in run["categories"]:
        lines.append(
            f"| {row['category']} | {row['pairs']} | {cell(row['spec_tokens_per_s'])} | "
            f"{cell(row['no_spec_tokens_per_s'])} | {times(row['speedup'])} | "
            f"{cell(row['spec_tpot_ms'], 1)} | {cell(row['no_spec_tpot_ms'], 1)} | "
            f"{times(row['tpot_speedup'])} | {cell(row['acceptance_rate'])} | "
            f"{cell(row['tau'])} | {cell(row.get('alpha_eff'))} | {cell(row.get('S'))} | "
            f"{cell(row.get('achieved'))} |"
        )
    agreement = run["agreement"]
    if greedy:
        differing = {k: v for k, v in agreement["first_divergence"].items() if v is not None}
        where = ", ".join(f"{k} at token {v}" for k, v in differing.items())
        lines += [
            "",
            f"Greedy outputs token-identical in {agreement['identical']} of "
            f"{agreement['pairs']} pairs" + (f"; first divergence: {where}." if where else "."),
        ]
    lines += failure_lines(run)
    lines += diagnostics_lines(run)
    return [*lines, ""]


def failure_lines(run: dict[str, Any]) -> list[str]:
    """Each arm's failed requests by gRPC status, with the first message seen."""
    lines = []
    for arm, stats in run["modes"].items():
        for code, count in stats["failures"].items():
            detail = next(
                (
                    r["error_details"]
                    for r in run["records"]
                    if (SPEC if r["speculative"] else BASE) == arm and r["error"] == code
                ),
                "",
            )
            lines.append(f"- {ARM_NAMES[arm]}: {count} × {code}: {detail}")
    return ["", "Failed requests:", "", *lines] if lines else []


def sweep_table(results: Sequence[dict[str, Any]]) -> list[str]:
    """TPOT and throughput against concurrency, per drafter label."""
    rows = [(r["label"], run) for r in results for run in r["runs"] if run["concurrency"]]
    if len(rows) < 2:
        return []
    lines = [
        "TPOT (mean ms) and output tokens/s against concurrency:",
        "",
        "| drafter | concurrency | TPOT spec | TPOT no spec | TPOT speedup | tok/s spec | "
        "tok/s no spec |",
        "|---" * 7 + "|",
    ]
    for label, run in rows:
        spec, base = run["modes"][SPEC], run["modes"][BASE]
        pooled = run["categories"][-1]
        lines.append(
            f"| {label} | {run['concurrency']} | {cell(spec['tpot_ms']['mean'], 1)} | "
            f"{cell(base['tpot_ms']['mean'], 1)} | {times(pooled['tpot_speedup'])} | "
            f"{cell(spec['output_tokens_per_s'])} | {cell(base['output_tokens_per_s'])} |"
        )
    return [*lines, ""]


def lengths(settings: dict[str, Any]) -> str:
    if settings["dataset"] == "random":
        given = settings["random_input_len"]  # one length, or lengths cycled (a mix)
        inputs = "/".join(map(str, given)) if isinstance(given, list) else given
        return f"{inputs} prompt and {settings['random_output_len']} output tokens (EOS ignored)"
    eos = " (EOS ignored)" if settings["ignore_eos"] else ""
    return f"max {settings['max_tokens']} tokens{eos}"


def budget(settings: dict[str, Any]) -> str:
    """How the spec arm's drafts were sized (results before the flag: the budget)."""
    if settings.get("fixed_speculation"):
        return f"every draft verified, γ ≤ {settings['gamma']} (fixed speculation, past the budget)"
    return f"γ ≤ {settings['gamma']}"


def markdown(results: Sequence[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        model, settings, machine = result["model"], result["settings"], result["machine"]
        greedy = settings["temperature"] == 0
        lines += [
            f"### Serving {model['target']} ({model['dtype']}, TP {model['tensor_parallel_size']}),"
            f" drafter {result['label']}",
            "",
            f"`{result['command']}`",
            "",
            f"{len(settings['prompts'])} prompts ({settings['dataset']}){waves(settings)}, "
            "each sent with "
            f"speculation on and off ({settings['ab_order']}; {priming(settings)}); "
            f"{lengths(settings)}, "
            f"temperature {settings['temperature']}, {budget(settings)}. Client: "
            f"{machine_line(machine)}; started {result['started_at']}.",
            "",
            "Latencies: mean / median / p99 (linear interpolation). ITL counts a multi-token "
            "chunk (one speculative round) as one gap: time per round, not per token; TPOT is "
            "per token. out tok/s: an arm's output over the time it had requests in flight. "
            "req tok/s: Σ tokens / Σ E2EL, a request's own rate; speedup: its spec ÷ no-spec "
            "ratio on the prompts where both arms succeeded; TPOT speedup: mean TPOT no spec "
            "÷ spec.",
            "",
        ]
        lines += cache_caveat(result)
        for run in result["runs"]:
            lines += run_tables(run, greedy)
    lines += sweep_table(results)
    return "\n".join(lines)


# Drafters that keep finished requests' outputs and draft later requests from them.
CACHING_DRAFTERS = ("suffix",)


def waves(settings: dict[str, Any]) -> str:
    """How many prompts a level sends beyond the set (results older than the flag: one wave)."""
    count = settings.get("waves", 1)
    if count <= 1:
        return ""
    return f" and at least {count} times its concurrency per level, cycled ({count} waves)"


def priming(settings: dict[str, Any]) -> str:
    """How the run treated the prefix cache (results older than the flag primed nothing)."""
    if settings.get("prime_cache", False):
        return "each level's new prompts prefilled once, unmeasured, before both arms"
    return "prefix cache not primed: the first arm warms it for the second"


def cache_caveat(result: dict[str, Any]) -> list[str]:
    """A warning where the server's drafter caches outputs across requests
    and the run sent a prompt more than once (a later level, or a prompt
    cycled within one): the later copies are drafted from the earlier ones'
    outputs."""
    drafts = result["model"].get("drafts", [])
    caching = [d for d in drafts if any(kind in d for kind in CACHING_DRAFTERS)]
    runs = result["runs"]
    cycled = any("#" in r["prompt_id"] for run in runs for r in run["records"])
    if not caching or (len(runs) < 2 and not cycled):
        return []
    return [
        f"Caution: the drafter ({', '.join(caching)}) caches finished outputs across "
        "requests, and this run sent prompts more than once (levels after the first, or "
        "prompts cycled within a level): those later copies were drafted from the earlier "
        "copies' outputs, so their speedups are not a fresh prompt's. Measure each level "
        "against a freshly started server for those.",
        "",
    ]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Speedup by category, one bar per drafter label (and load level)."""
    plt = _pyplot()
    series = []
    for result in results:
        for run in result["runs"]:
            name = (
                result["label"]
                if len(result["runs"]) == 1
                else f"{result['label']}, {run_title(run)}"
            )
            series.append((name, {row["category"]: row for row in run["categories"]}))
    named = dict.fromkeys(c for _, rows in series for c in rows if c != ALL)
    categories = [*named, ALL]
    width = 0.8 / max(len(series), 1)
    fig, axes = plt.subplots(
        2, 1, figsize=(max(8.0, 1.2 * len(categories) * len(series) / 2), 7.5), sharex=True
    )
    panels = (("speedup", "tokens / request latency"), ("tpot_speedup", "1 / TPOT"))
    for ax, (key, unit) in zip(axes, panels, strict=True):
        for i, (name, rows) in enumerate(series):
            values = [(rows.get(c) or {}).get(key) or 0.0 for c in categories]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
            ax.bar(xs, values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{unit}\nspec ÷ no spec")
    axes[-1].set_xticks(range(len(categories)), categories)
    model = results[0]["model"]
    axes[0].set_title(f"{model['target']} ({model['dtype']}): speculation on ÷ off, served")
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tpot(results: Sequence[dict[str, Any]], path: Path) -> bool:
    """Mean TPOT against concurrency, one colour per result (drafter label):
    spec solid, no spec dashed. False (nothing written) when no run had a
    concurrency cap."""
    curves = []
    for result in results:
        runs = sorted(
            (r for r in result["runs"] if r["concurrency"]), key=lambda r: r["concurrency"]
        )
        for arm in (SPEC, BASE):
            points = [(r["concurrency"], r["modes"][arm]["tpot_ms"]["mean"]) for r in runs]
            curves.append((result["label"], arm, [(c, t) for c, t in points if t is not None]))
    if not any(points for _, _, points in curves):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    levels = sorted({c for _, _, points in curves for c, _ in points})
    for number, (label, arm, points) in enumerate(curves):
        if points:
            ax.plot(
                [c for c, _ in points],
                [t for _, t in points],
                "-o" if arm == SPEC else "--s",
                color=colours[(number // 2) % len(colours)],
                label=f"{label}: {ARM_NAMES[arm]}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("mean TPOT, ms")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{results[0]['model']['target']}: TPOT against concurrency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_and_write(
    results: Sequence[dict[str, Any]], save: Path | None, combined: bool
) -> list[Path]:
    """Print the Markdown; with ``save``, write the JSON there (a single run's
    result, not a combination) and the .md and plots beside it. Returns the
    paths written."""
    text = markdown(results)
    print(text)
    if save is None:
        return []
    save.parent.mkdir(parents=True, exist_ok=True)
    stem = save.with_suffix("")
    written = []
    if not combined:
        save.write_text(json.dumps(results[0], indent=1))
        written.append(save)
    md = stem.with_name(stem.name + ".md")
    md.write_text(text)
    speedup = stem.with_name(stem.name + "_speedup.png")
    plot_speedup(results, speedup)
    written += [md, speedup]
    tpot = stem.with_name(stem.name + "_tpot.png")
    if plot_tpot(results, tpot):
        written.append(tpot)
    return written
