"""Each benchmark's markdown renders from its committed JSON: the tables'
cells equal those of the committed ``.md`` (the report a rerun of its
command writes), one table row per measured row, and the machine line with
its CPU flags."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from specray.bench import (
    budget_fuzz,
    ep_bench,
    model_bench,
    prefill_chunk_bench,
    prefill_mix_bench,
    prefix_chat_bench,
    prefix_copy_bench,
    round_sizes,
    router_compare,
    router_phases,
    row_kernel_bench,
    serve_report,
    server_diagnostics,
    structured_bench,
    tp_bench,
    v4_bench,
)

RESULTS = Path(__file__).parent.parent / "bench" / "results"
Markdown = Callable[[dict[str, Any]], str]
# Reports with one table of ``rows`` under a machine header.
ROW_REPORTS: dict[str, Markdown] = {
    "budget_fuzz_qwen2.5-coder-1.5b-instruct_gguf_resend_avx512bf16": budget_fuzz.markdown,
    "budget_fuzz_qwen2.5-coder-1.5b-instruct_gguf_resend_avx512bf16_before_rank_lanes": (
        budget_fuzz.markdown
    ),
    "prefill_chunk_qwen2.5-coder-0.5b-instruct_float32": prefill_chunk_bench.markdown,
    "prefill_mix_qwen2.5-coder-0.5b-instruct_float32": prefill_mix_bench.markdown,
    "prefix_chat_qwen2.5-coder-0.5b-instruct_float32": prefix_chat_bench.markdown,
    "prefix_copy_qwen2.5-coder-0.5b-instruct": prefix_copy_bench.markdown,
    "row_kernels_qwen2.5-coder-0.5b-instruct_float32": row_kernel_bench.markdown,
    "structured_qwen2.5-coder-1.5b-instruct_float32": structured_bench.markdown,
}
# Router phases: a row per arm, then (where the JSON has them) the
# speculative arms' rounds by verified size.
PHASE_REPORTS = [
    "router_phases_qwen1.5b_gguf_ngram_sameserver_own_avx2_avx2",
    "router_phases_qwen1.5b_gguf_ngram_placement_actor_avx2_avx2",
    "router_phases_qwen1.5b_gguf_ngram_placement_router_avx2_avx2",
    "router_phases_qwen1.5b_gguf_ngram_placement_router_avx2_priced_avx2",
    "router_phases_qwen1.5b_gguf_ngram_placement_router_avx2_c16_waves3",
    "router_phases_qwen1.5b_gguf_ngram_placement_router_avx2_c16_waves3_cold",
    "router_phases_qwen1.5b_gguf_ngram_placement_router_avx2_c16_waves3_warmup",
    "router_phases_suffix_adaptive_k16_suffix_verbatim_c1",
    "router_phases_suffix_fixed_k16_verbatim_c1",
    "router_phases_suffix_fixed_k8_verbatim_c1",
    "router_phases_suffix_adaptive_k16_suffix_verbatim_c1_bent",
    "router_phases_suffix_fixed_k16_verbatim_c1_bent",
]
# Served runs that recorded the router's diagnostics (Admin) per arm.
SERVED_DIAGNOSTICS = [
    "serve/qwen1.5b_gguf_ngram_inline_waves3_c16_diagnostics_avx2",
    "serve/qwen1.5b_gguf_ngram_inline_waves3_c16_diagnostics2_avx2",
    "serve/qwen1.5b_gguf_ngram_inline_waves3_c16_bent_avx2",
    "serve/qwen1.5b_gguf_ngram_inline_waves3_bent_avx2",
]
# Reports of our model against transformers' (a row per measure).
VERSUS_REPORTS: dict[str, Markdown] = {
    "model_qwen2.5-coder-0.5b-instruct_bfloat16": model_bench.markdown,
    "v4_tiny_bfloat16": v4_bench.markdown,
}
# Reports with a row per shard of each run (the flags are in their title).
SHARD_REPORTS: dict[str, Markdown] = {
    "ep_v4_float32_cpu": ep_bench.markdown,
    "tp_qwen2.5-coder-1.5b-instruct_bfloat16_cpu": tp_bench.markdown,
}


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def tables(text: str) -> list[list[str]]:
    """Every table line's cells, rules left out."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [cells(line) for line in lines if not set(cells(line)) <= {"---", "---:"}]


def render(stem: str, markdown: Markdown) -> tuple[dict[str, Any], str]:
    result: dict[str, Any] = json.loads((RESULTS / f"{stem}.json").read_text())
    text = markdown(result)
    assert text.startswith("### ") and text.endswith("\n")
    assert tables(text) == tables((RESULTS / f"{stem}.md").read_text())
    return result, text


@pytest.mark.parametrize("stem", list(ROW_REPORTS))
def test_a_report_renders_its_committed_rows(stem: str) -> None:
    result, text = render(stem, ROW_REPORTS[stem])
    assert f"({', '.join(result['machine']['cpu_flags'])})" in text
    header, *body = tables(text)
    assert len(body) == len(result["rows"])
    assert all(len(row) == len(header) for row in body)


@pytest.mark.parametrize("stem", PHASE_REPORTS)
def test_a_phases_report_renders_its_arms_and_their_rounds_by_size(stem: str) -> None:
    result, text = render(stem, router_phases.markdown)
    assert f"({', '.join(result['machine']['cpu_flags'])})" in text
    arms, *size_tables = text.split("\n\n|")[1:]
    assert len(tables("|" + arms)) == 1 + len(result["rows"])
    spec = [r for r in result["rows"] if r["arm"] == "spec" and r.get("verify_by_size")]
    if not spec:
        assert size_tables == []
        return
    (by_size,) = size_tables
    header, *body = tables("|" + by_size)
    plain = {  # each level's target-only decode round: its most frequent size
        (r["concurrency"], r["pair"]): int(max(sizes, key=lambda s: sizes[s]["rounds"]))
        for r in result["rows"]
        if r["arm"] == "none" and (sizes := r["verify_by_size"])
    }
    kept = [
        s for r in spec for s in r["verify_by_size"] if int(s) >= plain[r["concurrency"], r["pair"]]
    ]
    assert len(body) == len(kept)
    verified, even, bound = (header.index(h) for h in header[2:3] + header[-2:])
    for row in body:  # the bound is the verified tokens over the break-even ones
        assert float(row[bound]) == pytest.approx(int(row[verified]) / float(row[even]), rel=0.02)


@pytest.mark.parametrize("stem", SERVED_DIAGNOSTICS)
def test_a_served_report_renders_its_diagnostics(stem: str) -> None:
    """Per level, the copy estimates at each arm's start and end, then the
    speculative arm's rounds by size beside the target-only arm's decode
    round, each level's lines within the report."""
    result, text = render(stem, lambda r: serve_report.markdown([r]))
    for run in result["runs"]:
        diagnostics = run["diagnostics"]
        lines = server_diagnostics.diagnostics_lines(run)
        assert "\n".join(lines) in text
        estimates, by_size = "\n".join(lines).split("\n\n|")[-2:]
        assert len(tables("|" + estimates)) == 1 + 2 * len(diagnostics)
        plain_sizes = diagnostics["no_spec"]["end"]["rounds"]["by_verified"]
        plain = max(plain_sizes, key=lambda s: plain_sizes[s]["rounds"])
        plain_ms = 1e3 * plain_sizes[plain]["wait_s"] / plain_sizes[plain]["rounds"]
        spec_sizes = diagnostics["spec"]["end"]["rounds"]["by_verified"]
        kept = {s: v for s, v in spec_sizes.items() if int(s) >= int(plain) and v["rounds"]}
        header, *body = tables("|" + by_size)
        assert header == round_sizes.HEADERS
        assert [row[0] for row in body] == sorted(kept, key=int)
        for row in body:
            size = kept[row[0]]
            even = int(plain) * (1e3 * size["wait_s"] / size["rounds"]) / plain_ms
            assert float(row[-2]) == pytest.approx(even, abs=0.01)
            assert float(row[-1]) == pytest.approx(int(row[0]) / even, abs=0.01)


@pytest.mark.parametrize("stem", list(SHARD_REPORTS))
def test_a_parallel_report_renders_a_row_per_shard(stem: str) -> None:
    result, text = render(stem, SHARD_REPORTS[stem])
    shards = sum(len(run["shards"]) for run in result["runs"])
    body = tables(text)[1:]
    assert len(body) >= shards
    assert [row[3] for row in body[:shards]] == [
        str(shard["rank"]) for run in result["runs"] for shard in run["shards"]
    ]


@pytest.mark.parametrize("stem", list(VERSUS_REPORTS))
def test_a_model_report_renders_both_columns(stem: str) -> None:
    result, text = render(stem, VERSUS_REPORTS[stem])
    first, *rest = text.split("\n\n|")[1:]  # each table starts after a blank line
    header, *body = tables("|" + first)
    assert header == ["", "specray", "transformers"]
    assert len(body) == 2 + len(result["specray"]["verify_cost_ratio"])
    if "speculative" in result:  # the V4 report's second table: a row per method
        (spec,) = rest
        assert len(tables("|" + spec)) == 1 + len(result["speculative"]["methods"])


def test_router_compare_pairs_each_round() -> None:
    def run(none_c1: float, spec_c8: float) -> dict[str, Any]:
        sweep = [
            {"mode": "none", "concurrency": 1, "tokens_per_s": none_c1},
            {"mode": "spec", "concurrency": 8, "tokens_per_s": spec_c8},
        ]
        return {"sweep": sweep}

    runs = [run(10.0, 40.0), run(5.0, 40.0), run(9.0, 30.0), run(9.0, 20.0)]
    result = router_compare.compare(runs, ["new", "old"])
    by_key = {(r["mode"], r["concurrency"]): r for r in result["rows"]}
    assert by_key["none", 1]["ratios"] == [2.0, 1.0]
    assert by_key["spec", 8]["ratios"] == [1.0, 1.5]
    assert by_key["spec", 8]["median_ratio"] == 1.25
    with pytest.raises(ValueError, match="whole rounds"):
        router_compare.compare(runs[:3], ["new", "old"])


def test_a_served_report_names_the_weights_the_replicas_loaded() -> None:
    """Where the server's diagnostics say what its replicas loaded (the
    start-up probe chose it), the report says it before the estimates;
    older results without it render as they did."""
    result = json.loads((RESULTS / f"{SERVED_DIAGNOSTICS[0]}.json").read_text())
    run = result["runs"][0]
    before = server_diagnostics.diagnostics_lines(run)
    assert not any("Weights" in line for line in before)
    first = next(iter(run["diagnostics"].values()))["start"]
    first["weights"] = {"target": "gguf (bfloat16)", "draft": "gguf (bfloat16)"}
    after = server_diagnostics.diagnostics_lines(run)
    assert after[:2] == [
        "",
        "Weights the replicas loaded (Admin diagnostics): "
        "target gguf (bfloat16), draft gguf (bfloat16).",
    ]
    assert after[2:] == before


def test_a_served_report_says_which_arm_lost_replicas() -> None:
    """Where the diagnostics count replica losses, the report says each
    arm's (the restarts share the cores with the arm's own work)."""
    result = json.loads((RESULTS / f"{SERVED_DIAGNOSTICS[0]}.json").read_text())
    run = result["runs"][0]
    before = server_diagnostics.diagnostics_lines(run)
    for arm, lost in (("spec", 3), ("no_spec", 0)):
        reads = run["diagnostics"][arm]
        reads["start"]["recovery"] = {"draft_failures": 2, "target_failures": 1}
        reads["end"]["recovery"] = {"draft_failures": 2 + lost, "target_failures": 1}
    after = server_diagnostics.diagnostics_lines(run)
    line = (
        "Replicas lost during each arm (Admin diagnostics): "
        "spec 3 draft, 0 target; no spec 0 draft, 0 target."
    )
    assert [x for x in after if x.startswith("Replicas")] == [line]
    assert [x for x in after if not x.startswith("Replicas")] == ["", *before]
