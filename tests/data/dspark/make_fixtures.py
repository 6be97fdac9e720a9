"""Make the DSpark reference fixtures by running DeepSpec's own modeling code.

Usage (DeepSpec is not a dependency of this project; point at a checkout):

    python tests/data/dspark/make_fixtures.py --deepspec /path/to/DeepSpec \
        --out tests/data/dspark/qwen3_tiny

It builds a tiny Qwen3 DSpark drafter with DeepSpec's ``build_draft_config``
and ``Qwen3DSparkModel``, gives it random weights of a useful scale, saves it
with ``save_pretrained`` (DeepSpec's checkpoint format: ``config.json`` plus
``model.safetensors``), reloads it the way DeepSpec's evaluator does and
records, in ``reference.safetensors`` and ``reference.json``:

* two drafting rounds of DeepSpec's evaluator path (``forward_dspark_draft_block``
  with its KV cache, then the Markov head and confidence head), greedy and
  teacher-forced;
* one training forward (random anchors, flex attention on CPU) and its loss
  from ``compute_dspark_loss``.

Nothing of DeepSpec is copied here: everything it computes is imported from
the checkout given on the command line. Everything runs in float32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# The tiny target: the shapes of tests/tiny_models.py's Qwen3 model.
TARGET = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
    eos_token_id=1,
    bos_token_id=2,
)
DRAFT = dict(
    block_size=4,
    num_draft_layers=2,
    target_layer_ids=[0, 1],
    mask_token_id=159,
    num_anchors=3,
    markov_rank=8,
    markov_head_type="vanilla",
    confidence_head_alpha=1.0,
    confidence_head_with_markov=True,
    loss_decay_gamma=4.0,
    ce_loss_alpha=0.1,
    l1_loss_alpha=0.9,
)
SEED = 20260101


class Args(dict):
    """The attribute-and-``in`` access DeepSpec's model args need."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights whose activations stay O(1): linears ~ N(0, 1/fan_in), norms
    near 1, embeddings ~ N(0, 1). Post-init std 0.02 would make every
    distribution nearly uniform and every test lenient."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif "embed_tokens" in name or "markov_w1" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspec", type=Path, required=True, help="a DeepSpec checkout")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.deepspec.resolve()))

    import deepspec.modeling.dspark.qwen3.modeling as ds_modeling
    import torch.distributed as dist
    from deepspec.eval.dspark.draft_ops import (
        _predict_confidence_logits,
        forward_dspark_draft_block,
    )
    from deepspec.modeling.dspark.loss import compute_dspark_loss
    from deepspec.modeling.dspark.qwen3 import Qwen3DSparkModel, build_draft_config
    from deepspec.utils import metrics
    from transformers import DynamicCache, Qwen3Config

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)  # the loss all-reduces

    gen = torch.Generator().manual_seed(SEED)
    target_config = Qwen3Config(**TARGET)
    draft_config = build_draft_config(target_config, Args(DRAFT))
    model = Qwen3DSparkModel(draft_config).float()
    randomize(model, gen)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)

    ref: dict[str, torch.Tensor] = {}
    vocab, fused = TARGET["vocab_size"], len(DRAFT["target_layer_ids"]) * TARGET["hidden_size"]
    block = DRAFT["block_size"]

    # -- training forward (flex attention with DeepSpec's block mask) ---------
    batch, seq_len = 2, 14
    input_ids = torch.randint(3, vocab - 1, (batch, seq_len), generator=gen)
    hidden = torch.randn(batch, seq_len, fused, generator=gen)
    last_hidden = torch.randn(batch, seq_len, TARGET["hidden_size"], generator=gen)
    loss_mask = torch.ones(batch, seq_len)
    loss_mask[0, :3] = 0  # a prompt the loss skips
    loss_mask[1, :5] = 0
    loss_mask[1, 12:] = 0  # and padding at the end
    recorded = {}
    sample = ds_modeling.sample_anchor_positions

    def record_anchors(**kwargs):  # type: ignore[no-untyped-def]
        anchors, keep = sample(**kwargs)
        recorded["anchors"], recorded["keep"] = anchors, keep
        return anchors, keep

    ds_modeling.sample_anchor_positions = record_anchors
    torch.manual_seed(SEED)
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            target_hidden_states=hidden,
            loss_mask=loss_mask,
            target_last_hidden_states=last_hidden,
        )
        metrics.reset()
        loss = compute_dspark_loss(
            outputs=out,
            loss_decay_gamma=DRAFT["loss_decay_gamma"],
            ce_loss_alpha=DRAFT["ce_loss_alpha"],
            l1_loss_alpha=DRAFT["l1_loss_alpha"],
            confidence_head_alpha=DRAFT["confidence_head_alpha"],
        )
    parts = {}
    for name in ("ce_loss", "l1_loss", "confidence_loss"):
        entry = metrics._metrics[f"train/{name}"]
        parts[name] = float(entry["num"][-1] / entry["den"][-1])
    assert out.confidence_pred is not None and out.aligned_target_logits is not None
    ref.update(
        train_input_ids=input_ids,
        train_hidden=hidden,
        train_last_hidden=last_hidden,
        train_loss_mask=loss_mask,
        train_anchors=recorded["anchors"],
        train_block_keep=recorded["keep"],
        train_draft_logits=out.draft_logits,
        train_target_ids=out.target_ids,
        train_eval_mask=out.eval_mask,
        train_confidence_logits=out.confidence_pred,
        train_target_logits=out.aligned_target_logits,
    )

    # -- drafting, as DeepSpec's evaluator does it ----------------------------
    loaded = Qwen3DSparkModel.from_pretrained(
        args.out, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    total = 16
    tokens = torch.randint(3, vocab - 1, (1, total), generator=gen)
    context = torch.randn(1, total, fused, generator=gen)
    position_ids = torch.arange(total + block + 1).unsqueeze(0)
    cache = DynamicCache()
    ref.update(draft_tokens=tokens, draft_context=context)
    rounds = [(0, 7), (7, 10)]  # (context rows already fed, anchor position)
    for number, (fed, start) in enumerate(rounds, start=1):
        draft_input_ids = torch.full((1, block), DRAFT["mask_token_id"], dtype=torch.long)
        draft_input_ids[:, 0] = tokens[:, start]
        with torch.no_grad():
            block_hidden = forward_dspark_draft_block(
                loaded,
                draft_input_ids=draft_input_ids,
                position_ids=position_ids,
                past_key_values_draft=cache,
                target_hidden_states=context[:, fed:start],
                start=start,
                block_size=block,
            )
            base = loaded.compute_logits(block_hidden)
            greedy_tokens, greedy_logits = loaded.sample_draft_tokens(
                base,
                first_prev_token_ids=draft_input_ids[:, 0],
                temperature=0.0,
                hidden_states=block_hidden,
            )
            greedy_conf = _predict_confidence_logits(
                loaded,
                proposal_hidden_states=block_hidden,
                draft_input_ids=draft_input_ids,
                sampled_tokens=greedy_tokens,
                block_size=block,
            )
            forced = tokens[:, start + 1 : start + block]  # teacher-forced drafts
            forced_prev = torch.cat([draft_input_ids[:, :1], forced], dim=1)
            assert loaded.markov_head is not None
            forced_logits = loaded.markov_head.apply_block_logits(
                base.unsqueeze(1), token_ids=forced_prev.unsqueeze(1), hidden_states=None
            ).squeeze(1)
            forced_conf = loaded.predict_confidence_step(block_hidden, prev_token_ids=forced_prev)
        assert greedy_conf is not None and forced_conf is not None
        ref.update(
            {
                f"round{number}_base_logits": base[0],
                f"round{number}_greedy_tokens": greedy_tokens[0],
                f"round{number}_greedy_logits": greedy_logits[0],
                f"round{number}_greedy_confidence_logits": greedy_conf[0],
                f"round{number}_forced_prev": forced_prev[0],
                f"round{number}_forced_logits": forced_logits[0],
                f"round{number}_forced_confidence_logits": forced_conf[0],
            }
        )

    save_file({k: v.contiguous() for k, v in ref.items()}, str(args.out / "reference.safetensors"))
    meta = {
        "target_config": {k: v for k, v in TARGET.items()},
        "draft_args": DRAFT,
        "seed": SEED,
        "drafting_rounds": [{"context_fed": f, "anchor_position": s} for f, s in rounds],
        "train_loss": float(loss),
        "train_loss_parts": parts,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    (args.out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    dist.destroy_process_group()
    print(f"wrote {args.out}: loss {float(loss):.6f} {parts}")


if __name__ == "__main__":
    main()
