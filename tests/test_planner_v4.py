"""The planner reads DeepSeek-V4 from its config: parameters counted on the
meta device, the cache from V4's design, and the layout it picks written as
``specray serve`` keys (tp, ep) that the target group runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import DeepseekV4ForCausalLM

from specray.actors.store.tiny_v4 import tiny_v4_config
from specray.cluster.planning.layouts import Layout
from specray.cluster.planning.model_specs import load_model_spec, preset
from specray.deploy.cli import main
from specray.deploy.config import ServeConfig

# A "GPU" of 350 KB (141 GB H200 less a 140.99965 GB reserve): too small for
# the tiny V4's 393k fp8 weights, so the planner has to split them over nodes.
TINY_GPU = ["--gpu", "h200", "--memory-utilization", "1", "--reserve-gb", "140.99965"]
TINY_LOAD = ["--requests", "2", "--context", "64", "--min-request-context", "64"]


def test_v4_flash_is_counted_from_transformers_defaults() -> None:
    flash = preset("v4-flash")
    assert round(flash.total_params / 1e9, 1) == 284.3
    assert round(flash.active_params / 1e9, 1) == 13.8
    assert (flash.routed_experts, flash.experts_per_token, flash.num_layers) == (256, 6, 43)
    assert flash.expert_params == 3 * 4096 * 2048  # gate, up and down of one routed expert
    assert flash.assumed == () and flash.max_context == 1 << 20


def test_v4_flash_cache_is_v4s_design_not_mla() -> None:
    flash = preset("v4-flash")
    # Per context token: 20 CSA layers keep a 512-wide entry and a 128-wide
    # indexer key per 4 tokens, 23 HCA layers a 512-wide entry per 128.
    per_token = 20 * (512 / 4 + 128 / 4) + 23 * 512 / 128
    assert flash.kv_bytes_per_token(2.0) == per_token * 2 == 6584  # 6.43 KiB, not MLA's 48.4
    # Per request: every layer's 128-key window, and the rows of each
    # compressor's open windows (2·rate rows of 2·width values).
    window = 43 * 128 * 512
    rows = 20 * (2 * 4 * 2 * 1024 + 2 * 4 * 2 * 128) + 23 * (2 * 128 * 2 * 512)
    assert flash.request_cache_bytes(1.0) == window + rows == 9_216_000


def test_v4_pro_is_labelled_assumed_field_by_field() -> None:
    pro = preset("v4-pro")
    for name in ("num_layers", "hidden_size", "num_heads", "routed_experts", "experts_per_token"):
        assert name in pro.assumed
    assert "total_params" not in pro.assumed and "assumed" in pro.source
    assert pro.total_params == pytest.approx(1.6e12, rel=0.02)
    assert pro.active_params == pytest.approx(49e9, rel=0.02)


def test_a_checkpoint_config_is_counted_like_the_model(tmp_path: Path) -> None:
    config = tiny_v4_config()
    (tmp_path / "config.json").write_text(config.to_json_string())
    spec = load_model_spec(str(tmp_path))
    model = DeepseekV4ForCausalLM(config)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert spec.routed_params == pytest.approx(routed)
    assert spec.active_params == pytest.approx(spec.total_params - routed * 6 / 8)
    assert spec.cache is not None and spec.cache.per_token == 2 * (32 / 4 + 16 / 4) + 32 / 8


def test_the_emitted_serve_config_runs_the_picked_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text(tiny_v4_config().to_json_string())
    out = tmp_path / "serve.yaml"
    shape = ["--nodes", "2", "--gpus-per-node", "1"]
    flags = [*TINY_GPU, *TINY_LOAD, *shape, "--draft", "mtp", "--emit-serve-config", str(out)]
    assert main(["plan", "--model", str(tmp_path), *flags]) == 0
    assert "best: EP2, 1 x 2 GPUs" in capsys.readouterr().out
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    router = ServeConfig.model_validate(args).router
    assert (router.tp, router.ep, router.num_targets) == (1, 2, 1)
    assert router.drafter is not None and router.drafter.kind == "mtp"
    assert Layout("ep", 2, 1).runnable and not Layout("tp-ep", 2, 1).runnable
