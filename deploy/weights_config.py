"""The serve config's weight keys: the format the target runs (``weights``),
the legacy ``dtype`` key, and what the loader is told for each."""

from __future__ import annotations

from typing import Literal, Protocol, TypeVar

from specray.actors.model.hardware import CHOICES
from specray.actors.model.weight_plan import DTYPE_FORMATS

# The target's weights (actors/model/weight_plan.py): auto is measured at start.
Weights = Literal["auto", "gguf", "bf16", "fp32"]
WEIGHTS_HELP = (
    "gguf: the GGUF blocks on low-bit kernels; bf16 / fp32: dense; "
    "auto: the fastest a ~2 s probe of this machine measures"
)

Dtype = Literal["float32", "bfloat16"]


class _WeightKeys(Protocol):
    weights: Weights
    dtype: Dtype | None


_Settings = TypeVar("_Settings", bound=_WeightKeys)


def fold_legacy_dtype(settings: _Settings) -> _Settings:
    """The model validator of every section with a ``weights`` key: the legacy
    ``dtype`` key folded into it (see :func:`weights_for_dtype`)."""
    settings.weights = weights_for_dtype(settings.weights, settings.dtype)  # type: ignore[assignment]
    return settings


def weights_for_dtype(weights: str, dtype: str | None) -> str:
    """``weights`` with a legacy ``dtype`` key folded in: ``dtype`` alone
    means dense weights in it; with ``gguf`` it is the activation dtype."""
    if dtype is None:
        return weights
    dense = DTYPE_FORMATS[dtype]
    if weights == "auto":
        return dense
    if weights in ("fp32", "bf16") and weights != dense:
        raise ValueError(f"weights {weights} contradicts dtype {dtype}")
    return weights


def weight_source(weights: str) -> str:
    """``load_model``'s ``weights`` argument for a format."""
    return "gguf" if weights == "gguf" else "dense"


def model_dtype(weights: str, dtype: str | None) -> str:
    """The model dtype of planned settings (``weights`` not ``auto``)."""
    if weights == "auto":
        raise ValueError("weights: auto is planned at start-up (specray.deploy.weights_choice)")
    return dtype or CHOICES[weights].dtype
