"""The shipped agentic sessions replayed turn by turn through in-process
engines that share one loaded target model: the flags, the engines and the
replay that ``suffix_cache_bench`` and ``budget_fuzz`` have in common."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from specray.actors.drafting.base import Drafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.feeds import DEFAULT_MAX_BATCHED_TOKENS
from specray.actors.engine.request import GenerationRequest, RequestStats
from specray.actors.engine.target import LocalTarget
from specray.actors.engine.tokenizer import conversation_ids, eos_token_ids, load_tokenizer
from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.store.weights_dir import weights_dir
from specray.bench.common import report_head
from specray.bench.prompts import Prompt, load_prompts, sessions
from specray.bench.run_report import run_title


def add_session_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--weights", default="dense", choices=["dense", "gguf"])
    p.add_argument("--split", default=None, choices=["eval", "train"], help="default: both")
    p.add_argument("--sessions", type=int, default=None, help="the first N sessions; default all")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--k", type=int, default=16, help="draft tokens verified per round at most")
    p.add_argument("--resend", action="store_true", help="send the whole conversation each turn")
    p.add_argument("--tag", default="", help="suffix of the output files")


@dataclass
class LoadedTarget:
    """The target model the engines share, and how its text is tokenized."""

    model: DecoderModel
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: tuple[int, ...]

    @classmethod
    def load(cls, args: argparse.Namespace) -> LoadedTarget:
        target_dir = weights_dir(args.target, args.weights, args.dtype)
        tokenizer = load_tokenizer(target_dir)
        eos = eos_token_ids(ModelConfig.from_pretrained(target_dir), tokenizer)
        return cls(load_model(target_dir, args.dtype, weights=args.weights), tokenizer, eos)

    def engine(
        self, drafter: Drafter | None, k: int, max_len: int, prefix_tokens: int = 0
    ) -> SpecEngine:
        """A one-request engine with its own cache slot (and prefix cache)."""
        target = LocalTarget(self.model, 1, max_len, prefix_tokens=prefix_tokens)
        config = EngineConfig(1, k, adaptive=True, max_batched_tokens=DEFAULT_MAX_BATCHED_TOKENS)
        return SpecEngine(target, drafter, self.tokenizer, self.eos_token_ids, config)


@dataclass
class TurnRun:
    token_ids: list[int]
    seconds: float
    stats: RequestStats


def run_turn(engine: SpecEngine, request: GenerationRequest) -> TurnRun:
    began = time.perf_counter()
    token_ids: list[int] = []
    stats = None
    for chunk in engine.generate([request]):
        token_ids += chunk.token_ids
        stats = chunk.stats
    assert stats is not None
    return TurnRun(token_ids, round(time.perf_counter() - began, 3), stats)


def replay(
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    run: Callable[[Prompt, list[int]], list[int]],
) -> None:
    """Each turn of the chosen sessions, in order, handed to ``run`` with its
    prompt ids: the turn as one user message through the chat template, or
    with ``--resend`` the whole conversation so far. What ``run`` returns
    is the turn's answer, which later turns of a resent session repeat."""
    for session in sessions(load_prompts(["agentic"], args.split))[: args.sessions]:
        history: list[dict[str, str]] = []
        for prompt in session:
            message = {"role": "user", "content": prompt.prompt}
            turn = [*history, message] if args.resend else [message]
            prompt_ids = conversation_ids(tokenizer, turn)
            answer = str(tokenizer.decode(run(prompt, prompt_ids), skip_special_tokens=True))
            history += [message, {"role": "assistant", "content": answer}]


def report_top(subject: str, result: dict[str, Any], *details: str) -> list[str]:
    """A replay report's first lines: its title (the weights, how turns were
    sent, ``details``), the machine and the command."""
    send = "whole conversation resent" if result["resend"] else "each turn sent alone"
    title = run_title(subject, result, f"{result['weights']} weights", send, *details)
    return [*report_head(title, result["machine"]), f"`{result['command']}`", ""]
