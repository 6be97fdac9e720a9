"""Token-tree verification in one forward pass: every node's logits equal those
of its root-to-node chain verified alone, and keeping the accepted path leaves
the cache equal to a fresh prefill of the committed tokens (every family, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB

from specray.actors.drafting.base import DraftProposal
from specray.actors.engine.target import AcceptedPath, LocalTarget, VerifyInput
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.kv_cache import KVCache
from specray.actors.model.loader import load_model
from specray.actors.model.token_tree import ancestor_mask, children, depths, path_to

# Depths 0 0 1 1 1 2 3 2: late nodes sit far from their depth, so a wrong
# rotary position or a window measured in cache indices shows up.
PARENTS = [-1, -1, 0, 0, 1, 2, 5, 3]
TOL = {"atol": 2e-5, "rtol": 1e-5}


def _tokens(count: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _chain_logits(model: DecoderModel, tokens: list[int]) -> torch.Tensor:  # [len, vocab]
    cache = model.new_cache(1, 64)
    slot = cache.allocate()
    return model(ForwardBatch.build([SequenceInput(slot, tokens, 0, len(tokens))]), cache).logits


def _prefilled(model: DecoderModel, prefix: list[int], slots: int = 1) -> tuple[KVCache, int]:
    cache = model.new_cache(slots, 64)
    slot = cache.allocate()
    model(ForwardBatch.build([SequenceInput(slot, prefix, 0)]), cache)
    return cache, slot


def test_tree_logits_equal_each_branch_alone(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    prefix, fed, nodes = _tokens(9, 1), _tokens(2, 2), _tokens(len(PARENTS), 3)
    cache, slot = _prefilled(model, prefix)
    # Two uncached committed tokens, then the tree under the second of them.
    seq = SequenceInput(slot, fed + nodes, len(prefix), len(nodes) + 1, PARENTS)
    tree_logits = model(ForwardBatch.build([seq]), cache).logits
    assert cache.length(slot) == len(prefix) + len(fed) + len(nodes)
    alone = _chain_logits(model, prefix + fed)
    torch.testing.assert_close(tree_logits[0], alone[-1], **TOL)
    for node in range(len(PARENTS)):
        path = [nodes[i] for i in path_to(PARENTS, node)]
        alone = _chain_logits(model, prefix + fed + path)
        torch.testing.assert_close(tree_logits[1 + node], alone[-1], **TOL)


def test_trees_and_chains_share_a_batch(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    prefixes = [_tokens(n, 10 + n) for n in (9, 4, 6)]
    trees = [(_tokens(8, 20), PARENTS), (_tokens(3, 21), None), (_tokens(4, 22), [-1, 0, -1, 2])]
    cache = model.new_cache(4, 64)
    cache.allocate()  # a gap: the batch reads non-contiguous slots
    seqs, alone = [], []
    for prefix, (nodes, parents) in zip(prefixes, trees, strict=True):
        slot = cache.allocate()
        model(ForwardBatch.build([SequenceInput(slot, prefix, 0)]), cache)
        seqs.append(SequenceInput(slot, [prefix[-1], *nodes], len(prefix), len(nodes) + 1, parents))
        own_cache, own_slot = _prefilled(model, prefix)
        own = SequenceInput(own_slot, [prefix[-1], *nodes], len(prefix), len(nodes) + 1, parents)
        alone.append(model(ForwardBatch.build([own]), own_cache).logits)
    batched = model(ForwardBatch.build(seqs), cache).logits
    torch.testing.assert_close(batched, torch.cat(alone), **TOL)


def test_keeping_the_accepted_path_equals_a_fresh_prefill(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    prefix, nodes, after = _tokens(9, 4), _tokens(len(PARENTS), 5), _tokens(3, 6)
    for accepted in ([1, 4], [0, 2, 5, 6], [0, 3, 7], []):
        cache, slot = _prefilled(model, prefix)
        start = len(prefix)
        seq = SequenceInput(slot, [prefix[-1], *nodes], start, len(nodes) + 1, PARENTS)
        model(ForwardBatch.build([seq]), cache)
        first = start + 1
        cache.keep_path(slot, first, [first + n for n in accepted])
        committed = prefix + [prefix[-1]] + [nodes[n] for n in accepted]
        fresh, fresh_slot = _prefilled(model, committed)
        end = len(committed)
        assert cache.length(slot) == end
        torch.testing.assert_close(cache.keys[:, slot, :, :end], fresh.keys[:, fresh_slot, :, :end])
        torch.testing.assert_close(
            cache.values[:, slot, :, :end], fresh.values[:, fresh_slot, :, :end]
        )
        # And decoding on from there is unchanged.
        rolled = model(ForwardBatch.build([SequenceInput(slot, after, end, 3)]), cache).logits
        torch.testing.assert_close(rolled, _chain_logits(model, committed + after)[-3:], **TOL)


def test_local_target_carries_the_accepted_path_on_the_next_call(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    model = load_model(tiny_dir_factory("gemma3"))  # sliding window: the hardest case
    prompt, nodes = _tokens(8, 7), _tokens(len(PARENTS), 8)
    target = LocalTarget(model, num_slots=2, max_len=64)
    (first_out,) = target.verify([VerifyInput("r", 0, prompt, 1)])
    with pytest.raises(ValueError):  # the tree needs its root fed: one logit row too many
        VerifyInput("r", len(prompt), nodes, len(nodes), parents=tuple(PARENTS))
    bonus = int(first_out.greedy_ids()[-1])
    tree_input = VerifyInput(
        "r", len(prompt), [bonus, *nodes], len(nodes) + 1, parents=tuple(PARENTS)
    )
    target.verify([tree_input])
    path = (0, 2, 5)
    committed = [*prompt, bonus, *(nodes[n] for n in path)]
    next_tokens = _tokens(2, 9)
    (out,) = target.verify(
        [
            VerifyInput(
                "r",
                len(committed),
                next_tokens,
                2,
                accepted=AcceptedPath(tree_input.tree_start, path),
            )
        ]
    )
    reference = LocalTarget(model, num_slots=1, max_len=64)
    (expected,) = reference.verify([VerifyInput("q", 0, committed + next_tokens, 2)])
    assert out.logits is not None and expected.logits is not None
    torch.testing.assert_close(out.logits, expected.logits, **TOL)
    with pytest.raises(ValueError):  # only the kept path is cached now
        target.verify([VerifyInput("r", len(committed) + 3, [1], 1)])


def test_keep_path_validates_its_sources(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    cache = load_model(tiny_dir_factory("llama")).new_cache(1, 16)
    slot = cache.allocate()
    cache.set_length(slot, 10)
    for bad in ([5, 4], [3], [6, 10]):
        with pytest.raises(ValueError):
            cache.keep_path(slot, 4, bad)
    cache.keep_path(slot, 4, [4, 5])  # already in place: only the length moves
    assert cache.length(slot) == 6


def test_tree_helpers() -> None:
    assert depths(PARENTS) == [0, 0, 1, 1, 1, 2, 3, 2]
    assert children(PARENTS) == [[0, 1], [2, 3], [4], [5], [7], [], [6], [], []]
    assert path_to(PARENTS, 6) == [0, 2, 5, 6] and path_to(PARENTS, -1) == []
    mask = ancestor_mask(PARENTS)
    assert mask[6].nonzero().flatten().tolist() == [0, 2, 5, 6]
    assert mask[1].nonzero().flatten().tolist() == [1]
    seq = SequenceInput(0, [9, 9, *range(8)], 20, 9, PARENTS)
    assert seq.rotary_positions() == [20, 21, 22, 22, 23, 23, 23, 24, 25, 24]


def test_draft_proposal_trees_clip_by_node_budget() -> None:
    tree = DraftProposal([5, 6, 7, 8], parents=[-1, -1, 0, 2], confidence=[0.6, 0.3, 0.5, 0.4])
    assert tree.is_tree and not DraftProposal([1, 2], parents=[-1, 0]).is_tree
    clipped = tree.clipped(3)
    assert clipped.token_ids == [5, 6, 7]
    assert clipped.parents == [-1, -1, 0]
    assert clipped.confidence == [0.6, 0.3, 0.5]
    # A model's draft cut off was still made: it counts as dropped.
    assert DraftProposal([1, 2]).clipped(1) == DraftProposal([1], dropped=1)
    assert DraftProposal([1, 2], from_lookup=True).clipped(1) == DraftProposal(
        [1], from_lookup=True
    )
    with pytest.raises(ValueError):
        DraftProposal([1, 2], parents=[-1, 1])
    with pytest.raises(ValueError):
        DraftProposal([1, 2], confidence=[1.0])
