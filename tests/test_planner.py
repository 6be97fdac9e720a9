"""`specray plan`: the arithmetic against hand-computed cases (DeepSeek-V3's
public config, an H200 example), the layout choice, and emitted configs that
the serving code accepts."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from specray.actors.engine.gamma import speedup
from specray.cluster.planning.hardware import GPUS, Link, gpu_spec, links_from_check
from specray.cluster.planning.layouts import (
    ClusterShape,
    Layout,
    MemoryBudget,
    Precision,
    candidate_layouts,
    layout_memory,
)
from specray.cluster.planning.model_specs import preset, spec_from_dict
from specray.cluster.planning.planner import (
    PlanSettings,
    SpecSettings,
    make_plan,
    spec_speedup,
)
from specray.cluster.planning.step_time import experts_touched, step_time
from specray.cluster.preflight.nccl_tests import AllReduceRow
from specray.cluster.preflight.report import GroupResult, Thresholds, evaluate, report_dict
from specray.deploy.cli import main
from specray.deploy.config import ServeConfig

V3, PRO, FLASH = preset("v3"), preset("v4-pro"), preset("v4-flash")
H200 = GPUS["h200"]
FP8 = Precision("fp8", "bf16")


def test_v3_public_config_gives_its_published_shapes() -> None:
    # q_a, q_b, kv_a (latent + rope key), kv_b, o of one MLA layer, by hand:
    # 7168·1536 + 1536·128·192 + 7168·576 + 512·128·256 + 128·128·7168
    assert V3.attention_params_per_layer == 187_105_280
    # Derived from 671B / 37B alone, one expert comes out at V3's 3 × 7168 × 2048.
    assert V3.expert_params == pytest.approx(3 * 7168 * 2048, rel=0.002)
    assert V3.always_active_params == pytest.approx(16.5e9, rel=0.01)
    assert V3.kv_bytes_per_token(2.0) == (512 + 64) * 61 * 2 == 70_272
    assert V3.assumed == ()


def test_experts_touched_by_a_batch() -> None:
    assert experts_touched(V3, 1) == pytest.approx(8)
    assert experts_touched(V3, 2) == pytest.approx(256 * (1 - (248 / 256) ** 2))
    assert experts_touched(V3, 10_000) == pytest.approx(256)


def test_h200_memory_of_v3_tp8_pp2_by_hand() -> None:
    memory = layout_memory(Layout("tp", 8, 2), V3, H200, FP8, MemoryBudget(0.9, 6.0))
    # 31 of 61 layers on the fuller stage, every parameter split 8 ways, 1 byte each.
    weights = 671e9 / 8 * 31 / 61
    usable = 141e9 * 0.9 - 6e9
    per_token = (512 + 64) * 2 * 31  # MLA latent + rope key, bf16, this stage's layers
    assert memory.weight_bytes_per_gpu == pytest.approx(weights)
    assert memory.usable_bytes_per_gpu == pytest.approx(usable)
    assert memory.kv_bytes_per_token_per_gpu == per_token
    assert memory.kv_tokens_per_replica == int((usable - weights) // per_token) == 2_191_840
    assert memory.max_request_context == 131072 and memory.full_context_requests == 16
    # Data-parallel attention: every GPU keeps its own requests' KV.
    dp = layout_memory(Layout("dp-ep", 8, 2), V3, H200, FP8, MemoryBudget(0.9, 6.0))
    assert dp.kv_tokens_per_replica == 8 * dp.kv_tokens_per_gpu
    assert dp.weight_bytes_per_gpu == pytest.approx(
        (V3.attention_params + (V3.other_dense_params + V3.routed_params) / 8) * 31 / 61
    )


def test_h200_decode_step_of_v4_flash_tp8_by_hand() -> None:
    step = step_time(Layout("tp", 8, 1), FLASH, H200, ClusterShape(1, 8), FP8, 1, 32768)
    # One token reads the 13.79B active parameters (fp8) split 8 ways, and its
    # 32768-token V4 cache (20 CSA layers: 512/4 entry + 128/4 indexer values
    # per token; 23 HCA layers: 512/128), replicated on every TP rank, at 80%
    # of 4.8 TB/s.
    kv = 32768 * (20 * (512 // 4 + 128 // 4) + 23 * 512 // 128) * 2
    assert step.hbm_s == pytest.approx((FLASH.active_params / 8 + kv) / (4.8e12 * 0.8))
    # 2 all-reduces per layer of 4096 bf16 values: 10 us + 8192 B × 2·7/8 / 360 GB/s.
    assert step.comm_s == pytest.approx(2 * 43 * (10e-6 + 8192 * 1.75 / 360e9))
    assert step.collectives == 86
    assert step.total_s == pytest.approx(1.369e-3, abs=0.01e-3)


def test_pipeline_hops_and_cross_node_stages_use_the_inter_node_link() -> None:
    shape = ClusterShape(2, 8)
    spans = step_time(Layout("tp", 16, 1), FLASH, H200, shape, FP8, 1, 1)
    assert spans.comm_s == pytest.approx(2 * 43 * H200.inter.all_reduce_s(16, 8192))
    piped = step_time(Layout("tp", 8, 2), FLASH, H200, shape, FP8, 1, 1)
    hop = H200.inter.send_s(8192)
    assert piped.comm_s == pytest.approx(2 * 43 * H200.intra.all_reduce_s(8, 8192) + hop)


def test_spec_speedup_is_the_one_formula() -> None:
    assert spec_speedup(SpecSettings(0.5, 2, 0.0), 1.0) == pytest.approx(1.75)
    for alpha, gamma, c, v in ((0.8, 4, 0.1, 1.2), (0.6, 3, 0.05, 2.5), (1.0, 3, 0.0, 1.0)):
        expected = speedup(alpha, gamma, c, v)
        assert spec_speedup(SpecSettings(alpha, gamma, c), v) == pytest.approx(expected)


def test_layouts_divide_the_model_and_tile_the_nodes() -> None:
    layouts = candidate_layouts(PRO, ClusterShape(2, 8))
    assert Layout("tp", 8, 2) in layouts and Layout("dp-ep", 16, 1) in layouts
    for layout in layouts:
        assert layout.gpus % 8 == 0 or 8 % layout.gpus == 0
        if layout.family in ("tp", "tp-ep"):
            assert 128 % layout.width == 0
        if layout.family != "tp":
            assert 384 % layout.width == 0


def test_best_layout_is_the_fastest_that_fits_and_reaches_the_context() -> None:
    settings = PlanSettings(FP8, requests=8)
    plan = make_plan(PRO, H200, ClusterShape(2, 8), settings)
    best = plan.best
    assert best is not None and best.rejected is None
    assert best.memory.max_request_context == 1 << 20
    eligible = [c for c in plan.candidates if c.rejected is None]
    assert best.decode.total_s == min(c.decode.total_s for c in eligible)
    assert best.layout == Layout("tp", 16, 1) and best.layout.runnable
    # TP8 x PP2 is faster, but the target group has no pipeline stages.
    piped = next(c for c in plan.candidates if c.layout == Layout("tp", 8, 2))
    assert piped.decode.total_s < best.decode.total_s and piped.rejected is not None
    assert piped.rejected.startswith("not run by specray")
    assert "faster but rejected: TP8 x PP2" in " ".join(plan.why)
    # EP16 replicates attention: its KV room holds 420,015 tokens of one request.
    ep16 = next(c for c in plan.candidates if c.layout == Layout("ep", 16, 1))
    assert ep16.rejected == "context: one request reaches 420015 tokens < 1048576"
    assert plan.drafts is not None and plan.drafts.replicas == math.ceil(8 / 16)
    # With a shorter context requirement EP16 qualifies, still slower than TP16.
    short = make_plan(PRO, H200, ClusterShape(2, 8), replace(settings, min_request_context=400_000))
    assert short.best is not None and short.best.layout == best.layout
    assert any(c.layout == ep16.layout and c.rejected is None for c in short.candidates)


def test_nothing_fits_names_the_gpus_needed() -> None:
    plan = make_plan(PRO, H200, ClusterShape(1, 8), PlanSettings(FP8))
    assert plan.best is None and plan.drafts is None
    assert plan.min_gpus == math.ceil(1.6e12 / (141e9 * 0.9 - 6e9)) == 14
    assert "at least 14 H200 GPUs" in plan.why[0] and "this cluster has 8" in plan.why[0]


def test_no_layout_reaching_the_context_falls_back_and_says_so() -> None:
    settings = PlanSettings(FP8, min_request_context=2 << 20)  # beyond the model's 1M
    plan = make_plan(FLASH, H200, ClusterShape(1, 8), settings)
    assert plan.best is not None and plan.best.rejected is not None
    assert any("no layout reaches 2097152 tokens" in reason for reason in plan.why)


def test_links_from_a_check_report_replace_the_assumptions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def group(scope: Any, busbw: float, latency: float) -> GroupResult:
        rows = (
            AllReduceRow(8, 2, "float", latency, 0.0, 0.0),
            AllReduceRow(1 << 27, 1 << 25, "float", 500.0, busbw / 1.75, busbw),
        )
        return GroupResult(scope, f"{scope} {busbw}", ("n",), "nccl-tests", 8, rows)

    groups = [
        group("node", 431.0, 10.3),
        group("node", 300.0, 14.0),
        group("cross-node", 45.0, 28.0),
    ]
    report = report_dict(evaluate(groups, Thresholds()))
    gpu = links_from_check(json.loads(json.dumps(report)), H200)
    assert gpu.intra == Link(300.0, 14.0) and gpu.inter == Link(45.0, 28.0)
    assert links_from_check({"groups": []}, H200) == H200
    # Through the CLI: the measured links, then a flag over them.
    check = tmp_path / "check.json"
    check.write_text(json.dumps(report))
    flags = ["--model", "v4-flash", "--gpu", "h200", "--nodes", "2", "--json"]
    assert main(["plan", *flags, "--from-check", str(check), "--latency-us", "7"]) == 0
    used = json.loads(capsys.readouterr().out)["gpu"]
    assert used["intra"] == {"busbw_gbps": 300.0, "latency_us": 7.0}
    assert used["inter"] == {"busbw_gbps": 45.0, "latency_us": 28.0}
    check.write_text(json.dumps({"groups": [{"scope": "node", "rows": [1]}]}))
    assert main(["plan", *flags, "--from-check", str(check)]) == 2
    assert "not a `specray cluster check --json` report" in capsys.readouterr().err


def test_cli_emits_configs_the_serving_code_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray.serve.schema import ServeDeploySchema

    from specray.deploy.serve_app import ROUTER_DEPLOYMENT, ReplicaCounts

    serve_file, rayservice_file = tmp_path / "serve.yaml", tmp_path / "rayservice.yaml"
    code = main(
        [
            *("plan", "--model", "v4-flash", "--gpu", "h200", "--nodes", "2", "--json"),
            *("--emit-serve-config", str(serve_file), "--emit-rayservice", str(rayservice_file)),
        ]
    )
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    best = plan["best"]
    assert best["layout"] == plan["candidates"][0]["layout"] and best["rejected"] is None
    assert "# Layout: " + best["layout"] in serve_file.read_text()

    def check_app(serve: dict[str, Any]) -> ServeConfig:
        (app,) = ServeDeploySchema.model_validate(serve).applications
        config = ServeConfig.model_validate(app.args)
        router = config.router
        assert router.tp == best["gpus_per_replica"] and router.num_targets == best["replicas"]
        assert router.gpus_per_shard == 1 and router.num_slots == best["batch_per_replica"]
        assert router.max_len * router.num_slots <= best["kv_tokens_per_replica"]
        assert router.drafter is not None and router.drafter.kind == "ngram"
        knobs = {d.name: d.user_config for d in app.deployments}
        counts = ReplicaCounts.model_validate(knobs[ROUTER_DEPLOYMENT])
        assert counts.num_drafts == plan["drafts"]["replicas"]
        return config

    check_app(yaml.safe_load(serve_file.read_text()))
    manifests = {doc["kind"]: doc for doc in yaml.safe_load_all(rayservice_file.read_text())}
    assert set(manifests) == {"RayService", "PersistentVolumeClaim", "NetworkPolicy"}
    spec = manifests["RayService"]["spec"]
    config = check_app(yaml.safe_load(spec["serveConfigV2"]))
    assert config.host == "127.0.0.1"
    groups = {g["groupName"]: g for g in spec["rayClusterConfig"]["workerGroupSpecs"]}
    gpu_pod = groups["gpu-targets"]
    limits = gpu_pod["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8
    assert gpu_pod["replicas"] == best["replicas"] * best["gpus_per_replica"] // 8
    assert "cpu-drafts" in groups


def test_model_yaml_overrides_a_preset_and_is_validated(tmp_path: Path) -> None:
    spec = spec_from_dict({"base": "v4-pro", "routed_experts": 512, "name": "pro-512"})
    assert spec.routed_experts == 512 and "routed_experts" not in spec.assumed
    assert spec.total_params == PRO.total_params
    with pytest.raises(ValueError, match=r"unknown model fields \['experts'\]"):
        spec_from_dict({"base": "v4-pro", "experts": 8})
    with pytest.raises(ValueError, match="the routed experts alone activate"):
        spec_from_dict({"base": "v4-pro", "routed_experts": 256})  # V3's 256 cannot give 49B
    path = tmp_path / "model.yaml"
    path.write_text("base: v4-flash\nhidden_size: 5120\nname: flash-wide\n")
    code = main(["plan", "--model", str(path), "--gpu", "h100", "--nodes", "1", "--json"])
    assert code == 0


def test_gpu_names_are_case_insensitive() -> None:
    assert gpu_spec("H200") is H200 and H200.memory_gb == 141.0 and H200.hbm_tbps == 4.8
