"""A plan as text (tables and reasons) and as a JSON-ready dict."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from specray.cluster.planning.planner import Candidate, Plan

GB = 1e9


def candidate_dict(c: Candidate) -> dict[str, Any]:
    return {
        "layout": c.layout.label,
        "family": c.layout.family,
        "width": c.layout.width,
        "pp": c.layout.pp,
        "gpus_per_replica": c.layout.gpus,
        "replicas": c.replicas,
        "batch_per_replica": c.batch,
        "weight_gb_per_gpu": c.memory.weight_bytes_per_gpu / GB,
        "kv_free_gb_per_gpu": c.memory.free_bytes_per_gpu / GB,
        "kv_bytes_per_token_per_gpu": c.memory.kv_bytes_per_token_per_gpu,
        "kv_tokens_per_replica": c.memory.kv_tokens_per_replica,
        "max_request_context": c.memory.max_request_context,
        "full_context_requests": c.memory.full_context_requests,
        "decode_ms": c.decode.total_s * 1e3,
        "decode_hbm_ms": c.decode.hbm_s * 1e3,
        "decode_comm_ms": c.decode.comm_s * 1e3,
        "collectives_per_step": c.decode.collectives,
        "tokens_per_s": c.tokens_per_s,
        "verify_cost": c.verify_cost,
        "spec_speedup": c.speedup,
        "best_gamma": c.best_gamma,
        "best_spec_speedup": c.best_speedup,
        "rejected": c.rejected,
    }


def plan_dict(plan: Plan) -> dict[str, Any]:
    m, s = plan.model, plan.settings
    return {
        "model": {
            **{k: v for k, v in asdict(m).items() if k not in ("public",)},
            "public": list(m.public),
            "assumed": list(m.assumed),
            "expert_params": m.expert_params,
            "always_active_params": m.always_active_params,
            "attention_params": m.attention_params,
            "kv_bytes_per_token": m.kv_bytes_per_token(s.precision.kv_bytes),
            "request_cache_bytes": m.request_cache_bytes(s.precision.kv_bytes),
        },
        "gpu": asdict(plan.gpu),
        "cluster": {"nodes": plan.shape.nodes, "gpus_per_node": plan.shape.gpus_per_node},
        "settings": asdict(s),
        "min_gpus_for_weights": plan.min_gpus,
        "best": candidate_dict(plan.best) if plan.best else None,
        "why": list(plan.why),
        "drafts": asdict(plan.drafts) if plan.drafts else None,
        "candidates": [candidate_dict(c) for c in plan.candidates],
    }


def _cache_design(m: Any) -> str:
    if m.cache is None:
        return f"MLA: ({m.kv_lora_rank} + {m.qk_rope_head_dim}) values x {m.num_layers} layers"
    c = m.cache
    return (
        f"V4: {c.per_token:g} values/token from {c.csa_layers} CSA + {c.hca_layers} HCA layers' "
        f"compressed entries and indexer keys, plus {c.per_request / 1e6:.2f}M values/request "
        f"for sliding windows and open compressor rows"
    )


def plan_text(plan: Plan, top: int = 12) -> str:
    m, g, s = plan.model, plan.gpu, plan.settings
    kv_token = m.kv_bytes_per_token(s.precision.kv_bytes)
    lines = [
        f"{m.name} on {plan.shape.nodes} x {plan.shape.gpus_per_node} {g.name} "
        f"({g.memory_gb:g} GB, {g.hbm_tbps:g} TB/s; NVLink busbw {g.intra.busbw_gbps:g} GB/s, "
        f"{g.intra.latency_us:g} us; inter-node {g.inter.busbw_gbps:g} GB/s, "
        f"{g.inter.latency_us:g} us)",
        f"model: {m.total_params / 1e9:g}B total, {m.active_params / 1e9:g}B active, "
        f"{m.max_context} context; routed expert {m.expert_params / 1e6:.1f}M params, "
        f"always-active {m.always_active_params / 1e9:.1f}B (attention "
        f"{m.attention_params / 1e9:.1f}B)",
        f"assumed (not public): {', '.join(m.assumed) or 'nothing'}",
        f"weights {s.precision.weights}: {m.total_params * s.precision.weight_bytes / GB:.0f} GB "
        f"(at least {plan.min_gpus} GPUs); KV {s.precision.kv}: {kv_token / 1024:.2f} KiB/token "
        f"({_cache_design(m)})",
        f"load: {s.requests} requests in the cluster, {s.context} context tokens each; "
        f"speculation α={s.spec.alpha:g} γ={s.spec.gamma} c={s.spec.draft_cost:g}",
        "",
        f"{'layout':<26} {'GPUs':>4} {'repl':>4} {'batch':>5} {'wt GB':>6} {'KV GB':>6} "
        f"{'KV tokens':>10} {'max ctx':>8} {'step ms':>8} {'HBM':>6} {'comm':>5} "
        f"{'tok/s':>7} {'v':>5} {'S':>5}  status",
    ]
    for c in plan.candidates[:top]:
        lines.append(
            f"{c.layout.label:<26} {c.layout.gpus:>4} {c.replicas:>4} {c.batch:>5} "
            f"{c.memory.weight_bytes_per_gpu / GB:>6.1f} {c.memory.free_bytes_per_gpu / GB:>6.1f} "
            f"{c.memory.kv_tokens_per_replica:>10} {c.memory.max_request_context:>8} "
            f"{c.decode.total_s * 1e3:>8.2f} {c.decode.hbm_s * 1e3:>6.2f} "
            f"{c.decode.comm_s * 1e3:>5.2f} {c.tokens_per_s:>7.0f} {c.verify_cost:>5.2f} "
            f"{c.speedup:>5.2f}  {'ok' if c.rejected is None else c.rejected}"
        )
    if len(plan.candidates) > top:
        lines.append(f"... {len(plan.candidates) - top} more layouts (--json lists all)")
    lines.append("")
    if plan.best is None:
        lines.append("no layout: " + "; ".join(plan.why))
        return "\n".join(lines)
    best = plan.best
    lines.append(
        f"best: {best.layout.label}, {best.replicas} x {best.layout.gpus} GPUs; "
        f"expected speculative speedup {best.speedup:.2f}x (verify cost v = "
        f"{best.verify_cost:.2f})"
    )
    lines += [f"  - {reason}" for reason in plan.why]
    if plan.drafts:
        d = plan.drafts
        what = {"ngram": "n-gram", "mtp": "MTP-block"}.get(d.kind, f"draft model {d.model}")
        lines.append(
            f"drafts: {d.replicas} {what} replicas ({d.slots_each} requests and "
            f"{d.cpus_each:g} CPUs each) on the {d.where}"
        )
    return "\n".join(lines)
