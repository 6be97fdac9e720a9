"""``specray train-draft``: train a draft head for a target, on this machine.

1. Prompts: the shipped train-split prompts, ``--prompts`` files and the
   offline stdlib corpus (:mod:`specray.actors.drafting.head.corpus`).
2. Data: the target answers them (greedy, every second one sampled at 0.7),
   keeping hidden states and top-k distributions, cached under
   ``$SPECRAY_HOME/draft-data/`` and reused when the settings match.
3. Head: a reduced vocabulary from the answers, started from the target's
   last layer, trained with the training-time test; saved as safetensors
   plus ``config.json``, with ``train_log.json`` and ``train_curve.png``.
   ``--method dspark`` trains a DSpark block drafter on the same data
   instead and saves it in DeepSpec's format (``--draft dspark:DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from specray.actors.drafting.dspark.checkpoint import save_dspark
from specray.actors.drafting.dspark.config import default_target_layers
from specray.actors.drafting.dspark.fresh import default_mask_token, fresh_dspark
from specray.actors.drafting.dspark.held_out import (
    CalibrationFit,
    LabelKind,
    fit_held_out,
    held_out_blocks,
)
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.head.checkpoint import init_from_target, load_frozen, save_head
from specray.actors.drafting.head.config import HeadConfig, default_hidden_layers
from specray.actors.drafting.head.data import DraftData
from specray.actors.drafting.head.model import DraftHead
from specray.actors.drafting.head.trainer import (
    DraftModel,
    TrainResult,
    TrainSettings,
    split_indices,
    train_head,
)
from specray.actors.drafting.head.vocab import choose_draft_vocab, coverage, token_counts
from specray.actors.engine.tokenizer import load_tokenizer
from specray.actors.model.config import ModelConfig
from specray.actors.store.layout import default_home
from specray.actors.store.resolve import resolve_model
from specray.deploy.train_data import draft_data

# --smoke: a tiny model in well under two minutes; the loss must still fall.
SMOKE = {
    "num_samples": 32,
    "num_forced": 8,
    "max_tokens": 32,
    "epochs": 6,
    "steps": 2,
    "draft_vocab": 256,
    "lr": 3e-3,
    "val_fraction": 0.2,
}


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-draft", help="train a hidden-state draft head for a target")
    p.add_argument("--target", required=True, help="registered model name or local path")
    p.add_argument("--prompts", type=Path, action="append", default=[], help="extra JSONL/text")
    p.add_argument("--num-samples", type=int, default=1500, help="answers to generate")
    p.add_argument("--max-tokens", type=int, default=192, help="tokens per answer")
    p.add_argument(
        "--num-forced", type=int, default=400, help="stdlib answers the target reads (cheaper)"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default $SPECRAY_HOME/heads/<target>")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for CI (tiny targets)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--batch-size", type=int, default=32, help="answers generated at once")
    p.add_argument("--train-batch", type=int, default=4, help="answers per optimiser step")
    p.add_argument("--steps", type=int, default=3, help="chained steps of the training-time test")
    p.add_argument("--draft-vocab", type=int, default=8192, help="reduced LM-head rows")
    p.add_argument("--layers", default=None, help="target layers to read, e.g. 2,12,23")
    p.add_argument(
        "--init",
        choices=["target", "random"],
        default="target",
        help="start from the target's last layer",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-minutes", type=float, default=None, help="stop training after this")
    p.add_argument("--val-fraction", type=float, default=0.05, help="answers held out")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--data-minutes", type=float, default=None, help="stop starting new answers after this"
    )
    p.add_argument("--data-only", action="store_true", help="make (or find) the data and stop")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data directory (default: cached); one made with more --layers serves too",
    )
    p.add_argument("--home", type=Path, default=None, help="store (default $SPECRAY_HOME)")
    p.add_argument(
        "--method", choices=["head", "dspark"], default="head", help="what to train (see docs)"
    )
    p.add_argument("--block-size", type=int, default=5, help="dspark: drafts per forward (γ)")
    p.add_argument("--draft-layers", type=int, default=1, help="dspark: layers (the paper: 5)")
    p.add_argument("--markov-rank", type=int, default=256, help="dspark: Markov head rank")
    p.add_argument("--anchors", type=int, default=16, help="dspark: blocks per answer and step")
    p.add_argument(
        "--calibrate-for",
        choices=["greedy", "sampled"],
        default="greedy",
        help="dspark: fit the confidence head's temperatures to greedy or sampled acceptance",
    )
    p.add_argument("--device", default="cpu", help="where training runs (cpu, cuda); data: cpu")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        _validate(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.smoke:
        args = argparse.Namespace(**{**vars(args), **SMOKE})
    torch.set_num_threads(args.threads)
    home = args.home or default_home()
    target_dir = resolve_model(args.target, home=home, dtype=args.dtype)
    config = ModelConfig.from_pretrained(target_dir)
    layers = _layers(args.layers, config, args.method)
    began = time.perf_counter()
    try:
        data = draft_data(args, target_dir, config, layers, home)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    made_data = time.perf_counter()
    print(f"data: {len(data)} answers, {int(data.lengths.sum())} rows in {data.directory}")
    if args.data_only:
        return 0
    if args.method == "dspark":
        return _run_dspark(args, data, target_dir, config, layers, made_data - began)
    counts = token_counts((s.tokens for s in data), config.vocab_size)
    vocab = choose_draft_vocab(counts, args.draft_vocab, config.eos_token_ids)
    torch.manual_seed(args.seed)
    head_config = HeadConfig.for_target(args.target, config, len(vocab), layers)
    head = DraftHead(head_config, vocab, load_frozen(target_dir, vocab, torch.bfloat16))
    copied = init_from_target(head, target_dir, config) if args.init == "target" else []
    head = head.to(args.device)
    settings = replace(_train_settings(args), steps=args.steps)
    result = _train(head, data, settings)
    ended = time.perf_counter()
    out = args.out or home / "heads" / Path(str(args.target)).name
    save_head(head, out)
    summary = {
        "target": args.target,
        "data": str(data.directory),
        "samples": len(data),
        "rows": int(data.lengths.sum()),
        "draft_vocab": len(vocab),
        "draft_vocab_coverage": coverage(counts, vocab),
        "copied_from_target": len(copied),
        "data_s": made_data - began,
        "train_s": ended - made_data,
        "settings": asdict(settings),
        "val": [asdict(v) for v in result.val],
        "train": [asdict(t) for t in result.train],
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(result, out / "train_curve.png")
    first, last = result.val[0] if result.val else None, result.val[-1] if result.val else None
    print(f"saved {out} ({len(data)} answers, {summary['rows']} rows, vocab {len(vocab)})")
    print(f"data {summary['data_s']:.0f} s, training {summary['train_s']:.0f} s")
    if first is not None and last is not None:
        print(f"validation loss {first.loss:.3f} -> {last.loss:.3f}, step accuracy {last.accuracy}")
    return 0


def _validate(args: argparse.Namespace) -> None:
    if args.num_forced < 0:
        raise ValueError(f"--num-forced must be >= 0, got {args.num_forced}")
    for name in (
        "num_samples",
        "max_tokens",
        "epochs",
        "batch_size",
        "train_batch",
        "steps",
        "block_size",
        "draft_layers",
        "anchors",
    ):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.draft_vocab < 2:
        raise ValueError(f"--draft-vocab must be >= 2, got {args.draft_vocab}")


def _train_settings(args: argparse.Namespace) -> TrainSettings:
    """The training flags both methods take; each adds its own."""
    return TrainSettings(
        epochs=args.epochs,
        batch_size=args.train_batch,
        max_rows=args.max_tokens,
        lr=args.lr,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_minutes=args.train_minutes,
    )


def _layers(text: str | None, config: ModelConfig, method: str = "head") -> tuple[int, ...]:
    if not text:
        if method == "dspark":
            return default_target_layers(config.num_layers)
        return default_hidden_layers(config.num_layers)
    layers = tuple(int(part) for part in text.split(","))
    bad = [i for i in layers if not 0 <= i < config.num_layers]
    if bad:
        raise ValueError(f"--layers {bad} outside [0, {config.num_layers})")
    return layers


def _run_dspark(
    args: argparse.Namespace,
    data: DraftData,
    target_dir: Path,
    config: ModelConfig,
    layers: tuple[int, ...],
    data_s: float,
) -> int:
    """Train a DSpark drafter (full vocabulary, the target's frozen embedding
    and LM head) on the data and save it in DeepSpec's format."""
    tokenizer_size = len(load_tokenizer(target_dir))
    model, hf_config = fresh_dspark(
        target_dir,
        num_layers=args.draft_layers,
        block_size=args.block_size,
        target_layer_ids=layers,
        markov_rank=args.markov_rank,
        mask_token_id=default_mask_token(config.vocab_size, tokenizer_size),
        seed=args.seed,
    )
    settings = replace(_train_settings(args), anchors=args.anchors)
    began = time.perf_counter()
    result = _train(model.to(args.device), data, settings)
    fit = _calibrate(model, data, settings, args.calibrate_for)
    out = args.out or (args.home or default_home()) / "dspark" / Path(str(args.target)).name
    save_dspark(model.cpu(), out, hf_config, None if fit is None else fit.calibration)
    summary = {
        "target": args.target,
        "method": "dspark",
        "data": str(data.directory),
        "samples": len(data),
        "rows": int(data.lengths.sum()),
        "target_layer_ids": list(layers),
        "data_s": data_s,
        "train_s": time.perf_counter() - began,
        "settings": asdict(settings),
        "calibration": None if fit is None else asdict(fit),
        "val": [asdict(v) for v in result.val],
        "train": [asdict(t) for t in result.train],
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(result, out / "train_curve.png")
    if fit is not None:
        before = ", ".join(f"{e:.3f}" for e in fit.ece_before)
        after = ", ".join(f"{e:.3f}" for e in fit.ece_after)
        print(f"confidence ECE per position on {fit.blocks} held-out blocks ({fit.labels}):")
        print(f"  raw [{before}] -> calibrated [{after}]")
    print(f"saved {out} (DeepSpec format, block {args.block_size}, layers {list(layers)})")
    if result.val:
        first, last = result.val[0], result.val[-1]
        print(f"validation loss {first.loss:.3f} -> {last.loss:.3f}, accuracy {last.accuracy}")
    return 0


def _calibrate(
    model: DSparkModel, data: DraftData, settings: TrainSettings, labels: LabelKind
) -> CalibrationFit | None:
    """STS of the confidence head on the validation answers (none held out,
    or no confidence head: nothing to fit)."""
    _, val_ids = split_indices(len(data), settings)
    if not val_ids or model.confidence_head is None:
        return None
    blocks = held_out_blocks(
        model,
        data,
        val_ids,
        labels,
        anchors_per_answer=settings.anchors,
        max_rows=settings.max_rows,
        batch_size=settings.batch_size,
        seed=settings.seed,
        bf16=settings.bf16,
    )
    return fit_held_out(blocks, labels)


def _train(head: DraftModel, data: DraftData, settings: TrainSettings) -> TrainResult:
    train_ids, _ = split_indices(len(data), settings)
    per_epoch = -(-len(train_ids) // settings.batch_size)
    with tqdm(total=per_epoch * settings.epochs, desc="training", unit="step") as bar:

        def on_step(log: Any) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{log.loss:.3f}", acc1=f"{log.accuracy[0]:.2f}")

        def on_epoch(log: Any) -> None:
            bar.write(f"epoch {log.epoch:.0f}: val loss {log.loss:.3f} acc {log.accuracy}")

        return train_head(head, data, settings, on_step, on_epoch)


def _plot(result: TrainResult, path: Path) -> None:
    """Training loss per step and validation accuracy per draft step, by epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a dev extra
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([t.epoch for t in result.train], [t.loss for t in result.train], linewidth=0.8)
    left.plot([v.epoch for v in result.val], [v.loss for v in result.val], "o-", label="val")
    left.set_xlabel("epoch")
    left.set_ylabel("loss (CE + TV, position-weighted)")
    left.legend()
    steps = len(result.val[0].accuracy) if result.val else 0
    for k in range(steps):
        values = [v.accuracy[k] for v in result.val]
        right.plot([v.epoch for v in result.val], values, "o-", label=f"draft step {k + 1}")
    right.set_xlabel("epoch")
    right.set_ylabel("val top-1 agreement with the target")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
