"""Which weights a target loads, and how many shards it runs as.

``--weights`` names a format (see :mod:`specray.actors.model.hardware`):
``fp32`` / ``bf16`` (dense safetensors in that dtype), ``gguf`` (the GGUF
blocks on the low-bit kernels), or ``auto``: the format the start-up probe
measured fastest. With a drafter the target's work is verifying ``k + 1``
rows at a time, so auto picks the fastest format at that size, not at one
row: on a CPU without native bf16 the two differ.

The default ``tp`` is chosen the same way, from a measurement: one process
on every core against a ``1/tp`` slice on ``1/tp`` of the cores. On one CPU
the shards share the cores and the memory bandwidth, so a shard only pays
for its two all-reduces per layer when a process cannot use its cores well.

:func:`plan_weights` is the decision, pure: given the measurements it
returns the plan and the reason the server logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from specray.actors.model.hardware import CHOICES, Recommendation, TpSplit

WEIGHT_FORMATS = ("auto", "gguf", "bf16", "fp32")
# A shard's slice must run this much faster than the whole matmul in one
# process before TP is the default: the rest pays for the all-reduces.
TP_MIN_GAIN = 1.3
DTYPE_FORMATS = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass(frozen=True)
class WeightPlan:
    """What to load: ``load_model(dir, dtype, weights=weights)`` on ``tp`` shards."""

    format: str  # gguf | bf16 | fp32
    dtype: str  # float32 | bfloat16: the model dtype (activations, for gguf)
    weights: str  # dense | gguf
    tp: int
    reason: str  # one line for the server's log

    def log_line(self) -> str:
        return f"weights {self.format} ({self.dtype}), tp {self.tp}: {self.reason}"


def needs_probe(weights: str, tp: int | None) -> bool:
    """Whether :func:`plan_weights` needs measurements for these requests."""
    return weights == "auto" or tp is None


def plan_weights(
    weights: str,  # one of WEIGHT_FORMATS
    tp: int | None,  # None: chosen from ``split``
    recommendation: Recommendation | None,  # the probe's; needed for weights="auto"
    split: TpSplit | None,  # needed for tp=None on a CPU with more than one core
    device: str = "cpu",
    drafting: bool = True,  # the target verifies k + 1 rows, not one
) -> WeightPlan:
    """The plan for the requested ``weights`` and ``tp``, ``auto`` / None
    decided from the measurements."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    reasons: list[str] = []
    if weights == "auto":
        if recommendation is None:
            raise ValueError("weights='auto' needs the probe's recommendation")
        choice = recommendation.verify if drafting else recommendation.decode
        work = f"a {recommendation.verify_rows}-row verify" if drafting else "one-row decode"
        reasons.append(f"{choice.format} is the fastest measured for {work}.")
        reasons.append(recommendation.reason)
    else:
        choice = CHOICES[weights]
        reasons.append(f"{weights} as configured.")
    chosen_tp, tp_reason = _choose_tp(tp, split, device)
    reasons.append(tp_reason)
    return WeightPlan(choice.format, choice.dtype, choice.weights, chosen_tp, " ".join(reasons))


def _choose_tp(tp: int | None, split: TpSplit | None, device: str) -> tuple[int, str]:
    if tp is not None:
        return tp, f"tp {tp} as configured."
    if device != "cpu":
        return 1, f"tp 1: one {device} holds the model (set tp to shard it over several)."
    if split is None:
        return 1, "tp 1: one core, nothing to split."
    measured = (
        f"one process on {split.threads} threads: {split.one_process_ms:.2f} ms per decode "
        f"matmul; a 1/{split.tp} shard on {split.threads // split.tp}: {split.shard_ms:.2f} ms "
        f"({split.gain:.2f}x"
    )
    if split.gain >= TP_MIN_GAIN:
        return split.tp, f"tp {split.tp}: {measured}, over the {TP_MIN_GAIN}x a shard needs)."
    return 1, f"tp 1: {measured}, under the {TP_MIN_GAIN}x that pays for the all-reduces)."
