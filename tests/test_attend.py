"""CPU attention against torch's fused kernel: row by row on the compiled
kernel (csrc/row_attention.cpp) where it runs, else the grouped matmuls;
a row's output independent of the rows and context around it; and the
packed / padded layouts of a forward batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specray.actors.model import attend as attend_module
from specray.actors.model.attend import attend, attend_packed
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.parallel.block_kernel import SWITCH, block_kernel_reason

needs_row_kernel = pytest.mark.skipif(
    block_kernel_reason() is not None, reason=f"row kernel: {block_kernel_reason()}"
)


@pytest.fixture(params=["row kernel", "grouped matmuls"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both CPU paths: the row kernel (where it builds) and torch's matmuls."""
    if request.param == "row kernel" and block_kernel_reason() is not None:
        pytest.skip(f"row kernel: {block_kernel_reason()}")
    if request.param == "grouped matmuls":
        monkeypatch.setenv(SWITCH, "off")
    return str(request.param)


def _case(
    dtype: torch.dtype, window: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixed batch (a prefill, a decode, a verify of 4) over a cache with
    garbage past each sequence's length."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [SequenceInput(0, [1] * 9, 0, 1), SequenceInput(1, [2], 20, 1)]
    seqs.append(SequenceInput(2, [3, 4, 5, 6], 12, 4))
    batch = ForwardBatch.build(seqs)
    heads, kv_heads, head_dim = 6, 2, 16
    query = torch.randn(3, heads, batch.token_ids.shape[1], head_dim, generator=gen)
    keys = torch.randn(3, kv_heads, batch.context_len, head_dim, generator=gen)
    values = torch.randn(3, kv_heads, batch.context_len, head_dim, generator=gen)
    cast = [t.to(dtype) for t in (query, keys, values)]
    return cast[0], cast[1], cast[2], batch.attention_mask(window)


@pytest.mark.parametrize("window", [None, 5])
def test_cpu_paths_equal_the_fused_kernel_in_float32(window: int | None, cpu_path: str) -> None:
    query, keys, values, mask = _case(torch.float32, window)
    want = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=0.25, enable_gqa=True
    )
    got = attend(query, keys, values, mask, 0.25)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_cpu_paths_in_bfloat16_are_as_close_to_float32_as_the_fused_kernel(cpu_path: str) -> None:
    query, keys, values, mask = _case(torch.bfloat16, None, seed=1)
    exact = F.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=True
    )
    fused = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    got = attend(query, keys, values, mask, query.shape[-1] ** -0.5)
    assert got.dtype == torch.bfloat16
    fused_error = (fused.float() - exact).abs().max().item()
    assert (got.float() - exact).abs().max().item() <= fused_error * 1.01 + 1e-3


def test_over_the_score_budget_the_fused_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWITCH, "off")  # the row kernel has no budget: it stores no scores
    query, keys, values, mask = _case(torch.float32, None)
    calls = []
    fused = F.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return fused(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(attend_module.F, "scaled_dot_product_attention", spy)
    small = attend(query, keys, values, mask, 0.25)
    assert calls == []
    monkeypatch.setattr(attend_module, "GROUPED_SCORE_BUDGET", 0)
    big = attend(query, keys, values, mask, 0.25)
    assert calls == [1]
    torch.testing.assert_close(small, big, atol=1e-6, rtol=1e-5)


def test_pad_and_unpad_round_trip_the_real_tokens() -> None:
    seqs = [SequenceInput(4, [7, 8, 9], 0, 1), SequenceInput(1, [5], 3, 1)]
    batch = ForwardBatch.build(seqs)
    assert batch.packed_token_ids.tolist() == [7, 8, 9, 5]
    assert batch.packed_logit_index.tolist() == [2, 3]
    packed = torch.arange(4 * 2, dtype=torch.float32).view(4, 2)
    padded = batch.pad(packed)
    assert padded.shape == (2, 3, 2)
    assert padded[1, 1:].abs().sum() == 0  # padding rows are zeros
    assert torch.equal(batch.unpad(padded), packed)
    dense = ForwardBatch.build([SequenceInput(0, [1, 2], 0, 2), SequenceInput(1, [3, 4], 0, 1)])
    assert dense.is_dense and not batch.is_dense
    assert dense.packed_logit_index.tolist() == [0, 1, 3]


@needs_row_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_rows_or_context_around_it(dtype: torch.dtype) -> None:
    """A 5-token verify's rows equal five one-token decodes bit for bit,
    however long the padded context after them, and a token tree's rows
    equal each node's own path decoded as a chain."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, start = 8, 2, 64, 300
    cache_k = torch.randn(1, kv_heads, 512, head_dim, generator=gen).to(dtype)
    cache_v = torch.randn(1, kv_heads, 512, head_dim, generator=gen).to(dtype)
    query = torch.randn(1, heads, 5, head_dim, generator=gen).to(dtype)

    def run(rows: slice, context: int, visible: torch.Tensor) -> torch.Tensor:
        mask = visible[None, None, :, :context]
        keys, values = cache_k[:, :, :context], cache_v[:, :, :context]
        return attend(query[:, :, rows], keys, values, mask, 0.125)

    positions = torch.arange(512)
    causal = positions[None, :] <= (start + torch.arange(5))[:, None]  # [5, 512]
    verify = run(slice(0, 5), start + 5, causal)
    padded = run(slice(0, 5), 512, causal)
    assert torch.equal(verify, padded)
    for i in range(5):
        decode = run(slice(i, i + 1), start + i + 1, causal[i : i + 1])
        assert torch.equal(decode[:, :, 0], verify[:, :, i]), f"row {i}"
    # A tree: nodes 1 and 2 are siblings under node 0; node 3 is node 2's child.
    tree = positions[None, :] < start
    tree = tree.repeat(4, 1)
    for node, path in enumerate([[0], [0, 1], [0, 2], [0, 2, 3]]):
        for p in path:
            tree[node, start + p] = True
    nodes = run(slice(0, 4), start + 4, tree)
    chain = torch.zeros(512, dtype=torch.bool)
    chain[: start + 1] = True
    chain[start + 2] = True  # node 2 seen where it sits in the tree
    alone = run(slice(2, 3), start + 4, chain[None])
    assert torch.equal(nodes[:, :, 2], alone[:, :, 0])


@needs_row_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_a_tree_node_equals_its_path_moved_into_place(dtype: torch.dtype, seed: int) -> None:
    """A node whose ancestors lie apart in the cache (siblings between them)
    attends exactly as the same token does once the accepted path is copied
    into consecutive places, which is how the target keeps it: greedy
    speculation with trees then commits what one-token decodes would."""
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, start = 8, 2, 64, 301
    cache_k = torch.randn(1, kv_heads, 512, head_dim, generator=gen).to(dtype)
    cache_v = torch.randn(1, kv_heads, 512, head_dim, generator=gen).to(dtype)
    # The tree fed after the prefix: node i at start + i, parents below.
    parents = [-1, 0, 0, 2, 2, 4]
    path = [0, 2, 4, 5]  # the last node's ancestors and itself
    query = torch.randn(1, heads, 1, head_dim, generator=gen).to(dtype)
    positions = torch.arange(512)
    in_tree = positions < start
    in_tree[[start + node for node in path]] = True
    assert parents[5] == 4 and parents[4] == 2 and parents[2] == 0
    context = start + len(parents)
    node = attend(
        query,
        cache_k[:, :, :context],
        cache_v[:, :, :context],
        in_tree[None, None, None, :context],
        0.125,
    )
    moved_k, moved_v = cache_k.clone(), cache_v.clone()
    for place, source in enumerate(path):
        moved_k[:, :, start + place] = cache_k[:, :, start + source]
        moved_v[:, :, start + place] = cache_v[:, :, start + source]
    length = start + len(path)
    causal = (positions < length)[None, None, None, :length]
    decoded = attend(query, moved_k[:, :, :length], moved_v[:, :, :length], causal, 0.125)
    assert torch.equal(node, decoded)


def test_head_dims_the_row_kernel_refuses_keep_the_grouped_path() -> None:
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(1, 4, 3, 12, generator=gen)  # head_dim 12: not a multiple of 16
    keys = torch.randn(1, 2, 10, 12, generator=gen)
    values = torch.randn(1, 2, 10, 12, generator=gen)
    mask = torch.ones(1, 1, 3, 10, dtype=torch.bool)
    want = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    got = attend(query, keys, values, mask, 12**-0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@needs_row_kernel
@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (6, 2), (7, 1), (16, 2), (16, 1)])
def test_every_group_size_matches_the_fused_kernel(heads: int, kv_heads: int) -> None:
    """Query heads per KV head from 1 to 16: the row kernel's score passes
    take up to 4 heads and its value passes up to 8 at a time."""
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(2, heads, 3, 32, generator=gen)
    keys = torch.randn(2, kv_heads, 21, 32, generator=gen)  # 21: a partial last block of 8
    values = torch.randn(2, kv_heads, 21, 32, generator=gen)
    mask = torch.rand(2, 1, 3, 21, generator=gen) < 0.7
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=0.2, enable_gqa=True
    )
    torch.testing.assert_close(attend(query, keys, values, mask, 0.2), want, atol=1e-6, rtol=1e-5)


@needs_row_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_queries_read_the_cache_where_it_lies(dtype: torch.dtype) -> None:
    """Packed queries against a whole cache layer, each sequence reading its
    own slot: the same bits as the padded call on keys gathered out first."""
    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, head_dim, length = 6, 2, 32, 27
    cache_k = torch.randn(4, kv_heads, length, head_dim, generator=gen).to(dtype)
    cache_v = torch.randn(4, kv_heads, length, head_dim, generator=gen).to(dtype)
    # Slots 3 and 1, not in order; a prefill of 5 beside a decode at the
    # cache's last position (context 27 = length: no room past it).
    batch = ForwardBatch.build([SequenceInput(3, [1] * 5, 0, 1), SequenceInput(1, [2], 26, 1)])
    packed = torch.randn(6, heads, head_dim, generator=gen).to(dtype)
    mask = batch.attention_mask(None)
    slots = torch.tensor(batch.slots)
    got = attend_packed(packed, batch.flat_index, cache_k, cache_v, slots, mask, 0.3)
    assert got is not None
    keys = cache_k.index_select(0, slots)[:, :, : batch.context_len]
    values = cache_v.index_select(0, slots)[:, :, : batch.context_len]
    padded = attend(batch.pad(packed).transpose(1, 2), keys, values, mask, 0.3)
    assert torch.equal(got, batch.unpad(padded.transpose(1, 2)))
    with pytest.raises(ValueError, match="27 positions"):
        attend_packed(packed, batch.flat_index, cache_k[:, :, :20], cache_v, slots, mask, 0.3)
