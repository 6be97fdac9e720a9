"""Make training data: the target answers prompts, and we keep what it saw.

Continuous batching over :class:`LocalTarget`: every step verifies one token
per running answer (the whole prompt on its first step) and asks for the
head's hidden layers, so hidden states, the sampled token and the top-k of
the target's distribution come from the same forward. Each answer is greedy
or sampled (every ``sampled_every``-th prompt, at ``temperature``), with its
own generator seeded from ``seed`` and the prompt's index: the same
settings give the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specray.actors.drafting.head.data import DraftSample
from specray.actors.engine.target import LocalTarget, VerifyInput
from specray.actors.model.decoder import DecoderModel


@dataclass(frozen=True)
class GenerationSettings:
    hidden_layers: tuple[int, ...]
    eos_token_ids: tuple[int, ...]
    max_tokens: int = 256
    batch_size: int = 16
    top_k: int = 32
    sampled_every: int = 2  # 0: all greedy
    temperature: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (("max_tokens", 2), ("batch_size", 1), ("top_k", 1)):
            value = getattr(self, name)
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")


@dataclass
class _Answer:
    index: int
    prompt: list[int]
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    top_ids: list[torch.Tensor] = field(default_factory=list)
    top_probs: list[torch.Tensor] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return f"p{self.index}"


def generate_samples(
    model: DecoderModel,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    on_sample: Callable[[int, DraftSample], None],
    on_tokens: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Answer every prompt; ``on_sample(prompt index, sample)`` as each ends
    (in completion order), ``on_tokens(n)`` after every step. Once
    ``should_stop()`` is true no new prompt starts; running ones finish."""
    longest = max((len(p) for p in prompts), default=0)
    target = LocalTarget(model, settings.batch_size, longest + settings.max_tokens + 1)
    waiting = list(range(len(prompts)))[::-1]
    running: list[_Answer] = []
    while waiting or running:
        if should_stop is not None and should_stop():
            waiting = []
        admitted: list[_Answer] = []
        while waiting and len(running) + len(admitted) < settings.batch_size:
            index = waiting.pop()
            admitted.append(_Answer(index, list(prompts[index]), _generator(index, settings)))
        # Prompts prefill apart from the decode batch: one forward pads every
        # sequence to its longest, and a 200-token prompt would make 31
        # one-token decodes cost 200 positions each.
        still = [
            a
            for group in (admitted, running)
            if group
            for a in _step(target, group, settings, on_sample)
        ]
        if on_tokens is not None:
            on_tokens(len(admitted) + len(running))
        running = still


def _step(
    target: LocalTarget,
    answers: list[_Answer],
    settings: GenerationSettings,
    on_sample: Callable[[int, DraftSample], None],
) -> list[_Answer]:
    """One verify of ``answers``; returns those still running."""
    outputs = target.verify([_verify_input(a) for a in answers], settings.hidden_layers)
    still = []
    eos = set(settings.eos_token_ids)
    for answer, out in zip(answers, outputs, strict=True):
        assert out.hidden_states is not None
        _record(answer, out.full_logits()[-1], out.hidden_states[-1], settings)
        if answer.tokens[-1] in eos or len(answer.tokens) >= settings.max_tokens:
            target.release(answer.request_id)
            on_sample(answer.index, _sample(answer))
        else:
            still.append(answer)
    return still


def forced_samples(
    model: DecoderModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    settings: GenerationSettings,
    on_sample: Callable[[int, DraftSample], None],
    on_tokens: Callable[[int], None] | None = None,
) -> None:
    """Teacher forcing: the target reads ``(prompt, answer)`` in one forward
    each. Row ``t`` is the position whose output is ``answer[t]``; its labels
    (the top-k) are still the target's own distribution there."""
    longest = max((len(p) + len(a) for p, a in pairs), default=0)
    target = LocalTarget(model, 1, longest)
    for index, (prompt, answer) in enumerate(pairs):
        answer = list(answer)[: settings.max_tokens]
        if not answer:
            continue
        request = VerifyInput(f"f{index}", 0, [*prompt, *answer[:-1]], len(answer))
        (out,) = target.verify([request], settings.hidden_layers)
        assert out.hidden_states is not None
        target.release(request.request_id)
        top = torch.softmax(out.full_logits().float(), dim=-1).topk(settings.top_k)
        sample = DraftSample(
            torch.tensor(answer, dtype=torch.int64),
            out.hidden_states.to(torch.bfloat16),
            top.indices,
            top.values,
        )
        on_sample(index, sample)
        if on_tokens is not None:
            on_tokens(len(answer))


def _generator(index: int, settings: GenerationSettings) -> torch.Generator | None:
    if not settings.sampled_every or index % settings.sampled_every != settings.sampled_every - 1:
        return None
    return torch.Generator().manual_seed(settings.seed * 1_000_003 + index)


def _verify_input(answer: _Answer) -> VerifyInput:
    if not answer.tokens:
        return VerifyInput(answer.request_id, 0, answer.prompt, 1)
    start = len(answer.prompt) + len(answer.tokens) - 1
    return VerifyInput(answer.request_id, start, answer.tokens[-1:], 1)


def _record(
    answer: _Answer, logits: torch.Tensor, hidden: torch.Tensor, settings: GenerationSettings
) -> None:
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(settings.top_k)
    if answer.generator is None:
        token = int(top.indices[0])
    else:
        tempered = torch.softmax(logits.float() / settings.temperature, dim=-1)
        token = int(torch.multinomial(tempered, 1, generator=answer.generator))
    answer.tokens.append(token)
    answer.hidden.append(hidden.to(torch.bfloat16))
    answer.top_ids.append(top.indices)
    answer.top_probs.append(top.values)


def _sample(answer: _Answer) -> DraftSample:
    return DraftSample(
        torch.tensor(answer.tokens, dtype=torch.int64),
        torch.stack(answer.hidden),
        torch.stack(answer.top_ids),
        torch.stack(answer.top_probs),
    )
