"""Serving metrics as ``vllm bench serve`` reports them, from what a client sees.

Pure functions over :class:`RequestRecord` (a send time, each streamed
chunk's arrival time and token count, the final counters); no gRPC here.

Per request (seconds):

- TTFT: first chunk that carries a token − send.
- E2EL: last response − send.
- TPOT: (E2EL − TTFT) / (output tokens − 1); undefined for one token.
- ITL: the gaps between consecutive token-carrying chunks. A chunk holding
  several tokens (one speculative round) counts as **one** gap, as in vLLM:
  with speculation ITL is time per round, not per token, so it rises while
  TPOT falls. TPOT is the per-token figure.

Failed requests (a gRPC error at any point) are counted with their status
code and left out of every latency and throughput figure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from specray.bench.common import first_divergence

SPEC, BASE = "spec", "no_spec"  # the two arms of the A/B run
ARM_NAMES = {SPEC: "spec", BASE: "no spec"}  # as reports name them
ALL = "all"  # the row pooling every category


@dataclass
class RequestRecord:
    """One request as the load generator saw it (times from ``time.perf_counter``)."""

    prompt_id: str
    category: str
    speculative: bool
    send_s: float
    chunk_s: list[float] = field(default_factory=list)  # arrival of every response
    chunk_tokens: list[int] = field(default_factory=list)  # tokens each response carried
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, served from the server's prefix cache
    draft_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0
    fallback: bool = False
    finish_reason: str | None = None
    error: str | None = None  # the gRPC status name when the request failed
    error_details: str = ""

    @property
    def mode(self) -> str:
        return SPEC if self.speculative else BASE

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_s)

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def end_s(self) -> float:
        return self.chunk_s[-1] if self.chunk_s else self.send_s


@dataclass(frozen=True)
class RequestLatency:
    """One successful request's latencies, in seconds."""

    ttft: float
    e2el: float
    tpot: float | None  # None: fewer than two output tokens
    itl: list[float]


def request_latency(record: RequestRecord) -> RequestLatency | None:
    """``record``'s latencies, or None when it failed or streamed no token."""
    if not record.ok:
        return None
    arrivals = [t for t, n in zip(record.chunk_s, record.chunk_tokens, strict=True) if n > 0]
    if not arrivals:
        return None
    ttft = arrivals[0] - record.send_s
    e2el = record.end_s - record.send_s
    tokens = record.output_tokens
    tpot = (e2el - ttft) / (tokens - 1) if tokens > 1 else None
    itl = [later - earlier for earlier, later in pairwise(arrivals)]
    return RequestLatency(ttft, e2el, tpot, itl)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation between the two
    nearest ranks (numpy's default): rank h = (n − 1)·q/100, value
    x[⌊h⌋] + (h − ⌊h⌋)(x[⌊h⌋+1] − x[⌊h⌋]) over the sorted values. None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def distribution(values: Sequence[float], scale: float = 1e3) -> dict[str, float | None]:
    """mean, median and p99 of ``values`` × ``scale`` (seconds → ms by default)."""
    scaled = [v * scale for v in values]
    return {
        "mean": sum(scaled) / len(scaled) if scaled else None,
        "median": percentile(scaled, 50),
        "p99": percentile(scaled, 99),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def busy_seconds(records: Iterable[RequestRecord]) -> float:
    """Seconds during which at least one of ``records`` was in flight (the
    length of the union of their send-to-last-response intervals)."""
    total, covered_to = 0.0, -math.inf
    for start, end in sorted((r.send_s, r.end_s) for r in records):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


def failures(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Failed requests per gRPC status name."""
    return dict(Counter(r.error or "NO_OUTPUT" for r in records if not r.ok))


def mode_summary(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The headline numbers of one arm (or any set of requests).

    Throughput divides by :func:`busy_seconds` of the successful requests:
    the whole run for one arm sent alone, the arm's own requests' time when
    sent one at a time. When both arms are in flight together they share
    the server, and the two throughputs are not separable (nor additive).
    """
    done = [r for r in records if r.ok]
    latencies = [lat for lat in map(request_latency, done) if lat is not None]
    span = busy_seconds(done)
    output = sum(r.output_tokens for r in done)
    drafted = sum(r.draft_tokens for r in done)
    accepted = sum(r.accepted_tokens for r in done)
    rounds = sum(r.rounds for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "failures": failures(records),
        "duration_s": span,
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        # Each prompt is sent in both arms: the later send may find it cached.
        "cached_tokens": sum(r.cached_tokens for r in done),
        "output_tokens": output,
        "output_tokens_per_s": _ratio(output, span) if done else None,
        "requests_per_s": _ratio(len(done), span) if done else None,
        "ttft_ms": distribution([lat.ttft for lat in latencies]),
        "tpot_ms": distribution([lat.tpot for lat in latencies if lat.tpot is not None]),
        "itl_ms": distribution([gap for lat in latencies for gap in lat.itl]),
        "e2el_ms": distribution([lat.e2el for lat in latencies]),
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "rounds": rounds,
        "acceptance_rate": _ratio(accepted, drafted),
        # τ as actors/engine/request.py defines it: tokens one round commits,
        # the bonus (or recovered) token included; 1.0 without speculation.
        "tau": _ratio(accepted + rounds, rounds),
        "fallbacks": sum(r.fallback for r in done),
    }


@dataclass(frozen=True)
class Pair:
    """The two arms of one prompt, both successful."""

    spec: RequestRecord
    base: RequestRecord


def pairs(records: Sequence[RequestRecord]) -> list[Pair]:
    """Prompts whose spec and no-spec requests both succeeded, in prompt order."""
    arms: dict[tuple[str, bool], RequestRecord] = {}
    for record in records:
        arms[record.prompt_id, record.speculative] = record
    out = []
    for prompt_id in dict.fromkeys(r.prompt_id for r in records):
        spec, base = arms.get((prompt_id, True)), arms.get((prompt_id, False))
        if spec is not None and base is not None and spec.ok and base.ok:
            out.append(Pair(spec, base))
    return out


def per_token_rate(records: Iterable[RequestRecord]) -> float | None:
    """Output tokens per second of request latency, pooled: Σ tokens / Σ E2EL."""
    chosen = list(records)
    return _ratio(sum(r.output_tokens for r in chosen), sum(r.end_s - r.send_s for r in chosen))


def _mean_tpot(records: Iterable[RequestRecord]) -> float | None:
    tpots = [lat.tpot for lat in map(request_latency, records) if lat and lat.tpot is not None]
    return sum(tpots) / len(tpots) if tpots else None


def category_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Spec against no-spec per category (then pooled), over the prompts
    whose two arms both succeeded.

    ``speedup``: Σ tokens / Σ E2EL of the spec arm over the same for the
    no-spec arm (prefill and queueing included); ``tpot_speedup``: mean TPOT
    no-spec ÷ mean TPOT spec (decode only).
    """
    both = pairs(records)
    categories = list(dict.fromkeys(r.category for r in records))
    rows = []
    for category in [*categories, ALL]:
        chosen = [p for p in both if category in (ALL, p.spec.category)]
        spec = [p.spec for p in chosen]
        base = [p.base for p in chosen]
        spec_rate, base_rate = per_token_rate(spec), per_token_rate(base)
        spec_tpot, base_tpot = _mean_tpot(spec), _mean_tpot(base)
        stats = mode_summary(spec)
        rows.append(
            {
                "category": category,
                "pairs": len(chosen),
                "spec_tokens_per_s": spec_rate,
                "no_spec_tokens_per_s": base_rate,
                "speedup": divide(spec_rate, base_rate),
                "spec_tpot_ms": None if spec_tpot is None else spec_tpot * 1e3,
                "no_spec_tpot_ms": None if base_tpot is None else base_tpot * 1e3,
                "tpot_speedup": divide(base_tpot, spec_tpot),
                "acceptance_rate": stats["acceptance_rate"],
                "tau": stats["tau"],
            }
        )
    return rows


def divide(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return _ratio(numerator, denominator)


def output_agreement(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Per pair: where the spec output first differs from the no-spec one
    (None: token-identical). Greedy speculation is lossless, so a difference
    is a bug or a numerical near-tie (bf16 batch shapes can flip one)."""
    both = pairs(records)
    divergence = {
        p.spec.prompt_id: first_divergence(p.spec.token_ids, p.base.token_ids) for p in both
    }
    identical = sum(d is None for d in divergence.values())
    return {
        "pairs": len(both),
        "identical": identical,
        "identical_fraction": _ratio(identical, len(both)),
        "first_divergence": divergence,
    }
