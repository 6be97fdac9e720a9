"""A request's life around its rounds: starting it, how many drafts it may
take, and turning a round's tokens into the chunk it streams. Shared by the
in-process engine and the router."""

from __future__ import annotations

import time
from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from specray.actors.engine.detokenizer import IncrementalDetokenizer
from specray.actors.engine.errors import RequestRejectedError
from specray.actors.engine.request import (
    DraftState,
    GenerationRequest,
    RequestOutput,
    RunningRequest,
)
from specray.actors.engine.stopping import StopChecker
from specray.actors.sampling.grammar import GrammarCompiler, GrammarError, GrammarMatcher
from specray.actors.sampling.logits import make_generator, resolve_seed


def start_request(
    request: GenerationRequest,
    eos_token_ids: tuple[int, ...],
    tokenizer: PreTrainedTokenizerBase | None,
    max_gamma: int,
    draft: DraftState,
    grammar: GrammarMatcher | None = None,
) -> RunningRequest:
    """A request's running state: its seed resolved, the default EOS filled in
    and its stop checker and detokenizer ready. ``draft`` holds its starting
    acceptance estimates (the scheduler's priors); ``grammar`` is the
    matcher of its guide, if it has one."""
    seed = resolve_seed(request.sampling.seed)
    sampling = replace(request.sampling, seed=seed)
    stopping = request.stopping
    if not stopping.eos_token_ids:
        stopping = replace(stopping, eos_token_ids=eos_token_ids)
    decoder = (
        IncrementalDetokenizer(tokenizer, request.prompt_ids) if tokenizer is not None else None
    )
    return RunningRequest(
        request=replace(request, sampling=sampling, stopping=stopping),
        seed=seed,
        generator=make_generator(seed),
        stop=StopChecker(stopping, decoder),
        max_gamma=max_gamma,
        draft=draft,
        tokens=list(request.prompt_ids),
        grammar=grammar,
    )


def gamma_limit(running: RunningRequest) -> int:
    """The most drafts worth asking for: the request's own k and the ceiling,
    and never past ``max_tokens`` (those drafts would be wasted)."""
    own = running.request.num_speculative_tokens
    limit = running.max_gamma if own is None else min(own, running.max_gamma)
    return max(min(limit, running.remaining_tokens - 1), 0)


def stream_round(running: RunningRequest, new_token_ids: list[int]) -> RequestOutput:
    """Apply stop criteria to one round's committed tokens; the chunk to stream."""
    delta = running.stop.update(new_token_ids)
    running.output_ids.extend(delta.token_ids)
    running.stats.num_output_tokens = len(running.output_ids)
    now = time.perf_counter()
    if running.stats.first_token_at is None and delta.token_ids:
        running.stats.first_token_at = now
    if delta.finished:
        running.stats.finished_at = now
    return RequestOutput(
        running.request_id,
        delta.token_ids,
        delta.text,
        delta.finish_reason,
        running.stats,
        running.seed,
    )


def grammar_for(
    request: GenerationRequest, grammars: GrammarCompiler | None
) -> GrammarMatcher | None:
    """The matcher of ``request``'s guide, if it has one; a typed refusal if
    this engine cannot constrain output (no tokenizer) or the guide does not
    compile."""
    if request.guide is None:
        return None
    if grammars is None:
        raise RequestRejectedError("structured output needs the model's tokenizer")
    try:
        return grammars.matcher(request.guide)
    except GrammarError as error:
        raise RequestRejectedError(f"the guide is not a valid {error}") from None
