"""The pure pieces of the speculative-decoding benchmark: no model is loaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from specray.actors.engine.calibration import SurvivalCalibration
from specray.actors.engine.gamma import expected_tokens, speedup
from specray.bench.common import alpha_from_tau, cpu_flags, first_divergence, parse_drafters
from specray.bench.prompts import CATEGORIES, PROMPT_DIR, SESSION_CATEGORIES, SPLITS, load_prompts
from specray.bench.spec_analysis import compare_outputs, match_rates, summarize
from specray.bench.spec_bench import pick_prompts
from specray.bench.spec_report import calibration_tables
from specray.bench.spec_runners import RoundTiming, RunRecord


def test_speedup_matches_hand_computed_values() -> None:
    # α = 0.5, γ = 2, free draft and verify: (1 - 0.125) / 0.5 = 1.75.
    assert speedup(0.5, 2, 0.0, 1.0) == pytest.approx(1.75)
    # α = 0.8, γ = 4: (1 - 0.8^5) / 0.2 = 3.3616 tokens for 4 × 0.1 + 1.2 steps.
    assert speedup(0.8, 4, 0.1, 1.2) == pytest.approx(3.3616 / 1.6)
    # Every draft accepted: γ + 1 tokens per round.
    assert speedup(1.0, 3, 0.0, 1.0) == pytest.approx(4.0)
    # Nothing accepted and a costly verify: slower than plain decoding.
    assert speedup(0.0, 4, 0.0, 1.5) == pytest.approx(1 / 1.5)


def test_cpu_flags_reads_the_features_that_pick_kernels(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16 fma\n")
    assert cpu_flags(info) == ["avx2", "avx512f", "avx512_bf16"]
    assert cpu_flags(tmp_path / "missing") == []


def test_alpha_from_tau_inverts_the_expected_round_length() -> None:
    for alpha in (0.1, 0.5, 0.8, 0.95):
        for gamma in (1, 4, 8):
            tau = expected_tokens(alpha, gamma)
            assert alpha_from_tau(tau, gamma) == pytest.approx(alpha, abs=1e-9)
    assert alpha_from_tau(1.0, 4) == 0.0
    assert alpha_from_tau(5.0, 4) == 1.0


def test_raw_acceptance_rate_understates_the_per_token_alpha() -> None:
    # α = 0.8, γ = 4: E[accepted] = 0.8 (1 - 0.8^4) / 0.2 = 2.3616 of 4 drafts.
    alpha, gamma = 0.8, 4
    accepted = alpha * (1 - alpha**gamma) / (1 - alpha)
    assert accepted / gamma == pytest.approx(0.5904)
    assert alpha_from_tau(1 + accepted, gamma) == pytest.approx(alpha)


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], []) is None


def test_parse_drafters() -> None:
    assert parse_drafters("none, ngram:6,qwen", 4) == [("none", 0), ("ngram", 6), ("qwen", 4)]
    with pytest.raises(ValueError):
        parse_drafters("ngram:0", 4)


def _timing(step: float, propose: float, verify: float, drafts: int, accepted: int, tokens: int
            ) -> RoundTiming:  # fmt: skip
    # The CPU clock reads twice the wall clock: ratios must not change.
    return RoundTiming(step, propose, verify, drafts, accepted, tokens, 2 * step, 2 * propose,
                       2 * verify)  # fmt: skip


def _record(label: str, tokens: int, wall: float, rounds: list[RoundTiming]) -> RunRecord:
    impl = "hf" if label == "plain" else "specray"
    return RunRecord(impl, label, "p0", "code_edit", 4 if label == "ngram" else 0, False, 10,
                     list(range(tokens)), wall, rounds)  # fmt: skip


def test_summarize_derives_speedup_alpha_tau_and_limit() -> None:
    # Target-only: prefill round + 7 decode rounds of 0.1 s each, 8 tokens in 1.0 s.
    base = _record("none", 8, 1.0, [_timing(0.3, 0, 0.3, 0, 0, 1)]
                   + [_timing(0.1, 0, 0.1, 0, 0, 1) for _ in range(7)])  # fmt: skip
    # n-gram, γ = 4: the prefill round (4 drafts, 3 accepted), then two decode
    # rounds of 0.12 s (verify 0.11 s) that accept all 4 drafts plus the bonus.
    spec = _record("ngram", 14, 0.5, [
        _timing(0.26, 0.0, 0.25, 4, 3, 4),
        _timing(0.12, 0.001, 0.11, 4, 4, 5),
        _timing(0.12, 0.001, 0.11, 4, 4, 5),
    ])  # fmt: skip
    hf = _record("plain", 8, 2.0, [])
    base.cpu_s, spec.cpu_s, hf.cpu_s = 2.0, 0.8, 4.0
    rows = {(r["category"], r["label"]): r for r in summarize([base, spec, hf], ["code_edit"])}
    row = rows["code_edit", "ngram"]
    assert row["speedup"] == pytest.approx((14 / 0.5) / 8.0)
    assert row["alpha"] == pytest.approx(11 / 12)
    assert row["tau"] == pytest.approx((11 + 3) / 3)
    assert row["decode_speedup"] == pytest.approx(0.1 / (0.24 / 10))
    assert row["c"] == pytest.approx((0.002 / 8) / 0.1)
    assert row["verify_cost"] == pytest.approx(1.1)
    # The limit uses the decode rounds' τ (8 accepted + 2 bonus over 2 rounds).
    limit = speedup(alpha_from_tau(5.0, 4), 4, row["c"], row["verify_cost"])
    assert row["S"] == pytest.approx(limit)
    assert row["achieved"] == pytest.approx(row["decode_speedup"] / limit)
    for key in ("decode_speedup", "c", "verify_cost", "S", "achieved"):
        assert row[f"cpu_{key}"] == pytest.approx(row[key])
    assert row["cpu_speedup"] == pytest.approx((14 / 0.8) / (8 / 2.0))
    assert rows["code_edit", "none"]["vs_hf"] == pytest.approx(8.0 / 4.0)
    assert rows["code_edit", "none"]["vs_hf_cpu"] == pytest.approx(2.0)
    assert ("all", "ngram") in rows


def test_compare_outputs_reports_first_divergence() -> None:
    base = _record("none", 5, 1.0, [_timing(0.1, 0, 0.1, 0, 0, 1)])
    spec = _record("ngram", 5, 1.0, [_timing(0.1, 0, 0.1, 0, 0, 1)])
    spec.token_ids[3] = 99
    (entry,) = compare_outputs([base, spec])
    assert entry["vs_target_only"] == {"specray:none": None, "specray:ngram": 3}
    assert match_rates([entry], "vs_target_only") == {"specray:none": 1.0, "specray:ngram": 0.0}


def test_prompt_set_covers_every_category_and_both_splits() -> None:
    prompts = load_prompts()
    assert {p.category for p in prompts} == set(CATEGORIES)
    ids = [p.id for p in prompts]
    assert len(ids) == len(set(ids))
    for category in CATEGORIES:
        mine = [p for p in prompts if p.category == category]
        assert 6 <= len(mine) <= 10
        assert {p.split for p in mine} == set(SPLITS)
        assert all(p.prompt.strip() for p in mine)


def test_load_prompts_filters_by_category_and_split() -> None:
    evals = load_prompts(["math", "chat"], split="eval")
    assert evals and {p.category for p in evals} == {"math", "chat"}
    assert all(p.split == "eval" for p in evals)
    assert list(dict.fromkeys(p.category for p in evals)) == ["math", "chat"]
    train = load_prompts(["math"], split="train")
    assert not {p.id for p in train} & {p.id for p in evals}
    with pytest.raises(ValueError):
        load_prompts(["poetry"])
    with pytest.raises(ValueError):
        load_prompts(split="test")


def test_prompt_ids_pick_exactly_those_prompts_in_order() -> None:
    def args(ids: str | None) -> argparse.Namespace:
        return argparse.Namespace(
            categories=None, split="eval", prompts_per_category=1, prompt_ids=ids
        )

    assert [p.id for p in pick_prompts(args(None))] == [
        f"{c}-00" for c in ("code_edit", "summarization", "chat", "math", "translation")
    ]
    chosen = pick_prompts(args("math-02,code_edit-04"))
    assert [p.id for p in chosen] == ["math-02", "code_edit-04"]
    with pytest.raises(SystemExit, match="unknown \\['poem-01'\\]"):
        pick_prompts(args("poem-01"))


def test_prompt_files_are_valid_jsonl_with_the_documented_fields() -> None:
    for path in sorted(Path(PROMPT_DIR).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            sessions = {"session", "turn"} if path.stem in SESSION_CATEGORIES else set()
            assert set(record) == {"id", "category", "split", "prompt"} | sessions
            assert record["category"] == path.stem


def test_the_report_shows_each_adaptive_runs_survival_calibration() -> None:
    calibration = SurvivalCalibration()
    calibration.observe([0.36, 0.32, 0.9], [True, False, True])
    lines = calibration_tables({"suffix+adaptive": calibration.report(), "ngram+adaptive": []})
    assert any("suffix+adaptive" in line for line in lines)
    assert not any("ngram+adaptive" in line for line in lines)  # nothing judged: no table
    assert "| [0.30, 0.35) | 1 | 0.320 | 0.000 |" in "\n".join(lines)
    assert "| [0.35, 0.40) | 1 | 0.360 | 1.000 |" in "\n".join(lines)
