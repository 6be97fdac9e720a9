"""The data ``specray train-draft`` trains on: the target's own answers
with its hidden states and top-k distributions (:mod:`.head.data`), made
once and cached under ``$SPECRAY_HOME/draft-data/`` by what produced them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from specray.actors.drafting.head.corpus import build_corpus, build_forced_pairs
from specray.actors.drafting.head.data import META_NAME, DraftData, DraftDataWriter
from specray.actors.drafting.head.datagen import (
    GenerationSettings,
    forced_samples,
    generate_samples,
)
from specray.actors.engine.tokenizer import chat_ids, eos_token_ids, load_tokenizer
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model


def prompt_texts(paths: list[Path]) -> list[str]:
    """The shipped train split, then every extra file (JSONL with "prompt", or lines)."""
    from specray.bench.prompts import load_prompts  # the shipped prompt set's train split

    texts = [p.prompt for p in load_prompts(split="train")]
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["prompt"] if line.startswith("{") else line)
    return texts


def draft_data(
    args: argparse.Namespace,
    target_dir: Path,
    config: ModelConfig,
    layers: tuple[int, ...],
    home: Path,
) -> DraftData:
    tokenizer = load_tokenizer(target_dir)
    eos = eos_token_ids(config, tokenizer)
    settings = GenerationSettings(layers, eos, args.max_tokens, args.batch_size, seed=args.seed)
    meta = {
        "target": str(target_dir),
        "dtype": args.dtype,
        "num_samples": args.num_samples,
        "num_forced": args.num_forced,
        "data_minutes": args.data_minutes,
        "max_prompt_tokens": args.max_prompt_tokens,
        "prompt_files": [str(p) for p in args.prompts],
        "generation": asdict(settings),
        "corpus": "stdlib-v1",
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    directory = args.data or home / "draft-data" / f"{Path(str(args.target)).name}-{key}"
    if DraftData.is_complete(directory, meta):
        print(f"reusing draft data in {directory}")
        return DraftData(directory, layers)
    if args.data is not None and (args.data / META_NAME).is_file():
        # Named explicitly: reuse it though its settings differ (e.g. made
        # with more layers, for a head and a DSpark drafter alike).
        made_for = json.loads((args.data / META_NAME).read_text()).get("target")
        if made_for != meta["target"]:
            raise ValueError(f"--data {args.data} was made for {made_for}, not {meta['target']}")
        print(f"using draft data in {directory} (layers {list(layers)} of it)")
        return DraftData(directory, layers)
    corpus = build_corpus(args.num_samples, args.seed, prompt_texts(args.prompts))
    prompts = [chat_ids(tokenizer, p.text) for p in corpus]
    prompts = [p for p in prompts if len(p) <= args.max_prompt_tokens][: args.num_samples]
    pairs = [
        (chat_ids(tokenizer, pair.prompt), tokenizer.encode(pair.answer))
        for pair in build_forced_pairs(args.num_forced, args.seed)
    ]
    pairs = [(p, a) for p, a in pairs if len(p) <= args.max_prompt_tokens]
    model = load_model(target_dir, args.dtype)
    writer = DraftDataWriter(directory, meta)
    with (
        tqdm(total=len(prompts) + len(pairs), desc="answers", unit="ans") as answers,
        tqdm(desc="tokens", unit="tok", position=1) as tokens,
    ):

        def on_sample(index: int, sample: Any) -> None:
            writer.add(sample)
            answers.update(1)

        forced_samples(model, pairs, settings, on_sample, tokens.update)
        deadline = None if args.data_minutes is None else time.monotonic() + 60 * args.data_minutes
        generate_samples(
            model,
            prompts,
            settings,
            on_sample,
            tokens.update,
            lambda: deadline is not None and time.monotonic() > deadline,
        )
    writer.close()
    del model
    return DraftData(directory, layers)
