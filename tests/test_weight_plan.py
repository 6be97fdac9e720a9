"""Start-up choice of weight format and tp: the pure decision on injected
measurements, the config and flags that feed it, and one real probe."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_hardware import AVX2, AVX2_TIMINGS, SAPPHIRE
from tiny_gguf import write_tiny_qwen2

from specray.actors.model.hardware import recommend
from specray.actors.model.weight_plan import plan_weights
from specray.actors.store.weights_dir import kept_gguf, weights_dir
from specray.deploy.cli import build_parser
from specray.deploy.config import RouterSettings, ServeConfig
from specray.deploy.router_backend import router_config
from specray.deploy.serve import apply_overrides
from specray.deploy.weights_choice import (
    auto_draft_models,
    choose_plan,
    planned_config,
    planned_drafts,
    planned_router,
)

DENSE = {name: AVX2_TIMINGS[name] for name in ("fp32", "bf16")}


def test_avx2_without_gguf_verifies_in_fp32_and_decodes_in_bf16() -> None:
    measured = recommend(DENSE, AVX2, gguf_int4_share=None, verify_rows=9)
    drafting = plan_weights("auto", None, measured, drafting=True)
    assert (drafting.format, drafting.dtype, drafting.weights) == ("fp32", "float32", "dense")
    assert "fastest measured for a 9-row verify" in drafting.reason
    alone = plan_weights("auto", None, measured, drafting=False)
    assert (alone.format, alone.dtype) == ("bf16", "bfloat16")
    assert "one-row decode" in alone.reason


def test_a_gguf_file_at_hand_runs_low_bit_when_it_is_measured_fastest() -> None:
    measured = recommend(AVX2_TIMINGS, AVX2, gguf_int4_share=0.1, verify_rows=9)
    plan = plan_weights("auto", None, measured)
    assert (plan.format, plan.dtype, plan.weights) == ("gguf", "bfloat16", "gguf")
    assert plan.log_line().startswith("weights gguf (bfloat16), tp 1: ")
    assert "native bf16 matmul: no" in plan.reason


def test_tp_defaults_to_one_process_and_keeps_a_configured_one() -> None:
    measured = recommend(DENSE, SAPPHIRE, gguf_int4_share=None)
    on_cpu = plan_weights("auto", None, measured)
    assert on_cpu.tp == 1 and "share its cores" in on_cpu.reason
    assert plan_weights("auto", None, measured, device="cuda").tp == 1
    assert plan_weights("auto", 4, measured).tp == 4


def test_explicit_weights_need_no_measurement() -> None:
    plan = plan_weights("fp32", 2, None)
    assert (plan.format, plan.dtype, plan.weights, plan.tp) == ("fp32", "float32", "dense", 2)
    assert "fp32 as configured" in plan.reason
    assert plan_weights("gguf", None, None, dtype="float32").dtype == "float32"
    with pytest.raises(ValueError, match="recommendation"):
        plan_weights("auto", 1, None)
    with pytest.raises(ValueError, match="one of"):
        plan_weights("int3", 1, None)


def test_config_defaults_to_auto_and_folds_a_legacy_dtype() -> None:
    router = RouterSettings.model_validate({})
    assert (router.weights, router.tp, router.dtype, router.planned) == ("auto", None, None, False)
    with pytest.raises(ValueError, match="planned at start-up"):
        router.model_dtype  # noqa: B018
    legacy = RouterSettings.model_validate({"dtype": "float32", "tp": 2})
    assert (legacy.weights, legacy.model_dtype, legacy.shards, legacy.planned) == (
        "fp32",
        "float32",
        2,
        True,
    )
    with pytest.raises(ValueError, match="contradicts"):
        RouterSettings.model_validate({"weights": "bf16", "dtype": "float32"})
    gguf = ServeConfig.model_validate({"weights": "gguf", "dtype": "float32"})
    spec = gguf.engine_spec()
    assert (spec.weights, spec.dtype) == ("gguf", "float32")


def test_weights_and_tp_flags_reach_the_active_section() -> None:
    parser, _ = build_parser()
    legacy = ServeConfig.model_validate({"router": {"dtype": "bfloat16"}, "dtype": "float32"})
    args = parser.parse_args(["serve", "--weights", "gguf", "--tp", "1"])
    router = apply_overrides(legacy, args).router
    assert (router.weights, router.dtype, router.tp) == ("gguf", None, 1)
    assert router.max_num_batched_tokens == legacy.router.max_num_batched_tokens == 512
    args = parser.parse_args(["serve", "--max-num-batched-tokens", "0"])  # whole prompts
    assert apply_overrides(legacy, args).router.max_num_batched_tokens is None
    args = parser.parse_args(["serve", "--backend", "engine", "--weights", "bf16"])
    config = apply_overrides(legacy, args)
    assert (config.weights, config.dtype, config.router.weights) == ("bf16", None, "bf16")
    args = parser.parse_args(["serve", "--backend", "engine", "--max-num-batched-tokens", "256"])
    assert apply_overrides(legacy, args).max_num_batched_tokens == 256
    args = parser.parse_args(["serve", "--max-num-batched-tokens", "-1"])
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        apply_overrides(legacy, args)
    args = parser.parse_args(["generate", "--target", "t", "--prompt", "p", "--weights", "fp32"])
    assert (args.weights, args.tp, args.dtype) == ("fp32", None, None)


def test_a_real_probe_plans_a_tiny_gguf_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = write_tiny_qwen2(tmp_path)
    assert kept_gguf(str(model_dir)) == model_dir / "model.gguf"
    assert weights_dir(str(model_dir), "gguf") == model_dir.absolute()
    with caplog.at_level(logging.INFO, logger="specray.deploy.weights_choice"):
        plan = choose_plan(str(model_dir), "auto", None, verify_rows=5)
    assert plan.format in {"fp32", "bf16", "gguf"} and plan.tp >= 1
    assert "5-row verify" in plan.reason and "gguf: 1 row" in plan.reason
    assert [r.getMessage() for r in caplog.records] == [plan.log_line()]


def test_configured_weights_are_planned_without_a_probe(caplog: pytest.LogCaptureFixture) -> None:
    config = ServeConfig.model_validate({"backend": "engine", "weights": "gguf", "draft": "none"})
    with caplog.at_level(logging.INFO, logger="specray.deploy.weights_choice"):
        served = planned_config(config)
    assert (served.engine_spec().weights, served.engine_spec().dtype) == ("gguf", "bfloat16")
    assert caplog.records[0].getMessage() == (
        "weights gguf (bfloat16), tp 1: gguf as configured. tp 1 as configured."
    )


def test_a_gguf_router_hands_its_shards_the_gguf_directory(tmp_path: Path) -> None:
    model_dir = write_tiny_qwen2(tmp_path)
    settings = RouterSettings.model_validate(
        {"target": str(model_dir), "weights": "gguf", "dtype": "float32", "drafts": []}
    )
    target = router_config(settings).target
    assert (target.model.model_dir, target.model.weights, target.model.dtype, target.tp) == (
        str(model_dir.absolute()),
        "gguf",
        "float32",
        1,
    )


def test_draft_models_left_to_auto_take_the_fastest_one_row_format(tmp_path: Path) -> None:
    """A draft step is one row: a draft model at ``weights: auto`` runs on
    its GGUF blocks where the probe measured those fastest for one row (as
    on AVX2) and it has a GGUF file; dense (the router's dtype) otherwise,
    and without a probe. Lookup drafters keep no weights."""
    measured = recommend(AVX2_TIMINGS, AVX2, gguf_int4_share=0.7, verify_rows=9)
    plan = plan_weights("auto", None, measured)
    assert plan.draft == measured.decode and plan.draft is not None
    assert plan.draft.weights == "gguf"
    assert plan.log_line().endswith("Draft models: gguf, the fastest measured for one row.")
    with_gguf = str(write_tiny_qwen2(tmp_path / "blocks"))
    without = str(tmp_path / "dense")  # a directory with no GGUF in it
    registered = "qwen2.5-coder-0.5b-instruct"  # every registered model is a GGUF
    cases = [  # a drafter as configured: its weights planned, and unprobed
        ({"kind": "hybrid", "model": registered}, "gguf", "dense"),
        ({"kind": "model", "model": with_gguf}, "gguf", "dense"),
        ({"kind": "model", "model": without}, "dense", "dense"),
        ({"kind": "model", "model": with_gguf, "weights": "dense"}, "dense", "dense"),
        ({"kind": "ngram"}, "dense", "dense"),  # no weights to choose
    ]
    for drafter, probed, unprobed in cases:
        settings = RouterSettings.model_validate({"target": "t", "drafts": [drafter]})
        assert settings.drafts[0].weights == drafter.get("weights", "auto")
        planned = planned_drafts(settings.with_plan(plan), plan.draft).drafts[0]
        assert (planned.weights, planned.dtype) == (probed, None)  # the router's dtype
        alone = planned_drafts(settings.with_plan(plan_weights("fp32", 1, None)), None)
        assert alone.drafts[0].weights == unprobed
    with pytest.raises(ValueError, match="is for a draft model"):
        RouterSettings.model_validate(
            {"target": "t", "drafts": [{"kind": "ngram", "weights": "gguf"}]}
        )


def test_a_configured_target_still_probes_for_draft_models_left_to_auto(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Naming the target's weights leaves a draft model's to measure: the
    probe runs for the draft alone (on its GGUF file), the target keeps its
    configured format and dtype, and the draft takes the probe's one-row
    choice (dense only where nothing was measured, as the unprobed case)."""
    draft_dir = str(write_tiny_qwen2(tmp_path / "draft"))
    settings = RouterSettings.model_validate(
        {
            "target": "t",
            "weights": "gguf",
            "tp": 1,
            "dtype": "float32",
            "drafts": [{"kind": "suffix_hybrid", "model": draft_dir}],
        }
    )
    assert settings.planned  # the target needs nothing measured
    assert auto_draft_models(settings) == [draft_dir]
    with caplog.at_level(logging.INFO, logger="specray.deploy.weights_choice"):
        planned = planned_router(settings)
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("weights gguf (float32), tp 1: gguf as configured. cpu: ")
    assert "decode -> " in line and "Draft models: " in line
    assert (planned.weights, planned.dtype, planned.tp) == ("gguf", "float32", 1)
    chosen = line.rsplit("Draft models: ", 1)[1].split(",")[0]
    assert planned.drafts[0].weights == ("gguf" if chosen == "gguf" else "dense")
    # Planned once, it stays: a second pass probes nothing.
    caplog.clear()
    assert planned_router(planned) == planned and not caplog.records
    # A draft with nothing to choose does not start a probe.
    lookup = settings.model_copy(
        update={"drafts": [settings.drafts[0].model_copy(update={"kind": "ngram", "model": None})]}
    )
    assert auto_draft_models(lookup) == []
