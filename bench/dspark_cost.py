"""Draft cost per round: one DSpark forward for γ tokens against γ chained
steps of the EAGLE-3-style draft head (and, with ``--draft-model``, of a
small draft model), at a target's shapes, on this CPU.

Both drafters run behind the :class:`Drafter` protocol with random weights
(cost does not depend on training) at the shapes of ``--target`` (only its
``config.json`` is read). A round is what the engine does: ``accept`` the
verified rows (``accepted + 1`` hidden states), then ``propose`` γ tokens;
the time of ``propose`` is measured (it feeds the queued rows, then drafts),
rounds of the two drafters interleaved, median over ``--rounds`` after a
context of ``--context`` positions. Heads have one layer and draft from
a reduced vocabulary (8192 rows, as ``train-draft`` trains them) or the full
one (as EAGLE-3 in DeepSpec); DSpark reads the full vocabulary (the target's
frozen LM head) with ``--dspark-layers`` layers.

    python -m specray.bench.dspark_cost --target qwen2.5-coder-0.5b-instruct
    python -m specray.bench.dspark_cost --target qwen2.5-coder-1.5b-instruct \
        --draft-model qwen2.5-coder-0.5b-instruct --dspark-layers 1,5

Writes ``dspark_cost_<target>_<dtype>.{json,md}`` to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from specray.actors.drafting.base import Drafter, DraftRequest, DraftUpdate
from specray.actors.drafting.build import build_drafter
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.dspark.config import (
    DSparkConfig,
    default_target_layers,
    dspark_hf_config,
)
from specray.actors.drafting.dspark.drafter import DSparkDrafter
from specray.actors.drafting.dspark.fresh import init_weights
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.head.config import HeadConfig
from specray.actors.drafting.head.drafter import HeadDrafter
from specray.actors.drafting.head.model import DraftHead, FrozenParts
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.model.config import ModelConfig
from specray.actors.sampling.params import SamplingParams
from specray.actors.store.resolve import resolve_model
from specray.bench.common import cpu_flags, resolve_preferring

RESULTS = Path(__file__).parent / "results"


def dspark_drafter(
    target_hf: dict[str, Any],
    layers: int,
    gamma: int,
    frozen: tuple[torch.Tensor, torch.Tensor],  # embedding, LM head: shared, as in serving
    slots: int,
    max_len: int,
) -> DSparkDrafter:
    target = ModelConfig.from_hf(target_hf)
    hf = dspark_hf_config(
        target_hf,
        num_layers=layers,
        block_size=gamma,
        mask_token_id=target.vocab_size - 1,
        target_layer_ids=default_target_layers(target.num_layers),
    )
    embed, lm_head = frozen
    model = DSparkModel(DSparkConfig.from_hf(hf), embed.dtype)
    init_weights(model, 0.02, seed=0)
    model.embed_tokens.weights.weight.data = embed
    model.lm_head.weights.weight.data = lm_head
    return DSparkDrafter(model.eval(), slots, max_len)


def head_drafter(
    target: ModelConfig,
    vocab: int,
    frozen: tuple[torch.Tensor, torch.Tensor],
    slots: int,
    max_len: int,
) -> HeadDrafter:
    config = HeadConfig.for_target("bench", target, vocab)
    embed, lm_head = frozen
    parts = FrozenParts(embed, lm_head[:vocab].clone())
    head = DraftHead(config, torch.arange(vocab), parts).to(embed.dtype).eval()
    return HeadDrafter(head, slots, max_len)


def weight_megabytes(drafter: Drafter, gamma: int) -> float:
    """Weights one batch-1 round reads (what bounds it on a CPU): the head
    runs its layer and reduced LM head γ times; DSpark runs its layers and
    full LM head once, and the Markov head's ``vocab x rank`` matrix γ times."""

    def size(module: torch.nn.Module) -> int:
        tensors = [*module.parameters(), *module.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    if isinstance(drafter, DraftModelDrafter):
        # Every step reads the whole model but its embedding (one row a
        # token); parameters only: a packed kernel copy replaces, not adds.
        model = drafter.model
        embedding = {id(t) for t in model.embed_tokens.parameters()}
        owned = {id(t): t for t in model.parameters() if id(t) not in embedding}
        return gamma * sum(t.numel() * t.element_size() for t in owned.values()) / 1e6
    if isinstance(drafter, HeadDrafter):
        head = drafter.head
        per_step = size(head.layer) + size(head.fc) + size(head.token_proj)
        per_step += head.lm_head.numel() * head.lm_head.element_size()
        return gamma * per_step / 1e6
    assert isinstance(drafter, DSparkDrafter)
    dspark = drafter.model
    once = size(dspark.layers) + size(dspark.fc) + size(dspark.lm_head)
    markov = None if dspark.markov_head is None else dspark.markov_head.markov_w2
    per_step = 0 if markov is None else markov.numel() * markov.element_size()
    return (once + gamma * per_step) / 1e6


def fused_size(drafter: Drafter, hidden: int) -> int:
    return len(drafter.hidden_layers) * hidden


def round_seconds(
    drafters: dict[str, Drafter],
    hidden: int,
    batch: int,
    gamma: int,
    accepted: int,
    context: int,
    rounds: int,
) -> dict[str, float]:
    """Median propose seconds per drafter, rounds interleaved."""
    gen = torch.Generator().manual_seed(0)
    ids = [f"b{batch}r{i}" for i in range(batch)]
    for drafter in drafters.values():
        width = fused_size(drafter, hidden)
        for request_id in ids:
            drafter.start(request_id, [1] * 2, SamplingParams())
            rows = torch.randn(context, width, generator=gen).to(torch.bfloat16)
            drafter.accept(DraftUpdate(request_id, context - 1, [1] * context, rows))
        drafter.propose([DraftRequest(r, gamma) for r in ids])  # feeds the context
    times: dict[str, list[float]] = {name: [] for name in drafters}
    for _ in range(rounds):
        for name, drafter in drafters.items():
            width = fused_size(drafter, hidden)
            for request_id in ids:
                rows = torch.randn(accepted + 1, width, generator=gen).to(torch.bfloat16)
                drafter.accept(DraftUpdate(request_id, accepted, [1] * (accepted + 1), rows))
            start = time.perf_counter()
            proposals = drafter.propose([DraftRequest(r, gamma) for r in ids])
            times[name].append(time.perf_counter() - start)
            assert all(len(p) == gamma for p in proposals)
    for drafter in drafters.values():
        for request_id in ids:
            drafter.finish(request_id)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--accepted", type=int, default=3, help="accepted drafts per round")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dspark-layers", default="1,2,5")
    parser.add_argument(
        "--head-vocabs", default="8192,full", help="draft vocabularies of the heads compared"
    )
    parser.add_argument(
        "--draft-model",
        default=None,
        help="also a draft model (a stored name, e.g. qwen2.5-coder-0.5b-instruct)",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    target_dir = resolve_model(args.target, fetch_missing=False)
    target_hf = json.loads((target_dir / "config.json").read_text())
    target = ModelConfig.from_hf(target_hf)
    batches = [int(b) for b in args.batches.split(",")]
    depths = [int(d) for d in args.dspark_layers.split(",")]
    slots, max_len = max(batches), args.context + 64 + (args.accepted + 1) * args.rounds

    shape = (target.vocab_size, target.hidden_size)
    frozen = (torch.randn(shape) * 0.02).to(dtype), (torch.randn(shape) * 0.02).to(dtype)
    drafters: dict[str, Drafter] = {}
    for text in args.head_vocabs.split(","):
        vocab = target.vocab_size if text == "full" else int(text)
        drafters[f"head-{text}"] = head_drafter(target, vocab, frozen, slots, max_len)
    baseline = next(iter(drafters))
    for depth in depths:
        drafters[f"dspark-{depth}L"] = dspark_drafter(
            target_hf, depth, args.gamma, frozen, slots, max_len
        )
    if args.draft_model:
        # Real weights: a draft model is a checkpoint in the store, not a shape.
        model_dir = resolve_preferring(args.draft_model, args.dtype)
        spec = DrafterSpec("model", str(model_dir))
        drafters[f"model-{Path(args.draft_model).name}"] = build_drafter(
            spec, args.dtype, slots, max_len
        )
    rows: list[dict[str, Any]] = []
    for batch in batches:
        seconds = round_seconds(
            drafters,
            target.hidden_size,
            batch,
            args.gamma,
            args.accepted,
            args.context,
            args.rounds,
        )
        rows.append({"batch": batch, "seconds": seconds})
        print(batch, {k: f"{v * 1e3:.1f} ms" for k, v in seconds.items()})

    header = {
        "target": args.target,
        "dtype": args.dtype,
        "gamma": args.gamma,
        "accepted": args.accepted,
        "context": args.context,
        "rounds": args.rounds,
        "head_vocabs": args.head_vocabs,
        "threads": args.threads,
        "cpu_flags": cpu_flags(),
        "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "weight_mb_per_round": {n: weight_megabytes(d, args.gamma) for n, d in drafters.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"dspark_cost_{Path(args.target).name}_{args.dtype}"
    Path(f"{stem}.json").write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
    names = list(drafters)
    lines = [
        f"### Draft cost per round: {args.target} shapes ({args.dtype}), γ={args.gamma}, "
        f"{args.accepted} accepted, context {args.context}, median of {args.rounds} rounds",
        "",
        f"CPU flags: {' '.join(header['cpu_flags']) or 'unknown'}; {args.threads} threads; "
        f"load average at the end {header['load_average'][0]:.1f}; torch {torch.__version__}. "
        f"Heads: 1 layer, draft vocabulary {args.head_vocabs}, γ chained steps. "
        "DSpark: one block forward over the full vocabulary, then the Markov head's γ "
        "sequential steps and the confidence head. A draft model: its real weights, "
        "the round's accepted tokens fed, then γ chained steps.",
        "",
        "Weights read per batch-1 round (MB): "
        + ", ".join(f"{n} {mb:.0f}" for n, mb in header["weight_mb_per_round"].items())
        + ". At batch 1 every drafter here is bound by reading its weights.",
        "",
        "| batch | "
        + " | ".join(f"{n} ms" for n in names)
        + " | "
        + " | ".join(f"{n} / {baseline}" for n in names[1:])
        + " |",
        "|---" * (1 + 2 * len(names) - 1) + "|",
    ]
    for row in rows:
        s = row["seconds"]
        cells = [f"{s[n] * 1e3:.1f}" for n in names] + [
            f"{s[n] / s[baseline]:.2f}" for n in names[1:]
        ]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
