"""Build a ready in-process engine from model names or paths: the one place
that turns ``--target`` / ``--draft`` / ``--dtype`` into loaded components."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from specray.actors.drafting.build import build_drafter, resolve_drafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.feeds import DEFAULT_MAX_BATCHED_TOKENS
from specray.actors.engine.profile import profile_costs
from specray.actors.engine.target import LocalTarget, Target
from specray.actors.engine.tokenizer import eos_token_ids, load_tokenizer
from specray.actors.engine.verify_budget import DEFAULT_FLOOR, BudgetSizing
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model
from specray.actors.model.prefix_cache import prefix_tokens
from specray.actors.sampling.grammar import GrammarCompiler
from specray.actors.store.resolve import resolve_model
from specray.actors.store.weights_dir import weights_dir


@dataclass(frozen=True)
class EngineSpec:
    target: str  # a registered model name or a local path
    draft: DrafterSpec | None = field(default_factory=lambda: DrafterSpec("ngram"))  # None: none
    dtype: str = "bfloat16"
    weights: str = "dense"  # or "gguf": the GGUF blocks on low-bit kernels (load_model)
    num_speculative_tokens: int = 4
    adaptive: bool = True
    max_batch: int = 8
    max_len: int = 4096
    # Tokens the target feeds per round; longer prompts prefill in chunks.
    max_batched_tokens: int | None = DEFAULT_MAX_BATCHED_TOKENS
    # Positions of the target's (and a draft model's) prefix cache; None: a
    # quarter of the KV slots' positions, 0: no prefix caching.
    prefix_cache_tokens: int | None = None
    budget_sizing: BudgetSizing = "fresh"  # how the verify budget sizes a batch (verify_budget.py)
    budget_floor: float = DEFAULT_FLOOR  # least share of its plain rate a request keeps
    home: Path | None = None

    @property
    def prefix_tokens(self) -> int:
        return prefix_tokens(self.prefix_cache_tokens, self.max_batch, self.max_len)


@dataclass
class LoadedEngine:
    engine: SpecEngine
    tokenizer: PreTrainedTokenizerBase
    target_dir: Path
    target_config: ModelConfig


def build_engine(spec: EngineSpec, target: Target | None = None) -> LoadedEngine:
    """Resolve, load and profile. ``target`` replaces the local target
    (e.g. a tensor-parallel group) while everything else stays the same."""
    target_dir = (
        weights_dir(spec.target, spec.weights, spec.dtype, spec.home)
        if spec.weights == "gguf"
        else resolve_model(spec.target, home=spec.home)
    )
    config = ModelConfig.from_pretrained(target_dir)
    tokenizer = load_tokenizer(target_dir)
    if target is None:
        model = load_model(target_dir, spec.dtype, weights=spec.weights)
        target = LocalTarget(model, spec.max_batch, spec.max_len, spec.prefix_tokens)
    drafter = None
    if spec.draft is not None:
        resolved = resolve_drafter(spec.draft, spec.home)
        drafter = build_drafter(
            resolved, spec.dtype, spec.max_batch, spec.max_len, target_dir, spec.prefix_tokens
        )
    costs = None
    if spec.adaptive and drafter is not None:
        k = spec.num_speculative_tokens
        costs = profile_costs(
            target, drafter, spec.max_batch, k, spec.max_len, spec.max_batched_tokens
        )
    engine = SpecEngine(
        target,
        drafter,
        tokenizer,
        eos_token_ids(config, tokenizer),
        EngineConfig(
            spec.max_batch,
            spec.num_speculative_tokens,
            spec.adaptive,
            spec.max_batched_tokens,
            spec.budget_sizing,
            spec.budget_floor,
        ),
        costs,
        grammars=GrammarCompiler(tokenizer, config.vocab_size),
    )
    return LoadedEngine(engine, tokenizer, target_dir, config)
