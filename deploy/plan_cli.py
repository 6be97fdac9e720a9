"""``specray plan``: TP / EP / PP layouts, memory, decode step time and
speculative speedup of a large MoE model on a GPU cluster, and the Serve
config / KubeRay RayService of the best layout. Pure arithmetic, no Ray."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from specray.cluster.planning.hardware import GPUS, GpuSpec, Link, gpu_spec, links_from_check
from specray.cluster.planning.layouts import ClusterShape, MemoryBudget, Precision
from specray.cluster.planning.model_specs import PRESETS, load_model_spec
from specray.cluster.planning.planner import PlanSettings, SpecSettings, make_plan
from specray.cluster.planning.render import plan_dict, plan_text
from specray.deploy import plan_manifests


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="plan layouts of a V4-scale model on a GPU cluster")
    presets = " | ".join(PRESETS)
    p.add_argument(
        "--model",
        required=True,
        help=f"{presets} | a V4 config.json or checkpoint directory | a YAML of model fields",
    )
    p.add_argument("--gpu", required=True, help=" | ".join(GPUS))
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--dtype", default="fp8", help="weights: fp8 | bf16")
    p.add_argument("--kv-dtype", default="bf16", help="KV cache: bf16 | fp8")
    p.add_argument(
        "--requests", type=int, default=32, help="requests decoding at once, cluster-wide"
    )
    p.add_argument("--context", type=int, default=32768, help="context tokens per request (mean)")
    p.add_argument(
        "--min-request-context",
        type=int,
        default=None,
        help="tokens one request must reach (default: the model's max context)",
    )
    p.add_argument("--alpha", type=float, default=0.7, help="per-token draft acceptance α")
    p.add_argument("--gamma", type=int, default=3, help="draft tokens per round γ")
    p.add_argument("--draft-cost", type=float, default=0.0, help="c: draft token / target step")
    p.add_argument("--draft", default="ngram", help="ngram | mtp | a draft model's name")
    p.add_argument("--hbm-efficiency", type=float, default=0.8, help="share of peak HBM bandwidth")
    p.add_argument("--memory-utilization", type=float, default=0.9, help="share of HBM used")
    p.add_argument("--reserve-gb", type=float, default=6.0, help="per GPU, beside weights and KV")
    p.add_argument("--busbw-gbps", type=float, default=None, help="intra-node all-reduce busbw")
    p.add_argument("--latency-us", type=float, default=None, help="intra-node small all-reduce")
    p.add_argument("--inter-busbw-gbps", type=float, default=None, help="inter-node busbw")
    p.add_argument("--inter-latency-us", type=float, default=None, help="inter-node latency")
    p.add_argument(
        "--from-check", type=Path, default=None, help="links from `specray cluster check --json`"
    )
    p.add_argument("--target", default=None, help="router target in emitted configs")
    p.add_argument("--emit-serve-config", type=Path, default=None, help="write a Serve config")
    p.add_argument("--emit-rayservice", type=Path, default=None, help="write a KubeRay manifest")
    p.add_argument("--top", type=int, default=12, help="layouts in the table")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        model = load_model_spec(args.model)
        gpu = _links(args, gpu_spec(args.gpu))
        shape = ClusterShape(args.nodes, args.gpus_per_node)
        settings = PlanSettings(
            precision=Precision(args.dtype, args.kv_dtype),
            budget=MemoryBudget(args.memory_utilization, args.reserve_gb),
            spec=SpecSettings(args.alpha, args.gamma, args.draft_cost),
            requests=args.requests,
            context=args.context,
            min_request_context=args.min_request_context,
            hbm_efficiency=args.hbm_efficiency,
            draft=args.draft,
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = make_plan(model, gpu, shape, settings)
    print(json.dumps(plan_dict(plan)) if args.json else plan_text(plan, args.top))
    if plan.best is None:
        return 1
    target = args.target or f"/models/{model.name}"
    if args.emit_serve_config:
        config = plan_manifests.serve_config(plan, target)
        args.emit_serve_config.write_text(plan_manifests.dump(plan, [config]))
    if args.emit_rayservice:
        documents = plan_manifests.rayservice(plan, target)
        args.emit_rayservice.write_text(plan_manifests.dump(plan, documents))
    return 0


def _links(args: argparse.Namespace, gpu: GpuSpec) -> GpuSpec:
    """The GPU's assumed links, replaced by a check report, then by flags."""
    if args.from_check:
        try:
            gpu = links_from_check(json.loads(args.from_check.read_text()), gpu)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"--from-check {args.from_check}: not a `specray cluster check --json` report "
                f"({err!r})"
            ) from err
    for flag in ("busbw_gbps", "inter_busbw_gbps", "latency_us", "inter_latency_us"):
        value = getattr(args, flag)
        least = 0.0 if flag.endswith("latency_us") else 1e-9
        if value is not None and value < least:
            relation = ">= 0" if least == 0 else "> 0"
            raise ValueError(f"--{flag.replace('_', '-')} must be {relation}, got {value}")
    intra = Link(
        _pick(args.busbw_gbps, gpu.intra.busbw_gbps), _pick(args.latency_us, gpu.intra.latency_us)
    )
    inter = Link(
        _pick(args.inter_busbw_gbps, gpu.inter.busbw_gbps),
        _pick(args.inter_latency_us, gpu.inter.latency_us),
    )
    return replace(gpu, intra=intra, inter=inter)


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value
