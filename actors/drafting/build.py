"""Turn a :class:`DrafterSpec` into a loaded drafter: the one place that
resolves drafter models and builds every kind, for the in-process engine
and the draft replicas alike."""

from __future__ import annotations

from pathlib import Path

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.dspark.checkpoint import load_calibration, load_dspark
from specray.actors.drafting.dspark.drafter import DSparkDrafter
from specray.actors.drafting.head.checkpoint import load_head, resolve_head_target
from specray.actors.drafting.head.drafter import HeadDrafter
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.mtp import MTPDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.spec import MODEL_KINDS, DrafterSpec
from specray.actors.drafting.suffix.drafter import SuffixConfig, SuffixDrafter
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model
from specray.actors.model.v4.mtp import load_mtp
from specray.actors.store.weights_dir import weights_dir


class IncompatibleDraftError(ValueError):
    """The draft model cannot draft for this target (different vocabulary)."""


def resolve_drafter(
    spec: DrafterSpec, home: Path | None = None, dtype: str = "float32", weights: str = "dense"
) -> DrafterSpec:
    """``spec`` with its model as a local directory: a registered draft model
    from the offline store (in ``dtype``, or the directory holding its GGUF
    file for ``weights="gguf"``; fetched if missing), a path as given."""
    if spec.kind in MODEL_KINDS:
        assert spec.model is not None
        return spec.with_model(weights_dir(spec.model, weights, dtype, home))
    if spec.kind in ("head", "dspark"):
        assert spec.model_path is not None
        return spec.with_model(spec.model_path)
    return spec


def build_drafter(
    spec: DrafterSpec,
    dtype: str,
    num_slots: int,
    max_len: int,
    target_dir: Path | None = None,
    prefix_tokens: int = 0,
    weights: str = "dense",
) -> Drafter:
    """The drafter ``spec`` names (its model already resolved: see
    :func:`resolve_drafter`), with KV room for ``num_slots`` requests of up
    to ``max_len`` tokens. ``target_dir``: the target it drafts for; a head
    borrows the target's embedding and LM head from it (a DSpark drafter
    where its checkpoint has none), an MTP drafter is the target's own block,
    and a draft model's vocabulary is checked against it. ``weights``: a draft
    model's (``load_model``'s), dense or its GGUF blocks; other kinds take none."""
    if weights != "dense" and spec.kind not in MODEL_KINDS:
        raise ValueError(
            f"weights={weights!r} is for a draft model; a {spec.kind} drafter has none"
        )
    if spec.kind == "ngram":
        return NgramDrafter(spec.max_ngram, spec.min_ngram)
    if spec.kind == "suffix":
        return SuffixDrafter(SuffixConfig(tree=True))
    if spec.kind == "mtp":
        if target_dir is None:
            raise ValueError("an `mtp` drafter reads the target's checkpoint: give its directory")
        return MTPDrafter(load_mtp(target_dir, dtype), num_slots, max_len)
    model_dir = spec.model_path
    assert model_dir is not None
    if spec.kind == "dspark":
        model = load_dspark(model_dir, dtype, target_dir=target_dir)
        return DSparkDrafter(model, num_slots, max_len, load_calibration(model_dir, model.config))
    if spec.kind == "head":
        target = target_dir if target_dir is not None else resolve_head_target(model_dir, dtype)
        return HeadDrafter(load_head(model_dir, target, dtype), num_slots, max_len)
    if target_dir is not None:
        check_vocab(spec, ModelConfig.from_pretrained(model_dir), target_dir)
    drafter: Drafter = DraftModelDrafter(
        load_model(model_dir, dtype, weights=weights), num_slots, max_len, prefix_tokens
    )
    if spec.kind == "hybrid":
        return HybridDrafter(NgramDrafter(spec.max_ngram, spec.min_ngram), drafter)
    if spec.kind == "suffix_hybrid":
        return HybridDrafter(SuffixDrafter(SuffixConfig(tree=True)), drafter)
    return drafter


def check_vocab(spec: DrafterSpec, draft: ModelConfig, target_dir: Path) -> None:
    target = ModelConfig.from_pretrained(target_dir)
    if draft.vocab_size != target.vocab_size:
        raise IncompatibleDraftError(
            f"draft {spec.name!r} has vocab_size {draft.vocab_size}, the target has "
            f"{target.vocab_size}: a draft must share the target's tokenizer"
        )
