"""Which weights a target loads, and how many shards it runs as.

``--weights`` names a format (see :mod:`specray.actors.model.hardware`):
``fp32`` / ``bf16`` (dense safetensors in that dtype), ``gguf`` (the GGUF
blocks on the low-bit kernels), or ``auto``: the format the start-up probe
measured fastest. With a drafter the target's work is verifying ``k + 1``
rows at a time, so auto picks the fastest format at that size, not at one
row: on a CPU without native bf16 the two differ.

The default ``tp`` is 1 on a CPU: the shards of one machine share its cores
and memory bandwidth and add two all-reduces per layer, and measured on 2
cores TP = 2 decodes slower than one process
(``bench/results/tp_qwen2.5-coder-1.5b-instruct_bfloat16_cpu.md``: 372 vs 320
ms per token). A timing of half a matrix on half the threads inside one
process does not predict that (on an oversubscribed machine it favoured TP
by 2-6x), so the probe does not time it. On a GPU the default is 1 as well;
a configured ``tp`` is kept.

:func:`plan_weights` is the decision, pure: given the measurements it
returns the plan and the reason the server logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from specray.actors.model.hardware import CHOICES, Choice, Recommendation

WEIGHT_FORMATS = ("auto", "gguf", "bf16", "fp32")
DTYPE_FORMATS = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass(frozen=True)
class WeightPlan:
    """What to load: ``load_model(dir, dtype, weights=weights)`` on ``tp`` shards."""

    format: str  # gguf | bf16 | fp32
    dtype: str  # float32 | bfloat16: the model dtype (activations, for gguf)
    weights: str  # dense | gguf
    tp: int
    reason: str  # one line for the server's log
    # A draft model's format where the probe ran: the fastest measured for
    # one row, a draft step's work. None: nothing measured.
    draft: Choice | None = None

    def log_line(self) -> str:
        line = f"weights {self.format} ({self.dtype}), tp {self.tp}: {self.reason}"
        if self.draft is not None:
            line += f" Draft models: {self.draft.format}, the fastest measured for one row."
        return line


def needs_probe(weights: str) -> bool:
    """Whether :func:`plan_weights` needs the probe's measurements."""
    return weights == "auto"


def plan_weights(
    weights: str,  # one of WEIGHT_FORMATS
    tp: int | None,  # None: the default for ``device``
    recommendation: Recommendation | None,  # the probe's; needed for weights="auto"
    device: str = "cpu",
    drafting: bool = True,  # the target verifies k + 1 rows, not one
    dtype: str | None = None,  # configured: the model dtype (for gguf, of activations)
) -> WeightPlan:
    """The plan for the requested ``weights`` and ``tp``: ``auto`` decided
    from the probe's measurements, an unset ``tp`` by ``device``."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    reasons: list[str] = []
    if weights == "auto":
        if recommendation is None:
            raise ValueError("weights='auto' needs the probe's recommendation")
        choice = recommendation.verify if drafting else recommendation.decode
        work = f"a {recommendation.verify_rows}-row verify" if drafting else "one-row decode"
        reasons.append(f"{choice.format} is the fastest measured for {work}.")
    else:
        choice = CHOICES[weights]
        reasons.append(f"{weights} as configured.")
    if recommendation is not None:  # measured for the target, or for draft models alone
        reasons.append(recommendation.reason)
    chosen_tp, tp_reason = _choose_tp(tp, device)
    reasons.append(tp_reason)
    model_dtype = dtype or choice.dtype
    draft = recommendation.decode if recommendation is not None else None
    return WeightPlan(
        choice.format, model_dtype, choice.weights, chosen_tp, " ".join(reasons), draft
    )


def _choose_tp(tp: int | None, device: str) -> tuple[int, str]:
    if tp is not None:
        return tp, f"tp {tp} as configured."
    if device != "cpu":
        return 1, f"tp 1: one {device} holds the model (set tp to shard it over several)."
    return 1, (
        "tp 1: shards on one CPU share its cores and add two all-reduces per layer "
        "(set tp to shard across machines)."
    )
