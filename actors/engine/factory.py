"""Build a ready engine from model names or paths: the one place that turns
``--target`` / ``--draft`` / ``--dtype`` into loaded components."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.head.checkpoint import head_dir_of, load_head
from specray.actors.drafting.head.cost import head_step_seconds
from specray.actors.drafting.head.drafter import HeadDrafter
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.calibrate import CostModel, calibrate, step_seconds
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.gamma import GammaPolicy
from specray.actors.engine.target import LocalTarget, Target
from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.store.resolve import resolve_model

HYBRID_PREFIX = "ngram+"  # --draft ngram+NAME: a HybridDrafter over that model


class IncompatibleDraftError(ValueError):
    """The draft model cannot draft for this target (different vocabulary)."""


@dataclass(frozen=True)
class EngineSpec:
    target: str  # a registered model name or a local path
    # none | ngram | a registered model name or a local path | ngram+ that model
    # (n-gram lookup where the text is copied, the model elsewhere)
    draft: str = "ngram"
    dtype: str = "bfloat16"
    num_speculative_tokens: int = 4
    adaptive: bool = True
    max_batch: int = 8
    max_len: int = 4096
    home: Path | None = None


@dataclass
class LoadedEngine:
    engine: SpecEngine
    tokenizer: PreTrainedTokenizerBase
    target_dir: Path
    target_config: ModelConfig
    costs: CostModel | None


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def build_drafter(
    spec: EngineSpec, target_config: ModelConfig, target_dir: Path | None = None
) -> tuple[Drafter | None, DecoderModel | None]:
    """The drafter named by ``spec.draft``, and its model if it has one (a
    draft head borrows the target's embedding and LM head from ``target_dir``)."""
    if spec.draft == "none":
        return None, None
    if spec.draft == "ngram":
        return NgramDrafter(), None
    head_dir = head_dir_of(spec.draft)
    if head_dir is not None:
        if target_dir is None:
            raise ValueError("a draft head needs the target's directory")
        head = load_head(head_dir, target_dir, spec.dtype, target_config)
        return HeadDrafter(head, spec.max_batch, spec.max_len), None
    name = spec.draft.removeprefix(HYBRID_PREFIX)
    draft_dir = resolve_model(name, home=spec.home)
    draft_config = ModelConfig.from_pretrained(draft_dir)
    if draft_config.vocab_size != target_config.vocab_size:
        raise IncompatibleDraftError(
            f"draft {spec.draft!r} has vocab_size {draft_config.vocab_size}, the target has "
            f"{target_config.vocab_size}: a draft must share the target's tokenizer"
        )
    model = load_model(draft_dir, spec.dtype)
    drafter: Drafter = DraftModelDrafter(model, spec.max_batch, spec.max_len)
    if name != spec.draft:
        drafter = HybridDrafter(NgramDrafter(), drafter)
    return drafter, model


def build_engine(spec: EngineSpec, target: Target | None = None) -> LoadedEngine:
    """Resolve, load and calibrate. ``target`` replaces the local target
    (e.g. a tensor-parallel group) while everything else stays the same."""
    target_dir = resolve_model(spec.target, home=spec.home)
    config = ModelConfig.from_pretrained(target_dir)
    tokenizer = load_tokenizer(target_dir)
    costs = None
    if target is None:
        model = load_model(target_dir, spec.dtype)
        target = LocalTarget(model, spec.max_batch, spec.max_len)
    drafter, draft_model = build_drafter(spec, config, target_dir)
    policy = GammaPolicy(spec.num_speculative_tokens, spec.adaptive)
    if spec.adaptive and isinstance(target, LocalTarget) and drafter is not None:
        costs = calibrate(target.model, draft_model, spec.num_speculative_tokens)
        if isinstance(drafter, HeadDrafter):
            head_cost = head_step_seconds(drafter.head) / step_seconds(target.model, 1)
            costs = replace(costs, draft_cost=head_cost)
        policy = GammaPolicy(spec.num_speculative_tokens, True, costs.draft_cost, costs.verify_cost)
    eos = tuple(config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos += (int(tokenizer.eos_token_id),)
    engine = SpecEngine(
        target,
        drafter,
        tokenizer,
        eos,
        EngineConfig(spec.max_batch, spec.num_speculative_tokens, spec.adaptive),
        policy,
    )
    return LoadedEngine(engine, tokenizer, target_dir, config, costs)
