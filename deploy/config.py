"""The ``specray serve`` configuration: a YAML or JSON file, every key optional.

backend: router         # router (Ray; the ``router:`` section) | engine (in-process)
router:
  target: qwen2.5-coder-1.5b-instruct
  weights: auto         # gguf | bf16 | fp32 | auto: the fastest measured at start
  tp: 2                 # default: chosen at start (1 on one CPU); tp x ep shards a replica
  ep: 1                 # expert-parallel rows (MoE models only)
  drafts: [{kind: hybrid, model: qwen2.5-coder-0.5b-instruct}]  # or [{kind: ngram}], kind: model
  num_targets: 1        # target replicas, each a TP group
  num_drafts: 1         # draft replicas
# The in-process engine (backend: engine) reads the top-level model keys:
target: qwen2.5-coder-0.5b-instruct
draft: ngram            # none | ngram | a draft model's name or path
weights: auto           # as the router's
k: 4                    # draft tokens per round (its ceiling when adaptive)
max_batch: 8
max_len: 4096
host: 127.0.0.1         # binding elsewhere is an explicit choice
port: 50051             # gRPC; 0 picks a free port
http_port: 8000         # OpenAI-compatible HTTP; null turns it off
limits:
  max_tokens: 2048
  max_queued_requests: 64
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from specray.actors.drafting.spec import (
    DRAFTER_KINDS,
    MODEL_KINDS,
    PURE_LOOKUP_KINDS,
    DrafterSpec,
)
from specray.actors.engine.factory import EngineSpec
from specray.actors.engine.feeds import DEFAULT_MAX_BATCHED_TOKENS
from specray.actors.engine.verify_budget import DEFAULT_FLOOR, BudgetSizing
from specray.actors.model.weight_plan import WeightPlan
from specray.cluster.inline_draft import check_inline
from specray.deploy.auth import TlsFiles
from specray.deploy.backend import ModelInfo
from specray.deploy.gateway import QueueLimits
from specray.deploy.limits import LimitsConfig
from specray.deploy.validation import ValidationLimits
from specray.deploy.weights_config import (
    WEIGHTS_HELP,
    Dtype,
    Weights,
    fold_legacy_dtype,
    model_dtype,
    weight_source,
)


class DrafterConfig(BaseModel):
    """One kind of draft replica: n-gram lookup, or a small draft model."""

    model_config = ConfigDict(extra="forbid")

    # hybrid: n-gram lookup where the text is copied, the model everywhere else
    # suffix: suffix trees over the request and earlier outputs; suffix_hybrid: then a model
    # head: a trained draft head (``model`` is its directory; see docs/draft_head.md)
    kind: str = Field(description=f"one of {', '.join(DRAFTER_KINDS)}")
    model: str | None = Field(
        None, description="kind model or hybrid: registered name or local path; head: its dir"
    )
    dtype: Dtype | None = Field(None, description="default: the router's dtype")
    weights: Literal["auto", "dense", "gguf"] = Field(
        "auto",
        description="a draft model's weights: dense (safetensors in dtype), gguf (its GGUF "
        "blocks, on the block kernel where it runs; docs/weights.md), or auto: the format "
        "the start-up probe measured fastest for one row, where it ran (else dense)",
    )
    num_slots: int | None = Field(
        None, ge=1, description="requests one replica drafts for; default the router's num_slots"
    )
    threads: int = Field(1, ge=1, description="torch threads of one replica")
    cpus: float = Field(1.0, ge=0, description="Ray CPUs one replica reserves")
    placement: Literal["auto", "actor", "router"] = Field(
        "auto",
        description="where a replica runs: actor (a Ray actor of its own) or router (in the "
        f"router's process: {', '.join(PURE_LOOKUP_KINDS)} only, which spare a Ray call a round); "
        "auto: router for those kinds, else actor",
    )
    max_ngram: int = Field(5, ge=1)
    min_ngram: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _is_a_drafter(self) -> DrafterConfig:
        self.spec  # noqa: B018 -- the spec's own checks, with its messages
        if self.placement == "router":
            check_inline(self.kind)
        if self.weights == "gguf" and self.kind not in MODEL_KINDS:
            raise ValueError(
                f"weights: {self.weights!r} is for a draft model (kind "
                f"{', '.join(MODEL_KINDS)}); kind {self.kind!r} has no weights"
            )
        return self

    @property
    def spec(self) -> DrafterSpec:
        return DrafterSpec(self.kind, self.model, self.max_ngram, self.min_ngram)

    @property
    def placed(self) -> Literal["actor", "router"]:
        """Where the replicas run, ``auto`` resolved."""
        if self.placement == "auto":
            return "router" if self.kind in PURE_LOOKUP_KINDS else "actor"
        return self.placement

    @classmethod
    def from_spec(cls, spec: DrafterSpec) -> DrafterConfig:
        return cls.model_validate(
            {
                "kind": spec.kind,
                "model": spec.model,
                "max_ngram": spec.max_ngram,
                "min_ngram": spec.min_ngram,
            }
        )


def _default_drafts() -> list[DrafterConfig]:
    return [
        DrafterConfig.model_validate({"kind": "hybrid", "model": "qwen2.5-coder-0.5b-instruct"})
    ]


class RouterSettings(BaseModel):
    """The Ray router (``backend: router``): target replicas of ``tp × ep``
    shards each, and a pool of draft replicas, scaled independently."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field("qwen2.5-coder-1.5b-instruct", description="registered name or path")
    weights: Weights = Field("auto", description=WEIGHTS_HELP)
    tp: int | None = Field(
        None,
        ge=1,
        description="tensor-parallel shards per row of a target replica; default: measured",
    )
    ep: int = Field(
        1,
        ge=1,
        description="expert-parallel rows of tp shards per target replica (tp × ep shards; "
        "the routed experts split over the rows, attention repeated in each)",
    )
    dtype: Dtype | None = Field(None, description="dense weights in this dtype (legacy key)")
    num_targets: int = Field(1, ge=1, description="target replicas at start")
    # The router runs one draft pool, so one drafter kind: a list so that a
    # config stays valid once pools of several kinds exist; [] is target-only.
    drafts: list[DrafterConfig] = Field(default_factory=_default_drafts, max_length=1)
    num_drafts: int = Field(1, ge=0, description="draft replicas at start")
    k: int = Field(4, ge=0, description="draft tokens per round, or its ceiling")
    adaptive: bool = True
    budget_sizing: BudgetSizing = Field(
        "fresh",
        description="how the verify budget sizes a batch of ranked drafts: fresh (this "
        "round's survivals) or stale (last round's, so the batch shape is known before "
        "drafting; DSpark's production setting)",
    )
    budget_floor: float = Field(
        DEFAULT_FLOOR,
        ge=0.0,
        le=1.0,
        description="the least share of its rate without speculation the verify budget leaves "
        "any request of a batch: drafts whose verification would slow a request that gains "
        "nothing from them (or a prefill) below it are not verified; 0 (the default) "
        "turns it off (docs/drafting.md, 'The floor')",
    )
    overlap: bool = Field(False, description="two micro-batches: draft one, verify the other")
    num_slots: int = Field(8, ge=1, description="requests one target replica batches (max_batch)")
    max_len: int = Field(4096, ge=2, description="KV cache length: prompt + output")
    max_num_batched_tokens: int | None = Field(
        DEFAULT_MAX_BATCHED_TOKENS,
        ge=1,
        description="tokens a target replica feeds per round; longer prompts prefill in chunks "
        "beside the decoding requests (null: whole prompts in one round)",
    )
    prefix_cache_tokens: int | None = Field(
        None,
        ge=0,
        description="positions each target replica (and draft model) keeps of prompts it has "
        "seen, shared by requests with the same prefix; default a quarter of num_slots x "
        "max_len, 0: off",
    )
    prefix_affinity: bool = Field(
        True,
        description="admit a request to the target replica (and draft replica, for suffix "
        "and draft-model drafters) that likely holds its prefix",
    )
    threads_per_shard: int | None = Field(None, ge=1, description="default: cores / shards")
    cpus_per_shard: float | None = Field(None, ge=0, description="default: threads_per_shard")
    gpus_per_shard: float = Field(0.0, ge=0, description="> 0: shards on CUDA over NCCL")
    strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    timeout_s: float = Field(60.0, gt=0, description="bound on every shard call")
    start_timeout_s: float = Field(600.0, gt=0, description="placement and model loading")
    target_restart_timeout_s: float = Field(
        120.0,
        ge=0,
        description="while no target group is up, requests wait this long for its restart, "
        "then fail UNAVAILABLE; 0: fail at once",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="router Prometheus endpoint on 127.0.0.1; 0: any"
    )
    profile: bool = Field(
        True, description="time verify sizes and draft feeds once the replicas are up"
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, description="embedded Ray's logical CPUs; default: twice what the replicas need"
    )

    _fold_dtype = model_validator(mode="after")(fold_legacy_dtype)

    @property
    def drafter(self) -> DrafterConfig | None:
        return self.drafts[0] if self.drafts else None

    @property
    def planned(self) -> bool:
        return self.weights != "auto" and self.tp is not None

    @property
    def verify_rows(self) -> int | None:
        """Rows a target verifies per round: k + 1 with a drafter."""
        return self.k + 1 if self.drafter is not None and self.k > 0 else None

    def with_plan(self, plan: WeightPlan) -> RouterSettings:
        return self.model_copy(update={"weights": plan.format, "dtype": plan.dtype, "tp": plan.tp})

    @property
    def planned_tp(self) -> int:
        """``tp`` once planned."""
        if self.tp is None:
            raise ValueError("tp is planned at start-up (specray.deploy.weights_choice)")
        return self.tp

    @property
    def shards(self) -> int:
        """Shards of one target replica, once planned: tp × ep."""
        return self.planned_tp * self.ep

    @property
    def model_dtype(self) -> str:
        return model_dtype(self.weights, self.dtype)

    def with_draft(self, draft: str) -> RouterSettings:
        """These settings with ``--draft`` applied (see ``DrafterSpec.parse``)."""
        spec = DrafterSpec.parse(draft)
        drafts = [] if spec is None else [DrafterConfig.from_spec(spec)]
        return self.model_copy(update={"drafts": drafts})


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["router", "engine"] = Field(
        "router", description="router: Ray actors (the router section); engine: in-process"
    )
    router: RouterSettings = Field(default_factory=lambda: RouterSettings.model_validate({}))

    # The in-process engine, backend: engine (see specray.actors.engine.factory.EngineSpec).
    target: str = "qwen2.5-coder-0.5b-instruct"
    draft: str = Field(
        "ngram", description="as --draft: none|ngram|suffix|NAME|ngram+NAME|suffix+NAME|head:DIR"
    )
    weights: Weights = Field("auto", description=WEIGHTS_HELP)
    dtype: Dtype | None = Field(None, description="dense weights in this dtype (legacy key)")
    k: int = Field(4, ge=0, description="draft tokens per round, or its ceiling")
    adaptive: bool = True
    budget_sizing: BudgetSizing = Field("fresh", description="as the router's")
    budget_floor: float = Field(DEFAULT_FLOOR, ge=0.0, le=1.0, description="as the router's")
    max_batch: int = Field(8, ge=1)
    max_len: int = Field(4096, ge=2, description="KV cache length: prompt + output")
    max_num_batched_tokens: int | None = Field(
        DEFAULT_MAX_BATCHED_TOKENS, ge=1, description="as the router's: the prefill chunk budget"
    )
    prefix_cache_tokens: int | None = Field(
        None, ge=0, description="as the router's: the prefix cache (default on; 0: off)"
    )
    home: Path | None = Field(None, description="model store (default $SPECRAY_HOME)")
    threads: int | None = Field(None, ge=1, description="torch threads (default: all cores)")

    # The servers.
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    http_port: int | None = Field(8000, ge=0, le=65535)
    address: str | None = Field(None, description="a Ray cluster to join (router backend)")
    admin: bool | None = Field(
        None, description="the Admin service (scaling); default: on only when host is loopback"
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="wait this long for in-flight work")
    # Security (docs/security.md): TLS for both servers, and a bearer token
    # read from this file or $SPECRAY_AUTH_TOKEN, never from the config itself.
    tls_cert: Path | None = Field(None, description="PEM certificate chain; needs tls_key")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    auth_token_file: Path | None = Field(
        None, description="bearer token every call but health checks needs"
    )

    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig.model_validate({}))

    @model_validator(mode="after")
    def _draft_is_a_drafter(self) -> ServeConfig:
        DrafterSpec.parse(self.draft)
        return self

    _fold_dtype = model_validator(mode="after")(fold_legacy_dtype)

    @property
    def verify_rows(self) -> int | None:
        """Rows the engine's target verifies per round: k + 1 with a drafter."""
        return self.k + 1 if DrafterSpec.parse(self.draft) is not None and self.k > 0 else None

    def with_plan(self, plan: WeightPlan) -> ServeConfig:
        """The engine's weights planned (the router's are its own)."""
        return self.model_copy(update={"weights": plan.format, "dtype": plan.dtype})

    @model_validator(mode="after")
    def _address_needs_router(self) -> ServeConfig:
        if self.address is not None and self.backend != "router":
            raise ValueError("`address` (joining a Ray cluster) needs `backend: router`")
        return self

    @model_validator(mode="after")
    def _tls_needs_cert_and_key(self) -> ServeConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both `tls_cert` and `tls_key`")
        return self

    @property
    def tls(self) -> TlsFiles | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(self.tls_cert, self.tls_key)

    @property
    def admin_enabled(self) -> bool:
        return self.admin if self.admin is not None else is_loopback_host(self.host)

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(
            target=self.target,
            draft=DrafterSpec.parse(self.draft),
            dtype=model_dtype(self.weights, self.dtype),
            weights=weight_source(self.weights),
            num_speculative_tokens=self.k,
            adaptive=self.adaptive,
            budget_sizing=self.budget_sizing,
            budget_floor=self.budget_floor,
            max_batch=self.max_batch,
            max_len=self.max_len,
            max_batched_tokens=self.max_num_batched_tokens,
            prefix_cache_tokens=self.prefix_cache_tokens,
            home=self.home,
        )

    def queue_limits(self) -> QueueLimits:
        return QueueLimits(self.limits.max_queued_requests, self.limits.retry_after_s)

    def validation_limits(self, info: ModelInfo) -> ValidationLimits:
        """The model's limits and the ``limits`` section."""
        return ValidationLimits(
            max_context=info.max_context,
            vocab_size=info.vocab_size,
            max_num_speculative_tokens=info.max_num_speculative_tokens,
            request=self.limits,
        )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: Path | None) -> ServeConfig:
    """The file's settings over the defaults (JSON is read as YAML)."""
    if path is None:
        return ServeConfig.model_validate({})
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return ServeConfig.model_validate(data)
