"""Per-request sampling and stopping parameters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens.

    The same parameters are applied to the draft and the target distributions,
    so that rejection sampling compares like with like.
    """

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1 disables nucleus filtering
    min_p: float = 0.0  # 0 disables min-p filtering
    seed: int | None = None  # None: the engine picks one and reports it

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class StoppingCriteria:
    """When a request is finished."""

    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    eos_token_ids: tuple[int, ...] = field(default=())
