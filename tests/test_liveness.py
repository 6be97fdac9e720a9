"""Liveness by progress: a target group or a draft replica that computes is
never taken for hung, however long one round takes; one that answers no
probe, or stops making progress, still is. Real Ray actors on loopback."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from references import greedy_no_cache
from router_helpers import router_config, router_state, run_all, target_only

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.request import GenerationRequest
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import StoppingCriteria
from specray.actors.store.random_qwen2 import write_random_qwen2
from specray.cluster.liveness import ProgressWatch, StalledError, await_progressing
from specray.cluster.router import launch_router

CONTEXT = 2048  # the checkpoint's context, and the router's max_len


def test_a_moving_count_is_alive_a_still_or_silent_one_is_hung(local_ray: None) -> None:
    # Defined here, so Ray ships it by value (a worker cannot import tests/).
    class Counter:
        """Stands in for a shard's progress probe: counts up, stands still, or
        stops answering."""

        def __init__(self) -> None:
            self.count = 0
            self.moving = True
            self.silent = False

        def set(self, moving: bool, silent: bool) -> None:
            self.moving, self.silent = moving, silent

        def progress(self) -> int:
            if self.silent:
                time.sleep(30)
            if self.moving:
                self.count += 1
            return self.count

    actor: Any = ray.remote(Counter).options(num_cpus=0).remote()
    ray.get(actor.progress.remote())  # started
    # A stall far above a probe's round trip, so a loaded machine's slow
    # answers to a moving count are never taken for a stall.
    watch = ProgressWatch(lambda rank: actor.progress.remote(), stall_s=3.0, probe_interval_s=0.2)
    began = time.monotonic()
    # Twice the stall: a count that stood still would be caught in this time.
    while time.monotonic() < began + 2 * watch.stall_s:
        assert watch.check([0], began) is None
        time.sleep(0.3)
    ray.get(actor.set.remote(False, False))
    hang = None
    deadline = time.monotonic() + 30
    while hang is None and time.monotonic() < deadline:
        hang = watch.check([0], began)
        time.sleep(0.2)
    assert hang is not None and hang.ranks == (0,) and "no progress" in hang.detail
    ray.get(actor.set.remote(True, True))
    hang = ProgressWatch(lambda rank: actor.progress.remote(), 60.0, 1.0, 1.0).check([0], began)
    assert hang is not None and "no probe" in hang.detail
    ray.kill(actor)


def test_a_pending_answer_is_awaited_while_its_count_moves() -> None:
    """``await_progressing``: an answer that takes four stall windows comes
    back while the probed count moves; one whose count stands still, or
    whose probe goes unanswered, raises :class:`StalledError`."""

    async def outcome(count_moves: bool, answers: bool, answer_after_s: float) -> str:
        counted = 0

        async def probe() -> int:
            nonlocal counted
            if not answers:
                await asyncio.sleep(60)
            counted += count_moves
            return counted

        async def answer() -> str:
            await asyncio.sleep(answer_after_s)
            return "answer"

        try:
            return await await_progressing(answer(), probe, stall_s=0.2, answer_s=0.1)
        except StalledError as err:
            return str(err)

    assert asyncio.run(outcome(True, True, 0.8)) == "answer"
    assert asyncio.run(outcome(False, True, 0.8)) == "made no progress for 0.2 s"
    assert asyncio.run(outcome(True, False, 0.8)) == "answered no probe within 0.1 s"
    assert asyncio.run(outcome(False, False, 0.05)) == "answer"  # done before any probe


@pytest.fixture(scope="module")
def long_model(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, GenerationRequest, Any, float]:
    """A random Qwen2 big enough that a whole-context prefill takes seconds
    on two cores, a prompt that fills its context, that prompt's greedy
    reference, and how long one in-process prefill of it took here."""
    directory = tmp_path_factory.mktemp("long")
    write_random_qwen2(
        directory,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
    )
    gen = torch.Generator().manual_seed(7)
    max_tokens = 8
    prompt = torch.randint(3, 512, (CONTEXT - max_tokens,), generator=gen).tolist()
    request = GenerationRequest(
        "long", prompt, stopping=StoppingCriteria(max_tokens=max_tokens, ignore_eos=True)
    )
    model = load_model(directory)
    began = time.monotonic()
    greedy_no_cache(model, prompt, 1)
    prefill_s = time.monotonic() - began
    return directory, request, target_only(directory, [request]), prefill_s


def _serve(config: Any, request: GenerationRequest) -> tuple[Any, float, Any]:
    """``request`` through a router of ``config``: its output, the seconds
    it took and the router's state after it."""
    router = launch_router(config)
    try:
        began = time.monotonic()
        got = asyncio.run(run_all(router, [request]))
        elapsed = time.monotonic() - began
        return got, elapsed, router_state(router)
    finally:
        ray.get(router.shutdown.remote())


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 256])
def test_the_longest_prompt_is_served_without_a_restart(
    local_ray: None, long_model: tuple[Path, GenerationRequest, Any, float], budget: int | None
) -> None:
    """A prompt filling the context, prefilled whole (one long round) or in
    chunks, on TP = 2 with a shard deadline far shorter than the prefill:
    the group computes all along, so nothing is restarted or replayed."""
    model_dir, request, reference, prefill_s = long_model
    # A third of this machine's in-process prefill (TP = 2 on one thread per
    # shard takes longer still): short of the prefill on a fast CPU too.
    config = router_config(
        model_dir,
        None,
        tp=2,
        max_len=CONTEXT,
        timeout_s=max(0.25, prefill_s / 3),
        max_num_batched_tokens=budget,
        profile=False,
    )
    got, elapsed, state = _serve(config, request)
    assert state.recovery.target_failures == 0 and state.recovery.target_restarts == 0
    assert got == reference
    assert elapsed > 2 * config.target.timeout_s  # the deadline alone would have cut it


@pytest.mark.slow
def test_a_draft_models_long_catch_up_is_not_taken_for_a_hang(
    local_ray: None, long_model: tuple[Path, GenerationRequest, Any, float]
) -> None:
    """A draft model (the checkpoint itself) whose first proposal feeds a
    prompt filling the context in one call, with a draft deadline far
    shorter than that feed: the replica's count moves all along, so it is
    never dropped, and the output is target-only's."""
    model_dir, request, reference, prefill_s = long_model
    config = router_config(
        model_dir,
        DrafterSpec("model", str(model_dir)),
        max_len=CONTEXT,
        k=2,
        adaptive=False,  # every round drafts: the first one feeds the whole prompt
        max_num_batched_tokens=None,  # in one call, not in chunks
        profile=False,
    )
    assert config.draft is not None
    draft = replace(config.draft, timeout_s=max(0.25, prefill_s / 3))
    got, elapsed, state = _serve(replace(config, draft=draft), request)
    assert state.recovery.draft_failures == 0 and state.recovery.draft_restarts == 0
    assert got == reference
    assert elapsed > 2 * draft.timeout_s  # the deadline alone would have cut it
