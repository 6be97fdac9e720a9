"""Grouped-query attention of a padded batch against its KV cache.

On CPU, where the compiled kernel runs (``csrc/row_attention.cpp``, built
with the block kernel), attention is computed one query row at a time over
exactly the keys that row's mask lets it see, in one fixed order of
operations. A row's output then depends on its query and its visible keys
and values alone: a k-token verify's rows equal k one-token decodes bit for
bit, whatever the padded context length, batch or token tree around them.
Batched matmuls and softmax reduce over the padded context in blockings
that move with its length, so the same row could round differently in a
verify than in a decode, and greedy speculation could part from target-only
decoding at a near-tie (it did, after a prefix-cache hit changed how the
prompt was split between forwards). The kernel stores no scores, so long
prefills take it too. It has no backward: training keeps torch's path. The
layers call it packed (:func:`attend_packed`): each sequence's keys are read
in its own cache slot, with no gather, and its queries are not padded.

Without the kernel (no compiler, ``SPECRAY_BLOCK_KERNEL=off``, head sizes it
does not take): ``F.scaled_dot_product_attention`` picks its flash kernel,
which pays a large fixed cost per (sequence, head) when each sequence has
only a few queries (1.2-1.7 ms per layer for 8 one-token decodes at 200
positions of context on this 2-core machine, against 0.18 ms for the plain
grouped matmuls below; Qwen2.5-0.5B shapes). The grouped path computes
scores and softmax in float32, as the flash kernel accumulates, so bf16
outputs match it to bf16 rounding. It materialises the scores, so long
prefills (and every GPU) keep the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specray.actors.parallel.block_kernel import inference_kernel, named_for_profiler

# Float32 score elements (batch x heads x queries x keys) up to which the
# grouped matmul path runs: 16 M is 64 MiB of scores.
GROUPED_SCORE_BUDGET = 1 << 24
# What torch's profiler calls one row-kernel attention (bench/decode_profile.py).
PROFILER_NAME = "specray::row_attention"


def attend(
    query: torch.Tensor,  # [batch, heads, max_new, head_dim]
    keys: torch.Tensor,  # [batch, kv_heads, context_len, head_dim]
    values: torch.Tensor,  # [batch, kv_heads, context_len, head_dim]
    mask: torch.Tensor,  # [batch, 1, max_new, context_len] bool: query may see key
    scale: float,
) -> torch.Tensor:  # [batch, heads, max_new, head_dim], query's dtype
    batch, heads, new, head_dim = query.shape
    kv_heads, context = keys.shape[1], keys.shape[2]
    if query.device.type == "cpu":
        packed = query.transpose(1, 2).reshape(batch * new, heads, head_dim)
        every = torch.arange(batch * new)
        out = attend_packed(packed, every, keys, values, every[:batch], mask, scale)
        if out is not None:
            return out.view(batch, new, heads, head_dim).transpose(1, 2)
    if query.device.type != "cpu" or batch * heads * new * context > GROUPED_SCORE_BUDGET:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    group = heads // kv_heads  # query head h reads kv head h // group
    grouped = query.float().reshape(batch, kv_heads, group * new, head_dim)
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2)).mul_(scale)
    bias = mask_bias(mask)
    scores = scores.view(batch, kv_heads, group, new, context).add_(
        bias.view(batch, 1, 1, new, context)
    )
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * new, context)
    out = torch.matmul(probs, values.float())
    return out.view(batch, heads, new, head_dim).to(query.dtype)


def attend_packed(
    query: torch.Tensor,  # [tokens, heads, head_dim]: packed, as the layers make them
    query_rows: torch.Tensor,  # [tokens] int64: each query's row b * max_new + i of the mask
    keys: torch.Tensor,  # [blocks, kv_heads, length, head_dim]: e.g. a KV cache layer
    values: torch.Tensor,  # as keys
    kv_blocks: torch.Tensor,  # [batch] int64: the block of keys sequence b reads
    mask: torch.Tensor,  # [batch, 1, max_new, context_len] bool: query may see key
    scale: float,
) -> torch.Tensor | None:  # [tokens, heads, head_dim]; None: the row kernel cannot here
    """Attention on the row kernel with the keys read where they lie: a
    sequence's keys are not gathered out of the cache first, nor its queries
    padded. None where the kernel does not run (no kernel, autograd, a
    layout it refuses): then :func:`attend` on the padded batch."""
    kernel = inference_kernel(query, keys, values)  # training keeps torch's path
    if kernel is None or keys.dtype != values.dtype:
        return None
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        return None
    if keys.stride(-2) != keys.shape[-1] or values.stride(-2) != values.shape[-1]:
        return None
    batch, _, new, context = mask.shape
    if context > keys.shape[2] or kv_blocks.shape[0] != batch:
        raise ValueError(
            f"attention over {context} positions of {batch} sequences, but the keys "
            f"hold {keys.shape[2]} positions of {kv_blocks.shape[0]}"
        )
    visible = mask.reshape(batch, new, context).contiguous()
    rows = query.contiguous()
    return named_for_profiler(
        PROFILER_NAME,
        lambda: kernel.row_attention(rows, query_rows, keys, values, kv_blocks, visible, scale),
    )


def mask_bias(
    mask: torch.Tensor,  # [batch, 1, max_new, context_len] bool: query may see key
) -> torch.Tensor:  # as mask, float32: 0 where visible, -inf elsewhere
    """The mask as the additive float32 bias :func:`attend` adds to scores.

    Every row keeps at least one visible key (padding queries repeat the
    last real position), so no row of scores is all -inf."""
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))
