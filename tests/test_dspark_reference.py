"""Our DSpark drafter against DeepSpec's own outputs (tests/data/dspark).

The fixture is a tiny Qwen3 DSpark drafter saved by DeepSpec and what
DeepSpec's modeling computed with it (see tests/data/dspark/README.md). Our
loader reads the checkpoint; every output must match in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specray.actors.drafting.base import DraftRequest, DraftUpdate
from specray.actors.drafting.dspark.checkpoint import load_dspark
from specray.actors.drafting.dspark.drafter import DSparkDrafter
from specray.actors.drafting.dspark.loss import DSparkLossSettings, TargetTopK, dspark_loss
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.sampling.params import SamplingParams

FIXTURE = Path(__file__).parent / "data" / "dspark" / "qwen3_tiny"
TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.fixture(scope="module")
def model() -> DSparkModel:
    return load_dspark(FIXTURE)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


def test_config_reads_deepspecs_fields(model: DSparkModel) -> None:
    config = model.config
    assert (config.block_size, config.mask_token_id, config.markov_rank) == (4, 159, 8)
    assert config.target_layer_ids == (0, 1) and config.num_target_layers == 3
    assert config.confidence_head and config.confidence_with_markov
    assert config.decoder.num_layers == 2 and config.decoder.qk_norm
    assert config.fused_size == 128


def _draft_rounds(
    model: DSparkModel, ref: dict[str, torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """The fixture's two rounds through our cache path: feed context rows,
    then one block forward from the anchor."""
    tokens, context = ref["draft_tokens"][0], ref["draft_context"][0]
    cache = model.new_cache(1, 32)
    slot = cache.allocate()
    outputs = []
    for fed, start in ((0, 7), (7, 10)):
        model.feed_context(
            context[fed:start],
            torch.full((start - fed,), slot),
            torch.arange(fed, start),
            cache,
        )
        out = model.draft_block(
            tokens[start : start + 1], torch.tensor([start]), cache, [slot], torch.tensor([0])
        )
        outputs.append({"hidden": out.hidden[0], "base": out.base_logits[0]})
    return outputs


def test_block_forward_matches_deepspec(model: DSparkModel, ref: dict[str, torch.Tensor]) -> None:
    for number, out in enumerate(_draft_rounds(model, ref), start=1):
        torch.testing.assert_close(out["base"], ref[f"round{number}_base_logits"], **TOL)


def test_markov_and_confidence_heads_match_deepspec(
    model: DSparkModel, ref: dict[str, torch.Tensor]
) -> None:
    for number, out in enumerate(_draft_rounds(model, ref), start=1):
        for path in ("forced", "greedy"):
            if path == "forced":
                previous = ref[f"round{number}_forced_prev"]
            else:
                greedy = ref[f"round{number}_greedy_tokens"]
                previous = torch.cat([ref[f"round{number}_forced_prev"][:1], greedy[:-1]])
            logits = model.markov_logits(out["base"], previous)
            confidence = model.confidence_logits(out["hidden"], previous)
            torch.testing.assert_close(logits, ref[f"round{number}_{path}_logits"], **TOL)
            assert confidence is not None
            torch.testing.assert_close(
                confidence, ref[f"round{number}_{path}_confidence_logits"], **TOL
            )


def test_a_scheduler_prices_the_block_as_one_step(model: DSparkModel) -> None:
    """The drafter and the router's spec (which reads only config.json)
    both say four drafts come from one forward."""
    from specray.actors.drafting.spec import DrafterSpec

    assert DSparkDrafter(model, num_slots=1, max_len=16).paths.block == 4
    assert DrafterSpec("dspark", str(FIXTURE)).paths.block == 4
    assert DrafterSpec("ngram").paths.block == 1
    # Fed the target's hidden states, it has no prompt to catch up on.
    assert not DrafterSpec("dspark", str(FIXTURE)).paths.reads_prompt
    assert not DSparkDrafter(model, num_slots=1, max_len=16).paths.reads_prompt
    assert DrafterSpec("model", "some/dir").paths.reads_prompt


def test_drafter_drafts_deepspecs_greedy_block(
    model: DSparkModel, ref: dict[str, torch.Tensor]
) -> None:
    """Through the Drafter protocol: the target ships rows as it verifies;
    the greedy block and its confidences are DeepSpec's."""
    tokens, context = ref["draft_tokens"][0].tolist(), ref["draft_context"][0]
    drafter = DSparkDrafter(model, num_slots=2, max_len=32)
    # Prompt of 1 token: the first round commits token 1 with the hidden row of position 0.
    drafter.start("r", tokens[:1], SamplingParams())
    committed = 1
    for number, start in enumerate((7, 10), start=1):
        new = tokens[committed : start + 1]
        drafter.accept(DraftUpdate("r", len(new) - 1, new, context[committed - 1 : start]))
        committed = start + 1
        (proposal,) = drafter.propose([DraftRequest("r", 4)])
        assert proposal.token_ids == ref[f"round{number}_greedy_tokens"].tolist()
        assert proposal.draft_probs is None  # greedy: point masses
        assert proposal.confidence is not None
        expected = torch.sigmoid(ref[f"round{number}_greedy_confidence_logits"])
        torch.testing.assert_close(torch.tensor(proposal.confidence), expected, **TOL)


def test_teacher_forced_training_forward_matches_deepspec(
    model: DSparkModel, ref: dict[str, torch.Tensor]
) -> None:
    """DeepSpec's training forward (many anchors per sequence, block mask)
    with the anchors it drew: same draft logits and confidence logits."""
    input_ids, anchors = ref["train_input_ids"], ref["train_anchors"]
    assert bool(ref["train_block_keep"].all())
    previous = torch.cat(
        [input_ids.gather(1, anchors).unsqueeze(-1), ref["train_target_ids"][..., :-1]], dim=-1
    )
    out = model.teacher_forced(ref["train_hidden"], input_ids.gather(1, anchors), anchors, previous)
    torch.testing.assert_close(out.draft_logits, ref["train_draft_logits"], **TOL)
    assert out.confidence_logits is not None
    torch.testing.assert_close(out.confidence_logits, ref["train_confidence_logits"], **TOL)


def test_loss_matches_deepspec() -> None:
    """The loss on DeepSpec's own forward outputs, the full target
    distribution given as a top-k of the whole vocabulary."""
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    meta = json.loads((FIXTURE / "reference.json").read_text())
    target_logits = ref["train_target_logits"]
    vocab = target_logits.shape[-1]
    target = TargetTopK(
        ids=torch.arange(vocab).expand(*target_logits.shape[:-1], vocab),
        probs=torch.softmax(target_logits, dim=-1),
    )
    settings = DSparkLossSettings(decay=meta["draft_args"]["loss_decay_gamma"])
    parts = dspark_loss(
        ref["train_draft_logits"],
        ref["train_confidence_logits"],
        ref["train_target_ids"],
        target,
        ref["train_eval_mask"],
        settings,
    )
    expected = meta["train_loss_parts"]
    assert parts.ce_mean == pytest.approx(expected["ce_loss"], rel=1e-5)
    assert parts.l1_mean == pytest.approx(expected["l1_loss"], rel=1e-5)
    assert parts.confidence_mean == pytest.approx(expected["confidence_loss"], rel=1e-5)
    assert float(parts.total) == pytest.approx(meta["train_loss"], rel=1e-5)
