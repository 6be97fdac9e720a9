"""Tree acceptance: greedy tables, agreement with chain rejection, seeding, and
losslessness in distribution for trees of point masses and of sampled drafts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from sampling_helpers import chi_square_p_value, sample_rows, total_variation
from test_rejection_distribution import SMALL_VOCAB, START, ToyModels, toy_models
from test_rejection_sampler import VOCAB, random_batch

from specray.actors.sampling.logits import make_generator
from specray.actors.sampling.params import SamplingParams
from specray.actors.sampling.rejection import rejection_sample
from specray.actors.sampling.tree_rejection import (
    TreeDraft,
    tree_rejection_sample,
    verify_tree_with_uniforms,
)


def one_hot_rows(argmax: list[int]) -> torch.Tensor:  # [len(argmax), VOCAB]
    return torch.nn.functional.one_hot(torch.tensor(argmax), VOCAB).float()


# A tree:      root
#            /   |   \
#         0:4  1:5   2:4 (a duplicate of node 0's token)
#          |     |  \
#         3:6  4:7  5:8
#                    |
#                   6:9
TREE = TreeDraft([4, 5, 4, 6, 7, 8, 9], [-1, -1, -1, 0, 1, 1, 5])

# (target argmax per row [root, node 0..6], accepted nodes, emitted tokens)
GREEDY_CASES = [
    pytest.param([4, 6, 0, 0, 1, 0, 0, 0], [0, 3], [4, 6, 1], id="first-branch-to-leaf-bonus"),
    pytest.param([5, 0, 8, 0, 0, 0, 9, 2], [1, 5, 6], [5, 8, 9, 2], id="deepest-path"),
    pytest.param([5, 0, 7, 0, 0, 3, 0, 0], [1, 4], [5, 7, 3], id="second-child-of-node-1"),
    pytest.param([5, 0, 2, 0, 0, 0, 0, 0], [1], [5, 2], id="no-child-matches"),
    pytest.param([3, 0, 0, 0, 0, 0, 0, 0], [], [3], id="rejected-at-the-root"),
    pytest.param([4, 0, 0, 0, 0, 0, 0, 0], [0], [4, 0], id="duplicate-token-takes-first"),
]


@pytest.mark.parametrize(("argmax", "nodes", "emitted"), GREEDY_CASES)
def test_greedy_table(argmax: list[int], nodes: list[int], emitted: list[int]) -> None:
    for by_argmax in (True, False):
        result = tree_rejection_sample(
            [TREE],
            [None if by_argmax else one_hot_rows(argmax)],
            [True],
            [None],
            [torch.tensor(argmax)] if by_argmax else None,
        )
        assert result.accepted_nodes == [nodes]
        assert result.output_token_ids == [emitted]
        assert result.num_accepted == [len(nodes)]
        assert result.num_draft_tokens == [7]


def test_sampling_on_one_hot_targets_equals_greedy() -> None:
    for case in GREEDY_CASES:
        argmax = case.values[0]
        assert isinstance(argmax, list)
        greedy = tree_rejection_sample([TREE], [one_hot_rows(argmax)], [True], [None])
        for seed in range(5):
            draft_probs = torch.softmax(torch.randn(7, VOCAB, generator=make_generator(seed)), -1)
            for probs in (None, draft_probs):
                tree = TreeDraft(TREE.token_ids, TREE.parents, probs)
                sampled = tree_rejection_sample(
                    [tree], [one_hot_rows(argmax)], [False], [make_generator(seed)]
                )
                assert sampled == greedy


def test_chains_match_the_chain_sampler_token_for_token() -> None:
    num_drafts = [3, 0, 2, 4, 1, 3, 4, 2]
    point_mass = [i % 2 == 0 for i in range(8)]
    for seed in range(4):
        draft, target = random_batch(seed, num_drafts, point_mass)
        seeds = [seed * 100 + i for i in range(8)]
        chain = rejection_sample(draft, target, [False] * 8, [make_generator(s) for s in seeds])
        trees = [
            TreeDraft.chain(
                draft.token_ids[i, :k].tolist(),
                None if point_mass[i] or draft.probs is None else draft.probs[i, :k],
            )
            for i, k in enumerate(num_drafts)
        ]
        rows = [target[i, : k + 1] for i, k in enumerate(num_drafts)]
        tree = tree_rejection_sample(trees, rows, [False] * 8, [make_generator(s) for s in seeds])
        assert tree.output_token_ids == chain.output_token_ids
        assert tree.num_accepted == chain.num_accepted


def test_seeded_and_draws_one_uniform_per_node_plus_one() -> None:
    target = torch.softmax(torch.randn(8, VOCAB, generator=make_generator(3)), -1)
    runs = []
    for _ in range(2):
        generator = make_generator(42)
        runs.append(tree_rejection_sample([TREE], [target], [False], [generator]))
        reference = make_generator(42)
        torch.rand(len(TREE) + 1, generator=reference, dtype=torch.float64)
        assert torch.equal(generator.get_state(), reference.get_state())
    assert runs[0] == runs[1]
    others = {
        tuple(tree_rejection_sample([TREE], [target], [False], [make_generator(s)])
              .output_token_ids[0])
        for s in range(30)
    }  # fmt: skip
    assert len(others) > 1


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError):
        TreeDraft([1, 2], [-1, 1])  # a node cannot be its own parent
    with pytest.raises(ValueError):
        tree_rejection_sample([TREE], [torch.rand(3, VOCAB)], [False], [make_generator(0)])
    with pytest.raises(ValueError):
        tree_rejection_sample([TREE], [torch.rand(8, VOCAB)], [False], [None])


# --------------------------------------------------------------------------
# Losslessness in distribution, on the toy Markov models of the chain tests.
# Each tree has two children of the root, one child under the first and two
# under the second; target rows are the target chain at each node's token.
# --------------------------------------------------------------------------

PARENTS = [-1, -1, 0, 1, 1]
TreeBuilder = Callable[[ToyModels, torch.Tensor, torch.Generator], list[TreeDraft]]


def point_mass_trees(
    models: ToyModels, contexts: torch.Tensor, gen: torch.Generator
) -> list[TreeDraft]:
    """Deterministic guesses, plus random tokens (duplicates and tokens the
    target filters out included), one tree per context."""
    n = contexts.shape[0]
    first = models.guess[contexts]
    second, last = torch.randint(SMALL_VOCAB, (2, n), generator=gen)
    columns = [first, second, models.guess[first], models.guess[second], last]
    return [TreeDraft(tokens, PARENTS) for tokens in torch.stack(columns, 1).tolist()]


def sampled_trees(without_replacement: bool) -> TreeBuilder:
    """Siblings drawn from the draft model, i.i.d. (SpecInfer) or without
    replacement (each sibling's q excludes the earlier ones)."""

    def build(models: ToyModels, contexts: torch.Tensor, gen: torch.Generator) -> list[TreeDraft]:
        tokens: list[torch.Tensor] = []  # per node: [n] int64
        probs: list[torch.Tensor] = []  # per node: [n, vocab]
        for node, parent in enumerate(PARENTS):
            q = models.draft[contexts if parent < 0 else tokens[parent]].clone()
            if without_replacement:
                for sibling in range(node):
                    if PARENTS[sibling] == parent:
                        q.scatter_(1, tokens[sibling].unsqueeze(1), 0.0)
                q = q / q.sum(-1, keepdim=True)
            tokens.append(sample_rows(q, gen))
            probs.append(q)
        stacked, stacked_probs = torch.stack(tokens, 1).tolist(), torch.stack(probs, 1)
        return [TreeDraft(t, PARENTS, stacked_probs[i]) for i, t in enumerate(stacked)]

    return build


def emit(
    models: ToyModels, build: TreeBuilder, contexts: torch.Tensor, gen: torch.Generator
) -> list[list[int]]:
    """One tree round per context: the emitted tokens of each."""
    emitted = []
    for context, tree in zip(contexts.tolist(), build(models, contexts, gen), strict=True):
        rows = models.target[torch.tensor([context, *tree.token_ids])]
        uniforms = torch.rand(len(tree) + 1, generator=gen, dtype=torch.float64)
        path = verify_tree_with_uniforms(tree, rows, uniforms)
        emitted.append([*(tree.token_ids[i] for i in path.accepted_nodes), path.final_token_id])
    return emitted


BUILDERS = {
    "point_mass": point_mass_trees,
    "iid": sampled_trees(without_replacement=False),
    "without_replacement": sampled_trees(without_replacement=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_tree_speculation_follows_the_target(builder: str) -> None:
    models = toy_models(SamplingParams(temperature=0.8, top_k=7, top_p=0.9))
    gen = make_generator(11)
    n = 20_000
    outputs = emit(models, BUILDERS[builder], torch.full((n,), START), gen)
    short = [i for i, out in enumerate(outputs) if len(out) == 1]
    # Requests that emitted one token continue with a fresh round from it.
    again = emit(models, BUILDERS[builder], torch.tensor([outputs[i][0] for i in short]), gen)
    for i, more in zip(short, again, strict=True):
        outputs[i].append(more[0])
    first = torch.tensor([out[0] for out in outputs])
    second = torch.tensor([out[1] for out in outputs])
    first_counts = torch.bincount(first, minlength=SMALL_VOCAB)
    joint_counts = torch.bincount(first * SMALL_VOCAB + second, minlength=SMALL_VOCAB**2)
    first_target = models.target[START]
    joint_target = first_target.unsqueeze(1) * models.target

    assert 0.05 < len(short) / n < 0.95  # trees are partly accepted, partly not
    assert (joint_counts[joint_target.flatten() == 0] == 0).all()
    assert total_variation(first_counts, first_target) < 0.015
    assert total_variation(joint_counts, joint_target.flatten()) < 0.03
    assert chi_square_p_value(first_counts, first_target) > 1e-3
    assert chi_square_p_value(joint_counts, joint_target) > 1e-3


def test_a_second_sibling_is_a_second_chance() -> None:
    # The tree's path through nodes 0 and 2 is the chain; with the chain's
    # uniforms at those nodes, the tree accepts at least as much, and more
    # whenever node 0 fails and node 1 passes.
    models = toy_models(SamplingParams(temperature=0.8, top_k=7, top_p=0.9))
    gen = make_generator(4)
    trees = sampled_trees(without_replacement=True)(models, torch.full((1000,), START), gen)
    gains = []
    for tree in trees:
        rows = models.target[torch.tensor([START, *tree.token_ids])]
        uniforms = torch.rand(len(tree) + 1, generator=gen, dtype=torch.float64)
        assert tree.draft_probs is not None
        chain = TreeDraft.chain([tree.token_ids[0], tree.token_ids[2]], tree.draft_probs[[0, 2]])
        on_chain = verify_tree_with_uniforms(chain, rows[[0, 1, 3]], uniforms[[0, 2, 5]])
        on_tree = verify_tree_with_uniforms(tree, rows, uniforms)
        gains.append(len(on_tree.accepted_nodes) - len(on_chain.accepted_nodes))
    assert min(gains) >= 0
    assert sum(gains) > 20
