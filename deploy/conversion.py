"""Between a validated front-door request and the engine's (or the
router's) request and output types; both backends use these."""

from __future__ import annotations

from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.deploy.backend import Chunk, ChunkStats
from specray.deploy.validation import ValidatedRequest


def generation_request(request: ValidatedRequest) -> GenerationRequest:
    """The engine's (and the router's) request for a validated one."""
    return GenerationRequest(
        request_id=request.request_id,
        prompt_ids=list(request.prompt_ids),
        sampling=request.sampling,
        stopping=request.stopping,
        # 0 drafts per round is target-only decoding on the same path.
        num_speculative_tokens=request.num_speculative_tokens if request.speculative else 0,
        guide=request.guide,
        fixed_speculation=request.fixed_speculation,
    )


def chunk_from_output(
    output: RequestOutput, prompt_tokens: int, elapsed_s: float | None = None
) -> Chunk:
    """A front-door chunk from an engine (or router) output; stats are copied
    because the engine keeps mutating its own. ``elapsed_s`` replaces the
    output's own clock, which is another process's when it comes from an actor."""
    stats = output.stats
    return Chunk(
        request_id=output.request_id,
        token_ids=tuple(output.token_ids),
        text=output.text,
        finish_reason=output.finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=stats.num_output_tokens,
        stats=ChunkStats(
            stats.draft_tokens,
            stats.accepted_tokens,
            stats.rounds,
            stats.fallback,
            stats.elapsed_s if elapsed_s is None else elapsed_s,
        ),
        seed=output.seed,
        cached_tokens=stats.cached_tokens,
    )
