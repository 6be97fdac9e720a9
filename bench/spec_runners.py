"""What the in-process speculative benchmark runs: our engine and HF
``generate()`` on one prompt at a time, timed per round, and the loop that
interleaves them so machine noise hits every method alike."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from specray.actors.drafting.base import Drafter, DraftProposal, DraftRequest, DraftUpdate
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget, VerifyInput, VerifyOutput
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.bench.common import HF, SPECRAY
from specray.bench.prompts import Prompt


@dataclass
class RoundTiming:
    """One engine step of one request: wall seconds, then counts, then this
    process's CPU seconds for the same spans."""

    step_s: float
    propose_s: float
    verify_s: float
    num_drafts: int
    num_accepted: int
    num_tokens: int  # tokens the round streamed (after stop criteria)
    step_cpu_s: float = 0.0
    propose_cpu_s: float = 0.0
    verify_cpu_s: float = 0.0

    def seconds(self, part: str, cpu: bool) -> float:
        """``part`` is step, propose or verify."""
        return float(getattr(self, f"{part}_cpu_s" if cpu else f"{part}_s"))


@dataclass
class RunRecord:
    """One prompt through one method."""

    impl: str  # specray | hf
    label: str  # none | ngram | a model name, "+adaptive" for adaptive γ
    prompt_id: str
    category: str
    k: int
    adaptive: bool
    prompt_tokens: int
    token_ids: list[int]
    wall_s: float
    rounds: list[RoundTiming] = field(default_factory=list)  # empty for HF
    repeat_wall_s: list[float] = field(default_factory=list)  # every repeat's wall time
    cpu_s: float = 0.0  # this process's CPU time during the run (all threads)
    target_forwards: int = 0  # = rounds for ours
    draft_forwards: int = 0  # draft-model forwards (0 for n-gram)

    @property
    def decode_rounds(self) -> list[RoundTiming]:
        """Every round after the first, which also prefilled the prompt."""
        return self.rounds[1:]


class TimedTarget:
    """A :class:`LocalTarget` that remembers how long its last verify took."""

    def __init__(self, inner: LocalTarget) -> None:
        self.inner = inner
        self.last_s = self.last_cpu_s = 0.0

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput]:
        cpu, start = time.process_time(), time.perf_counter()
        out = self.inner.verify(inputs, hidden_layers)
        self.last_s, self.last_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        return out

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)

    @property
    def verifies_trees(self) -> bool:
        return self.inner.verifies_trees


class TimedDrafter:
    """A drafter that remembers how long its last propose took."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.name = inner.name
        self.hidden_layers = inner.hidden_layers
        self.paths = inner.paths
        self.last_s = self.last_cpu_s = 0.0

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self.inner.start(request_id, prompt_ids, sampling)

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        cpu, start = time.process_time(), time.perf_counter()
        out = self.inner.propose(requests)
        self.last_s, self.last_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        return out

    def accept(self, update: DraftUpdate) -> None:
        self.inner.accept(update)

    def finish(self, request_id: str) -> None:
        self.inner.finish(request_id)


class ForwardCounter:
    """Counts forward calls of a module: HF's target forwards are its rounds."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1


class OursRunner:
    """One engine (target + one drafter, fixed or adaptive γ) at batch size 1;
    ``costs`` are the adaptive γ's profiled costs."""

    def __init__(
        self,
        label: str,
        target: LocalTarget,
        drafter: Drafter | None,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: tuple[int, ...],
        k: int,
        adaptive: bool,
        costs: RoundCostModel | None = None,
        draft_counter: ForwardCounter | None = None,
    ) -> None:
        self.label, self.k, self.adaptive = label, k, adaptive
        self.draft_counter = draft_counter
        self.target = TimedTarget(target)
        self.drafter = TimedDrafter(drafter) if drafter is not None else None
        self.engine = SpecEngine(
            self.target,
            self.drafter,
            tokenizer,
            eos_token_ids,
            EngineConfig(max_batch=1, num_speculative_tokens=max(k, 1), adaptive=adaptive),
            costs,
        )
        self._counter = 0

    def run(self, prompt: Prompt, prompt_ids: list[int], max_tokens: int) -> RunRecord:
        self._counter += 1
        request = GenerationRequest(
            f"{prompt.id}#{self._counter}",
            prompt_ids,
            SamplingParams(),
            StoppingCriteria(max_tokens=max_tokens),
            num_speculative_tokens=None if self.drafter is not None else 0,
        )
        token_ids: list[int] = []
        rounds: list[RoundTiming] = []
        drafted = accepted = 0
        draft_calls = self.draft_counter.calls if self.draft_counter else 0
        cpu_start, start = time.process_time(), time.perf_counter()
        self.engine.add_request(request)
        drafter = self.drafter
        while self.engine.has_work:
            self.target.last_s = self.target.last_cpu_s = 0.0
            if drafter is not None:
                drafter.last_s = drafter.last_cpu_s = 0.0
            step_cpu, step_start = time.process_time(), time.perf_counter()
            (out,) = self.engine.step()
            step_s, step_cpu_s = time.perf_counter() - step_start, time.process_time() - step_cpu
            token_ids += out.token_ids
            rounds.append(
                RoundTiming(
                    step_s,
                    drafter.last_s if drafter is not None else 0.0,
                    self.target.last_s,
                    out.stats.draft_tokens - drafted,
                    out.stats.accepted_tokens - accepted,
                    len(out.token_ids),
                    step_cpu_s,
                    drafter.last_cpu_s if drafter is not None else 0.0,
                    self.target.last_cpu_s,
                )
            )
            drafted, accepted = out.stats.draft_tokens, out.stats.accepted_tokens
        wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        return RunRecord(
            SPECRAY,
            self.label,
            prompt.id,
            prompt.category,
            self.k,
            self.adaptive,
            len(prompt_ids),
            token_ids,
            wall_s,
            rounds,
            cpu_s=cpu_s,
            target_forwards=len(rounds),
            draft_forwards=(self.draft_counter.calls if self.draft_counter else 0) - draft_calls,
        )


class HFRunner:
    """HF ``generate()``, greedy, plain or with one form of assisted decoding."""

    def __init__(
        self,
        label: str,
        model: Any,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int,
        k: int = 0,
        assistant: Any = None,
    ) -> None:
        self.label, self.model, self.k = label, model, k
        self.counter: ForwardCounter = model.specray_counter
        self.assistant_counter: ForwardCounter | None = None
        self.kwargs: dict[str, Any] = {
            "do_sample": False,
            "eos_token_id": list(eos_token_ids),
            "pad_token_id": pad_token_id,
        }
        if assistant is not None:
            # HF reads these from the assistant's own generation config; keep
            # its default confidence threshold (it may stop drafting early).
            assistant.generation_config.num_assistant_tokens = k
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            self.kwargs["assistant_model"] = assistant
            self.assistant_counter = assistant.specray_counter
        elif k:
            self.kwargs["prompt_lookup_num_tokens"] = k

    def run(self, prompt: Prompt, prompt_ids: list[int], max_tokens: int) -> RunRecord:
        input_ids = torch.tensor([prompt_ids])
        calls = self.counter.calls
        draft_calls = self.assistant_counter.calls if self.assistant_counter else 0
        cpu_start, start = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                **self.kwargs,
            )
        wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        token_ids = out[0, len(prompt_ids) :].tolist()
        return RunRecord(
            HF,
            self.label,
            prompt.id,
            prompt.category,
            self.k,
            False,
            len(prompt_ids),
            token_ids,
            wall_s,
            cpu_s=cpu_s,
            target_forwards=self.counter.calls - calls,
            draft_forwards=(self.assistant_counter.calls if self.assistant_counter else 0)
            - draft_calls,
        )


Runner = OursRunner | HFRunner


def run_interleaved(
    runners: Sequence[Runner],
    prompts: Sequence[Prompt],
    prompt_ids: dict[str, list[int]],
    max_tokens: int,
    repeats: int = 1,
) -> list[RunRecord]:
    """Each prompt through every runner in turn, ``repeats`` times; per prompt
    and runner the fastest repeat is kept (greedy output is the same each
    time, so only the machine's noise differs)."""
    records = []
    for number, prompt in enumerate(prompts, 1):
        tries: list[list[RunRecord]] = [[] for _ in runners]
        for _ in range(repeats):
            for runner, kept in zip(runners, tries, strict=True):
                record = runner.run(prompt, prompt_ids[prompt.id], max_tokens)
                kept.append(record)
                print(
                    f"[{number}/{len(prompts)}] {prompt.id:18s} {record.impl:7s} "
                    f"{record.label:40s} {len(record.token_ids):4d} tok "
                    f"{len(record.token_ids) / record.wall_s:7.2f} tok/s",
                    flush=True,
                )
        for kept in tries:
            best = min(kept, key=lambda r: r.wall_s)
            best.repeat_wall_s = [r.wall_s for r in kept]
            records.append(best)
    return records


def warm_up(runners: Sequence[Runner], prompt: Prompt, ids: list[int]) -> None:
    """First calls pay one-off allocation and kernel-selection costs."""
    for runner in runners:
        runner.run(prompt, ids, 8)
