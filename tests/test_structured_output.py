"""Structured output with speculation on: the grammar's masks and rollback
against llguidance's own matcher stepped token by token, greedy output equal
to constrained target-only decoding (a no-cache loop over the model that
masks each step), the sampled distribution the masked target's, and refusals
that name the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import llguidance
import llguidance.hf
import pytest
import torch
from serving_helpers import MODEL_VOCAB, save_served_model
from transformers import AutoTokenizer

from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.errors import RequestRejectedError
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.loader import load_model
from specray.actors.sampling.grammar import GrammarCompiler, GrammarError, Guide
from specray.actors.sampling.params import SamplingParams, StoppingCriteria

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["ok", "n"],
        "additionalProperties": False,
        # Compact: a random-weight model would otherwise fill the budget with
        # the whitespace JSON allows between tokens.
        "x-guidance": {"whitespace_flexible": False},
    }
)
GUIDES = {
    "json_schema": Guide("json_schema", SCHEMA),
    "regex": Guide("regex", r"(yes|no)-[0-9]{2}"),
    "choice": Guide("choice", json.dumps(["alpha", "beta", "gamma"])),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("guided"), seed=4)


@pytest.fixture(scope="module")
def compiler(served: Path) -> GrammarCompiler:
    return GrammarCompiler(AutoTokenizer.from_pretrained(served), MODEL_VOCAB)


def _reference_matcher(served: Path, guide: Guide) -> llguidance.LLMatcher:
    tokenizer = AutoTokenizer.from_pretrained(served)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=MODEL_VOCAB)
    return llguidance.LLMatcher(ll_tokenizer, guide.grammar())


def _allowed(matcher: llguidance.LLMatcher) -> set[int]:
    bias = matcher.compute_logit_bias()  # one byte per token: 200 allowed, 0 forbidden
    return {i for i, b in enumerate(bias[:MODEL_VOCAB]) if b}


def test_masks_equal_a_reference_matcher_stepped_token_by_token(
    served: Path, compiler: GrammarCompiler
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(served)
    committed = tokenizer.encode('{"ok":true,"n":')
    mine = compiler.matcher(GUIDES["json_schema"])
    mine.commit(committed)
    draft = tokenizer.encode("12}")
    assert mine.clip(draft) == len(draft)
    masks = mine.masks(draft)
    for row in range(len(draft) + 1):
        reference = _reference_matcher(served, GUIDES["json_schema"])
        assert reference.consume_tokens(committed + draft[:row])
        assert set(masks[row].nonzero().flatten().tolist()) == _allowed(reference)
    assert torch.equal(mine.masks(draft), masks)  # computing masks rolled back
    bad = tokenizer.encode("x}")
    assert mine.clip(draft[:1] + bad) == 1  # cut at the first forbidden token
    mine.commit(draft)
    assert mine.done


def test_bad_guides_name_the_problem() -> None:
    with pytest.raises(GrammarError, match="json_schema"):
        Guide("json_schema", '{"type": "objectx"}').check()
    with pytest.raises(GrammarError, match="regex"):
        Guide("regex", "[0-9").check()
    with pytest.raises(GrammarError, match="non-empty list"):
        Guide("choice", "[]").check()


def _constrained_greedy(
    served: Path, guide: Guide, prompt: list[int], max_tokens: int
) -> list[int]:
    """Constrained target-only decoding without the round: each step runs the
    model from scratch, masks the last logits with a reference matcher, and
    takes the argmax."""
    model = load_model(served)
    matcher = _reference_matcher(served, guide)
    tokens = list(prompt)
    out: list[int] = []
    eos = AutoTokenizer.from_pretrained(served).eos_token_id
    for _ in range(max_tokens):
        cache = model.new_cache(1, len(tokens))
        logits = model(ForwardBatch.build([SequenceInput(cache.allocate(), tokens, 0)]), cache)
        allowed = torch.zeros(MODEL_VOCAB, dtype=torch.bool)
        allowed[list(_allowed(matcher))] = True
        token = int(logits.logits[-1].masked_fill(~allowed, float("-inf")).argmax())
        out.append(token)
        tokens.append(token)
        if token == eos:
            break
        assert matcher.consume_token(token)
    return out


def _engine(served: Path, compiler: GrammarCompiler, drafter_name: str, k: int) -> SpecEngine:
    target = LocalTarget(load_model(served), num_slots=4, max_len=256)
    drafter = None
    if drafter_name == "ngram":
        drafter = NgramDrafter(max_ngram=3)
    elif drafter_name == "draft model":
        drafter = DraftModelDrafter(load_model(served), 4, 256)  # agrees with the target often
    eos = (AutoTokenizer.from_pretrained(served).eos_token_id,)
    config = EngineConfig(max_batch=4, num_speculative_tokens=k, adaptive=False)
    return SpecEngine(target, drafter, None, eos, config, grammars=compiler)


@pytest.mark.parametrize("drafter_name", ["none", "ngram", "draft model"])
def test_greedy_constrained_speculation_equals_constrained_target_only(
    served: Path, compiler: GrammarCompiler, drafter_name: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(served)
    prompt = tokenizer.encode('x = [1, 2, 3]\ny = [1, 2, 3]\nanswer: {"ok":true,"n":12}\n')
    engine = _engine(served, compiler, drafter_name, k=4)
    requests = [
        GenerationRequest(name, prompt, stopping=StoppingCriteria(max_tokens=40), guide=guide)
        for name, guide in GUIDES.items()
    ]
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    reasons = {}
    drafted = accepted = 0
    for chunk in engine.generate(requests):
        outputs[chunk.request_id] += chunk.token_ids
        if chunk.finished:
            reasons[chunk.request_id] = chunk.finish_reason
            drafted += chunk.stats.draft_tokens
            accepted += chunk.stats.accepted_tokens
    if drafter_name == "ngram":  # copies from the prompt pass the grammar and are verified
        assert drafted > 0 and accepted > 0
    for name, guide in GUIDES.items():
        assert outputs[name] == _constrained_greedy(served, guide, prompt, 40)[: len(outputs[name])]
        assert reasons[name] == "stop", (name, tokenizer.decode(outputs[name]))
    text = {name: tokenizer.decode(ids, skip_special_tokens=True) for name, ids in outputs.items()}
    assert set(json.loads(text["json_schema"])) == {"ok", "n"}
    assert re.fullmatch(r"(yes|no)-[0-9]{2}", text["regex"])
    assert text["choice"] in ("alpha", "beta", "gamma")


def test_sampled_choices_follow_the_masked_target(served: Path, compiler: GrammarCompiler) -> None:
    """With speculation on, the first token of a choice among single-token
    words follows the target's distribution restricted to those tokens."""
    tokenizer = AutoTokenizer.from_pretrained(served)
    words = [w for w in ("x", "y", "z", "a", "b") if len(tokenizer.encode(w)) == 1]
    assert len(words) >= 3
    ids = [tokenizer.encode(w)[0] for w in words]
    guide = Guide("choice", json.dumps(words))
    prompt = tokenizer.encode("x y z x y z a b")
    model = load_model(served)
    cache = model.new_cache(1, len(prompt))
    logits = model(ForwardBatch.build([SequenceInput(cache.allocate(), prompt, 0)]), cache)
    expected = torch.softmax(logits.logits[-1, ids], -1)
    engine = _engine(served, compiler, "ngram", k=3)
    count = 300
    requests = [
        GenerationRequest(
            f"s{i}",
            prompt,
            SamplingParams(temperature=1.0, seed=i),
            StoppingCriteria(max_tokens=3),
            guide=guide,
        )
        for i in range(count)
    ]
    first: dict[str, int] = {}
    for chunk in engine.generate(requests):
        if chunk.token_ids and chunk.request_id not in first:
            first[chunk.request_id] = chunk.token_ids[0]
    counts = torch.tensor([sum(t == i for t in first.values()) for i in ids], dtype=torch.float64)
    assert counts.sum() == count  # every first token is one of the choices
    # Within 5 standard errors of the masked target's probabilities.
    spread = (expected * (1 - expected) / count).sqrt() * 5 + 1e-3
    assert ((counts / count - expected).abs() <= spread).all()


def test_an_engine_without_a_tokenizer_refuses_a_guide(served: Path) -> None:
    target = LocalTarget(load_model(served), num_slots=1, max_len=64)
    engine = SpecEngine(target, None, None, (), EngineConfig(1, 0, adaptive=False))
    request = GenerationRequest("g", [5, 6], guide=GUIDES["regex"])
    with pytest.raises(RequestRejectedError, match="tokenizer"):
        engine.add_request(request)
